"""Checkpoints of the engine state on disk, recorded in the database with their seq, memory-log
position and sha256. Only the leader writes them; any replica that sees the directory (a shared
volume) may start from one."""

from __future__ import annotations

from datetime import timezone
import logging
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from memoir_core import MemoirEngine, StateMismatch
from memoir_core.engine import MemoryState
from memoir_core.state import check_compatible, file_sha256, read_metadata, read_state, weights_sha256

from ..db.models import Checkpoint, Edit, Event, MemoryChange, utcnow

log = logging.getLogger(__name__)


class CheckpointStore:
    def __init__(self, directory: Path, sessions: sessionmaker[Session], keep: int):
        self.directory = directory
        self.sessions = sessions
        self.keep = keep
        self.last_written_at: float | None = None  # time.time() of the newest checkpoint written or loaded

    def write(self, engine: MemoirEngine, state: MemoryState, seq: int, position: int) -> Checkpoint:
        with self.sessions() as session:
            existing = session.scalar(
                select(Checkpoint).where(
                    Checkpoint.valid.is_(True), Checkpoint.seq == seq, Checkpoint.applied == state.snapshot.applied
                )
            )
        if existing is not None:
            return existing
        path = self.directory / f"ckpt-{seq:010d}-{state.snapshot.applied:08d}.safetensors"
        sha256 = engine.save(path, state)  # atomic: temporary file, fsync, rename
        with self.sessions.begin() as session:
            row = Checkpoint(
                seq=seq, applied=state.snapshot.applied, path=str(path), sha256=sha256, created_at=utcnow(), position=position
            )
            row.valid = True
            session.add(row)
            session.add(Event(action="checkpoint", detail={"seq": seq, "sha256": sha256}, at=utcnow()))
        self.last_written_at = row.created_at.timestamp()  # utcnow(): aware
        self._prune()
        return row

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
            problem = self._problem(row, engine, applied)
            if problem is None:
                state, hasher, metadata = read_state(engine.layout, row.path, engine.memory_state)
                if before_seq is None:  # the newest checkpoint there is
                    self._loaded(row)
                return row, state, hasher, metadata
            log.warning("checkpoint %s is not usable: %s", row.path, problem)
            with self.sessions.begin() as session:
                session.execute(update(Checkpoint).where(Checkpoint.id == row.id).values(valid=False))
                session.add(Event(action="checkpoint_rejected", detail={"path": row.path, "reason": problem}, at=utcnow()))
        return None

    def newest_at_position(self, engine: MemoirEngine, after: int = 0):
        """The newest valid checkpoint past memory-log position `after` whose file is intact and
        holds the memory the log recorded at its position, as (checkpoint, state, hasher,
        metadata); None if there is none. Read-only: a follower may call it."""
        with self.sessions() as session:
            query = select(Checkpoint, MemoryChange.weights_sha256).join(
                MemoryChange, MemoryChange.position == Checkpoint.position
            )
            query = query.where(Checkpoint.valid.is_(True), Checkpoint.position > after)
            candidates = list(session.execute(query.order_by(Checkpoint.position.desc())).all())
        for row, recorded_sha in candidates:
            try:
                problem = self._file_problem(row, engine)
                if problem is None:
                    state, hasher, metadata = read_state(engine.layout, row.path, engine.memory_state)
                    if weights_sha256(state) == recorded_sha:
                        self._loaded(row)
                        return row, state, hasher, metadata
                    problem = "its W_m differs from the one the memory log recorded at its position"
            except OSError as error:  # pruned by the leader while we read it
                problem = str(error)
            log.warning("checkpoint %s is not usable: %s", row.path, problem)
        return None

    def _loaded(self, row: Checkpoint) -> None:
        at = row.created_at  # SQLite gives naive UTC times
        self.last_written_at = (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()

    @staticmethod
    def _file_problem(row: Checkpoint, engine: MemoirEngine) -> str | None:
        path = Path(row.path)
        if not path.exists():
            return "file missing"
        if file_sha256(path) != row.sha256:
            return "sha256 differs from the recorded one"
        try:
            check_compatible(engine.layout, read_metadata(path))
        except (StateMismatch, ValueError, OSError) as error:
            return str(error)
        return None

    @classmethod
    def _problem(cls, row: Checkpoint, engine: MemoirEngine, applied: list[Edit]) -> str | None:
        problem = cls._file_problem(row, engine)
        if problem is not None:
            return problem
        metadata = read_metadata(row.path)
        expected = [e.id for e in applied if e.seq <= row.seq]
        if list(dict.fromkeys(metadata["keys"])) != expected:  # one key per mask, several per edit
            return "its edits differ from the applied edits in the log"
        return None
