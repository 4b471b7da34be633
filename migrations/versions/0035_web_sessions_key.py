"""A key's viewer sessions are found by an index

Each viewer login keeps its key's newest 100 live sessions and deletes the rest
(app/store/web_sessions.py), and a revoked key's sessions are ended: both look a key's
sessions up, which scanned the whole table.

Revision ID: 0035_web_sessions_key
Revises: 0034_outage_waits
Create Date: 2026-12-06 01:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0035_web_sessions_key"
down_revision: str | None = "0034_outage_waits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_web_sessions_key_id", "web_sessions", ["key_id"])


def downgrade() -> None:
    op.drop_index("ix_web_sessions_key_id", table_name="web_sessions")
