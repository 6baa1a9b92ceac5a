"""Reaching the leader's memory from the memory log, at start-up and while following.

`restore` builds the memory at the newest memory-log position: the newest usable checkpoint (a
file whose W_m hash equals the one the log recorded at its position) or the newest whole state in
the log, whichever is newer, then every later change in order. No edit is trained: a delta sets
exactly the bits the leader's training produced, and each batch ends with a hash check against
the log. The follower thread keeps doing that as the leader writes (LISTEN/NOTIFY, polling as a
fallback) and takes the lead when the leader's lock comes free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import logging
import threading
import time
from typing import TYPE_CHECKING

import psycopg

from memoir_core.deltas import DeltaMismatch, apply_delta, state_from_bytes
from memoir_core.engine import MemoryState
from memoir_core.state import StateMismatch, weights_sha256

from ..db.models import MemoryChange
from ..db.session import is_unavailable
from .blobs import BlobUnusable
from .memory_log import CHANNEL

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger(__name__)
PAGE = 64  # changes read per query while catching up


class Diverged(RuntimeError):
    """The memory reached from the log does not hash to what the leader recorded."""


class IncompatibleLog(RuntimeError):
    """The memory log was written for another base model, layer or state format: this process can
    only get to its memory by retraining the applied edits (`Runtime._rebuild`, as leader)."""


@dataclass
class Position:
    """Where a memory stands in the memory log."""

    position: int
    settled_seq: int  # every edit with seq <= this has its outcome in the memory
    last_change_at: float | None = None  # created_at (epoch s) of the last change applied


def with_saved_threshold(engine, state: MemoryState, metadata: dict) -> MemoryState:
    """A stored state keeps the tau it was served with when tau is calibrated per memory."""
    if engine.config.calibrate_threshold and metadata.get("threshold_calibrated"):
        return replace(state, threshold=metadata["threshold"])
    return state


def restore(runtime: "Runtime") -> tuple[MemoryState, Position] | None:
    """The memory at the newest log position, or None when the log is empty."""
    memory_log = runtime.memory_log
    last = memory_log.last_position()
    if last == 0:
        return None
    start = _newest_start(runtime)
    if start is None:
        raise Diverged("the memory log holds no whole state to start from")
    return catch_up(runtime, *start, private=True)


def _newest_start(runtime: "Runtime") -> tuple[MemoryState, Position] | None:
    engine = runtime.engine
    entry = runtime.memory_log.newest_state()
    # the leader (the only writer) marks an unusable checkpoint invalid, so it is not tried again
    found = runtime.checkpoints.newest_at_position(
        engine, after=entry.position if entry else 0, reject=runtime.leadership.leading
    )
    if found is not None:
        checkpoint, state, hasher, metadata = found
        engine.adopt_hasher(hasher, metadata["context_templates"])
        state = with_saved_threshold(engine, state, metadata)
        seq = checkpoint.seq
        return state, Position(checkpoint.position, seq)
    if entry is None:
        return None
    return _start_from_state(runtime, entry)


def _start_from_state(
    runtime: "Runtime", entry: MemoryChange, adopt_hasher: bool = True
) -> tuple[MemoryState, Position]:
    """The memory a whole state in the log holds, at its position (adopt_hasher: also the
    leader's hasher and templates, which a replica takes once, at start-up)."""
    engine = runtime.engine
    try:
        state, hasher, metadata = state_from_bytes(engine, runtime.memory_log.payload(entry))
    except (StateMismatch, DeltaMismatch, BlobUnusable) as error:
        raise IncompatibleLog(f"the newest whole state in the memory log does not fit: {error}") from error
    if adopt_hasher:
        engine.adopt_hasher(hasher, metadata["context_templates"])
    state = with_saved_threshold(engine, state, metadata)
    seq = max([runtime.seq_of(key) for key in state.edit_keys] + [entry.edit_seq or 0])
    return state, Position(entry.position, seq, entry.created_at.timestamp())


def catch_up(
    runtime: "Runtime", state: MemoryState, position: Position, private: bool = False
) -> tuple[MemoryState, Position]:
    """`state` moved through every change after `position.position`, in order.

    private: `state` was never published, so its tensors may be written in place (a long
    catch-up then copies W_m once instead of once per change)."""
    engine = runtime.engine
    while True:
        changes = runtime.memory_log.after(position.position, PAGE)
        if not changes:
            break
        if not private and len(changes) > 1:  # one copy for the whole batch, then in place
            copy = engine.memory_state(
                state.master.clone(),
                state.snapshot.index,
                state.snapshot.applied,
                None if state.key_moments is None else state.key_moments.clone(),
            )
            state, private = replace(copy, threshold=state.threshold), True
        for change in changes:
            try:
                state = apply_change(runtime, state, change, in_place=private)
            except BlobUnusable as error:
                state, position = _past_pruned(runtime, change, error)
                private = True
                break
            except DeltaMismatch as error:  # e.g. the edits were keyed by another router: retrain
                raise IncompatibleLog(f"memory-log position {change.position} does not fit: {error}") from error
            runtime.seq_by_key.update(_keys_of(change, state))
            position = Position(
                change.position,
                max(position.settled_seq, change.edit_seq or 0),
                change.created_at.timestamp() if change.created_at else None,
            )
        else:
            _check_hash(state, changes[-1])
    return state, position


def _past_pruned(runtime: "Runtime", change: MemoryChange, error: BlobUnusable) -> tuple[MemoryState, Position]:
    """A replica that lagged behind a compaction finds the deltas it needed pruned (or a blob
    unusable): it goes on from the newest whole state, which holds all of them. Pruning therefore
    never strands a lagging replica, however far behind it is."""
    entry = runtime.memory_log.newest_state()
    if entry is None or entry.position <= change.position:  # the leader retrains; a follower waits for a new state
        raise IncompatibleLog(
            f"memory-log position {change.position} cannot be applied ({error}) and no newer whole state holds it"
        )
    log.info(
        "memory-log position %d cannot be applied (%s): going on from the whole state at %d",
        change.position,
        error,
        entry.position,
    )
    state, position = _start_from_state(runtime, entry, adopt_hasher=False)
    _check_hash(state, entry)
    return state, position


def _check_hash(state: MemoryState, last: MemoryChange) -> None:
    if weights_sha256(state) != last.weights_sha256:
        raise Diverged(
            f"the memory at log position {last.position} hashes to {weights_sha256(state)}, "
            f"the leader recorded {last.weights_sha256}"
        )


def _keys_of(change: MemoryChange, state: MemoryState) -> dict[str, int]:
    if change.kind == "edit" and state.edit_keys:
        return {state.edit_keys[-1]: change.edit_seq}
    return {}


def apply_change(runtime: "Runtime", state: MemoryState, change: MemoryChange, in_place: bool) -> MemoryState:
    engine = runtime.engine
    if change.kind == "edit":
        return apply_delta(engine, state, runtime.memory_log.payload(change), in_place=in_place)
    if change.kind == "state":
        new, _, metadata = state_from_bytes(engine, runtime.memory_log.payload(change))
        for key in new.edit_keys:
            runtime.seq_of(key)  # known from here on (last_seq reads it)
        return with_saved_threshold(engine, new, metadata)
    return state  # "failed": the memory did not change


class Follower(threading.Thread):
    """Applies the leader's changes as they are recorded and takes the lead when it comes free."""

    def __init__(self, runtime: "Runtime", poll_s: float, leader_poll_s: float, outage_grace_s: float):
        super().__init__(name="memoir-follower", daemon=True)
        self.runtime = runtime
        self.poll_s = poll_s
        self.leader_poll_s = leader_poll_s
        # A database outage breaks every replica's connections, the leader lock's too, so when it
        # ends the lock is free whoever led. Followers hold back this long after their last failed
        # call, and the leader (which retries every second) takes its own lock back: one outage,
        # no hand-over. A leader that died meanwhile is replaced this much later.
        self.outage_grace_s = outage_grace_s
        self._stopping = threading.Event()
        self._listener: psycopg.Connection | None = None

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        runtime = self.runtime
        next_leader_try = 0.0
        while not self._stopping.is_set():
            try:
                self.sync()
                if time.monotonic() >= next_leader_try:
                    next_leader_try = time.monotonic() + self.leader_poll_s
                    if runtime.leadership.try_acquire():
                        self._close_listener()
                        runtime.lead()
                        return
                self._wait()
            except Exception as error:
                if is_unavailable(error) or isinstance(error, psycopg.OperationalError):
                    log.warning("follower waits for the database: %s", str(error).splitlines()[0])
                    next_leader_try = time.monotonic() + self.outage_grace_s
                else:
                    log.exception("follower step failed; retrying in 1 s")
                self._close_listener()
                self._stopping.wait(1.0)
        self._close_listener()

    def sync(self) -> None:
        runtime = self.runtime
        state, position = catch_up(runtime, runtime.engine.state, runtime.position)
        if position.position != runtime.position.position:
            runtime.publish(state, position)
        runtime.measure_lag()

    def _wait(self) -> None:
        """Until a change is announced, or poll_s (no LISTEN on SQLite, or while it is down)."""
        timeout = min(self.poll_s, self.leader_poll_s)
        if not self.runtime.leadership.is_postgres:
            self._stopping.wait(timeout)
            return
        if self._listener is None:
            self._listener = self.runtime.leadership.listen(CHANNEL)
        for _ in self._listener.notifies(timeout=timeout, stop_after=1):
            break

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except psycopg.Error:
                pass
            self._listener = None
