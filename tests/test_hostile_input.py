"""Hostile and malformed requests: none stalls the event loop, and each is a 4xx in the one
JSON error shape, never a 500 (issue 10, items 3 and 4, and two of item 8).

Requests go to the real app (in-process, or served over HTTP for the /healthz timing) on
real Postgres; jobs are made by arq's real worker against the scripted LLM."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.main import create_app
from app.store.db import make_engine
from tests.test_api import error_of

# --- a bug: still the one error shape, and nothing of the request shown or logged -------------


async def test_an_unexpected_error_is_a_json_500_that_shows_nothing_of_the_request(
    settings: Settings,
) -> None:
    app = create_app(settings)

    @app.get("/v1/broken")
    async def broken() -> None:  # a bug, as a route with one would meet it
        raise RuntimeError("invalid input for query argument $1: 'SECRET-PROMPT-41c'")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.get("/v1/broken")

    error_of(response, 500, "internal_error")
    assert "SECRET" not in response.text


async def test_a_failed_statement_does_not_carry_the_values_it_was_sent(migrated: str) -> None:
    engine = make_engine(migrated)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError) as failed:
                await connection.execute(
                    text("select cast(:value as text), 1 / 0"), {"value": "SECRET-PROMPT-41c"}
                )
    finally:
        await engine.dispose()

    assert "SECRET" not in str(failed.value)
