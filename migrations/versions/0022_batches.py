"""batches

Batch delivery (workers/waves.py): the provider batches of each wave of a batch job, and
every LLM call such a job's items made there, keyed like its turn. Written against
0018_model_evaluations (main's head then); the lead rechains it.

Revision ID: 0022_batches
Revises: 0021_pair_candidates
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0022_batches"
down_revision: str | None = "0021_pair_candidates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("owner_key_id", sa.UUID(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("input_file_id", sa.String(length=200), nullable=True),
        sa.Column("provider_batch_id", sa.String(length=200), nullable=True),
        sa.Column("provider_status", sa.String(length=32), nullable=True),
        sa.Column("request_counts", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("output_file_id", sa.String(length=200), nullable=True),
        sa.Column("error_file_id", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "next_poll_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_batches_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["owner_key_id"], ["api_keys.id"], name=op.f("fk_batches_owner_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_index("ix_batches_job_wave", "batches", ["job_id", "wave"])
    op.create_index(
        "ix_batches_open", "batches", ["next_poll_at"], postgresql_where=sa.text("finished_at IS NULL")
    )
    op.create_table(
        "batch_requests",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.UUID(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("agent", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(length=100), nullable=False),
        sa.Column("body", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("batch_id", sa.UUID(), nullable=True),
        sa.Column("submissions", sa.Integer(), nullable=False),
        sa.Column("answer", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_batch_requests_batch_id_batches")
        ),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=op.f("fk_batch_requests_item_id_items")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_batch_requests_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_requests")),
        sa.UniqueConstraint(
            "item_id",
            "stage",
            "round",
            "agent",
            "attempt",
            name=op.f("uq_batch_requests_item_id_stage_round_agent_attempt"),
        ),
    )
    op.create_index("ix_batch_requests_job_status", "batch_requests", ["job_id", "status"])
    op.create_index("ix_batch_requests_batch_id", "batch_requests", ["batch_id"])


def downgrade() -> None:
    # The older code neither reads a batch job's plan nor parks items for a batch: those jobs
    # go, with their rows.
    op.drop_table("batch_requests")
    op.drop_table("batches")
    batch_jobs = "SELECT id FROM jobs WHERE plan->>'delivery' = 'batch'"
    for table in ("annotations", "turns", "cots", "preference_pairs", "items", "jobs"):
        column = "id" if table == "jobs" else "job_id"
        op.execute(f"DELETE FROM {table} WHERE {column} IN ({batch_jobs})")
