"""Columns added after migration 0024 are compressed with lz4 as every other column is (its
test: test_migrations.py), where the server was built with it."""

from alembic import op


def compress_with_lz4(table: str, *columns: str) -> None:
    """ALTER each of `table`'s `columns` to lz4 (a catalog change only), unless the server lacks it."""
    alters = ", ".join(f"ALTER COLUMN {column} SET COMPRESSION lz4" for column in columns)
    op.execute(f"""
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)) THEN
    ALTER TABLE {table} {alters};
  END IF;
END $$;
""")
