"""An item's outage clock counts the time the LLM was seen unavailable, not its wait for a worker

`items.llm_unavailable_since` marked the first of an item's outage hand-backs in a row, and
the item failed once that was longer ago than `AIDSAFE_ITEM_MAX_OUTAGE_S`: an item that then
waited out a backlog longer than that failed at one blip on its next claim. The wait in the
queue between two outage hand-backs now counts only as long as a back-off explains (twice the
longest), by moving that mark later; `items.llm_unavailable_seen_at` keeps the last
hand-back, for the next one to measure the wait from. Items mid-outage have none: their wait
is measured from their run's start (items.end_in_outage).

On the way down, the marks stay as moved: the older release counts from them, a little less.

Revision ID: 0034_outage_waits
Revises: 0033_webhook_deletion
Create Date: 2026-12-05 23:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0034_outage_waits"
down_revision: str | None = "0033_webhook_deletion"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("items", sa.Column("llm_unavailable_seen_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("items", "llm_unavailable_seen_at")
