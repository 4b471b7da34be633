"""An LLM outage delays an item for a time, not a number of claims

An item handed back because the LLM stayed unavailable used up one of its claims
(`AIDSAFE_ITEM_MAX_ATTEMPTS`); once the circuit breaker made such claims instant, an outage
of about 6 h failed every item it touched. Those claims are now counted apart
(`items.outage_claims`) and not against the claims' limit, and `items.llm_unavailable_since`
marks when the LLM became unavailable to the item: it fails once that is longer ago than
`AIDSAFE_ITEM_MAX_OUTAGE_S`.

Revision ID: 0032_item_outages
Revises: 0031_items_unfinished_index
Create Date: 2026-12-05 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0032_item_outages"
down_revision: str | None = "0031_items_unfinished_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: Postgres adds the column without rewriting the table.
    op.add_column(
        "items", sa.Column("outage_claims", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("items", sa.Column("llm_unavailable_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("items", "llm_unavailable_since")
    op.drop_column("items", "outage_claims")
