"""The Postgres turn log: fenced by the claim, idempotent per key, storable text only."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from uuid import UUID

import httpx
import pytest
from sqlalchemy import select

from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.store import items
from app.store.db import Sessions
from app.store.models import Item
from app.store.turn_log import PostgresTurnLog
from app.store.turn_writer import TurnWriter

LIMITS = items.Limits(lease_s=60, max_claims=10, max_failures=5)


async def claimed_item(api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions) -> items.Claim:
    response = await api.post("/v1/jobs", json={"prompts": ["How do bees see?"]}, headers=auth)
    async with sessions() as session:
        item_id = await session.scalar(select(Item.id).where(Item.job_id == UUID(response.json()["id"])))
    assert item_id is not None
    claim = await items.claim(sessions, item_id, LIMITS)
    assert claim is not None
    return claim


def a_turn(item_id: UUID, raw: str, parsed: dict[str, object] | None = None) -> Turn:
    return Turn(
        item_id=item_id,
        key=TurnKey(Stage.INTENT),
        role="intent",
        endpoint="default",
        model="m",
        request_hash="h",
        raw_output=raw,
        outcome=TurnOutcome.OK,
        parsed=parsed or {"explicit_intents": ["x"], "implicit_intents": []},
        prompt_tokens=3,
        completion_tokens=4,
        latency_ms=5.0,
    )


async def test_recording_a_stored_key_again_returns_the_stored_turn(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claim = await claimed_item(api, auth, sessions)
    log = PostgresTurnLog(TurnWriter(sessions), claim)

    first = await log.record(a_turn(claim.item_id, "first"))
    second = await log.record(a_turn(claim.item_id, "second"))

    assert first.raw_output == second.raw_output == "first"
    assert [t.raw_output for t in await log.done(claim.item_id)] == ["first"]


async def test_a_worker_that_lost_its_claim_cannot_record(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    stale = await claimed_item(api, auth, sessions)
    async with sessions.begin() as session:  # its lease runs out and another worker takes over
        item = await session.get(Item, stale.item_id)
        assert item is not None
        item.lease_until = item.created_at
    fresh = await items.claim(sessions, stale.item_id, LIMITS)
    assert fresh is not None and fresh.attempt == stale.attempt + 1

    with pytest.raises(items.ClaimLost):
        await PostgresTurnLog(TurnWriter(sessions), stale).record(a_turn(stale.item_id, "late"))
    assert await PostgresTurnLog(TurnWriter(sessions), fresh).done(stale.item_id) == []


async def test_text_postgres_cannot_hold_is_stored_with_a_replacement_character(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claim = await claimed_item(api, auth, sessions)
    log = PostgresTurnLog(TurnWriter(sessions), claim)

    turn = a_turn(
        claim.item_id, "nul\x00 and \ud800", {"explicit_intents": ["a\x00b"], "implicit_intents": []}
    )

    stored = await log.record(replace(turn, error="the reply quotes \x00 and \ud800"))

    assert "\x00" not in stored.raw_output and "\ud800" not in stored.raw_output
    assert stored.parsed == {"explicit_intents": ["a\ufffdb"], "implicit_intents": []}
    assert stored.error == "the reply quotes \ufffd and ?"
    assert (await log.done(claim.item_id))[0].raw_output == stored.raw_output


async def test_concurrent_records_of_one_key_store_it_once(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claim = await claimed_item(api, auth, sessions)
    log = PostgresTurnLog(TurnWriter(sessions), claim)

    results = await asyncio.gather(*(log.record(a_turn(claim.item_id, f"r{n}")) for n in range(5)))

    assert len({r.raw_output for r in results}) == 1
    assert len(await log.done(claim.item_id)) == 1
