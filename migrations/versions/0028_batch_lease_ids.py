"""A batch's lease carries a token its holder's every write names

A worker held a batch by `lease_until` alone, and wrote on it (and let go of it) whether or
not another worker had taken it over since its lease ran out: the first worker's release
cleared the second's lease, and two holders could each create a provider batch of the same
requests. `lease_id` is the lease's token (workers/waves.py, app/store/batches.py).

A batch the provider no longer knows now ends as `lost`, a status the code before this
revision does not have: on the way down such batches become `collected` (ended, answered
as far as they were: their requests went back as a batch's unanswered ones do, as then).

Revision ID: 0028_batch_lease_ids
Revises: 0027_purge_retries
Create Date: 2026-12-05 07:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0028_batch_lease_ids"
down_revision: str | None = "0027_purge_retries"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("lease_id", sa.Uuid(), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE batches SET status = 'collected' WHERE status = 'lost'")
    op.drop_column("batches", "lease_id")
