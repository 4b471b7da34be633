"""prompt sets

Prompt sets are registered like policy sets: immutable rows, built-in (no owner) or a
key's own, versioned by the hash of their templates. Jobs pin one; jobs already there keep
NULL, which means the built-in set (what they would have run). CoTs name the set that
worded their requests; those already there keep NULL: which templates wrote them was not
recorded, and the built-in wording has changed since some of them.

Revision ID: 0017_prompt_sets
Revises: 0015_costs
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0017_prompt_sets"
down_revision: str | None = "0016_sample_evaluations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prompt_sets",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("owner_key_id", sa.UUID(), nullable=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("templates", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_key_id"], ["api_keys.id"], name="fk_prompt_sets_owner_key_id_api_keys"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_prompt_sets"),
        sa.UniqueConstraint(
            "owner_key_id",
            "name",
            "version",
            name="uq_prompt_sets_owner_key_id_name_version",
            postgresql_nulls_not_distinct=True,
        ),
    )
    op.add_column("jobs", sa.Column("prompt_set_id", sa.UUID(), nullable=True))
    op.create_foreign_key(
        "fk_jobs_prompt_set_id_prompt_sets", "jobs", "prompt_sets", ["prompt_set_id"], ["id"]
    )
    op.add_column("cots", sa.Column("prompt_set_id", sa.UUID(), nullable=True))
    op.add_column("cots", sa.Column("prompt_set_name", sa.String(length=100), nullable=True))
    op.add_column("cots", sa.Column("prompt_set_version", sa.String(length=32), nullable=True))
    op.create_foreign_key(
        "fk_cots_prompt_set_id_prompt_sets", "cots", "prompt_sets", ["prompt_set_id"], ["id"]
    )


def downgrade() -> None:
    op.drop_constraint("fk_cots_prompt_set_id_prompt_sets", "cots", type_="foreignkey")
    op.drop_column("cots", "prompt_set_version")
    op.drop_column("cots", "prompt_set_name")
    op.drop_column("cots", "prompt_set_id")
    op.drop_constraint("fk_jobs_prompt_set_id_prompt_sets", "jobs", type_="foreignkey")
    op.drop_column("jobs", "prompt_set_id")
    op.drop_table("prompt_sets")
