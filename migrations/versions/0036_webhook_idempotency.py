"""A webhook's creation takes an Idempotency-Key

POST /v1/webhooks stores the request's Idempotency-Key and hash with the webhook, so that a
retry answers the webhook made rather than making a second one (each counts toward the key's
cap). A key names one webhook per API key; webhooks made before have none.

Revision ID: 0036_webhook_idempotency
Revises: 0035_web_sessions_key
Create Date: 2026-12-06 04:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.lz4 import compress_with_lz4

revision: str = "0036_webhook_idempotency"
down_revision: str | None = "0035_web_sessions_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("webhooks", sa.Column("idempotency_key", sa.String(200), nullable=True))
    op.add_column("webhooks", sa.Column("request_hash", sa.String(64), nullable=True))
    op.create_unique_constraint(
        "uq_webhooks_owner_key_id_idempotency_key", "webhooks", ["owner_key_id", "idempotency_key"]
    )
    compress_with_lz4("webhooks", "idempotency_key", "request_hash")


def downgrade() -> None:
    op.drop_constraint("uq_webhooks_owner_key_id_idempotency_key", "webhooks", type_="unique")
    op.drop_column("webhooks", "request_hash")
    op.drop_column("webhooks", "idempotency_key")
