"""The memory log: the changes the leader made to the served memory, in order (db.models.MemoryChange).

The leader appends a change in the same transaction as the edit's status change (edit_log), so a
replica that sees `applied` in the log also finds the edit's delta. Replicas read changes after
the position they are at and apply them in order (replica.py); a restart does the same from its
newest checkpoint. PostgreSQL also announces each new position on the channel `memoir_memory`
(LISTEN/NOTIFY), so followers need not poll to learn of it promptly.

A payload larger than `inline_max_bytes` goes to the blob store (blobs.py) before its row is
committed; the row keeps its key, size and SHA-256, and a blob whose bytes differ is refused.
Compaction: the leader records a whole state every so many edits or bytes of deltas
(worker.py); deltas behind the newest whole state and older than the retention window are then
pruned (payload and blob dropped, row kept), and a replica that finds a change pruned goes on from
the newest whole state instead (replica.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
import logging

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from ..db.models import MemoryChange, utcnow
from .blobs import LOG_PREFIX, BlobStore, BlobUnusable, decode, encode, sha256

log = logging.getLogger(__name__)

CHANNEL = "memoir_memory"


@dataclass(frozen=True)
class Change:
    """What the worker records beside an outcome."""

    kind: str  # "edit" | "failed" | "state"
    applied: int
    weights_sha256: str
    payload: bytes | None = None
    blob_key: str | None = None  # set by MemoryLog.stage: the payload is in the blob store
    payload_size: int | None = None
    payload_sha256: str | None = None


def append(session: Session, change: Change, edit_seq: int | None, epoch: int) -> MemoryChange:
    payload = change.payload
    row = MemoryChange(
        kind=change.kind,
        edit_seq=edit_seq,
        applied=change.applied,
        weights_sha256=change.weights_sha256,
        epoch=epoch,
        payload=payload,
        blob_key=change.blob_key,
        payload_size=change.payload_size if payload is None else len(payload),
        payload_sha256=change.payload_sha256,
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
    def __init__(self, sessions: sessionmaker[Session], blobs: BlobStore | None, inline_max_bytes: int):
        self.sessions = sessions
        self.blobs = blobs
        self.inline_max_bytes = inline_max_bytes

    def stage(self, change: Change) -> Change:
        """The change as its row will record it: a payload over `inline_max_bytes` is written to
        the blob store now, before the row that names it is committed (put-then-commit)."""
        payload = change.payload
        if self.blobs is None or payload is None or len(payload) <= self.inline_max_bytes:
            return change
        digest = sha256(payload)
        key = f"{LOG_PREFIX}{digest}"  # content-addressed: a retried put writes the same blob
        self.blobs.put(key, encode(payload))
        return replace(change, payload=None, blob_key=key, payload_size=len(payload), payload_sha256=digest)

    def payload(self, row: MemoryChange) -> bytes | None:
        """A change's payload, inline or from the blob store; BlobUnusable when its blob is gone
        (pruned) or its bytes are not the ones recorded."""
        if row.payload is not None or row.kind == "failed":
            return row.payload
        if row.blob_key is None:
            raise BlobUnusable(f"the payload of memory-log position {row.position} was pruned")
        if self.blobs is None:
            raise BlobUnusable(f"memory-log position {row.position} is in a blob store: set MEMOIR_BLOB_URL")
        data = decode(self.blobs.get(row.blob_key))
        if sha256(data) != row.payload_sha256:
            raise BlobUnusable(f"blob {row.blob_key} (position {row.position}) differs from its recorded SHA-256")
        return data

    def since_newest_state(self) -> tuple[int, int]:
        """(edits, payload bytes) recorded after the newest whole state: what compaction weighs."""
        with self.sessions() as session:
            query = select(func.count(), func.coalesce(func.sum(MemoryChange.payload_size), 0)).where(
                MemoryChange.kind == "edit", MemoryChange.position > self._newest_state_position(session)
            )
            edits, size = session.execute(query).one()
        return int(edits), int(size)

    def prune(self, retention: timedelta) -> int:
        """Drop the payloads behind the newest whole state that are older than `retention` (the
        rows stay: order, hashes, sizes); returns how many. Only the leader calls it."""
        with self.sessions.begin() as session:
            newest = self._newest_state_position(session)
            behind = (
                MemoryChange.position < newest,
                MemoryChange.created_at < utcnow() - retention,
                or_(MemoryChange.payload.is_not(None), MemoryChange.blob_key.is_not(None)),
            )
            keys = set(session.scalars(select(MemoryChange.blob_key).where(*behind)).all()) - {None}
            pruned = session.execute(update(MemoryChange).where(*behind).values(payload=None, blob_key=None)).rowcount
        self._delete_unreferenced(keys)
        return pruned

    @staticmethod
    def _newest_state_position(session: Session) -> int:
        """Without reading the state's payload (inline on PostgreSQL without a blob store)."""
        return session.scalar(select(func.max(MemoryChange.position)).where(MemoryChange.kind == "state")) or 0

    def sweep_orphans(self) -> int:
        """Delete blobs that no row names: the puts of a leader that died (or was fenced) before
        its commit. Called by a new leader before its worker starts (the one writer from then on)."""
        return self._delete_unreferenced(set(self.blobs.keys(LOG_PREFIX))) if self.blobs is not None else 0

    def _delete_unreferenced(self, keys: set[str]) -> int:
        if not keys:
            return 0
        named: set[str] = set()
        ordered = sorted(keys)
        with self.sessions() as session:
            for start in range(0, len(ordered), 500):  # bounded IN lists (SQLite's variable limit)
                chunk = ordered[start : start + 500]
                named.update(
                    session.scalars(select(MemoryChange.blob_key).where(MemoryChange.blob_key.in_(chunk))).all()
                )
        unreferenced = keys - named
        for key in unreferenced:
            self.blobs.delete(key)
        return len(unreferenced)

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
