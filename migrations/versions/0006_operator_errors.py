"""upstream error details kept for operators only

Revision ID: 0006_operator_errors
Revises: 0005_web_sessions
Create Date: 2026-12-02 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_operator_errors"
down_revision: str | None = "0005_web_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("items", sa.Column("operator_error", sa.Text(), nullable=True))
    # Messages stored before they were classified may quote an upstream's answer (which can
    # echo hazardous text or the server's LLM key) or an exception: operators keep them,
    # tenants now read a note. The engine's own failure messages stay as they were.
    op.execute(
        """
        UPDATE items
        SET operator_error = error_message,
            error_message = 'details kept for operators (recorded before error messages were classified)'
        WHERE error_message IS NOT NULL
          AND error_code IS DISTINCT FROM 'agent_refused'
          AND error_code IS DISTINCT FROM 'unparseable_output'
          AND error_message NOT IN ('worker lost (lease expired)', 'worker shut down')
        """
    )


def downgrade() -> None:
    op.drop_column("items", "operator_error")
