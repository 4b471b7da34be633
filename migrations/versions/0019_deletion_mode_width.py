"""a deletion names any job mode

`job_deletions.mode` was 16 characters, the width of the modes there were; a deleted
sample evaluation ("sample_evaluation", 17) could not be recorded.

Revision ID: 0019_deletion_mode_width
Revises: 0018_model_evaluations
Create Date: 2026-12-02 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_deletion_mode_width"
down_revision: str | None = "0018_model_evaluations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("job_deletions", "mode", type_=sa.String(32), existing_type=sa.String(16))


def downgrade() -> None:
    # Older code knows no mode longer than 16: their records go with the kind of job.
    op.execute("DELETE FROM job_deletions WHERE length(mode) > 16")
    op.alter_column("job_deletions", "mode", type_=sa.String(16), existing_type=sa.String(32))
