"""The models describe the database the migrations build: Alembic's autogenerate finds
nothing to change between them, and every constraint and index has the name the models'
naming convention gives it. (The migrations are the truth of what is deployed.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from app.store.models import Base


@pytest.fixture
async def database(migrated: str) -> AsyncIterator[AsyncConnection]:
    """A connection to the database built by the migrations alone."""
    engine = create_async_engine(migrated)
    async with engine.connect() as connection:
        yield connection
    await engine.dispose()


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    differences: list[Any] = compare_metadata(context, Base.metadata)
    return differences


async def test_autogenerate_finds_no_difference_between_the_models_and_the_migrated_database(
    database: AsyncConnection,
) -> None:
    assert await database.run_sync(_differences) == []


async def test_every_constraint_and_index_has_the_name_of_the_naming_convention(
    database: AsyncConnection,
) -> None:
    in_models = {
        (table.name, str(name))
        for table in Base.metadata.tables.values()
        for name in (*(c.name for c in table.constraints), *(i.name for i in table.indexes))
    }
    in_database = set(
        await database.execute(
            text(
                "SELECT conrelid::regclass::text, conname FROM pg_constraint "
                "WHERE connamespace = 'public'::regnamespace "
                "UNION SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'"
            )
        )
    )
    assert in_database - {("alembic_version", "alembic_version_pkc")} == in_models
