"""The Alembic migrations run on SQLite and PostgreSQL and produce exactly the ORM models' schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db.migrate import upgrade
from app.db.models import Base
from app.db.session import database_engine


def test_migrations_match_the_models(database_url, tmp_path):
    url = database_url or f"sqlite:///{tmp_path / 'migrated.db'}"
    upgrade(url)
    upgrade(url)  # idempotent: a restart runs them again
    engine = database_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) >= {"edits", "checkpoints", "events", "idempotency_keys", "memory_log", "leadership"}
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            assert context.get_current_revision() == "0006"
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()
