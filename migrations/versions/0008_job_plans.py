"""job plans, and comparison links in their own columns

A job's resolved config is now its plan (app/plan.py), read back typed: the column is renamed
`plan`, and configs stored before modes, grading and pairs existed get the plan's shape (the
`aidsafe` mode, no grading, no pairs: what the worker read them as). A comparison item's two
samples moved out of the item's metadata (`a_item_id`, `b_item_id`, which were never the
user's) into `baseline_item_id` and `candidate_item_id`.

Revision ID: 0008_job_plans
Revises: 0007_naming_convention
Create Date: 2026-12-04 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_job_plans"
down_revision: str | None = "0007_naming_convention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LINKS = (("baseline_item_id", "a_item_id"), ("candidate_item_id", "b_item_id"))  # (column, metadata key)
COMPARISON_ITEMS = "FROM jobs WHERE jobs.id = items.job_id AND jobs.plan->>'mode' = 'comparison'"


def upgrade() -> None:
    op.alter_column("jobs", "config", new_column_name="plan")
    op.execute(
        """UPDATE jobs SET plan = '{"mode": "aidsafe", "grading": null, "pairs": null}'::jsonb || plan
        WHERE NOT plan ? 'mode'"""
    )
    for column, _ in LINKS:
        op.add_column("items", sa.Column(column, sa.UUID(), nullable=True))
        op.create_foreign_key(f"fk_items_{column}_items", "items", "items", [column], ["id"])
    op.execute(
        "UPDATE items SET "
        + ", ".join(f"{column} = (metadata->>'{key}')::uuid" for column, key in LINKS)
        + ", metadata = metadata"
        + "".join(f" - '{key}'" for _, key in LINKS)
        + f" {COMPARISON_ITEMS}"
    )


def downgrade() -> None:
    pairs = ", ".join(f"'{key}', {column}" for column, key in LINKS)
    op.execute(f"UPDATE items SET metadata = metadata || jsonb_build_object({pairs}) {COMPARISON_ITEMS}")
    for column, _ in LINKS:
        op.drop_constraint(f"fk_items_{column}_items", "items", type_="foreignkey")
        op.drop_column("items", column)
    op.alter_column("jobs", "plan", new_column_name="config")
