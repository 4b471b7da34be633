"""the stages of a CoT its job's fallback role answered

`cots.fallbacks` lists, for each stage whose agent refused and the fallback answered, its
`{"stage", "round", "agent", "model"}`. CoTs written before it had no fallback: `[]`.

Revision ID: 0014_cot_fallbacks
Revises: 0013_job_duplicates
Create Date: 2026-12-08 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014_cot_fallbacks"
down_revision: str | None = "0013_job_duplicates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The default fills the rows already there; new rows always name their fallbacks.
    op.add_column(
        "cots",
        sa.Column("fallbacks", postgresql.JSONB(), nullable=False, server_default=sa.text("'[]'::jsonb")),
    )
    op.alter_column("cots", "fallbacks", server_default=None)


def downgrade() -> None:
    op.drop_column("cots", "fallbacks")
