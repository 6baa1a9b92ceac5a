"""The durable edit log: submissions, status changes and their events, all in the database.

Every status change and its event are written in one transaction, with the memory change it made
(memory_log) when the worker records an outcome. `seq` is handed out by the database under a lock
that every submitting transaction takes (a process-wide one, and on PostgreSQL an advisory one
across replicas), so the apply order is the commit order. The worker's writes are fenced: they
happen only while this process leads (leadership.py).
"""

from __future__ import annotations

from dataclasses import dataclass
import threading
from typing import Sequence
import uuid

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from memoir_core import Prompt

from ..db.models import Edit, EditStatus, Event, IdempotencyKey, utcnow
from ..db.session import SUBMIT_LOCK
from . import memory_log
from .leadership import LeaderLock
from .memory_log import Change


# idempotency records of imports: one per origin edit id, under a key id no API key can have
IMPORT_KEY_ID = ":import"


class EditNotFound(LookupError):
    pass


class EditConflict(RuntimeError):
    pass


class IdempotencyConflict(ValueError):
    """An Idempotency-Key reused with a different request body."""


class QueueFull(RuntimeError):
    pass


@dataclass(frozen=True)
class Submission:
    edits: list[Edit]
    replayed: bool  # an earlier request with the same Idempotency-Key and body created them


@dataclass(frozen=True)
class NewEdit:
    prompt: str  # as submitted ("" when given as messages)
    target: str
    frames: list[Prompt]  # every rendered text the model is trained on; the submitted prompt's first
    messages: list[dict] | None = None
    paraphrases: list | None = None  # as submitted


def frame_record(prompt: Prompt) -> dict:
    return {"text": prompt.text, "feature_start": prompt.feature_start, "format": prompt.format}


def trained_frames(edit: Edit) -> list[Prompt]:
    """Exactly the frames an edit was (or will be) trained in, as stored."""
    if edit.frames is None:  # logged before edits were trained in several frames
        return [Prompt(edit.train_prompt, edit.feature_start, edit.prompt_format)]
    return [Prompt(f["text"], f["feature_start"], f["format"]) for f in edit.frames]


class EditLog:
    def __init__(self, sessions: sessionmaker[Session], append_eos: bool, leadership: LeaderLock):
        self.sessions = sessions
        self.append_eos = append_eos
        self.leadership = leadership
        self._submit_lock = threading.Lock()

    @staticmethod
    def _serialise_submissions(session: Session) -> None:
        """Replicas on one PostgreSQL database hand out seqs one transaction at a time, so that no
        edit with a lower seq can commit after one with a higher seq was claimed."""
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SUBMIT_LOCK})

    def _fenced(self, session: Session) -> int:
        """The epoch this process leads under, checked in the transaction (leadership.Fenced if not)."""
        self.leadership.fence(session)
        return self.leadership.epoch

    # ---- API side ---------------------------------------------------------------------------

    def submit(
        self,
        edits: list[NewEdit],
        key_id: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        max_queue_depth: int | None = None,
    ) -> Submission:
        """Queue edits in order. Nothing is written when the queue is full or the key conflicts."""
        with self._submit_lock, self.sessions.begin() as session:
            self._serialise_submissions(session)
            if idempotency_key is not None:
                earlier = session.scalar(
                    select(IdempotencyKey).where(
                        IdempotencyKey.key_id == (key_id or ""), IdempotencyKey.idempotency_key == idempotency_key
                    )
                )
                if earlier is not None:
                    if earlier.request_hash != request_hash:
                        raise IdempotencyConflict(
                            "this Idempotency-Key was already used with a different request body"
                        )
                    rows = session.scalars(select(Edit).where(Edit.seq.in_(earlier.edit_seqs)).order_by(Edit.seq))
                    return Submission(list(rows), replayed=True)
            self._check_room(session, len(edits), max_queue_depth)
            rows = [self._queue(session, new, key_id) for new in edits]
            if idempotency_key is not None:
                session.add(
                    IdempotencyKey(
                        key_id=key_id or "",
                        idempotency_key=idempotency_key,
                        request_hash=request_hash,
                        edit_seqs=[row.seq for row in rows],
                        created_at=utcnow(),
                    )
                )
            return Submission(rows, replayed=False)

    def import_edits(
        self, edits: list[tuple[str, NewEdit]], key_id: str | None = None, max_queue_depth: int | None = None
    ) -> tuple[list[Edit], int]:
        """Queue (origin id, edit) pairs in order, skipping each origin id imported before or
        present here already; returns the queued rows and how many were skipped."""
        with self._submit_lock, self.sessions.begin() as session:
            self._serialise_submissions(session)
            origins = [origin for origin, _ in edits]
            seen = set(session.scalars(select(Edit.id).where(Edit.id.in_(origins))))
            seen |= set(
                session.scalars(
                    select(IdempotencyKey.idempotency_key).where(
                        IdempotencyKey.key_id == IMPORT_KEY_ID, IdempotencyKey.idempotency_key.in_(origins)
                    )
                )
            )
            fresh = [(origin, new) for origin, new in edits if origin not in seen]
            self._check_room(session, len(fresh), max_queue_depth)
            rows = []
            for origin, new in fresh:
                rows.append(self._queue(session, new, key_id, detail={"imported_from": origin}))
                session.add(
                    IdempotencyKey(
                        key_id=IMPORT_KEY_ID,
                        idempotency_key=origin,
                        request_hash="",
                        edit_seqs=[rows[-1].seq],
                        created_at=utcnow(),
                    )
                )
            return rows, len(edits) - len(fresh)

    @staticmethod
    def _check_room(session: Session, adding: int, max_queue_depth: int | None) -> None:
        if max_queue_depth is not None:
            queued = session.scalar(select(func.count()).select_from(Edit).where(Edit.status == EditStatus.QUEUED))
            if queued + adding > max_queue_depth:
                raise QueueFull(f"{queued} edits are queued; the queue holds at most {max_queue_depth}")

    def _queue(self, session: Session, new: NewEdit, key_id: str | None, detail: dict | None = None) -> Edit:
        row = Edit(
            id=str(uuid.uuid4()),
            status=EditStatus.QUEUED,
            prompt=new.prompt,
            target=new.target,
            messages=new.messages,
            paraphrases=new.paraphrases,
            train_prompt=new.frames[0].text,
            feature_start=new.frames[0].feature_start,
            prompt_format=new.frames[0].format,
            frames=[frame_record(f) for f in new.frames],
            append_eos=self.append_eos,
            retract_requested=False,
            attempts=0,
            created_at=utcnow(),
            created_by=key_id,
        )
        session.add(row)
        session.flush()  # assigns seq in submission order
        session.add(Event(edit_seq=row.seq, action="submitted", key_id=key_id, detail=detail, at=utcnow()))
        return row

    def get(self, edit_id: str) -> Edit:
        with self.sessions() as session:
            row = session.scalar(select(Edit).where(Edit.id == edit_id))
            if row is None:
                raise EditNotFound(edit_id)
            return row

    def list(self, status: str | None, limit: int, offset: int) -> tuple[list[Edit], int]:
        with self.sessions() as session:
            query = select(Edit)
            counted = select(func.count()).select_from(Edit)
            if status:
                query = query.where(Edit.status == status)
                counted = counted.where(Edit.status == status)
            rows = session.scalars(query.order_by(Edit.seq).limit(limit).offset(offset)).all()
            return list(rows), session.scalar(counted) or 0

    def history(self, seq: int) -> list[Event]:
        with self.sessions() as session:
            return list(session.scalars(select(Event).where(Event.edit_seq == seq).order_by(Event.id)).all())

    def delete(self, edit_id: str, key_id: str | None = None, allow_retraction: bool = True) -> Edit:
        """Cancel a queued edit at once; ask the worker to retract an applied one."""
        with self._submit_lock, self.sessions.begin() as session:
            row = session.scalar(select(Edit).where(Edit.id == edit_id).with_for_update())
            if row is None:
                raise EditNotFound(edit_id)
            if row.status == EditStatus.QUEUED:
                row.status = EditStatus.CANCELLED
                row.finished_at = utcnow()
                session.add(Event(edit_seq=row.seq, action="cancelled", key_id=key_id, at=utcnow()))
            elif row.status == EditStatus.APPLIED:
                if not allow_retraction:  # checked again here: the edit may have been applied meanwhile
                    raise PermissionError("retracting an applied edit needs the 'admin' scope")
                if not row.retract_requested:
                    row.retract_requested = True
                    session.add(Event(edit_seq=row.seq, action="retraction_requested", key_id=key_id, at=utcnow()))
            elif row.status == EditStatus.RUNNING:
                raise EditConflict("the edit is being applied right now; delete it again once it is applied")
            else:
                raise EditConflict(f"the edit is already {row.status}")
            return row

    def newest_seq(self) -> int:
        """The highest seq handed out so far (0 before the first edit)."""
        with self.sessions() as session:
            return session.scalar(select(func.max(Edit.seq))) or 0

    def counts(self) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.execute(select(Edit.status, func.count()).group_by(Edit.status)).all()
            return {status: count for status, count in rows}

    # ---- worker side ------------------------------------------------------------------------

    def requeue_interrupted(self) -> int:
        """Edits that were running when their leader died run again (when a process takes the lead
        only: while it leads, a running edit is its worker's own)."""
        with self.sessions.begin() as session:
            self._fenced(session)
            interrupted = session.scalars(select(Edit).where(Edit.status == EditStatus.RUNNING)).all()
            for row in interrupted:
                row.status = EditStatus.QUEUED
                session.add(Event(edit_seq=row.seq, action="requeued", detail={"reason": "restart"}, at=utcnow()))
            return len(interrupted)

    def applied_page(self, after_seq: int, limit: int) -> list[Edit]:
        """Up to `limit` edits in the memory with seq > after_seq, in apply order."""
        with self.sessions() as session:
            query = select(Edit).where(Edit.status == EditStatus.APPLIED, Edit.seq > after_seq)
            return list(session.scalars(query.order_by(Edit.seq).limit(limit)).all())

    def applied(self) -> list[Edit]:
        """Edits in the memory, in apply order."""
        with self.sessions() as session:
            query = select(Edit).where(Edit.status == EditStatus.APPLIED).order_by(Edit.seq)
            return list(session.scalars(query).all())

    def next_retraction(self) -> Edit | None:
        with self.sessions() as session:
            query = select(Edit).where(Edit.status == EditStatus.APPLIED, Edit.retract_requested.is_(True))
            return session.scalar(query.order_by(Edit.seq).limit(1))

    def claim_next(self) -> Edit | None:
        """The edit with the lowest seq that is queued, marked running; or one already running.

        Only the leader's worker leaves an edit `running` (it records every outcome before it
        claims again, and a new leader requeues its predecessor's), so a running edit found here is
        its own claim whose commit answer the database lost: it is resumed rather than skipped,
        which would reorder the memory. FOR UPDATE, not SKIP LOCKED: the lowest seq must wait for a
        cancellation in flight, never be passed over.
        """
        with self._submit_lock, self.sessions.begin() as session:
            self._fenced(session)
            unfinished = Edit.status.in_([EditStatus.QUEUED, EditStatus.RUNNING])
            row = session.scalar(select(Edit).where(unfinished).order_by(Edit.seq).limit(1).with_for_update())
            if row is None or row.status == EditStatus.RUNNING:
                return row
            row.status = EditStatus.RUNNING
            row.started_at = utcnow()
            row.attempts += 1
            session.add(Event(edit_seq=row.seq, action="started", detail={"attempt": row.attempts}, at=utcnow()))
            return row

    # The mark_* methods change only an edit still in the state they expect, and add their event
    # and memory change only then: a retry after a commit whose answer was lost records nothing
    # twice. They return the memory-log position they wrote (None: nothing written).

    def mark_applied(
        self,
        seq: int,
        loss: float,
        iterations: int,
        fingerprint: str,
        seconds: float,
        change: Change,
        supersedes: Sequence[str] = (),
    ) -> int | None:
        """supersedes: ids of the applied edits this one asked the question of again (they stop
        firing; their superseded_by becomes this edit's id in the same transaction)."""
        with self.sessions.begin() as session:
            epoch = self._fenced(session)
            changed = session.execute(
                update(Edit)
                .where(Edit.seq == seq, Edit.status == EditStatus.RUNNING)
                .values(
                    status=EditStatus.APPLIED,
                    finished_at=utcnow(),
                    loss=loss,
                    iterations=iterations,
                    mask_fingerprint=fingerprint,
                    error=None,
                )
            )
            if changed.rowcount:
                detail = {"loss": loss, "iterations": iterations, "seconds": round(seconds, 4)}
                if supersedes:
                    detail["supersedes"] = list(supersedes)
                session.add(Event(edit_seq=seq, action="applied", detail=detail, at=utcnow()))
                if supersedes:
                    edit_id = session.scalar(select(Edit.id).where(Edit.seq == seq))
                    earlier = session.scalars(select(Edit).where(Edit.id.in_(list(supersedes)))).all()
                    self._set_superseded(session, earlier, {key: edit_id for key in supersedes})
                return memory_log.append(session, change, seq, epoch).position
            return None

    def mark_failed(self, seq: int, error: str, change: Change) -> int | None:
        with self.sessions.begin() as session:
            epoch = self._fenced(session)
            changed = session.execute(
                update(Edit)
                .where(Edit.seq == seq, Edit.status == EditStatus.RUNNING)
                .values(status=EditStatus.FAILED, finished_at=utcnow(), error=error)
            )
            if changed.rowcount:
                session.add(Event(edit_seq=seq, action="failed", detail={"error": error}, at=utcnow()))
                return memory_log.append(session, change, seq, epoch).position
            return None

    def mark_retracted(self, seq: int, change: Change, superseded: dict[str, str] | None = None) -> int | None:
        """superseded: the supersessions of the memory rebuilt without the edit (edit id -> the id
        of the edit that superseded it); every edit's superseded_by is set to match."""
        with self.sessions.begin() as session:
            epoch = self._fenced(session)
            changed = session.execute(
                update(Edit)
                .where(Edit.seq == seq, Edit.status == EditStatus.APPLIED)
                .values(status=EditStatus.RETRACTED, retracted_at=utcnow(), retract_requested=False)
            )
            if changed.rowcount:
                session.add(Event(edit_seq=seq, action="retracted", at=utcnow()))
                if superseded is not None:
                    self._sync_superseded(session, superseded)
                return memory_log.append(session, change, seq, epoch).position
            return None

    def sync_superseded(self, superseded: dict[str, str]) -> int:
        """Make every edit's superseded_by say what the served memory does (the leader, once at
        start: a memory retrained under another MEMOIR_SUPERSEDE); returns how many changed."""
        with self.sessions.begin() as session:
            self._fenced(session)
            return self._sync_superseded(session, superseded)

    @classmethod
    def _sync_superseded(cls, session: Session, superseded: dict[str, str]) -> int:
        marked = Edit.superseded_by.is_not(None)
        query = select(Edit).where(or_(marked, Edit.id.in_(list(superseded))) if superseded else marked)
        return cls._set_superseded(session, session.scalars(query).all(), superseded)

    @staticmethod
    def _set_superseded(session: Session, rows, superseded: dict[str, str]) -> int:
        """rows' superseded_by = superseded.get(id), with an event for each one that changes."""
        changed = 0
        for row in rows:
            by = superseded.get(row.id)
            if row.superseded_by == by:
                continue
            if by is None:
                detail, action = {"was": row.superseded_by}, "supersession_lifted"
            else:
                detail, action = {"by": by}, "superseded"
            row.superseded_by = by
            session.add(Event(edit_seq=row.seq, action=action, detail=detail, at=utcnow()))
            changed += 1
        return changed

    def record_state(self, change: Change) -> int:
        """A whole state in the memory log: the first leader's, so that replicas start from it, or a
        compaction's, so that they need not apply every delta since."""
        with self.sessions.begin() as session:
            return memory_log.append(session, change, None, self._fenced(session)).position
