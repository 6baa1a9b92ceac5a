"""SQLAlchemy 2 models: the edit log, checkpoints of the engine state, and an append-only event log."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class EditStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    APPLIED = "applied"
    FAILED = "failed"
    CANCELLED = "cancelled"  # deleted while still queued: never trained
    RETRACTED = "retracted"  # deleted after it was applied: the memory was rebuilt without it


class Edit(Base):
    __tablename__ = "edits"

    # seq is the apply order: assigned at insert under the service's submit lock
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=EditStatus.QUEUED)
    prompt: Mapped[str] = mapped_column(Text)  # as submitted (empty when given as messages)
    target: Mapped[str] = mapped_column(Text)
    messages: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # as submitted: plain strings or message lists (JSON), asked the same question
    paraphrases: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # exactly what is trained and replayed: the submitted prompt rendered (text, its feature window
    # start, format), and every frame the edit is trained and keyed in ({"text", "feature_start",
    # "format"} each, the first being train_prompt's); NULL for edits from before frames existed
    train_prompt: Mapped[str] = mapped_column(Text)
    feature_start: Mapped[int] = mapped_column(Integer, default=0)
    prompt_format: Mapped[str] = mapped_column(String(16), default="text")
    frames: Mapped[list | None] = mapped_column(JSON, nullable=True)
    append_eos: Mapped[bool] = mapped_column(Boolean, default=False)
    retract_requested: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    retracted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    iterations: Mapped[int | None] = mapped_column(Integer, nullable=True)
    mask_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)  # API key id
    # id of the later applied edit that asked this one's question again: this one no longer fires
    # (NULL: not superseded; cleared when that edit is retracted)
    superseded_by: Mapped[str | None] = mapped_column(String(36), nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)  # last edit seq the state includes
    applied: Mapped[int] = mapped_column(Integer)  # number of edits in the state
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    valid: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the memory log position the state is at (NULL: written before the memory log existed)
    position: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    edit_seq: Mapped[int | None] = mapped_column(ForeignKey("edits.seq"), index=True, nullable=True)
    action: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class IdempotencyKey(Base):
    """An Idempotency-Key of POST /edits, per API key, with the body it was first used with."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("key_id", "idempotency_key", name="uq_idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(64))  # "" when the server runs without keys
    idempotency_key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    edit_seqs: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MemoryChange(Base):
    """The memory log: every change the leader made to the served memory, in the order it made
    them, so that any replica reaches the same memory bit for bit without training.

    kind "state": a whole memory (the first leader's start, a retraction's result, a compaction);
    "edit": an applied edit's delta on the state before it; "failed": an edit that changed
    nothing (followers learn that its seq is settled).
    """

    __tablename__ = "memory_log"

    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))
    edit_seq: Mapped[int | None] = mapped_column(ForeignKey("edits.seq"), nullable=True)
    applied: Mapped[int] = mapped_column(Integer)  # edits in the memory after the change
    weights_sha256: Mapped[str] = mapped_column(String(64))  # of W_m after the change: replicas check it
    epoch: Mapped[int] = mapped_column(Integer)  # the leader term that wrote it
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # a small one, inline
    # a large payload lives in the blob store (services/blobs.py) under blob_key; pruning behind a
    # newer whole state clears payload and blob_key, and keeps the row with the payload's size and hash
    blob_key: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    payload_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    payload_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Leadership(Base):
    """One row: the current leader term. Every change the leader writes checks the epoch in the
    same transaction, so a leader that lost its lock can never write after a new one took over."""

    __tablename__ = "leadership"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    holder: Mapped[str | None] = mapped_column(String(128), nullable=True)
    since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
