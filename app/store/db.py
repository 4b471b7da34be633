"""Engine and session factory. One session per concurrent task: hand out the factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

Sessions = async_sessionmaker[AsyncSession]


def make_engine(database_url: str, timeout_s: float, pool_size: int = 10) -> AsyncEngine:
    # Not pool_pre_ping: with asyncpg that is three round trips (BEGIN, ping, ROLLBACK) on
    # every checkout, more than most of our statements cost. The local check below catches
    # connections a Postgres restart closed while they sat in the pool; one that breaks
    # mid-use fails its statement, SQLAlchemy invalidates the pool, and the caller's retry
    # (the worker's item retry, the client's retry after a 503) gets a fresh connection.
    # hide_parameters: a failed statement's message (logged, maybe shown) never carries the
    # values it was sent, which are user data: prompts, reviews, raw tool payloads.
    # timeout_s bounds each statement (Settings.database_timeout_s says why). A session's
    # connection gone silent times out its ROLLBACK too when it is given back, and the pool
    # discards it; driver_connection discards the driver path's, which has none to send.
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        hide_parameters=True,
        connect_args={"command_timeout": timeout_s},
    )
    event.listen(engine.sync_engine, "checkout", _replace_if_closed)
    return engine


def _replace_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    # asyncpg marks a connection closed as soon as the server hangs up: no round trip.
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


def make_sessions(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, expire_on_commit=False)


async def driver_of(connection: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one (a checked-out connection has one)."""
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    return driver


@asynccontextmanager
async def driver_connection(sessions: Sessions) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection's own asyncpg connection, in autocommit, for the hot single
    statements (claim an item, record a turn): one round trip each, and none of the ORM's
    per-statement CPU. Parameters and results use SQLAlchemy's codecs: jsonb goes in as
    JSON text and comes back decoded."""
    engine: AsyncEngine = sessions.kw["bind"]
    async with engine.connect() as connection:
        driver = await driver_of(connection)
        try:
            yield driver
        except BaseException as error:
            # Never hand it out again if it is closed, or if a statement on it timed out: the
            # server may never answer on it again, and the pool's reset sends nothing to learn so.
            if driver.is_closed() or isinstance(error, TimeoutError):
                await connection.invalidate()
            raise
