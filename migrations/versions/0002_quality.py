"""quality: key scopes, grades and gates on CoTs, preference pairs, judgements

Revision ID: 0002_quality
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_quality"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "api_keys",
        sa.Column("scopes", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
    )
    # Workers dispatch on the stored mode; jobs stored before modes existed ran the AIDSAFE pipeline.
    op.execute("""UPDATE jobs SET config = config || '{"mode": "aidsafe"}' WHERE NOT config ? 'mode'""")

    op.add_column("cots", sa.Column("scores", postgresql.JSONB(), nullable=True))
    op.add_column("cots", sa.Column("grade_error", sa.Text(), nullable=True))
    op.add_column("cots", sa.Column("accepted", sa.Boolean(), nullable=True))
    op.add_column("cots", sa.Column("gate_reasons", postgresql.JSONB(), nullable=True))
    op.create_index("ix_cots_job_accepted_position", "cots", ["job_id", "accepted", "position"])

    op.create_table(
        "preference_pairs",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("item_id", sa.UUID(), sa.ForeignKey("items.id"), nullable=False),
        sa.Column("job_id", sa.UUID(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kept", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("gap", sa.Float(), nullable=True),
        sa.Column("chosen_scores", postgresql.JSONB(), nullable=True),
        sa.Column("rejected_scores", postgresql.JSONB(), nullable=True),
        sa.Column("rejected_grade_error", sa.Text(), nullable=True),
        sa.Column("belief", sa.Text(), nullable=True),
        sa.Column("rejected_thoughts", postgresql.JSONB(), nullable=True),
        sa.Column("rejected_response", sa.Text(), nullable=True),
        sa.Column("guard", postgresql.JSONB(), nullable=True),
        sa.Column("tries", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("item_id"),
    )
    op.create_index("ix_preference_pairs_job_position", "preference_pairs", ["job_id", "position"])

    op.create_table(
        "judgements",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("item_id", sa.UUID(), sa.ForeignKey("items.id"), nullable=False),
        sa.Column("job_id", sa.UUID(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("a_item_id", sa.UUID(), sa.ForeignKey("items.id"), nullable=False),
        sa.Column("b_item_id", sa.UUID(), sa.ForeignKey("items.id"), nullable=False),
        sa.Column("winner", sa.String(length=8), nullable=True),
        sa.Column("votes", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("item_id"),
    )
    op.create_index("ix_judgements_job_position", "judgements", ["job_id", "position"])


def downgrade() -> None:
    # Comparison jobs (config mode "comparison") cannot run on the previous code: delete them first.
    op.drop_index("ix_judgements_job_position", table_name="judgements")
    op.drop_table("judgements")
    op.drop_index("ix_preference_pairs_job_position", table_name="preference_pairs")
    op.drop_table("preference_pairs")
    op.drop_index("ix_cots_job_accepted_position", table_name="cots")
    for column in ("gate_reasons", "accepted", "grade_error", "scores"):
        op.drop_column("cots", column)
    op.drop_column("api_keys", "scopes")
