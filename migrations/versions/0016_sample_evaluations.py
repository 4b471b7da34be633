"""sample evaluations: samples written elsewhere, and what the grader, guard and judge said

A sample-evaluation job imports samples (a prompt, thoughts, a response, a label) from a
file or a request: one item per sample (its prompt and metadata), and the rest in `samples`.
Each item's result is one row of `sample_evaluations`: scores, the guard's verdict and the
pairwise judgement against the other set's sample of the prompt (the item's
baseline_item_id).

Revision ID: 0016_sample_evaluations
Revises: 0015_costs
Create Date: 2026-12-08 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016_sample_evaluations"
down_revision: str | None = "0015_costs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _result_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    """What both tables start with: an item's row, by its job and position."""
    return [
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("item_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
    ]


def _created_at() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def _constraints(table: str) -> list[sa.Constraint]:
    return [
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=f"fk_{table}_item_id_items"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=f"fk_{table}_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
        sa.UniqueConstraint("item_id", name=f"uq_{table}_item_id"),
    ]


def upgrade() -> None:
    op.create_table(
        "samples",
        *_result_columns(),
        sa.Column("thoughts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        _created_at(),
        *_constraints("samples"),
    )
    op.create_index("ix_samples_job_position", "samples", ["job_id", "position"])
    op.create_table(
        "sample_evaluations",
        *_result_columns(),
        sa.Column("scores", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("grade_error", sa.Text(), nullable=True),
        sa.Column("guard", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("winner", sa.String(length=8), nullable=True),
        sa.Column("votes", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        _created_at(),
        *_constraints("sample_evaluations"),
    )
    op.create_index("ix_sample_evaluations_job_position", "sample_evaluations", ["job_id", "position"])


SAMPLE_EVALUATIONS = "jobs.plan->>'mode' = 'sample_evaluation'"


def downgrade() -> None:
    # Older code cannot read these jobs' plans: they go, with their items and turns.
    op.drop_table("sample_evaluations")
    op.drop_table("samples")
    op.execute(f"DELETE FROM turns USING jobs WHERE turns.job_id = jobs.id AND {SAMPLE_EVALUATIONS}")
    op.execute(f"DELETE FROM items USING jobs WHERE items.job_id = jobs.id AND {SAMPLE_EVALUATIONS}")
    op.execute(f"DELETE FROM jobs WHERE {SAMPLE_EVALUATIONS}")
