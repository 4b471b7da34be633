"""pair candidates: every rejected side's gap, and min_gap applied by readers

The engine no longer keeps or drops a pair on its gap: it records whether a pair was made
(`preference_pairs.kept` becomes `paired`: the guard flagged a try and both sides were
graded) and every gap, and readers keep the pairs at a `min_gap` (the job's by default).
A pair stored as not kept for `gap_below_threshold` was made: it becomes paired, and the
listing and summary still show it not kept at its job's `min_gap`.

`pair_candidates` has one row per rejected side the guard was asked about (item, method,
try): its verdict, the rejected side's scores and its gap; the report's gap distributions
are made of them. Pairs made before this revision graded only the flagged try and have no
candidate rows.

Revision ID: 0021_pair_candidates
Revises: 0020_comparison_judges
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0021_pair_candidates"
down_revision: str | None = "0020_comparison_judges"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pair_candidates",
        sa.Column("item_id", sa.UUID(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=True),
        sa.Column("rejected_scores", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("gap", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name="fk_pair_candidates_item_id_items"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_pair_candidates_job_id_jobs"),
        sa.PrimaryKeyConstraint("item_id", "method", "number", name="pk_pair_candidates"),
    )
    op.create_index("ix_pair_candidates_job_method", "pair_candidates", ["job_id", "method"])
    op.alter_column("preference_pairs", "kept", new_column_name="paired")
    op.execute(
        "UPDATE preference_pairs SET paired = true, reason = NULL WHERE reason = 'gap_below_threshold'"
    )


def downgrade() -> None:
    # The older code decided `kept` at the job's min_gap: a made pair under it was not kept.
    op.execute(
        "UPDATE preference_pairs AS p SET paired = false, reason = 'gap_below_threshold' FROM jobs AS j "
        "WHERE j.id = p.job_id AND p.paired AND p.gap < (j.plan -> 'pairs' ->> 'min_gap')::float"
    )
    op.alter_column("preference_pairs", "paired", new_column_name="kept")
    op.drop_index("ix_pair_candidates_job_method", table_name="pair_candidates")
    op.drop_table("pair_candidates")
