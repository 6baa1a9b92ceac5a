"""memory-log payloads may live in a blob store: the row keeps the key, size and SHA-256

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # rows from before this revision keep their payload inline (blob_key NULL)
    with op.batch_alter_table("memory_log") as batch:
        batch.add_column(sa.Column("blob_key", sa.String(128), nullable=True))
        batch.add_column(sa.Column("payload_size", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("payload_sha256", sa.String(64), nullable=True))
        batch.create_index("ix_memory_log_blob_key", ["blob_key"])


def downgrade() -> None:
    with op.batch_alter_table("memory_log") as batch:
        batch.drop_index("ix_memory_log_blob_key")
        batch.drop_column("payload_sha256")
        batch.drop_column("payload_size")
        batch.drop_column("blob_key")
