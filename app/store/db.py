"""Engine and session factory. One session per concurrent task: hand out the factory."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

Sessions = async_sessionmaker[AsyncSession]


def make_engine(database_url: str, pool_size: int = 10) -> AsyncEngine:
    # pool_pre_ping: survive a Postgres restart without failing the first query after it
    return create_async_engine(database_url, pool_size=pool_size, pool_pre_ping=True)


def make_sessions(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, expire_on_commit=False)
