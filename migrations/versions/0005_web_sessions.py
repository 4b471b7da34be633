"""viewer sessions ended server-side; separate Idempotency-Key namespaces for jobs and comparisons

Revision ID: 0005_web_sessions
Revises: 0004_tenant_seams
Create Date: 2026-12-02 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_web_sessions"
down_revision: str | None = "0004_tenant_seams"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("key_id", sa.UUID(), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.add_column(
        "jobs",
        sa.Column("idempotency_scope", sa.String(length=16), server_default="jobs", nullable=False),
    )
    op.execute("UPDATE jobs SET idempotency_scope = 'comparisons' WHERE config->>'mode' = 'comparison'")
    op.drop_constraint("jobs_owner_key_id_idempotency_key_key", "jobs", type_="unique")
    op.create_unique_constraint(
        "jobs_owner_key_id_idempotency_scope_idempotency_key_key",
        "jobs",
        ["owner_key_id", "idempotency_scope", "idempotency_key"],
    )


def downgrade() -> None:
    # Fails if a key was used for both a job and a comparison: pick which one keeps it first.
    op.drop_constraint("jobs_owner_key_id_idempotency_scope_idempotency_key_key", "jobs", type_="unique")
    op.create_unique_constraint(
        "jobs_owner_key_id_idempotency_key_key", "jobs", ["owner_key_id", "idempotency_key"]
    )
    op.drop_column("jobs", "idempotency_scope")
    op.drop_table("web_sessions")
