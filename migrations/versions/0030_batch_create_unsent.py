"""A batch knows when its create was certainly not sent yet

Before each create a worker searched the provider's batch list for one an earlier holder
created and died before storing: a list call per batch, and a provider whose list kept failing
held every batch's creation. A batch uploaded by this release is marked `create_unsent` until
its holder sends the create: until then there is nothing to find. Every other batch (the
existing ones, and any an older release's worker uploads during a rolling upgrade) keeps the
default, false: it is searched for, as before.

Revision ID: 0030_batch_create_unsent
Revises: 0029_batch_refusals
Create Date: 2026-12-05 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0030_batch_create_unsent"
down_revision: str | None = "0029_batch_refusals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: Postgres adds the column without rewriting the table.
    op.add_column(
        "batches", sa.Column("create_unsent", sa.Boolean(), server_default=sa.text("false"), nullable=False)
    )


def downgrade() -> None:
    op.drop_column("batches", "create_unsent")
