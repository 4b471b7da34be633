"""costs and budgets

Turns record the prompt tokens the server reported as cached and their cost at the job's
pinned prices (NULL: unpriced, as every turn before this revision is, since no job pinned
prices then). Jobs get an optional budget (money and/or tokens); what they spent is summed
from their turns (the workers count it in Redis, app/store/budgets.py). The index behind job
totals covers the new turn columns.

Revision ID: 0015_costs
Revises: 0014_cot_fallbacks
Create Date: 2026-12-06 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_costs"
down_revision: str | None = "0014_cot_fallbacks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "turns", sa.Column("cached_prompt_tokens", sa.Integer(), nullable=False, server_default=sa.text("0"))
    )
    op.add_column("turns", sa.Column("cost_usd", sa.Float(), nullable=True))
    op.drop_index("ix_turns_job_usage", table_name="turns")
    op.create_index(
        "ix_turns_job_usage",
        "turns",
        ["job_id"],
        postgresql_include=["prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost_usd"],
    )
    op.add_column("jobs", sa.Column("budget_max_cost_usd", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("budget_max_tokens", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Items waiting on a budget go back to the queue: the older code knows no such status
    # (and has no budget to stop them).
    op.execute(
        "UPDATE items SET status = 'queued', error_code = NULL, error_message = NULL "
        "WHERE status = 'budget_exhausted'"
    )
    op.drop_column("jobs", "budget_max_tokens")
    op.drop_column("jobs", "budget_max_cost_usd")
    op.drop_index("ix_turns_job_usage", table_name="turns")
    op.create_index(
        "ix_turns_job_usage", "turns", ["job_id"], postgresql_include=["prompt_tokens", "completion_tokens"]
    )
    op.drop_column("turns", "cost_usd")
    op.drop_column("turns", "cached_prompt_tokens")
