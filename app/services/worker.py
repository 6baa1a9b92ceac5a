"""The single edit worker: applies queued edits strictly in seq order and performs retractions.

Training runs on a private copy of the memory; the new state is published with one reference
swap and only then recorded as applied, so a reader that sees `applied` also sees the edit, and no
reader ever sees half of one. Retractions rebuild the memory from the newest checkpoint before the
retracted edit, replaying the later applied edits, and publish the result in one swap.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from memoir_core import EditInputError
from memoir_core.engine import MemoryState

from ..db.models import Edit
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
            except Exception:  # a broken database or disk must not kill the worker for good
                log.exception("edit worker step failed; retrying in 1 s")
                worked = False
                time.sleep(1.0)
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

    def _apply(self, edit: Edit) -> None:
        runtime = self.runtime
        self.busy_with = edit.seq
        try:
            result, state = runtime.engine.train(
                trained_frames(edit),
                edit.target,
                key=edit.id,
                append_eos=edit.append_eos,
            )
        except EditInputError as error:
            runtime.edit_log.mark_failed(edit.seq, str(error))
            return
        except Exception as error:  # the memory is untouched: training works on a copy
            log.exception("edit %s failed", edit.id)
            runtime.edit_log.mark_failed(edit.seq, f"{type(error).__name__}: {error}")
            return
        finally:
            self.busy_with = None
        runtime.seq_by_key[edit.id] = edit.seq
        runtime.publish(state)
        runtime.edit_log.mark_applied(edit.seq, result.loss, result.iterations, result.mask_fingerprint, result.seconds)
        runtime.metrics.edit_seconds.observe(result.seconds)
        if state.snapshot.applied % runtime.settings.checkpoint_every == 0:
            runtime.checkpoints.write(runtime.engine, state, edit.seq)

    def _retract(self, edit: Edit) -> None:
        runtime = self.runtime
        self.busy_with = edit.seq
        try:
            state, retrained = replay(runtime, exclude_seq=edit.seq)
        finally:
            self.busy_with = None
        runtime.publish(state)
        runtime.edit_log.mark_retracted(edit.seq)
        runtime.checkpoints.invalidate_from(edit.seq)
        log.info("retracted edit %s (seq %d), retrained %d later edits", edit.id, edit.seq, retrained)
        applied = runtime.edit_log.applied()
        if applied:  # so that a restart need not replay what the retraction just did
            runtime.checkpoints.write(runtime.engine, state, applied[-1].seq)
