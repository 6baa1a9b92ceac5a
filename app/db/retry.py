"""Retrying database calls through an outage, with capped exponential backoff."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

from .session import is_unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_WAIT_S = 0.2
LONGEST_WAIT_S = 5.0


class GaveUp(RuntimeError):
    """The database stayed unreachable past the deadline (or the caller is stopping)."""


def retry_database(
    call: Callable[[], T],
    what: str,
    deadline_s: float | None = None,
    stopping: threading.Event | None = None,
    any_error: bool = False,
) -> T:
    """`call()` until the database answers; other errors pass through at once (any_error: those
    are retried too, for a write that must happen before anything else may). An error whose
    `retryable` is False (a fenced leader) is never retried.

    deadline_s: give up after this long (None: never); stopping: give up once it is set.
    """
    started, wait, attempt = time.monotonic(), FIRST_WAIT_S, 0
    while True:
        try:
            return call()
        except Exception as error:
            if not (any_error or is_unavailable(error)) or getattr(error, "retryable", True) is False:
                raise
            attempt += 1
            waited = time.monotonic() - started
            if (deadline_s is not None and waited + wait > deadline_s) or (stopping is not None and stopping.is_set()):
                reason = f"the database is unreachable ({what}, {attempt} attempts in {waited:.0f} s): {error}"
                raise GaveUp(reason) from error
            if attempt == 1 or attempt % 10 == 0:
                log.warning("%s failed, retrying: %s", what, str(error).splitlines()[0])
            (stopping or threading.Event()).wait(wait)
            wait = min(wait * 2, LONGEST_WAIT_S)
