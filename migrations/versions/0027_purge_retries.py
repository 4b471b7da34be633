"""A job whose hazardous-text purge failed is put off

The purge took the oldest unpurged job first: one whose purge kept failing (a constraint or
a statement error on its rows) was taken first again at every purge, and no other job was
purged after it. A failed purge now counts against the job and puts it off, longer after
each failure, while the others go on; it is tried again once its time comes.

Revision ID: 0027_purge_retries
Revises: 0026_items_finished_index
Create Date: 2026-12-06 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0027_purge_retries"
down_revision: str | None = "0026_items_finished_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: Postgres adds the column without rewriting the table.
    op.add_column(
        "jobs",
        sa.Column("hazardous_purge_failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("jobs", sa.Column("hazardous_purge_retry_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "hazardous_purge_retry_at")
    op.drop_column("jobs", "hazardous_purge_failures")
