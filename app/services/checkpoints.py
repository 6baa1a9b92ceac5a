"""Checkpoints of the engine state on disk, recorded in the database with their seq, memory-log
position and sha256. Only the leader writes them; any replica that sees the directory (a shared
volume) may start from one.

A checkpoint only shortens the next start-up (the edit log and the memory log are the truth), so a
write that fails on the disk (full, over quota, an I/O error) is reported and skipped, never
raised into the worker: the edit that prompted it stays applied, no row is recorded for the file,
and the next edit tries again. `health()` says whether writes are failing (/ready, /state,
metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
import logging
from pathlib import Path
import threading
import time
from typing import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from memoir_core import MemoirEngine, StateMismatch
from memoir_core.engine import MemoryState
from memoir_core.state import STAGING_SUFFIX, StateCorrupt, read_state, weights_sha256
from memoir_core.tophash import TopHasher

from ..db.models import Checkpoint, Edit, Event, MemoryChange, utcnow
from ..db.session import is_unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointHealth:
    failing: bool  # the last write failed
    failures: int  # failed writes since start-up
    last_error: str | None  # of the most recent failure (kept after a recovery)
    last_failed_at: float | None  # time.time()
    failing_since: float | None  # first failure of the current streak
    last_written_at: float | None  # newest checkpoint written or loaded


class CheckpointStore:
    def __init__(
        self,
        directory: Path,
        sessions: sessionmaker[Session],
        keep: int,
        on_write_failed: Callable[[], None] = lambda: None,
    ):
        self.directory = directory
        self.sessions = sessions
        self.keep = keep
        self.on_write_failed = on_write_failed  # the failure counter (metrics)
        self.last_written_at: float | None = None  # time.time() of the newest checkpoint written or loaded
        self._lock = threading.Lock()  # the worker writes, requests read health()
        self._failures = 0
        self._streak = 0
        self._failing_since: float | None = None
        self._last_error: str | None = None
        self._last_failed_at: float | None = None

    @property
    def failing(self) -> bool:
        return self._streak > 0

    def health(self) -> CheckpointHealth:
        with self._lock:
            return CheckpointHealth(
                self._streak > 0,
                self._failures,
                self._last_error,
                self._last_failed_at,
                self._failing_since,
                self.last_written_at,
            )

    def write(self, engine: MemoirEngine, state: MemoryState, seq: int, position: int) -> Checkpoint | None:
        """The checkpoint of `state` (the existing one if there is); None when its file could not
        be written. Database errors are raised (the callers skip a checkpoint the database
        cannot record)."""
        with self.sessions() as session:
            existing = session.scalar(
                select(Checkpoint).where(
                    Checkpoint.valid.is_(True), Checkpoint.seq == seq, Checkpoint.applied == state.snapshot.applied
                )
            )
        if existing is not None:
            return existing
        path = self.directory / f"ckpt-{seq:010d}-{state.snapshot.applied:08d}.safetensors"
        try:
            sha256 = engine.save(path, state)  # atomic: temporary file, fsync, rename, fsync of the directory
        except OSError as error:
            # No valid row names this path (that one would have been `existing`): remove whatever a
            # write that failed after its rename left, so no file outlives a failed write.
            path.unlink(missing_ok=True)
            self._write_failed(seq, path, error)
            return None
        streak = self._streak
        with self.sessions.begin() as session:
            row = Checkpoint(
                seq=seq, applied=state.snapshot.applied, path=str(path), sha256=sha256, created_at=utcnow(), position=position
            )
            row.valid = True
            session.add(row)
            session.add(Event(action="checkpoint", detail={"seq": seq, "sha256": sha256}, at=utcnow()))
            if streak:
                detail = {"seq": seq, "failures": streak}
                session.add(Event(action="checkpoint_write_recovered", detail=detail, at=utcnow()))
        with self._lock:
            self.last_written_at = row.created_at.timestamp()  # utcnow(): aware
            self._streak, self._failing_since = 0, None
        if streak:
            log.warning("checkpoint writes recovered: wrote %s after %d failed write(s)", path.name, streak)
        self._prune()
        return row

    def _write_failed(self, seq: int, path: Path, error: OSError) -> None:
        reason = f"{type(error).__name__}: {error}"
        with self._lock:
            self._failures += 1
            self._streak += 1
            first = self._streak == 1
            now = time.time()
            self._last_error, self._last_failed_at = reason, now
            if first:
                self._failing_since = now
        self.on_write_failed()
        if not first:  # one warning and one event per streak: a full disk fails every edit's try
            log.debug("checkpoint at seq %d not written (%d failures in a row): %s", seq, self._streak, reason)
            return
        log.warning(
            "checkpoint write failed at seq %d (%s): the memory and the edit log are unaffected, the next edit "
            "tries again; /ready reports checkpoints failing until a write succeeds",
            seq,
            reason,
        )
        try:
            with self.sessions.begin() as session:
                detail = {"seq": seq, "path": str(path), "error": reason, "errno": error.errno}
                session.add(Event(action="checkpoint_write_failed", detail=detail, at=utcnow()))
        except Exception as db_error:  # only a record of the failure: never worth failing the worker
            if not is_unavailable(db_error):
                log.exception("could not record the failed checkpoint write")
            else:
                log.warning("could not record the failed checkpoint write: the database is unreachable")

    def remove_staging(self) -> int:
        """Delete staging files a killed writer left (never read: only renamed files have rows).
        Called by a new leader before its worker starts, when no one else writes here."""
        removed = 0
        for staging in self.directory.glob(f".ckpt-*{STAGING_SUFFIX}"):
            staging.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed %d unfinished checkpoint file(s) from %s", removed, self.directory)
        return removed

    def _prune(self) -> None:
        with self.sessions.begin() as session:
            rows = session.scalars(select(Checkpoint).where(Checkpoint.valid.is_(True)).order_by(Checkpoint.seq.desc())).all()
            for row in rows[self.keep :]:
                row.valid = False
                Path(row.path).unlink(missing_ok=True)

    def invalidate_from(self, seq: int) -> None:
        """Checkpoints that contain edit `seq` (theirs >= it) no longer describe the memory."""
        with self.sessions.begin() as session:
            rows = session.scalars(select(Checkpoint).where(Checkpoint.valid.is_(True), Checkpoint.seq >= seq)).all()
            for row in rows:
                row.valid = False
                Path(row.path).unlink(missing_ok=True)

    def newest_usable(self, engine: MemoirEngine, applied: list[Edit], before_seq: int | None = None):
        """The newest valid checkpoint whose file is intact and holds exactly the applied edits up
        to its seq, read as (checkpoint, state, hasher, metadata); None if there is none."""
        with self.sessions() as session:
            query = select(Checkpoint).where(Checkpoint.valid.is_(True))
            if before_seq is not None:
                query = query.where(Checkpoint.seq < before_seq)
            candidates = list(session.scalars(query.order_by(Checkpoint.seq.desc())).all())
        for row in candidates:
            loaded, problem = self._read(row, engine)
            if loaded is not None:
                expected = [e.id for e in applied if e.seq <= row.seq]
                if list(dict.fromkeys(loaded[2]["keys"])) == expected:  # one key per mask, several per edit
                    if before_seq is None:  # the newest checkpoint there is
                        self._loaded(row)
                    return row, *loaded
                problem = "its edits differ from the applied edits in the log"
            log.warning("checkpoint %s is not usable: %s", row.path, problem)
            self._reject(row, problem)
        return None

    def _reject(self, row: Checkpoint, problem: str) -> None:
        with self.sessions.begin() as session:
            session.execute(update(Checkpoint).where(Checkpoint.id == row.id).values(valid=False))
            session.add(Event(action="checkpoint_rejected", detail={"path": row.path, "reason": problem}, at=utcnow()))

    def newest_at_position(self, engine: MemoirEngine, after: int = 0, reject: bool = False):
        """The newest valid checkpoint past memory-log position `after` whose file is intact and
        holds the memory the log recorded at its position, as (checkpoint, state, hasher,
        metadata); None if there is none. Read-only unless `reject` (the leader): then each
        unusable checkpoint is marked invalid, with a `checkpoint_rejected` event."""
        with self.sessions() as session:
            query = select(Checkpoint, MemoryChange.weights_sha256).join(
                MemoryChange, MemoryChange.position == Checkpoint.position
            )
            query = query.where(Checkpoint.valid.is_(True), Checkpoint.position > after)
            candidates = list(session.execute(query.order_by(Checkpoint.position.desc())).all())
        for row, recorded_sha in candidates:
            loaded, problem = self._read(row, engine)
            if loaded is not None:
                if weights_sha256(loaded[0]) == recorded_sha:
                    self._loaded(row)
                    return row, *loaded
                problem = "its W_m differs from the one the memory log recorded at its position"
            log.warning("checkpoint %s is not usable: %s", row.path, problem)
            if reject:
                self._reject(row, problem)
        return None

    def _loaded(self, row: Checkpoint) -> None:
        at: datetime = row.created_at  # SQLite gives naive UTC times
        with self._lock:
            self.last_written_at = (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()

    @staticmethod
    def _read(row: Checkpoint, engine: MemoirEngine) -> tuple[tuple[MemoryState, TopHasher, dict] | None, str | None]:
        """The checkpoint as (state, hasher, metadata), from one read of its file checked against the
        recorded sha256 and the loaded model; or None and why it cannot be used."""
        if not Path(row.path).exists():
            return None, "file missing"
        try:
            return read_state(engine.layout, row.path, engine.memory_state, sha256=row.sha256), None
        except (StateMismatch, StateCorrupt, OSError) as error:  # OSError: pruned by the leader while read
            return None, str(error)
