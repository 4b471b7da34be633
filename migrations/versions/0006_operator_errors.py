"""upstream error details kept for operators only

Revision ID: 0006_operator_errors
Revises: 0005_web_sessions
Create Date: 2026-12-02 08:00:00.000000
"""

from collections.abc import Sequence

revision: str = "0006_operator_errors"
down_revision: str | None = "0005_web_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass  # placeholder: filled in by its branch


def downgrade() -> None:
    pass
