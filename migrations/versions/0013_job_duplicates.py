"""duplicate prompts found at a job's submission

`jobs.duplicates` holds the report of exact and normalised duplicate prompts made when the
job was submitted (app/duplicates.py): with `duplicates: skip` the skipped prompts have no
items, so the report cannot be derived later. Jobs submitted before it, and comparisons, have
none (NULL).

Revision ID: 0013_job_duplicates
Revises: 0012_item_claimed_by
Create Date: 2026-12-02 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013_job_duplicates"
down_revision: str | None = "0012_item_claimed_by"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("duplicates", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "duplicates")
