"""annotation identity per owner and item, retractions, per-key webhooks

Revision ID: 0004_tenant_seams
Revises: 0003_annotations
Create Date: 2026-12-02 08:00:00.000000
"""

from collections.abc import Sequence

revision: str = "0004_tenant_seams"
down_revision: str | None = "0003_annotations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass  # placeholder: filled in by its branch


def downgrade() -> None:
    pass
