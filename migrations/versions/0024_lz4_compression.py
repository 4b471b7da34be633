"""lz4 for every compressible column

Postgres compresses a row's long values (once the row passes about 2 KB) with pglz unless a
column says otherwise. A turn's raw output and parsed reply, a CoT's thoughts and a pair's
texts are kilobytes each, written once per LLM call or item. Inserting such rows cost the
Postgres backend 42-60 % less CPU with lz4 than with pglz, which also tries (and gives up on)
values just over the limit at a high price; lz4 stores prose of 6 KB a quarter larger, 3 KB
about the same, 2 KB smaller (bench/toast.py, bench/RESULTS.md). Only values written from now
on are compressed with lz4; those already stored stay as they are, readable as before.

A server built without lz4 keeps pglz: the change is skipped with a notice. Each table is
locked only for a moment, but until the migration commits: it gives up after 10 s behind a
long transaction (run it again once that has ended).

Revision ID: 0024_lz4_compression
Revises: 0023_workbench_rest
Create Date: 2026-12-03 22:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0024_lz4_compression"
down_revision: str | None = "0023_workbench_rest"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _set_compression(method: str) -> None:
    # Every column of our tables whose type can be compressed (typstorage 'x' or 'm': text,
    # varchar, jsonb, bytea, arrays, numeric), so that a column added later without it fails
    # its test. Each ALTER only changes the catalog, but holds its table's exclusive lock until
    # the migration commits: behind a long transaction it gives up after 10 s, rather than
    # stall the service's writes while it waits.
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute(f"""
DO $$
DECLARE col record;
BEGIN
  IF NOT EXISTS (SELECT FROM pg_settings
                 WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)) THEN
    RAISE NOTICE 'this server was built without lz4: compression stays pglz';
    RETURN;
  END IF;
  FOR col IN
    SELECT n.nspname AS schema_name, c.relname AS table_name, a.attname AS column_name
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_type t ON t.oid = a.atttypid
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
      AND c.relname <> 'alembic_version' AND a.attnum > 0 AND NOT a.attisdropped
      AND t.typstorage IN ('x', 'm')
  LOOP
    EXECUTE format('ALTER TABLE %I.%I ALTER COLUMN %I SET COMPRESSION {method}',
                   col.schema_name, col.table_name, col.column_name);
  END LOOP;
END $$;
""")


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("default")
