"""Database engine and sessions for SQLite (default) or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

DATABASE_TIMEOUT_S = 5.0  # the default of MEMOIR_DATABASE_TIMEOUT_S
# PostgreSQL advisory lock keys (any 64-bit numbers no other application on the database uses)
MIGRATION_LOCK = 0x4D454D4F49520001  # held while migrations run
LEADER_LOCK = 0x4D454D4F49520002  # held by the replica that trains edits, for as long as it leads
SUBMIT_LOCK = 0x4D454D4F49520003  # taken by each transaction that assigns seqs: commit order = seq order


def is_unavailable(error: BaseException) -> bool:
    """The database cannot be reached right now (as opposed to a query that is wrong)."""
    if isinstance(error, (OperationalError, InterfaceError, PoolTimeout, psycopg.OperationalError)):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


class GuardedConnection(psycopg.Connection):
    """A psycopg connection that never waits on the network longer than `answer_timeout_s`.

    A database host that stops answering without closing the connection (black-holed: a dead
    host, a partition, a stateful firewall that forgets the flow) leaves libpq waiting for a reply
    forever: the server's statement_timeout cannot arrive and TCP keepalives only help once
    packets are actually lost. Each wait for the server (query, commit, rollback, ping) gives up
    after the deadline; the connection is then closed (its protocol state is unknown) and the call
    raises psycopg.OperationalError, which callers treat as "database unavailable" (503)."""

    answer_timeout_s: float | None = None

    def wait(self, gen, interval=0.1, timeout=None):
        if timeout is not None or self.answer_timeout_s is None:  # notifies() sets its own
            return super().wait(gen, interval=interval, timeout=timeout)
        try:
            return super().wait(gen, interval=interval, timeout=self.answer_timeout_s)
        except psycopg.errors._WaitTimeout:
            self.pgconn.finish()  # closed (and `broken`): the pool discards it
            raise psycopg.OperationalError(
                f"the database did not answer within {self.answer_timeout_s:g} s (MEMOIR_DATABASE_TIMEOUT_S)"
            ) from None


def guarded_class(timeout_s: float) -> type[GuardedConnection]:
    # the server cancels a slow statement at timeout_s itself; the client waits a little longer
    # so that an answering server's own error (57014 query_canceled) wins the race
    return type("GuardedConnection", (GuardedConnection,), {"answer_timeout_s": timeout_s + 1.0})


def postgres_connect_args(timeout_s: float) -> dict:
    """libpq parameters that bound every wait on the database to about timeout_s."""
    seconds = max(1, round(timeout_s))
    return {
        "connect_timeout": seconds,  # libpq takes whole seconds
        "options": f"-c statement_timeout={int(timeout_s * 1000)}",
        # detect a peer that is gone: keepalive probes on an idle connection, and unacknowledged
        # data on a busy one (tcp_user_timeout, Linux) abort the socket instead of retransmitting
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": max(1, seconds // 3),
        "keepalives_count": 3,
        "tcp_user_timeout": int(timeout_s * 1000),
    }


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def normalize_url(url: str) -> str:
    """postgresql:// URLs use the psycopg 3 driver that ships with the service."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def database_engine(url: str, timeout_s: float = DATABASE_TIMEOUT_S) -> Engine:
    """timeout_s (MEMOIR_DATABASE_TIMEOUT_S) bounds connecting, each statement and each wait for
    the database: past it a call fails as unavailable (503 + Retry-After) instead of hanging."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout_s})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            # WAL lets readers run while the worker writes; foreign keys are off by default.
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            cursor.close()

        return engine
    # fail fast while the database is away: a request answers 503 within seconds instead of hanging
    engine = create_engine(
        url, pool_pre_ping=True, pool_timeout=timeout_s, connect_args=postgres_connect_args(timeout_s)
    )
    connection_class = guarded_class(timeout_s)

    @event.listens_for(engine, "do_connect")
    def _guarded_connect(_dialect, _record, cargs, cparams):
        return connection_class.connect(*cargs, **cparams)

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
