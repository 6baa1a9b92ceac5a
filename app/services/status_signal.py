"""Wakes requests that wait for an edit's status to change (GET /edits/{id}?wait=S).

The edit worker (a thread) calls `notify()` after each job; waiting requests (coroutines in the
event loop) then read the edit again. They never poll the database faster than `recheck_s`, the
fallback for a change made elsewhere (a cancellation, another process on the same database).
"""

from __future__ import annotations

import asyncio
import threading


class StatusSignal:
    def __init__(self, recheck_s: float = 1.0):
        self.recheck_s = recheck_s
        self.version = 0  # read it before reading a status; wait() then misses no change after that read
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()

    async def wait(self, version: int, timeout: float) -> None:
        """Until a notify() after `version`, or min(timeout, recheck_s) has passed."""
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        with self._lock:
            if self.version != version:
                return
            self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter[1], min(timeout, self.recheck_s))
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    def notify(self) -> None:
        """Callable from any thread."""
        with self._lock:
            self.version += 1
            waiters, self._waiters = self._waiters, set()
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
