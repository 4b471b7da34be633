"""A lost batch's cancel is recorded, with what the provider showed of the batch since

A batch taken for lost is cancelled before its requests are sent again. OpenAI answers a
cancel `cancelling`, its output file (the answers made before) named only once the batch is
`cancelled`, up to 10 minutes later: read at once, no file was named, and those answers were
bought again. And a download of the cancel's files that failed sent the cancel again at the
next look. The batch now keeps when its cancel was sent and the provider's answer (status
and files): it is waited for until it has ended, and its files are read from that answer.

Revision ID: 0037_batch_lost_cancel
Revises: 0036_webhook_idempotency
Create Date: 2026-12-06 04:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from migrations.lz4 import compress_with_lz4

revision: str = "0037_batch_lost_cancel"
down_revision: str | None = "0036_webhook_idempotency"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("cancel_sent_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("batches", sa.Column("cancel_seen", postgresql.JSONB(), nullable=True))

    compress_with_lz4("batches", "cancel_seen")


def downgrade() -> None:
    op.drop_column("batches", "cancel_seen")
    op.drop_column("batches", "cancel_sent_at")
