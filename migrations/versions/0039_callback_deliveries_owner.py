"""callback deliveries carry their job's owner, indexed with when each falls due

The workers' claims take the keys in turns (each key's oldest due delivery before any key's
second). Numbered over every due delivery joined to its job, a claim read and sorted the whole
backlog at every poll: 0.7-1.8 s a claim at 100,000 due (bench/callback_claims.py). With the owner
on the row and an index of each key's pending deliveries by due time, a claim reads one entry
per key and at most a batch of the first keys' deliveries.

During a rolling upgrade the old release's workers go on writing deliveries without the owner:
a trigger writes the job's owner on those (the column is NOT NULL, and a delivery without its
owner would never be claimed).

Revision ID: 0039_callback_deliveries_owner
Revises: 0038_request_hash_scheme
Create Date: 2026-12-07 05:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0039_callback_deliveries_owner"
down_revision: str | None = "0038_request_hash_scheme"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")
OWNER_OF_JOB = "callback_deliveries_owner_of_job"


def upgrade() -> None:
    op.add_column("callback_deliveries", sa.Column("owner_key_id", sa.UUID(), nullable=True))
    op.execute(
        "UPDATE callback_deliveries SET owner_key_id = jobs.owner_key_id "
        "FROM jobs WHERE jobs.id = callback_deliveries.job_id"
    )
    op.alter_column("callback_deliveries", "owner_key_id", nullable=False)
    op.create_foreign_key(
        "fk_callback_deliveries_owner_key_id_api_keys",
        "callback_deliveries",
        "api_keys",
        ["owner_key_id"],
        ["id"],
    )
    op.create_index(
        "ix_callback_deliveries_owner_due",
        "callback_deliveries",
        ["owner_key_id", "next_attempt_at"],
        postgresql_where=PENDING,
    )
    op.drop_index("ix_callback_deliveries_due", table_name="callback_deliveries")
    op.execute(
        f"CREATE FUNCTION {OWNER_OF_JOB}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.owner_key_id IS NULL THEN"
        " SELECT owner_key_id INTO NEW.owner_key_id FROM jobs WHERE id = NEW.job_id; END IF;"
        " RETURN NEW; END $$"
    )
    op.execute(
        f"CREATE TRIGGER {OWNER_OF_JOB} BEFORE INSERT ON callback_deliveries"
        f" FOR EACH ROW EXECUTE FUNCTION {OWNER_OF_JOB}()"
    )


def downgrade() -> None:
    op.execute(f"DROP TRIGGER {OWNER_OF_JOB} ON callback_deliveries")
    op.execute(f"DROP FUNCTION {OWNER_OF_JOB}()")
    op.create_index(
        "ix_callback_deliveries_due", "callback_deliveries", ["next_attempt_at"], postgresql_where=PENDING
    )
    op.drop_index("ix_callback_deliveries_owner_due", table_name="callback_deliveries")
    op.drop_constraint(
        "fk_callback_deliveries_owner_key_id_api_keys", "callback_deliveries", type_="foreignkey"
    )
    op.drop_column("callback_deliveries", "owner_key_id")
