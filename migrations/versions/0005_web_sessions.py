"""viewer sessions ended server-side

Revision ID: 0005_web_sessions
Revises: 0004_tenant_seams
Create Date: 2026-12-02 08:00:00.000000
"""

from collections.abc import Sequence

revision: str = "0005_web_sessions"
down_revision: str | None = "0004_tenant_seams"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass  # placeholder: filled in by its branch


def downgrade() -> None:
    pass
