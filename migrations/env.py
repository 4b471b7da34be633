"""Alembic environment: async engine, URL from the service settings."""

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from app.config import get_settings
from app.preflight import postgres_too_old, server_version_num
from app.store.db import engine_for
from app.store.models import Base

target_metadata = Base.metadata


def _migrate(connection: Connection) -> None:
    # Alembic's operations name unnamed constraints by target_metadata's naming convention if
    # it has one. Migrations 0001-0006 must keep creating the names PostgreSQL chose when they
    # were deployed (0007 renames those), so the models go in a list: autogenerate compares
    # against them all the same, operations see no convention (and a new migration names its
    # constraints, as autogenerate writes them).
    context.configure(
        connection=connection,
        target_metadata=[target_metadata],
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run() -> None:
    url = context.config.attributes.get("database_url") or get_settings().database_url
    engine = engine_for(url)  # as the service's: the URL's SSL files and other options honoured
    async with engine.connect() as connection:
        # Before any DDL: an older server stops at the first NULLS NOT DISTINCT, with a bare
        # syntax error that does not say what to do.
        if (too_old := postgres_too_old(await connection.run_sync(server_version_num))) is not None:
            raise SystemExit(too_old)
        # End SHOW's transaction: alembic must begin its own, which 0026's and 0031's
        # autocommit blocks commit (in one it did not begin, they fail).
        await connection.rollback()
        await connection.run_sync(_migrate)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run against a database")
asyncio.run(_run())
