"""The single edit worker: applies queued edits strictly in seq order and performs retractions.

Training runs on a private copy of the memory; the new state is published with one reference
swap and only then recorded as applied, so a reader that sees `applied` also sees the edit, and no
reader ever sees half of one. The record is retried until the database answers, and no other edit
is claimed before it is written: the order of the log is the order of the memory. Retractions
rebuild the memory from the newest checkpoint before the retracted edit, replaying the later
applied edits, and publish the result in one swap.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable

import torch

from memoir_core import EditInputError
from memoir_core.engine import MemoryState

from ..db.models import Edit
from ..db.retry import GaveUp, retry_database
from ..db.session import is_unavailable
from .edit_log import trained_frames

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger(__name__)


def replay(
    runtime: "Runtime",
    exclude_seq: int | None = None,
    adopt_hasher: bool = False,
    progress: Callable[[int, int], None] = lambda done, needed: None,
) -> tuple[MemoryState, int]:
    """The memory of all applied edits (minus `exclude_seq`): newest usable checkpoint + replay.

    Returns the state and how many edits had to be retrained; `progress(done, needed)` is called
    before the first and after each retrained edit.
    """
    engine, store = runtime.engine, runtime.checkpoints
    applied = [e for e in runtime.edit_log.applied() if e.seq != exclude_seq]
    found = store.newest_usable(engine, applied, before_seq=exclude_seq)
    if found is not None:
        checkpoint, state, hasher, metadata = found
        if adopt_hasher:
            engine.adopt_hasher(hasher, metadata["context_templates"])
        start_after = checkpoint.seq
    else:
        state, start_after = engine.empty_state(), 0
    needed = sum(edit.seq > start_after for edit in applied)
    retrained = 0
    for edit in applied:
        if edit.seq > start_after:
            progress(retrained, needed)
            _, state = engine.train(
                trained_frames(edit),
                edit.target,
                key=edit.id,
                append_eos=edit.append_eos,
                base=state,
            )
            retrained += 1
    progress(retrained, needed)
    return state, retrained


class EditWorker(threading.Thread):
    def __init__(self, runtime: "Runtime"):
        super().__init__(name="memoir-edit-worker", daemon=True)
        self.runtime = runtime
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.busy_with: int | None = None  # seq being applied or retracted

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Finish the current job, then stop."""
        self._stopping.set()
        self._wake.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = self.step()
                if worked:
                    self.runtime.edit_status.notify()
            except Exception as error:  # a broken database or disk must not kill the worker for good
                if is_unavailable(error) or isinstance(error, GaveUp):
                    log.warning("edit worker waits for the database: %s", str(error).splitlines()[0])
                else:
                    log.exception("edit worker step failed; retrying in 1 s")
                worked = False
                self._stopping.wait(1.0)
            if not worked:
                self._wake.wait(0.5)
                self._wake.clear()

    def step(self) -> bool:
        edit_log = self.runtime.edit_log
        pending = edit_log.next_retraction()
        if pending is not None:
            self._retract(pending)
            return True
        edit = edit_log.claim_next()
        if edit is not None:
            self._apply(edit)
            return True
        return False

    def _record(self, call, what: str) -> None:
        """Write an outcome to the log, waiting out a database outage (or anything else: the worker
        would rather stall than go on past an unrecorded outcome). Nothing else runs meanwhile, so
        the log never falls behind the memory by more than the one edit in hand."""
        retry_database(call, what, stopping=self._stopping, any_error=True)

    def _train(self, edit: Edit):
        """(result, state), or the reason the edit failed. A transient failure (CUDA out of memory,
        say) is tried again up to MEMOIR_EDIT_MAX_ATTEMPTS times; bad input fails at once."""
        runtime, attempts = self.runtime, self.runtime.settings.edit_max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return runtime.engine.train(
                    trained_frames(edit),
                    edit.target,
                    key=edit.id,
                    append_eos=edit.append_eos,
                )
            except EditInputError as error:
                return str(error)
            except Exception as error:  # the memory is untouched: training works on a copy
                log.exception("edit %s: attempt %d of %d failed", edit.id, attempt, attempts)
                reason = f"{type(error).__name__}: {error} (after {attempt} attempts)"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._stopping.wait(min(2.0**attempt, 30.0))
        return reason

    def _apply(self, edit: Edit) -> None:
        runtime = self.runtime
        self.busy_with = edit.seq
        try:
            trained = self._train(edit)
        finally:
            self.busy_with = None
        if isinstance(trained, str):
            self._record(lambda: runtime.edit_log.mark_failed(edit.seq, trained), f"edit {edit.seq} failed")
            return
        result, state = trained
        runtime.seq_by_key[edit.id] = edit.seq
        # Publish, then record: whoever reads `applied` finds the edit in the memory. Should the
        # process die in between, the edit is still `running`: the restart rebuilds the memory
        # before it, requeues it and trains it again in the same place, and training is
        # deterministic, so the rebuilt memory is the one that was served.
        runtime.publish(state)
        self._record(
            lambda: runtime.edit_log.mark_applied(
                edit.seq, result.loss, result.iterations, result.mask_fingerprint, result.seconds
            ),
            f"edit {edit.seq} applied",
        )
        runtime.metrics.edit_seconds.observe(result.seconds)
        if state.snapshot.applied % runtime.settings.checkpoint_every == 0:
            self._checkpoint(state, edit.seq)

    def _retract(self, edit: Edit) -> None:
        runtime = self.runtime
        self.busy_with = edit.seq
        try:
            state, retrained = replay(runtime, exclude_seq=edit.seq)
        finally:
            self.busy_with = None
        # As for applying: publish, then record. A crash in between leaves the edit applied with
        # its retraction requested, so the restart rebuilds with it and retracts it again.
        runtime.publish(state)
        self._record(lambda: runtime.edit_log.mark_retracted(edit.seq), f"edit {edit.seq} retracted")
        self._record(lambda: runtime.checkpoints.invalidate_from(edit.seq), f"checkpoints from seq {edit.seq}")
        log.info("retracted edit %s (seq %d), retrained %d later edits", edit.id, edit.seq, retrained)
        last = runtime.last_seq(state)
        if last is not None:  # so that a restart need not replay what the retraction just did
            self._checkpoint(state, last)

    def _checkpoint(self, state: MemoryState, seq: int) -> None:
        """A checkpoint only shortens the next start-up: without the database it is skipped."""
        try:
            self.runtime.checkpoints.write(self.runtime.engine, state, seq)
        except Exception as error:
            if not is_unavailable(error):
                raise
            log.warning("checkpoint at seq %d skipped, the database is unreachable", seq)
