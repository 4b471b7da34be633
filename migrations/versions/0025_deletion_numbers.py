"""A key's deletions numbered 1, 2, 3, ... of its own

`GET /v1/deletions` showed each deletion's row id, taken from one sequence for every key: the
gaps between a key's ids counted the deletions of all the other keys. Each deletion now
carries its number among its key's deletions, which the API shows as `id` (and pages by);
existing deletions are numbered in the order they were made.

Revision ID: 0025_deletion_numbers
Revises: 0024_lz4_compression
Create Date: 2026-12-04 23:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025_deletion_numbers"
down_revision: str | None = "0024_lz4_compression"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job_deletions", sa.Column("number", sa.BigInteger(), nullable=True))
    op.execute(
        """
        UPDATE job_deletions SET number = numbered.number
        FROM (
            SELECT id, row_number() OVER (PARTITION BY deleted_by_key_id ORDER BY id) AS number
            FROM job_deletions
        ) AS numbered
        WHERE job_deletions.id = numbered.id
        """
    )
    op.alter_column("job_deletions", "number", nullable=False)
    op.drop_index("ix_job_deletions_key_newest", table_name="job_deletions")
    op.create_index(
        "ix_job_deletions_key_number", "job_deletions", ["deleted_by_key_id", "number"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ix_job_deletions_key_number", table_name="job_deletions")
    op.create_index("ix_job_deletions_key_newest", "job_deletions", ["deleted_by_key_id", "id"])
    op.drop_column("job_deletions", "number")
