"""indexes for refusals on the job and usage on each exported CoT

`GET /v1/jobs/{id}` (and its progress events) now show a job's refused turns per stage and
model. Refusals are few, so a partial index of them, keyed by job, stage and model, answers
that count by an index-only scan instead of reading every turn of the job. Exports now carry
each item's usage: the job's usage index is keyed by item too, so an item's turns are summed
from the index alone, as the job's are.

Revision ID: 0023_workbench_rest
Revises: 0022_batches
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023_workbench_rest"
down_revision: str | None = "0022_batches"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_turns_job_usage", table_name="turns")
    op.create_index(
        "ix_turns_job_usage",
        "turns",
        ["job_id", "item_id"],
        postgresql_include=["prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost_usd"],
    )
    op.create_index(
        "ix_turns_job_refusals",
        "turns",
        ["job_id", "stage", "model"],
        postgresql_where=sa.text("outcome = 'refused'"),
    )


def downgrade() -> None:
    op.drop_index("ix_turns_job_refusals", table_name="turns")
    op.drop_index("ix_turns_job_usage", table_name="turns")
    op.create_index(
        "ix_turns_job_usage",
        "turns",
        ["job_id"],
        postgresql_include=["prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost_usd"],
    )
