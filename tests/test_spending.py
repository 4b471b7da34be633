"""A job's budget counters in Redis (app/store/budgets.py), one call at a time: rebuilt from
the turns, added to by each turn, read by the meter before each call; and the settle of the
job's waiting items, by those counters or by the turns, at a park or a budget's PATCH."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import httpx
import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update

from app.config import EndpointConfig, Settings
from app.costs import Budget, BudgetExhausted
from app.deliberation.ports import LLMUnavailable
from app.deliberation.stages import SEED
from app.llm.client import OpenAICompatibleClient
from app.queue import arq_job_id, line_key
from app.store import budgets, items
from app.store.db import Sessions
from app.store.models import CallbackDelivery, Item, ItemStatus, Job
from app.store.turn_writer import TurnWriter
from tests.conftest import api_client, eventually, new_key, submit
from tests.scripted_llm import ScriptedLLM, chat_request
from tests.test_turn_log import LIMITS
from tests.test_turn_writer import claimed_items, turn_row

DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def spending(redis: Redis, sessions: Sessions, settings: Settings) -> budgets.Spending:
    return budgets.Spending(redis, sessions, settings.redis_key_prefix)


@pytest.fixture
async def llm(scripted_llm: ScriptedLLM) -> AsyncIterator[OpenAICompatibleClient]:
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url)}
    async with OpenAICompatibleClient(endpoints, timeout_s=10) as client:
        yield client


async def a_job_with_a_turn(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> tuple[items.Claim, items.Claim]:
    """A job of two items, both claimed; the first has recorded one turn (7 tokens, $0.5)."""
    running, other = await claimed_items(api, auth, sessions, 2)
    await TurnWriter(sessions).write({**turn_row(running), "cost_usd": 0.5})
    return running, other


async def set_budget(sessions: Sessions, job_id: UUID, budget: Budget) -> None:
    async with sessions.begin() as session:
        columns = {"budget_max_tokens": budget.max_tokens, "budget_max_cost_usd": budget.max_cost_usd}
        await session.execute(update(Job).where(Job.id == job_id).values(**columns))


async def another_tenants_waiting_item(api: httpx.AsyncClient, sessions: Sessions) -> UUID:
    """An item of another key's job, waiting for its own budget: nothing of ours may move it."""
    job_id = await submit(api, await new_key(sessions, "bob"), ["Someone else's?"])
    async with sessions.begin() as session:
        item_id = await session.scalar(select(Item.id).where(Item.job_id == UUID(job_id)))
        await session.execute(
            update(Item).where(Item.id == item_id).values(status=ItemStatus.BUDGET_EXHAUSTED)
        )
    assert item_id is not None
    return item_id


async def status_of(sessions: Sessions, item_id: UUID) -> tuple[ItemStatus, int]:
    async with sessions() as session:
        row = (await session.execute(select(Item.status, Item.enqueues).where(Item.id == item_id))).one()
        return row.status, row.enqueues


async def test_counters_are_rebuilt_from_the_turns_added_to_by_each_turn_and_kept_a_day(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, redis: Redis, spending: budgets.Spending
) -> None:
    job_id = (await a_job_with_a_turn(api, auth, sessions))[0].job_id
    key = spending.key(job_id)
    assert await spending.spent(job_id) == (7, 0.5)  # rebuilt from the turn
    # Ready: later reads take the counters, not the turns. (redis-py types hash commands as
    # sync or async.)
    assert await redis.hget(key, "ready") == b"1"  # type: ignore[misc]
    assert DAY_MS - 60_000 < await redis.pttl(key) <= DAY_MS
    await redis.pexpire(key, 60_000)
    await spending.add(job_id, 10, 0.25)
    assert DAY_MS - 60_000 < await redis.pttl(key) <= DAY_MS  # a job still spending keeps them
    await spending.add(job_id, 5, None)  # an unpriced call: its tokens, no USD
    await spending.add(job_id, 1, 0.0)  # a call priced at nothing
    assert await spending.spent(job_id) == (23, 0.75)

    await spending.forget(job_id)
    assert await redis.exists(key) == 0
    async with sessions() as session:  # a caller in a session has the turns read on it
        assert await spending.spent(job_id, session) == (7, 0.5)  # the turns are the record
    assert await spending.spent(uuid4()) == (0, 0.0)  # a job without turns has spent nothing


async def test_a_turn_added_while_its_counters_are_rebuilt_is_counted_once(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, redis: Redis, spending: budgets.Spending
) -> None:
    job_id = (await a_job_with_a_turn(api, auth, sessions))[0].job_id
    key = spending.key(job_id)
    async with sessions.begin() as holder:
        # The rebuild's sum of the turns waits here, its counters already started.
        await holder.execute(text("LOCK TABLE turns IN ACCESS EXCLUSIVE MODE"))
        rebuild = asyncio.create_task(spending.spent(job_id))
        await eventually(lambda: sum_waits_for_the_lock(sessions), 10, "the rebuild's sum to wait")
        await spending.add(job_id, 10, 0.25)  # a turn recorded meanwhile (not in that sum)
    assert await asyncio.wait_for(rebuild, 10) == (17, 0.75)
    assert await spending.spent(job_id) == (17, 0.75)

    # Dropped meanwhile and started again by another reader, the counters are that reader's
    # to finish: this rebuild answers with its sum and leaves them be.
    await spending.forget(job_id)
    async with sessions.begin() as holder:
        await holder.execute(text("LOCK TABLE turns IN ACCESS EXCLUSIVE MODE"))
        rebuild = asyncio.create_task(spending.spent(job_id))
        await eventually(lambda: sum_waits_for_the_lock(sessions), 10, "the rebuild's sum to wait")
        await spending.forget(job_id)
        assert await redis.register_script(budgets._READ)(keys=[key], args=[30_000, "another"]) == b"rebuild"
    assert await asyncio.wait_for(rebuild, 10) == (7, 0.5)
    assert await redis.hget(key, "ready") == b"0"  # type: ignore[misc]


async def test_a_reader_meeting_another_callers_rebuild_takes_the_turns_and_leaves_it_to_them(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, redis: Redis, spending: budgets.Spending
) -> None:
    job_id = (await a_job_with_a_turn(api, auth, sessions))[0].job_id
    key = spending.key(job_id)
    read = redis.register_script(budgets._READ)
    assert await read(keys=[key], args=[30_000, "another"]) == b"rebuild"  # it sums the turns
    await spending.add(job_id, 10, 0.25)
    assert await spending.spent(job_id) == (7, 0.5)
    assert await redis.hmget(key, ["tokens", "ready", "rebuilder"]) == [b"10", b"0", b"another"]  # type: ignore[misc]
    assert 0 < await redis.pttl(key) <= 30_000  # a rebuilder that died leaves them briefly


async def sum_waits_for_the_lock(sessions: Sessions) -> bool:
    async with sessions() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'SELECT coalesce(sum(%'"
            )
        )
    return bool(waiting)


@pytest.mark.parametrize("limit", ["max_tokens", "max_cost_usd"])
async def test_waiting_items_resume_by_the_counters_unless_the_budget_changed_then_by_the_turns(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, spending: budgets.Spending, limit: str
) -> None:
    """The counters, which the workers read, say the budget is spent (a turn they counted
    twice, say) while the turns say it is not: without a change of budget the waiting item
    stays (resumed, it would only park again); a changed budget drops the counters and sums
    the turns, which decide then, either way."""
    claim, _ = await a_job_with_a_turn(api, auth, sessions)
    elsewhere = await another_tenants_waiting_item(api, sessions)
    at_the_turns, above_them = (
        Budget.model_validate({limit: figure})
        for figure in {"max_tokens": (7, 100), "max_cost_usd": (0.5, 1.0)}[limit]
    )
    async with sessions.begin() as session:
        await items.write_ending(session, claim, budgets.WAITING)
        parked_at = await session.scalar(select(Item.updated_at).where(Item.id == claim.item_id))
    assert await spending.spent(claim.job_id) == (7, 0.5)
    await spending.add(claim.job_id, 200, 2.0)

    for budget, budget_changed in ((at_the_turns, True), (above_them, False)):
        await set_budget(sessions, claim.job_id, budget)
        async with sessions.begin() as session:
            assert (
                await budgets.settle_waiting(session, spending, claim.job_id, budget_changed=budget_changed)
                == []
            )
        assert await status_of(sessions, claim.item_id) == (ItemStatus.BUDGET_EXHAUSTED, 1)
    async with sessions.begin() as session:
        resumed = await budgets.settle_waiting(session, spending, claim.job_id, budget_changed=True)
    assert resumed == [(claim.item_id, 2)]
    assert await status_of(sessions, claim.item_id) == (ItemStatus.QUEUED, 2)
    async with sessions() as session:
        item = await session.get_one(Item, claim.item_id)
        # Queued again: no error shown, and its time in the queue starts now (the sweeper's grace).
        assert (item.error_code, item.error_message) == (None, None)
        assert parked_at is not None and item.updated_at > parked_at
    assert await status_of(sessions, elsewhere) == (ItemStatus.BUDGET_EXHAUSTED, 1)


async def test_with_redis_away_the_turns_decide_whether_waiting_items_resume(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, sessions: Sessions
) -> None:
    """A park settles the job's waiting items as it ends its own: raising there for want of
    Redis would undo the park. The turns answer instead, and must hold back items whose
    budget they have spent."""
    claim, _ = await a_job_with_a_turn(api, auth, sessions)
    waiting = update(Item).where(Item.id == claim.item_id).values(status=ItemStatus.BUDGET_EXHAUSTED)
    async with sessions.begin() as session:
        await session.execute(waiting)
    unreachable = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    try:
        spending = budgets.Spending(unreachable, sessions, settings.redis_key_prefix)
        for budget, resumed in ((Budget(max_tokens=7), []), (Budget(max_tokens=8), [(claim.item_id, 2)])):
            await set_budget(sessions, claim.job_id, budget)
            async with sessions.begin() as session:
                assert await budgets.settle_waiting(session, spending, claim.job_id) == resumed
    finally:
        await unreachable.aclose()


async def test_a_park_after_the_budget_was_raised_queues_the_item_again_in_its_keys_share(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    arq_redis: ArqRedis,
    spending: budgets.Spending,
) -> None:
    """The worker found the budget spent, then a PATCH raised it before the park: the park
    itself queues the item again, in line as its job's API key's. A park while the counters
    say the budget is spent leaves the item waiting."""
    claim, other = await a_job_with_a_turn(api, auth, sessions)
    await set_budget(sessions, claim.job_id, Budget(max_tokens=10**6))
    async with sessions() as session:
        owner = str(await session.scalar(select(Job.owner_key_id).where(Job.id == claim.job_id)))
    line = line_key(settings.queue_name)
    placed = int(await redis.hget(line, owner))  # type: ignore[misc]  # the job's items, at submission
    ending = await budgets.park(sessions, spending, arq_redis, settings.queue_name, claim)
    assert ending is not None and ending.error_code == "budget_exhausted"
    assert await status_of(sessions, claim.item_id) == (ItemStatus.QUEUED, 2)
    assert await redis.zscore(settings.queue_name, arq_job_id(claim.item_id, 2)) is not None
    assert int(await redis.hget(line, owner)) == placed + 1  # type: ignore[misc]  # one more place of the key's

    await spending.add(claim.job_id, 10**6, None)  # counted, not yet in the turns
    await budgets.park(sessions, spending, arq_redis, settings.queue_name, other)
    assert await status_of(sessions, other.item_id) == (ItemStatus.BUDGET_EXHAUSTED, 1)


async def test_a_park_in_a_cancelled_job_cancels_the_item_and_announces_the_job_finished(
    settings: Settings,
    auth: dict[str, str],
    sessions: Sessions,
    arq_redis: ArqRedis,
    spending: budgets.Spending,
) -> None:
    """Items running when their job is cancelled stop at their next check; one that found the
    budget spent first is parked, and cancelled there: the last one ends the job."""
    async with api_client(settings.model_copy(update={"callback_hosts": "127.0.0.1:9"})) as api:
        body = {
            "prompts": ["a?", "b?"],
            "callback_url": "http://127.0.0.1:9/hook",
            "budget": {"max_tokens": 10**6},
        }
        job_id = UUID((await api.post("/v1/jobs", json=body, headers=auth)).json()["id"])
        async with sessions() as session:
            ids = (await session.scalars(select(Item.id).where(Item.job_id == job_id))).all()
        claims = [await items.claim(sessions, item_id, LIMITS) for item_id in ids]
        assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200
        elsewhere = await another_tenants_waiting_item(api, sessions)
    for claim in claims:
        assert claim is not None
        await budgets.park(sessions, spending, arq_redis, settings.queue_name, claim)
    async with sessions() as session:
        statuses = (await session.scalars(select(Item.status).where(Item.job_id == job_id))).all()
        assert statuses == [ItemStatus.CANCELLED] * 2
        assert await session.scalar(select(func.count()).select_from(CallbackDelivery)) == 1
    assert await status_of(sessions, elsewhere) == (ItemStatus.BUDGET_EXHAUSTED, 1)


async def test_the_meter_counts_each_turn_of_a_budgeted_job_and_starts_no_call_once_it_is_spent(
    redis: Redis, spending: budgets.Spending, llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    job_id, budget = uuid4(), Budget(max_tokens=20)
    meter = budgets.Meter(llm, spending, job_id, budget)
    request = chat_request(SEED, "How do tides work?")
    await meter.chat(request)
    await meter.recorded(budget, 15, 0.5)
    assert await spending.spent(job_id) == (15, 0.5)
    await meter.chat(request)
    await meter.recorded(budget, 5, None)
    with pytest.raises(BudgetExhausted):
        await meter.chat(request)
    assert len(scripted_llm.requests) == 2

    await meter.recorded(None, 5, None)  # the budget was removed: nothing counted, calls go on
    assert await spending.spent(job_id) == (20, 0.5)
    await meter.chat(request)
    assert len(scripted_llm.requests) == 3

    # Counters that cannot be added to are dropped, to be rebuilt from the turns.
    await redis.set(spending.key(job_id), "not counters")
    await meter.recorded(budget, 5, None)
    assert await redis.exists(spending.key(job_id)) == 0


async def test_a_meter_without_redis_starts_no_call_and_tells_the_tenant_why_and_loses_no_turn(
    settings: Settings, sessions: Sessions, llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """The item waits as in an LLM outage, its tries not used up; a turn already stored is
    kept (rebuilt counters will count it), not failed for want of Redis."""
    unreachable = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    try:
        spending = budgets.Spending(unreachable, sessions, settings.redis_key_prefix)
        budget = Budget(max_tokens=20)
        meter = budgets.Meter(llm, spending, uuid4(), budget)
        with pytest.raises(LLMUnavailable) as unavailable:
            await meter.chat(chat_request(SEED, "How do tides work?"))
        assert unavailable.value.summary == "the job's spending could not be read"
        assert str(unavailable.value).startswith("budget counters unreadable: ConnectionError(")
        assert scripted_llm.requests == []
        await meter.recorded(budget, 5, None)  # neither added nor dropped: it returns all the same
    finally:
        await unreachable.aclose()
