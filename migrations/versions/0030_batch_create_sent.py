"""A batch records when a holder first sent its provider's create

Before each create a worker searched the provider's batch list for one an earlier holder
might have created and died before storing: a list call per batch, and a provider whose list
kept failing held every batch's creation. Only a batch whose create was sent before can have
one to find. Batches uploaded but not yet submitted at the upgrade count as sent (an older
worker may have sent it): they are searched for, as before.

Revision ID: 0030_batch_create_sent
Revises: 0029_batch_refusals
Create Date: 2026-12-05 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0030_batch_create_sent"
down_revision: str | None = "0029_batch_refusals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("create_sent_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE batches SET create_sent_at = now() "
        "WHERE status = 'uploaded' AND provider_batch_id IS NULL AND finished_at IS NULL"
    )


def downgrade() -> None:
    op.drop_column("batches", "create_sent_at")
