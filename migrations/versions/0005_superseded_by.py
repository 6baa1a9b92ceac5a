"""edits record the later edit that superseded them (asked their question again)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: not superseded (every edit from before this revision)
    with op.batch_alter_table("edits") as batch:
        batch.add_column(sa.Column("superseded_by", sa.String(36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edits") as batch:
        batch.drop_column("superseded_by")
