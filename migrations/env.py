"""Alembic environment: runs online against the URL the service (or alembic.ini) gives."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from app.db.models import Base
from app.db.session import MIGRATION_LOCK, database_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = database_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        # batch mode lets later ALTER TABLE migrations run on SQLite too
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":  # replicas starting together migrate one at a time
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
