"""A batch counts the provider's refusals before it is taken for gone

A batch whose retrieve answered 404 once ended `lost`, and an output or error file that
answered 404 once was skipped: their requests were bought again in a new batch. Some
proxies answer 404 (or 403) for a while before a batch or file is there. A batch now counts
the polls in a row at which the provider refused it or one of its files, from when the first
was (app/store/batches.py's `refused`), and is taken for gone only once they are settled.

Revision ID: 0029_batch_refusals
Revises: 0028_batch_lease_ids
Create Date: 2026-12-07 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0029_batch_refusals"
down_revision: str | None = "0028_batch_lease_ids"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: Postgres adds the column without rewriting the table.
    op.add_column("batches", sa.Column("refusals", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column("batches", sa.Column("refused_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("batches", "refused_since")
    op.drop_column("batches", "refusals")
