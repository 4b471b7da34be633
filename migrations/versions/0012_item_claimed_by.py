"""the worker that claimed an item

`items.claimed_by` names the worker process running an item (cleared when the claim ends),
so the sweeper can take the item back as soon as that worker's heartbeat in Redis is gone
rather than when its lease expires.

Revision ID: 0012_item_claimed_by
Revises: 0011_job_labels
Create Date: 2026-12-06 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_item_claimed_by"
down_revision: str | None = "0011_job_labels"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("items", sa.Column("claimed_by", sa.UUID(), nullable=True))


def downgrade() -> None:
    op.drop_column("items", "claimed_by")
