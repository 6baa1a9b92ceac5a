"""Who trains edits: exactly one process per database, the leader.

PostgreSQL: the leader holds a session advisory lock on a connection of its own. The lock goes
with the connection (a killed process, a cut network once the server notices: TCP keepalives are
set short on that connection), and any replica that polls `pg_try_advisory_lock` then takes
it. Taking it bumps the epoch in the `leadership` row; every change the leader writes checks its
epoch there in the same transaction (`fence`), so a leader that lost the lock while paused or
partitioned can never write again, even if it does not know yet.

SQLite serves one process only: an exclusive lock on a file beside the database; a second process
on the same file is refused at start-up.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
import socket
import threading
import time
from typing import Callable

import psycopg
from sqlalchemy import select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ..db.models import Leadership as LeadershipRow, utcnow
from ..db.session import DATABASE_TIMEOUT_S, LEADER_LOCK, guarded_class

log = logging.getLogger(__name__)


class Fenced(RuntimeError):
    """This process's leader term has ended: another replica leads now."""

    retryable = False  # retry_database passes it through: no retry can make the write right


class DatabaseInUse(RuntimeError):
    """Another process already serves this SQLite database."""


def replica_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaderLock:
    """The leader lock, the epoch this process leads under, and the fence on its writes."""

    def __init__(self, url: str, sessions: sessionmaker[Session], timeout_s: float = DATABASE_TIMEOUT_S):
        self.url = make_url(url)
        self.timeout_s = timeout_s  # MEMOIR_DATABASE_TIMEOUT_S: no wait on these connections lasts longer
        self.sessions = sessions
        self.name = replica_name()
        self.epoch: int | None = None  # set while this process leads
        self.since: float | None = None  # time.monotonic() when it took the lead
        self._connection: psycopg.Connection | None = None  # PostgreSQL: holds the lock
        self._file = None  # SQLite: holds the file lock
        self._lock = threading.Lock()

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    # ---- taking the lead ----------------------------------------------------------------------

    def claim_sqlite(self) -> None:
        """SQLite: lead for the whole process life, or refuse to start."""
        path = Path(self.url.database or "memoir.db").with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise DatabaseInUse(
                f"the SQLite database {self.url.database} is already served by {holder}; SQLite takes one "
                "process: run replicas on PostgreSQL (MEMOIR_DATABASE_URL=postgresql://...)"
            ) from None
        handle.truncate(0)
        handle.write(self.name)
        handle.flush()
        self._file = handle

    def try_acquire(self) -> bool:
        """Take the lead if no one holds it; then the epoch is bumped and this process leads."""
        with self._lock:
            if self.leading:
                return True
            if self.is_postgres:
                if self._connection is None or self._connection.closed:
                    self._connection = self._connect()
                got = self._connection.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0]
                if not got:
                    return False
            elif self._file is None:
                self.claim_sqlite()
            self.epoch = self._new_term()
            self.since = time.monotonic()
            log.info("this replica (%s) leads now, epoch %d", self.name, self.epoch)
            return True

    def listen(self, channel: str) -> psycopg.Connection:
        """A connection of its own that receives the channel's notifications (PostgreSQL)."""
        connection = self._connect()
        connection.execute(f"LISTEN {channel}")
        return connection

    def _connect(self) -> psycopg.Connection:
        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        connection = guarded_class(self.timeout_s).connect(
            conninfo,
            autocommit=True,
            connect_timeout=max(1, round(self.timeout_s)),
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
        # the server drops the lock of a leader it cannot reach after about 5 + 2 * 3 s
        connection.execute("SET tcp_keepalives_idle = 5")
        connection.execute("SET tcp_keepalives_interval = 2")
        connection.execute("SET tcp_keepalives_count = 3")
        return connection

    def _new_term(self) -> int:
        """epoch + 1 in the leadership row. The UPDATE waits for the old leader's fenced
        transactions (they hold the row FOR SHARE) and makes every later one of them fail."""
        with self.sessions.begin() as session:
            session.execute(
                update(LeadershipRow)
                .where(LeadershipRow.id == 1)
                .values(epoch=LeadershipRow.epoch + 1, holder=self.name, since=utcnow())
            )
            return session.scalar(select(LeadershipRow.epoch).where(LeadershipRow.id == 1))

    # ---- while leading ------------------------------------------------------------------------

    def fence(self, session: Session) -> None:
        """Inside a writing transaction: go on only while this process's term is the current one."""
        current = session.scalar(select(LeadershipRow.epoch).where(LeadershipRow.id == 1).with_for_update(read=True))
        if self.epoch is None or current != self.epoch:
            raise Fenced(f"this replica led in epoch {self.epoch}; epoch {current} belongs to another replica")

    def still_held(self) -> bool:
        """False once another replica leads. A lock connection that broke (a database blink) is
        opened again and the lock taken again if it is free and no one led meanwhile; while the
        database is unreachable this raises its error (the caller waits, as for any outage)."""
        if not self.is_postgres:
            return self.leading
        with self._lock:
            if not self.leading:
                return False
            if self._connection is not None:  # None: a reconnect below failed (the database was away)
                try:
                    self._connection.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    log.warning("the leader lock's connection broke; taking the lock again")
                    self._close_connection()  # its session, if the server still has it, lets go of the lock
            self._connection = self._connect()  # raises while the database is away
            got = self._connection.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0]
            epoch, holder = self.current()
            if got and epoch == self.epoch:
                return True
            self._close_connection()
            if epoch == self.epoch:
                # the lock is held but no new term began: the old session not yet gone on the
                # server, or a follower between taking the lock and bumping the epoch. Wait (the
                # worker retries, as in an outage) rather than hand the lead over unasked.
                raise psycopg.OperationalError("the leader lock is held by a session of no newer term; waiting")
            log.warning("another replica (%s, epoch %d) took the lead", holder, epoch)
            return False

    def _close_connection(self) -> None:
        try:
            if self._connection is not None:
                self._connection.close()
        except psycopg.Error:
            pass
        self._connection = None

    def current(self) -> tuple[int, str | None]:
        """(epoch, holder) as the database has them."""
        with self.sessions() as session:
            row = session.get(LeadershipRow, 1)
            return row.epoch, row.holder

    def release(self) -> None:
        with self._lock:
            self.epoch = None
            self._close_connection()  # the lock goes with the session
            if self._file is not None:
                self._file.close()
                self._file = None


class LockKeeper(threading.Thread):
    """While this process leads, checks its lock every second, apart from the edit worker.

    The worker checks the lock only between jobs; a retraction retrains for minutes and an outcome
    waits out an outage, and meanwhile a database blink would free the lock with no one taking it
    back until the followers' hold-back ran out. The keeper takes it back as soon as the database
    answers (`still_held`) and ends the process at once when another replica leads."""

    def __init__(self, lock: LeaderLock, on_lost: Callable[[str], None], every_s: float = 1.0):
        super().__init__(name="memoir-lock-keeper", daemon=True)
        self.lock, self.on_lost, self.every_s = lock, on_lost, every_s
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.wait(self.every_s):
            try:
                held = self.lock.still_held()
            except Exception as error:  # the database is away: try again next second
                log.debug("leader lock check: %s", str(error).splitlines()[0] if str(error) else error)
                continue
            if not held and not self._stopping.is_set() and self.lock.leading:
                self.on_lost("another replica took the lead while this one was busy")
                return
