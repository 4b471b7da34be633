"""annotations: human reviews imported from Label Studio and Argilla

Revision ID: 0003_annotations
Revises: 0002_quality
Create Date: 2026-11-23 12:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_annotations"
down_revision: str | None = "0002_quality"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "annotations",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("item_id", sa.UUID(), sa.ForeignKey("items.id"), nullable=False),
        sa.Column("job_id", sa.UUID(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("annotator", sa.String(length=200), nullable=False),
        sa.Column("annotated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verdict", sa.String(length=8), nullable=True),
        sa.Column("edited_response", sa.Text(), nullable=True),
        sa.Column("policy_faithfulness", sa.Integer(), nullable=True),
        sa.Column("flagged_thoughts", postgresql.JSONB(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("raw", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "external_id", "annotated_at"),
    )
    op.create_index("ix_annotations_item", "annotations", ["item_id", "annotated_at"])
    op.create_index("ix_annotations_job", "annotations", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_annotations_job", table_name="annotations")
    op.drop_index("ix_annotations_item", table_name="annotations")
    op.drop_table("annotations")
