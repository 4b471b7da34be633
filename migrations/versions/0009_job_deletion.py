"""job deletion and the hazardous-text purge

DELETE /v1/jobs/{id} deletes a job's rows with explicit statements, children first, in one
transaction (app/store/deletions.py), not by cascades: so it can count the rows of each
table for its audit row, `job_deletions`, and refuse (rather than cascade into) a comparison
that uses the job. Deleting items checks the comparison links that may point at them, which
are indexed here so that the check does not scan every item and judgement per row.
`jobs.hazardous_purged_at` marks a job whose hazardous text the purge has blanked; the
partial index finds the jobs it has yet to visit.

Revision ID: 0009_job_deletion
Revises: 0008_job_plans
Create Date: 2026-12-05 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009_job_deletion"
down_revision: str | None = "0008_job_plans"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ITEM_LINKS = ("baseline_item_id", "candidate_item_id")
JUDGEMENT_LINKS = ("a_item_id", "b_item_id")


def upgrade() -> None:
    op.create_table(
        "job_deletions",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("deleted_by_key_id", sa.UUID(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("row_counts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.ForeignKeyConstraint(
            ["deleted_by_key_id"], ["api_keys.id"], name="fk_job_deletions_deleted_by_key_id_api_keys"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_job_deletions"),
    )
    op.create_index("ix_job_deletions_key_newest", "job_deletions", ["deleted_by_key_id", "id"])
    op.add_column("jobs", sa.Column("hazardous_purged_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_hazardous_unpurged",
        "jobs",
        ["created_at"],
        postgresql_where=sa.text("hazardous_purged_at IS NULL"),
    )
    for column in ITEM_LINKS:
        op.create_index(
            f"ix_items_{column}", "items", [column], postgresql_where=sa.text(f"{column} IS NOT NULL")
        )
    for column in JUDGEMENT_LINKS:
        op.create_index(f"ix_judgements_{column}", "judgements", [column])


def downgrade() -> None:
    for column in JUDGEMENT_LINKS:
        op.drop_index(f"ix_judgements_{column}", table_name="judgements")
    for column in ITEM_LINKS:
        op.drop_index(f"ix_items_{column}", table_name="items")
    op.drop_index("ix_jobs_hazardous_unpurged", table_name="jobs")
    op.drop_column("jobs", "hazardous_purged_at")
    op.drop_index("ix_job_deletions_key_newest", table_name="job_deletions")
    op.drop_table("job_deletions")
