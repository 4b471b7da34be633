"""AIDSAFE_DATABASE_URL in the libpq form hosted databases hand out (`postgres://`, no driver,
`?sslmode=`) is taken as SQLAlchemy's asyncpg driver takes it; a refused setting is named in
the error, never quoted (its URL may carry a password)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import make_url, text

from app.config import Settings
from app.store.db import Sessions, make_engine


@pytest.mark.parametrize(
    ("given", "taken"),
    [
        (
            "postgres://u:p%40ss@db.example:5432/x?sslmode=require",
            "postgresql+asyncpg://u:p%40ss@db.example:5432/x?ssl=require",
        ),
        ("postgresql://u@db.example/x", "postgresql+asyncpg://u@db.example/x"),
        (
            "postgresql+asyncpg://u@db.example/x?sslmode=verify-full&application_name=a",
            "postgresql+asyncpg://u@db.example/x?application_name=a&ssl=verify-full",
        ),
        ("postgresql+asyncpg://u@db.example/x?ssl=prefer", "postgresql+asyncpg://u@db.example/x?ssl=prefer"),
    ],
)
def test_a_libpq_style_url_is_taken_as_asyncpg_takes_it(given: str, taken: str) -> None:
    assert Settings(database_url=given).database_url == taken


async def test_a_url_with_sslmode_and_no_driver_connects(settings: Settings, sessions: Sessions) -> None:
    libpq = (
        make_url(settings.database_url).set(drivername="postgresql").update_query_dict({"sslmode": "disable"})
    )
    url = Settings(database_url=libpq.render_as_string(hide_password=False)).database_url
    engine = make_engine(url, timeout_s=5, connections=1)
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("SELECT 1")) == 1
    finally:
        await engine.dispose()


def test_a_refused_setting_is_named_not_quoted() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(database_url="postgresql://u:hunter2@db.example/x?ssl=require&sslmode=require")
    assert "database_url" in str(refused.value)
    assert "ssl or its sslmode" in str(refused.value)
    assert "hunter2" not in str(refused.value)
