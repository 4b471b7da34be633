"""A job says whether its request hash may be the legacy one

A conflicting replay under an Idempotency-Key computed the legacy hash (app/idempotency.py,
`_legacy_full_dump_hash`: a second dump of the whole body, up to ~30 MiB, holding the GIL and
so the event loop for 70-150 ms) whatever the job's age, and a key could have that done at
will by replaying its own used key with a large other body. Only jobs stored before requests
were hashed by the fields sent (145eef3) may hold it. Every job stored until now is marked
as may-be-legacy, and so is one an older release inserts during a rolling upgrade or after a
rollback (it does not name the column: the default); this release stores false, and a
conflict on such a job is decided by one comparison. The hash itself keeps its form, which
every release reads.

Revision ID: 0038_request_hash_scheme
Revises: 0037_batch_lost_cancel
Create Date: 2026-12-07 04:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0038_request_hash_scheme"
down_revision: str | None = "0037_batch_lost_cancel"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: a catalog change only, no table rewrite. A boolean is not compressed.
    op.add_column(
        "jobs",
        sa.Column("request_hash_may_be_legacy", sa.Boolean(), nullable=False, server_default=sa.text("true")),
    )


def downgrade() -> None:
    op.drop_column("jobs", "request_hash_may_be_legacy")
