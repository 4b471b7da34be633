"""Revoked webhooks can be deleted, and a key's webhooks are listed a page at a time

A key may delete a webhook it revoked (DELETE /v1/webhooks/{id}), with its rejections. The
reviews it delivered stay, and keep its id: a deletion from another of the owner's webhooks
must still leave them alone (app/store/annotations.py), so `annotations.webhook_id` no longer
references `webhooks` (as `job_deletions.job_id` names a job that is gone). The listing pages
oldest first by (created_at, id) within a key: that index takes the place of the one on the
key alone, which it serves as well (the cap counts a key's live webhooks).

On the way down, reviews of a deleted webhook lose its id (as if imported from a file), which
the older release's foreign key needs.

Revision ID: 0033_webhook_deletion
Revises: 0032_item_outages
Create Date: 2026-12-05 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0033_webhook_deletion"
down_revision: str | None = "0032_item_outages"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("fk_annotations_webhook_id_webhooks", "annotations", type_="foreignkey")
    op.create_index("ix_webhooks_owner_created", "webhooks", ["owner_key_id", "created_at", "id"])
    op.drop_index("ix_webhooks_owner_key_id", table_name="webhooks")


def downgrade() -> None:
    op.create_index("ix_webhooks_owner_key_id", "webhooks", ["owner_key_id"])
    op.drop_index("ix_webhooks_owner_created", table_name="webhooks")
    op.execute(
        sa.text(
            "UPDATE annotations SET webhook_id = NULL WHERE webhook_id IS NOT NULL"
            " AND NOT EXISTS (SELECT FROM webhooks WHERE webhooks.id = annotations.webhook_id)"
        )
    )
    op.create_foreign_key(
        "fk_annotations_webhook_id_webhooks", "annotations", "webhooks", ["webhook_id"], ["id"]
    )
