"""The single edit worker (on the leader): applies queued edits strictly in seq order and
performs retractions.

Training runs on a private copy of the memory; the new state is published with one reference
swap and only then recorded as applied, together with its delta in the memory log, so a reader
that sees `applied` also sees the edit here, a follower finds its delta, and no reader ever sees
half of one. The record is retried until the database answers, and no other edit is claimed
before it is written: the order of the log is the order of the memory. Retractions rebuild the
memory from the newest checkpoint before the retracted edit, retraining the later applied edits,
publish the result in one swap and record it whole in the memory log. An edit that asks an applied
edit's question again supersedes it (memoir_core MemoirConfig.supersede): the edit log records
superseded_by with the edit, and a retraction sets it again from the rebuilt memory. Every record
is fenced: a worker whose process no longer leads stops the process (runtime.fenced).
"""

from __future__ import annotations

from datetime import timedelta
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

import torch

from memoir_core import EditInputError
from memoir_core.deltas import edit_delta, state_bytes
from memoir_core.engine import MemoryState
from memoir_core.state import weights_sha256

from ..db.models import Edit
from ..db.retry import GaveUp, retry_database
from ..db.session import is_unavailable
from .edit_log import trained_frames
from .leadership import Fenced
from .memory_log import Change

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
                if not self.runtime.leadership.still_held():
                    raise Fenced("the leader lock's connection is gone")
                worked = self.step()
                if worked:
                    self.runtime.edit_status.notify()
            except Fenced as error:
                self.runtime.fenced(str(error))
                return
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

    def _record(self, call, what: str):
        """Write an outcome to the log, waiting out a database outage (or anything else: the worker
        would rather stall than go on past an unrecorded outcome). Nothing else runs meanwhile, so
        the log never falls behind the memory by more than the one edit in hand."""
        return retry_database(call, what, stopping=self._stopping, any_error=True)

    def _settle(self, seq: int, position: int | None) -> None:
        """The outcome of `seq` is recorded at `position` (None: by an earlier try whose answer was
        lost; this process is the only writer, so the log's last position is it)."""
        if position is None:
            position = self._record(self.runtime.memory_log.last_position, "memory log position")
        self.runtime.settle(seq, position)

    def _train(self, edit: Edit, base: MemoryState):
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
                    base=base,
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
        base = runtime.engine.state
        self.busy_with = edit.seq
        try:
            trained = self._train(edit, base)
        finally:
            self.busy_with = None
        if isinstance(trained, str):
            unchanged = Change("failed", base.snapshot.applied, weights_sha256(base))
            position = self._record(
                lambda: runtime.edit_log.mark_failed(edit.seq, trained, unchanged), f"edit {edit.seq} failed"
            )
            self._settle(edit.seq, position)
            return
        result, state = trained
        state = runtime.engine.with_threshold(state)  # the delta carries the tau it is served with
        delta = Change("edit", state.snapshot.applied, weights_sha256(state), edit_delta(base, state))
        runtime.seq_by_key[edit.id] = edit.seq
        # Publish, then record: whoever reads `applied` finds the edit in the memory. Should the
        # process die in between, the edit is still `running`: the restart (or the next leader)
        # rebuilds the memory before it, requeues it and trains it again in the same place, and
        # training is deterministic, so the rebuilt memory is the one that was served.
        runtime.publish(state)
        runtime.settle(edit.seq)
        change = self._record(lambda: runtime.memory_log.stage(delta), f"edit {edit.seq}'s delta to the blob store")
        position = self._record(
            lambda: runtime.edit_log.mark_applied(
                edit.seq,
                result.loss,
                result.iterations,
                result.mask_fingerprint,
                result.seconds,
                change,
                result.supersedes,
            ),
            f"edit {edit.seq} applied",
        )
        self._settle(edit.seq, position)
        runtime.metrics.edit_seconds.observe(result.seconds)
        # a checkpoint the disk refused is tried again at the next edit, not N edits later
        if state.snapshot.applied % runtime.settings.checkpoint_every == 0 or runtime.checkpoints.failing:
            self._checkpoint(state, edit.seq)
        self._compact_if_due(state, edit.seq)

    def _compact_if_due(self, state: MemoryState, seq: int) -> None:
        """A whole state in the log once enough edits or delta bytes followed the last one, so that
        a new replica applies at most that many deltas; then the payloads behind it are pruned."""
        runtime, settings = self.runtime, self.runtime.settings
        edits, size = self._record(runtime.memory_log.since_newest_state, "deltas since the newest whole state")
        if edits < settings.compact_every_edits and size < settings.compact_every_bytes:
            return
        started = time.perf_counter()
        whole = Change("state", state.snapshot.applied, weights_sha256(state), state_bytes(runtime.engine, state))
        staged = self._record(lambda: runtime.memory_log.stage(whole), "a whole state to the blob store")
        self._settle(seq, self._record(lambda: runtime.edit_log.record_state(staged), "a whole state"))
        try:
            pruned = runtime.memory_log.prune(timedelta(seconds=settings.log_retention_s))
        except Exception as error:  # only space: the next compaction prunes what this one could not
            log.warning("memory-log payloads not pruned (%s): %s", type(error).__name__, str(error).splitlines()[0])
        else:
            log.info("compacted the memory log after %d edits (%d bytes of deltas); pruned %d payloads", edits, size, pruned)
        runtime.metrics.compaction_seconds.observe(time.perf_counter() - started)

    def _retract(self, edit: Edit) -> None:
        runtime = self.runtime
        self.busy_with = edit.seq
        try:
            state, retrained = replay(runtime, exclude_seq=edit.seq)
        finally:
            self.busy_with = None
        # As for applying: publish, then record. A crash in between leaves the edit applied with
        # its retraction requested, so the restart rebuilds with it and retracts it again.
        state = runtime.engine.with_threshold(state)
        rebuilt = Change("state", state.snapshot.applied, weights_sha256(state), state_bytes(runtime.engine, state))
        runtime.publish(state)
        whole = self._record(lambda: runtime.memory_log.stage(rebuilt), f"edit {edit.seq}'s retraction to the blob store")
        # the rebuild decided supersession again from the remaining edits: an edit only the
        # retracted one superseded fires again, and the log says so in the same transaction
        superseded = dict(state.snapshot.index.superseded)
        position = self._record(
            lambda: runtime.edit_log.mark_retracted(edit.seq, whole, superseded), f"edit {edit.seq} retracted"
        )
        self._settle(edit.seq, position)
        self._record(lambda: runtime.checkpoints.invalidate_from(edit.seq), f"checkpoints from seq {edit.seq}")
        log.info("retracted edit %s (seq %d), retrained %d later edits", edit.id, edit.seq, retrained)
        last = runtime.last_seq(state)
        if last is not None:  # so that a restart need not replay what the retraction just did
            self._checkpoint(state, last)

    def _checkpoint(self, state: MemoryState, seq: int) -> None:
        """A checkpoint only shortens the next start-up: without the database it is skipped, and
        a disk that refuses its file is reported by the store (which returns None), not raised."""
        try:
            self.runtime.checkpoints.write(self.runtime.engine, state, seq, self.runtime.position.position)
        except Exception as error:
            if not is_unavailable(error):
                raise
            log.warning("checkpoint at seq %d skipped, the database is unreachable", seq)
