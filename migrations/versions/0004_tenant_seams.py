"""annotation identity per owner and item, retractions, per-key webhooks

An annotation was identified by (source, the tool's id, time) across all tenants, so one
key's Label Studio annotation 1 could stand in for another's. Existing rows get their job's
owner; their identity becomes (owner, item, source, tool id).

Revision ID: 0004_tenant_seams
Revises: 0003_annotations
Create Date: 2026-12-02 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_tenant_seams"
down_revision: str | None = "0003_annotations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("owner_key_id", sa.UUID(), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhooks_owner_key_id", "webhooks", ["owner_key_id"])
    op.create_table(
        "webhook_rejections",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("webhook_id", sa.UUID(), sa.ForeignKey("webhooks.id"), nullable=False),
        sa.Column("owner_key_id", sa.UUID(), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_webhook_rejections_webhook_received", "webhook_rejections", ["webhook_id", "received_at"]
    )

    op.add_column("annotations", sa.Column("owner_key_id", sa.UUID(), nullable=True))
    op.execute(
        "UPDATE annotations AS a SET owner_key_id = j.owner_key_id FROM jobs AS j WHERE j.id = a.job_id"
    )
    op.alter_column("annotations", "owner_key_id", nullable=False)
    op.create_foreign_key(
        "annotations_owner_key_id_fkey", "annotations", "api_keys", ["owner_key_id"], ["id"]
    )
    op.add_column(
        "annotations", sa.Column("webhook_id", sa.UUID(), sa.ForeignKey("webhooks.id"), nullable=True)
    )
    op.add_column(
        "annotations",
        sa.Column("retracted", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.drop_constraint("annotations_source_external_id_annotated_at_key", "annotations", type_="unique")
    op.create_unique_constraint(
        "uq_annotations_version",
        "annotations",
        ["owner_key_id", "item_id", "source", "external_id", "annotated_at"],
    )
    op.create_index("ix_annotations_owner_external", "annotations", ["owner_key_id", "source", "external_id"])


def downgrade() -> None:
    op.drop_index("ix_annotations_owner_external", table_name="annotations")
    op.drop_constraint("uq_annotations_version", "annotations", type_="unique")
    # Rows that differ only by owner or item cannot share the old, global key: keep one.
    op.execute(
        "DELETE FROM annotations AS a USING annotations AS b WHERE a.source = b.source "
        "AND a.external_id = b.external_id AND a.annotated_at = b.annotated_at AND a.id > b.id"
    )
    op.create_unique_constraint(
        "annotations_source_external_id_annotated_at_key",
        "annotations",
        ["source", "external_id", "annotated_at"],
    )
    op.drop_column("annotations", "retracted")
    op.drop_column("annotations", "webhook_id")
    op.drop_constraint("annotations_owner_key_id_fkey", "annotations", type_="foreignkey")
    op.drop_column("annotations", "owner_key_id")
    op.drop_index("ix_webhook_rejections_webhook_received", table_name="webhook_rejections")
    op.drop_table("webhook_rejections")
    op.drop_index("ix_webhooks_owner_key_id", table_name="webhooks")
    op.drop_table("webhooks")
