"""Items not finished, by job

Each submission counts its API key's open jobs (`app/store/key_limits.py`): the key's jobs
with an item queued, running or waiting. Through `ix_items_job_status` Postgres read every
item of each of the key's ended jobs and filtered on the status (it chose to: 10,000 index
entries for a job of 10,000 items); this index holds only the items not finished, so an ended
job is one look that finds nothing.

Built CONCURRENTLY, outside the migration's transaction, so that a running service keeps
writing items while it is built.

Revision ID: 0031_items_unfinished_index
Revises: 0030_batch_create_unsent
Create Date: 2026-12-05 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0031_items_unfinished_index"
down_revision: str | None = "0030_batch_create_unsent"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As the statuses were when this was written (app/store/models.py UNFINISHED), not imported:
# a migration builds what it built then.
UNFINISHED = "status IN ('queued', 'running', 'budget_exhausted', 'awaiting_batch')"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_items_unfinished_job",
            "items",
            ["job_id"],
            postgresql_where=sa.text(UNFINISHED),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_items_unfinished_job", table_name="items", postgresql_concurrently=True)
