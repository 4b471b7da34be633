"""The Postgres turn log: fenced by the claim, idempotent per key, storable text only."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from uuid import UUID

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from app.config import Prices
from app.costs import Budget
from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.store import items
from app.store.budgets import Meter
from app.store.db import Sessions
from app.store.models import Item, Job, TurnRow
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


async def taken_over(sessions: Sessions, stale: items.Claim) -> items.Claim:
    """The claim's lease runs out and another worker takes the item over."""
    async with sessions.begin() as session:
        item = await session.get(Item, stale.item_id)
        assert item is not None
        item.lease_until = item.created_at
    fresh = await items.claim(sessions, stale.item_id, LIMITS)
    assert fresh is not None and fresh.attempt == stale.attempt + 1
    return fresh


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
    fresh = await taken_over(sessions, stale)

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


async def test_a_later_claim_reads_back_the_items_turns_as_they_were_recorded(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claim, other = await claimed_item(api, auth, sessions), await claimed_item(api, auth, sessions)
    writer = TurnWriter(sessions)
    await PostgresTurnLog(writer, other).record(a_turn(other.item_id, "another item's"))
    turn = replace(
        a_turn(claim.item_id, "raw"),
        key=TurnKey(Stage.DELIBERATION, 2, 1, 1),
        role="deliberator",
        model="the model",
        request_hash="the hash",
        outcome=TurnOutcome.MALFORMED,
        error="no JSON",
        agreed=True,
        prompt_tokens=30,
        completion_tokens=40,
        cached_prompt_tokens=20,
        latency_ms=5.5,
    )

    assert await PostgresTurnLog(writer, claim).record(turn) == turn
    fresh = await taken_over(sessions, claim)

    assert await PostgresTurnLog(writer, fresh).done(claim.item_id) == [turn]


async def test_a_stored_key_returns_that_keys_turn_and_not_a_neighbours_or_another_items(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    # Each neighbour is found before it, whether by the turns' unique index or in table order.
    other, claim = sorted(
        [await claimed_item(api, auth, sessions) for _ in range(2)], key=lambda c: c.item_id
    )
    writer = TurnWriter(sessions)
    log = PostgresTurnLog(writer, claim)
    key = TurnKey(Stage.REFINE, 1, 1, 1)
    await PostgresTurnLog(writer, other).record(replace(a_turn(other.item_id, "another item's"), key=key))
    neighbours = [  # each differs from it in one part of the key
        TurnKey(Stage.DELIBERATION, 1, 1, 1),
        TurnKey(Stage.REFINE, 0, 1, 1),
        TurnKey(Stage.REFINE, 1, 0, 1),
        TurnKey(Stage.REFINE, 1, 1, 0),
    ]
    for neighbour in neighbours:
        await log.record(replace(a_turn(claim.item_id, str(neighbour)), key=neighbour))
    await log.record(replace(a_turn(claim.item_id, "first"), key=key))

    again = await log.record(replace(a_turn(claim.item_id, "second"), key=key))

    assert (again.key, again.raw_output) == (key, "first")


PRICES = {"default": Prices(input=1.0, cached_input=0.5, output=2.0)}
ONLINE_PRICES = {"default": Prices(input=10.0, output=20.0)}
COST_METRIC = "aidsafe_llm_cost_usd_total"


def priced(claim: items.Claim) -> items.Claim:
    """The claim of a batch job whose endpoint has pinned prices, batch and online."""
    plan = claim.plan.model_copy(update={"prices": PRICES, "online_prices": ONLINE_PRICES})
    return replace(claim, plan=plan)


def a_call(item_id: UUID, key: TurnKey) -> Turn:
    """A turn of 3,000 prompt tokens (1,000 cached) and 4,000 completion tokens."""
    turn = replace(a_turn(item_id, "raw"), key=key, prompt_tokens=3000, completion_tokens=4000)
    return replace(turn, cached_prompt_tokens=1000)


async def test_a_turn_costs_its_jobs_pinned_prices_and_a_batch_jobs_turn_sent_online_its_online_prices(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claim = priced(await claimed_item(api, auth, sessions))
    batched, online = TurnKey(Stage.SEED, 0, 0), TurnKey(Stage.SEED, 0, 1)
    log = PostgresTurnLog(TurnWriter(sessions), claim, sent_online={online})

    for key in (batched, online):
        await log.record(a_call(claim.item_id, key))

    async with sessions() as session:
        rows = await session.execute(
            select(TurnRow.agent, TurnRow.cost_usd).where(TurnRow.item_id == claim.item_id)
        )
        costs = {agent: cost for agent, cost in rows}
    assert costs == pytest.approx(
        {
            0: (2000 * 1.0 + 1000 * 0.5 + 4000 * 2.0) / 1e6,
            1: (3000 * 10.0 + 4000 * 20.0) / 1e6,  # no cached price: the input price
        }
    )


class Told(Meter):
    """A meter that notes what it is told."""

    def __init__(self) -> None:
        self.told: list[tuple[Budget | None, int, float | None]] = []

    async def recorded(self, budget: Budget | None, tokens: int, usd: float | None) -> None:
        self.told.append((budget, tokens, usd))


async def test_a_turn_added_is_counted_and_told_to_the_meter_and_a_key_stored_before_is_not(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claim = priced(await claimed_item(api, auth, sessions))
    async with sessions.begin() as session:
        budget = {"budget_max_cost_usd": 2.5, "budget_max_tokens": 10**6}
        await session.execute(update(Job).where(Job.id == claim.job_id).values(budget))
    meter = Told()
    log = PostgresTurnLog(TurnWriter(sessions), claim, meter)
    counted_before = REGISTRY.get_sample_value(COST_METRIC, {"endpoint": "default"}) or 0.0

    await log.record(a_call(claim.item_id, TurnKey(Stage.SEED)))
    await log.record(a_call(claim.item_id, TurnKey(Stage.SEED)))

    cost = (2000 * 1.0 + 1000 * 0.5 + 4000 * 2.0) / 1e6
    counted = REGISTRY.get_sample_value(COST_METRIC, {"endpoint": "default"})
    assert counted == pytest.approx(counted_before + cost)
    ((told_budget, tokens, usd),) = meter.told
    assert (told_budget, tokens) == (Budget(max_cost_usd=2.5, max_tokens=10**6), 3000 + 4000)
    assert usd == pytest.approx(cost)
