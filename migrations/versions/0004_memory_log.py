"""the memory log (edit deltas, whole states) and the leader term, for replicas and fast restarts

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "memory_log",
        sa.Column("position", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("edit_seq", sa.Integer(), sa.ForeignKey("edits.seq"), nullable=True),
        sa.Column("applied", sa.Integer(), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "leadership",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(128), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
    )
    op.execute("INSERT INTO leadership (id, epoch) VALUES (1, 0)")
    # NULL position: a checkpoint from before the memory log; replicas do not start from it
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("position", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("position")
    op.drop_table("leadership")
    op.drop_table("memory_log")
