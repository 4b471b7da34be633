"""Items found by the time they ended, within their job

A progress stream checks Postgres for the items of its job that ended since its last check
(`app/events.py`, `finished_since`), every few seconds, for each follower. Through
`ix_items_job_status` that read every finished item of the job and filtered on `finished_at`
row by row: 10,000 rows at the end of a 10,000-item job, per follower, per check. This index
reads only the window.

Built CONCURRENTLY, outside the migration's transaction, so that a running service keeps
writing items while it is built.

Revision ID: 0026_items_finished_index
Revises: 0025_deletion_numbers
Create Date: 2026-12-05 04:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0026_items_finished_index"
down_revision: str | None = "0025_deletion_numbers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_items_job_finished",
            "items",
            ["job_id", "finished_at"],
            postgresql_where=sa.text("finished_at IS NOT NULL"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_items_job_finished", table_name="items", postgresql_concurrently=True)
