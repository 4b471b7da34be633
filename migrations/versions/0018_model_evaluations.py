"""model evaluations

One row per model evaluation item (a benchmark prompt answered by one model under test):
the target, the benchmark, the category, the expected behaviour, and the judges' verdicts
once the item completed. Written against 0015_costs; the lead rechains it.

Revision ID: 0018_model_evaluations
Revises: 0015_costs
Create Date: 2026-12-08 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_model_evaluations"
down_revision: str | None = "0017_prompt_sets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_answers",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("item_id", sa.UUID(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("owner_key_id", sa.UUID(), nullable=False),
        sa.Column("target", sa.Integer(), nullable=False),
        sa.Column("benchmark", sa.String(length=100), nullable=False),
        sa.Column("category", sa.String(length=100), nullable=False),
        sa.Column("expected", sa.String(length=8), nullable=False),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column("unsafe", sa.Boolean(), nullable=True),
        sa.Column("refused", sa.Boolean(), nullable=True),
        sa.Column("judged_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=op.f("fk_model_answers_item_id_items")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_model_answers_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["owner_key_id"], ["api_keys.id"], name=op.f("fk_model_answers_owner_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_answers")),
        sa.UniqueConstraint("item_id", name=op.f("uq_model_answers_item_id")),
    )
    op.create_index("ix_model_answers_job_target", "model_answers", ["job_id", "target"])


def downgrade() -> None:
    # The older code reads no model evaluation plan: those jobs go, with their rows.
    evaluations = "SELECT id FROM jobs WHERE plan->>'mode' = 'model_evaluation'"
    op.drop_table("model_answers")
    for table in ("turns", "items", "jobs"):
        column = "id" if table == "jobs" else "job_id"
        op.execute(f"DELETE FROM {table} WHERE {column} IN ({evaluations})")
