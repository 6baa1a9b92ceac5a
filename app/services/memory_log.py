"""The memory log: the changes the leader made to the served memory, in order (db.models.MemoryChange).

The leader appends a change in the same transaction as the edit's status change (edit_log), so a
replica that sees `applied` in the log also finds the edit's delta. Replicas read changes after
the position they are at and apply them in order (replica.py); a restart does the same from its
newest checkpoint. PostgreSQL also announces each new position on the channel `memoir_memory`
(LISTEN/NOTIFY), so followers need not poll to learn of it promptly.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from ..db.models import MemoryChange, utcnow

CHANNEL = "memoir_memory"


@dataclass(frozen=True)
class Change:
    """What the worker records beside an outcome."""

    kind: str  # "edit" | "failed" | "state"
    applied: int
    weights_sha256: str
    payload: bytes | None = None


def append(session: Session, change: Change, edit_seq: int | None, epoch: int) -> MemoryChange:
    row = MemoryChange(
        kind=change.kind,
        edit_seq=edit_seq,
        applied=change.applied,
        weights_sha256=change.weights_sha256,
        epoch=epoch,
        payload=change.payload,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()  # assigns the position
    notify(session, CHANNEL, str(row.position))
    return row


def notify(session: Session, channel: str, message: str = "") -> None:
    """Delivered when the transaction commits (PostgreSQL; nothing on SQLite: one process)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :message)"), {"channel": channel, "message": message})


class MemoryLog:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def after(self, position: int, limit: int = 100) -> list[MemoryChange]:
        """Up to `limit` changes after `position`, in order, payloads included."""
        with self.sessions() as session:
            query = select(MemoryChange).where(MemoryChange.position > position)
            return list(session.scalars(query.order_by(MemoryChange.position).limit(limit)).all())

    def last_position(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.max(MemoryChange.position))) or 0

    def newest_state(self) -> MemoryChange | None:
        """The newest whole state: where a replica without a usable checkpoint starts."""
        with self.sessions() as session:
            query = select(MemoryChange).where(MemoryChange.kind == "state")
            return session.scalar(query.order_by(MemoryChange.position.desc()).limit(1))

    def is_empty(self) -> bool:
        return self.last_position() == 0
