"""job labels and metadata, and the index a key's job listing reads

A job may carry the user's `label` (a short name) and free-form `metadata` (a JSON object),
given at submission or set later. `GET /v1/jobs` lists a key's jobs newest first: the index
on (owner_key_id, created_at, id) serves that order and its cursor, and replaces the index on
owner_key_id alone (its leading column).

Revision ID: 0011_job_labels
Revises: 0010_job_callbacks
Create Date: 2026-12-05 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011_job_labels"
down_revision: str | None = "0010_job_callbacks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("label", sa.String(length=100), nullable=True))
    op.add_column(
        "jobs",
        sa.Column("metadata", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
    )
    op.create_index("ix_jobs_owner_created", "jobs", ["owner_key_id", "created_at", "id"])
    op.drop_index("ix_jobs_owner_key_id", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_owner_key_id", "jobs", ["owner_key_id"])
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    op.drop_column("jobs", "metadata")
    op.drop_column("jobs", "label")
