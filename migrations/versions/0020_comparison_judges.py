"""comparison judges: a verdict per judge

A comparison may have several judges: judgements get the judge's number in the plan (0, the
first, for every existing row, each of a one-judge comparison), and an item has one row per
judge instead of one row. Stored plans keep their one `judge`: the code reads it as a list of
one (app/plan.py ComparisonPlan).

Revision ID: 0020_comparison_judges
Revises: 0019_deletion_mode_width
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020_comparison_judges"
down_revision: str | None = "0019_deletion_mode_width"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "judgements", sa.Column("judge", sa.SmallInteger(), nullable=False, server_default=sa.text("0"))
    )
    op.drop_constraint("uq_judgements_item_id", "judgements", type_="unique")
    op.create_unique_constraint("uq_judgements_item_id_judge", "judgements", ["item_id", "judge"])


def downgrade() -> None:
    # The older code reads one judge per comparison and one verdict per item: the first
    # judge's stay, the others' go, and what differed between the jobs is forgotten.
    op.execute("DELETE FROM judgements WHERE judge > 0")
    op.execute(
        "UPDATE jobs SET plan = (plan - 'judges' - 'mismatches') "
        "|| jsonb_build_object('judge', plan->'judges'->0) "
        "WHERE plan->>'mode' = 'comparison' AND plan ? 'judges'"
    )
    op.drop_constraint("uq_judgements_item_id_judge", "judgements", type_="unique")
    op.create_unique_constraint("uq_judgements_item_id", "judgements", ["item_id"])
    op.drop_column("judgements", "judge")
