"""Database engine and sessions for SQLite (default) or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

DATABASE_TIMEOUT_S = 3
# PostgreSQL advisory lock keys (any 64-bit numbers no other application on the database uses)
MIGRATION_LOCK = 0x4D454D4F49520001  # held while migrations run
LEADER_LOCK = 0x4D454D4F49520002  # held by the replica that trains edits, for as long as it leads
SUBMIT_LOCK = 0x4D454D4F49520003  # taken by each transaction that assigns seqs: commit order = seq order


def is_unavailable(error: BaseException) -> bool:
    """The database cannot be reached right now (as opposed to a query that is wrong)."""
    if isinstance(error, (OperationalError, InterfaceError, PoolTimeout, psycopg.OperationalError)):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def normalize_url(url: str) -> str:
    """postgresql:// URLs use the psycopg 3 driver that ships with the service."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def database_engine(url: str) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            # WAL lets readers run while the worker writes; foreign keys are off by default.
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # fail fast while the database is away: a request answers 503 within seconds instead of hanging
    return create_engine(
        url, pool_pre_ping=True, pool_timeout=DATABASE_TIMEOUT_S, connect_args={"connect_timeout": DATABASE_TIMEOUT_S}
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
