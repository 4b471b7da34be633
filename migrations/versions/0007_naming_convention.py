"""constraints named by the models' naming convention

The tables were created with unnamed primary keys, foreign keys and unique constraints, so
PostgreSQL named them (items_pkey, items_job_id_fkey, items_job_id_position_key). The models
now carry Alembic's naming convention (app/store/models.py NAMING_CONVENTION): this renames
each one to the name the convention gives it (pk_items, fk_items_job_id_jobs,
uq_items_job_id_position). A primary key's or unique constraint's index is renamed with it.
Indexes and uq_annotations_version were named already.

Revision ID: 0007_naming_convention
Revises: 0006_operator_errors
Create Date: 2026-12-03 09:00:00.000000
"""

from collections.abc import Iterator, Sequence

from alembic import op

revision: str = "0007_naming_convention"
down_revision: str | None = "0006_operator_errors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As deployed by 0001-0006: written out, not read from the models, which may change later.
TABLES = (
    "annotations",
    "api_keys",
    "cots",
    "items",
    "jobs",
    "judgements",
    "policy_sets",
    "preference_pairs",
    "turns",
    "web_sessions",
    "webhook_rejections",
    "webhooks",
)
FOREIGN_KEYS = (  # (table, column, referred table)
    ("annotations", "item_id", "items"),
    ("annotations", "job_id", "jobs"),
    ("annotations", "owner_key_id", "api_keys"),
    ("annotations", "webhook_id", "webhooks"),
    ("cots", "item_id", "items"),
    ("cots", "job_id", "jobs"),
    ("cots", "policy_set_id", "policy_sets"),
    ("items", "job_id", "jobs"),
    ("jobs", "owner_key_id", "api_keys"),
    ("jobs", "policy_set_id", "policy_sets"),
    ("judgements", "a_item_id", "items"),
    ("judgements", "b_item_id", "items"),
    ("judgements", "item_id", "items"),
    ("judgements", "job_id", "jobs"),
    ("policy_sets", "owner_key_id", "api_keys"),
    ("preference_pairs", "item_id", "items"),
    ("preference_pairs", "job_id", "jobs"),
    ("turns", "item_id", "items"),
    ("turns", "job_id", "jobs"),
    ("web_sessions", "key_id", "api_keys"),
    ("webhook_rejections", "owner_key_id", "api_keys"),
    ("webhook_rejections", "webhook_id", "webhooks"),
    ("webhooks", "owner_key_id", "api_keys"),
)
UNIQUE = (  # (table, columns)
    ("api_keys", ("key_hash",)),
    ("cots", ("item_id",)),
    ("items", ("job_id", "position")),
    ("jobs", ("owner_key_id", "idempotency_scope", "idempotency_key")),
    ("judgements", ("item_id",)),
    ("policy_sets", ("owner_key_id", "name", "version")),
    ("preference_pairs", ("item_id",)),
    ("turns", ("item_id", "stage", "round", "agent", "attempt")),
)


def _renames() -> Iterator[tuple[str, str, str]]:
    """(table, PostgreSQL's name, the convention's name) of every constraint renamed."""
    for table in TABLES:
        yield table, f"{table}_pkey", f"pk_{table}"
    for table, column, referred in FOREIGN_KEYS:
        yield table, f"{table}_{column}_fkey", f"fk_{table}_{column}_{referred}"
    for table, columns in UNIQUE:
        joined = "_".join(columns)
        yield table, f"{table}_{joined}_key", f"uq_{table}_{joined}"


def upgrade() -> None:
    for table, postgres_name, convention_name in _renames():
        op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {postgres_name} TO {convention_name}")


def downgrade() -> None:
    for table, postgres_name, convention_name in _renames():
        op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {convention_name} TO {postgres_name}")
