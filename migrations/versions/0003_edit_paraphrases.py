"""edits keep their paraphrases and every frame they are trained in

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL frames: an edit from before this revision, trained in its one train_prompt frame
    with op.batch_alter_table("edits") as batch:
        batch.add_column(sa.Column("paraphrases", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("frames", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edits") as batch:
        batch.drop_column("frames")
        batch.drop_column("paraphrases")
