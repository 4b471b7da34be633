"""Costs and budgets end to end: prices pinned at submission, each turn's cost from the usage
the (scripted) server reports, cached prompt tokens included; a budget that stops a job and a
PATCH that resumes it; the dry-run estimate; and the refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

import httpx
import orjson
import pytest
from arq.connections import ArqRedis
from prometheus_client import REGISTRY
from pydantic import ValidationError
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update

from app.config import EndpointConfig, Prices, Settings
from app.store import budgets, callbacks
from app.store.db import Sessions, make_engine, make_sessions
from app.store.models import CallbackDelivery, Item, ItemStatus, Job, TurnRow
from app.store.turn_writer import TurnWriter, Written
from tests.conftest import ROOT, api_client, eventually, least_loop_pause, run_worker_burst
from tests.scripted_llm import ScriptedLLM
from tests.test_turn_log import COST_METRIC
from tests.test_turn_writer import claimed_items, turn_row
from tests.test_viewer import logged_in
from workers.sweeper import sweep

PRICES = {"input": 1.0, "cached_input": 0.5, "output": 2.0}  # USD per million tokens
# Every answer reports 1,000 prompt tokens (400 of them cached) and 200 completion tokens.
USAGE = (1000, 200, 400)
CALL_USD = (600 * 1.0 + 400 * 0.5 + 200 * 2.0) / 1e6
CALL_TOKENS = 1200
QUICK = {"agents": 2, "max_rounds": 2, "max_tokens": 64}  # agreement at once: 4 calls an item


@pytest.fixture
def priced(settings: Settings) -> Settings:
    """The session's settings with the default endpoint priced and "second" left unpriced."""
    return settings.model_copy(update={"llm_prices": {"default": Prices(**PRICES)}})


@pytest.fixture
async def priced_api(priced: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(priced) as client:
        yield client


async def post_job(api: httpx.AsyncClient, auth: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return await api.post("/v1/jobs", json=body, headers=auth)


def prompts(n: int) -> list[str]:
    return [f"How do I store cleaning products safely? ({i})" for i in range(n)]


async def turns_of(sessions: Sessions, job_id: str) -> list[TurnRow]:
    async with sessions() as session:
        rows = await session.scalars(
            select(TurnRow).where(TurnRow.job_id == UUID(job_id)).order_by(TurnRow.id)
        )
        return list(rows)


def test_settings_refuse_a_price_for_an_unknown_endpoint_a_negative_price_and_a_price_given_twice() -> None:
    with pytest.raises(ValidationError) as unknown:
        Settings(llm_prices={"gpt-typo": Prices(**PRICES)})
    assert unknown.value.errors()[0]["type"] == "unknown_price_endpoint"
    assert "llm_prices names endpoint 'gpt-typo', which is not configured" in str(unknown.value)
    with pytest.raises(ValidationError) as negative:
        Settings(llm_prices={"default": Prices(**{**PRICES, "output": -1})})
    assert negative.value.errors()[0]["type"] == "greater_than_equal"
    with pytest.raises(ValidationError) as twice:
        Settings(
            llm_endpoints={"vllm": EndpointConfig(base_url="http://gpu/v1", prices=Prices(**PRICES))},
            llm_prices={"vllm": Prices(**PRICES)},
        )
    assert twice.value.errors()[0]["type"] == "endpoint_priced_twice"
    assert "endpoint 'vllm' has prices in both" in str(twice.value)
    # Given once, either way, an endpoint carries its prices.
    endpoints = Settings(
        llm_endpoints={"vllm": EndpointConfig(base_url="http://gpu/v1", prices=Prices(**PRICES))},
        llm_prices={"default": Prices(input=3, output=4)},
    ).endpoints()
    assert endpoints["vllm"].prices == Prices(**PRICES)
    assert endpoints["default"].prices == Prices(input=3, output=4)


async def test_turns_items_and_jobs_cost_their_reported_usage_at_the_prices_pinned_at_submission(
    priced_api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    second_llm: ScriptedLLM,
) -> None:
    scripted_llm.usage = second_llm.usage = USAGE
    counted_before = REGISTRY.get_sample_value(COST_METRIC, {"endpoint": "default"}) or 0.0
    priced_job = await post_job(priced_api, auth, {"prompts": prompts(2), "config": QUICK})
    assert priced_job.status_code == 202, priced_job.text
    assert priced_job.json()["config"]["prices"] == {"default": {**PRICES}}
    unpriced_job = await post_job(
        priced_api, auth, {"prompts": prompts(1), "config": {**QUICK, "defaults": {"endpoint": "second"}}}
    )
    assert "prices" not in unpriced_job.json()["config"]
    await run_worker_burst(settings)

    priced_id, unpriced_id = priced_job.json()["id"], unpriced_job.json()["id"]
    turns = await turns_of(sessions, priced_id)
    assert len(turns) == 8
    assert {(t.prompt_tokens, t.cached_prompt_tokens, t.completion_tokens) for t in turns} == {
        (1000, 400, 200)
    }
    assert all(t.cost_usd == pytest.approx(CALL_USD) for t in turns)
    assert all(t.cost_usd is None for t in await turns_of(sessions, unpriced_id))
    # The worker's metrics count the priced calls' cost per endpoint, and none for "second".
    counted = REGISTRY.get_sample_value(COST_METRIC, {"endpoint": "default"})
    assert counted is not None and counted - counted_before == pytest.approx(8 * CALL_USD)
    assert REGISTRY.get_sample_value(COST_METRIC, {"endpoint": "second"}) is None

    # A price change afterwards prices new jobs only: this one keeps its pinned prices.
    repriced = settings.model_copy(update={"llm_prices": {"default": Prices(input=100, output=100)}})
    async with api_client(repriced) as api:
        job = (await api.get(f"/v1/jobs/{priced_id}", headers=auth)).json()
        assert job["status"] == "completed"
        assert job["usage"] == {
            "llm_calls": 8,
            "prompt_tokens": 8000,
            "cached_prompt_tokens": 3200,
            "completion_tokens": 1600,
            "cost_usd": pytest.approx(8 * CALL_USD),
        }
        assert job["config"]["prices"] == {"default": {**PRICES}}
        unpriced = (await api.get(f"/v1/jobs/{unpriced_id}", headers=auth)).json()
        assert unpriced["usage"]["cost_usd"] is None  # unknown, not free
        assert unpriced["usage"]["llm_calls"] == 4

        listed = {j["id"]: j["cost_usd"] for j in (await api.get("/v1/jobs", headers=auth)).json()["data"]}
        assert listed == {priced_id: pytest.approx(8 * CALL_USD), unpriced_id: None}

        report = (await api.get(f"/v1/jobs/{priced_id}/report", headers=auth)).json()
        assert report["usage"]["cost_usd"] == pytest.approx(8 * CALL_USD)
        assert {stage: u["cost_usd"] for stage, u in report["usage_by_stage"].items()} == {
            stage: pytest.approx(2 * CALL_USD) for stage in ("deliberation", "intent", "refine", "seed")
        }

        item_id = (await api.get(f"/v1/jobs/{priced_id}/items", headers=auth)).json()["data"][0]["id"]
        item = (await api.get(f"/v1/items/{item_id}", headers=auth)).json()
        assert item["usage"]["cost_usd"] == pytest.approx(4 * CALL_USD)
        assert [t["cost_usd"] for t in item["turns"]] == [pytest.approx(CALL_USD)] * 4
        assert {t["cached_prompt_tokens"] for t in item["turns"]} == {400}

    # Neither job has a budget: their workers kept no spending counters (no Redis round trip).
    redis = Redis.from_url(settings.redis_url)
    try:
        assert not [key async for key in redis.scan_iter(f"{settings.redis_key_prefix}:spent:*")]
    finally:
        await redis.aclose()


@pytest.mark.parametrize("items_at_once", [1, 3])
async def test_a_spent_budget_parks_the_items_and_raising_it_resumes_them_with_nothing_lost_or_repeated(
    priced_api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    items_at_once: int,
) -> None:
    scripted_llm.usage = USAGE
    scripted_llm.latency_s = 0.1  # calls of items run at once overlap
    # Three recorded calls (3,600 tokens) reach it; every call starts with at most two recorded,
    # so beyond those, only calls in flight then (one per other running item) can be made.
    body = {"prompts": prompts(3), "config": QUICK, "budget": {"max_tokens": 3600}}
    submitted = await post_job(priced_api, auth, body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.json()["budget"] == {
        "max_cost_usd": None,
        "max_tokens": 3600,
        "spent_cost_usd": 0.0,
        "spent_tokens": 0,
        "exhausted": False,
    }
    await run_worker_burst(settings, max_jobs=items_at_once)

    job = (await priced_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "budget_exhausted"
    assert job["counts"]["by_status"] == {"budget_exhausted": 3}
    assert job["budget"]["exhausted"] is True
    calls = len(scripted_llm.requests)
    assert 3 <= calls <= 2 + items_at_once  # one at a time: exactly the three
    assert job["budget"]["spent_tokens"] == calls * CALL_TOKENS  # every call made is recorded
    items = (await priced_api.get(f"/v1/jobs/{job_id}/items", headers=auth)).json()["data"]
    assert {i["error_code"] for i in items} == {"budget_exhausted"}
    listed = (await priced_api.get("/v1/jobs?status=budget_exhausted", headers=auth)).json()["data"]
    assert [j["id"] for j in listed] == [job_id]

    raised = await priced_api.patch(
        f"/v1/jobs/{job_id}", json={"budget": {"max_tokens": 100_000}}, headers=auth
    )
    assert raised.status_code == 200, raised.text
    assert raised.json()["budget"]["exhausted"] is False
    assert raised.json()["counts"]["by_status"] == {"queued": 3}
    await run_worker_burst(settings)

    job = (await priced_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "completed"
    assert job["counts"]["by_status"] == {"completed": 3}
    turns = await turns_of(sessions, job_id)
    assert len(turns) == 12 == len(scripted_llm.requests)  # each call made once, each kept
    assert len({(t.item_id, t.stage, t.round, t.agent, t.attempt) for t in turns}) == 12
    assert job["usage"]["cost_usd"] == pytest.approx(12 * CALL_USD)
    cots = (await priced_api.get(f"/v1/jobs/{job_id}/cots", headers=auth)).json()["data"]
    assert len(cots) == 3


async def test_counters_lost_mid_job_are_rebuilt_from_the_turns_and_the_job_stops_where_it_would_have(
    priced_api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.usage = USAGE
    key_prefix = f"{settings.redis_key_prefix}:spent:"
    redis = SyncRedis.from_url(settings.redis_url)
    answered = 0

    def restart_redis_at_the_third_call() -> None:  # its counters go, as in a Redis restart
        nonlocal answered
        answered += 1
        if answered == 3:
            keys = redis.keys(f"{key_prefix}*")
            assert isinstance(keys, list)  # redis-py types its commands as sync or async
            redis.delete(*keys)

    scripted_llm.unscripted = restart_redis_at_the_third_call
    # Five recorded calls (6,000 tokens) reach it, of the eight the two items would make.
    body = {"prompts": prompts(2), "config": QUICK, "budget": {"max_tokens": 6000}}
    job_id = (await post_job(priced_api, auth, body)).json()["id"]
    try:
        await run_worker_burst(settings, max_jobs=1)
        assert answered == 5
        job = (await priced_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
        assert job["status"] == "budget_exhausted"
        assert job["budget"]["spent_tokens"] == 5 * CALL_TOKENS
        counted = redis.hmget(f"{key_prefix}{job_id}", ["tokens", "usd"])
        assert isinstance(counted, list)  # redis-py types its commands as sync or async
        assert int(counted[0]) == 5 * CALL_TOKENS and float(counted[1]) == pytest.approx(5 * CALL_USD)
    finally:
        redis.close()


async def test_a_rebuild_finished_twice_counts_the_turns_once(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """The pool sends a call again when its reply timed out, maybe after Redis ran it: the
    second finish of a rebuild must not add the turns' sums again."""
    spending = budgets.Spending(redis, sessions, f"{settings.redis_key_prefix}:test")
    job_id = uuid4()
    key = spending.key(job_id)
    finish = redis.register_script(budgets._FINISH)
    try:
        assert await redis.register_script(budgets._READ)(keys=[key], args=[30_000, "r"]) == b"rebuild"
        await spending.add(job_id, 7, 0.25)  # a turn added meanwhile
        first = await finish(keys=[key], args=[100, "1.5", 60_000, "r"])
        again = await finish(keys=[key], args=[100, "1.5", 60_000, "r"])
    finally:
        await redis.delete(key)
    assert (int(first[0]), float(first[1])) == (107, 1.75)
    assert (int(again[0]), float(again[1])) == (107, 1.75)


async def test_a_rebuild_finishes_only_the_counters_it_started(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """Counters dropped while a rebuild sums the turns (a budget's PATCH, a failed add) are
    started again by the next reader: the first rebuild's sum, older, must not finish them."""
    spending = budgets.Spending(redis, sessions, f"{settings.redis_key_prefix}:test")
    job_id = uuid4()
    key = spending.key(job_id)
    read, finish = redis.register_script(budgets._READ), redis.register_script(budgets._FINISH)
    try:
        assert await read(keys=[key], args=[30_000, "first"]) == b"rebuild"  # it sums: 100
        await spending.forget(job_id)
        assert await read(keys=[key], args=[30_000, "second"]) == b"rebuild"  # it sums: 107
        assert await read(keys=[key], args=[30_000, "second"]) == b"rebuild", "its call sent again"
        assert await read(keys=[key], args=[30_000, "third"]) == b"wait"
        assert await finish(keys=[key], args=[100, "1.5", 60_000, "first"]) is None
        second = await finish(keys=[key], args=[107, "1.75", 60_000, "second"])
    finally:
        await redis.delete(key)
    assert (int(second[0]), float(second[1])) == (107, 1.75)


async def test_settling_waiting_items_with_redis_away_reads_the_turns(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, sessions: Sessions
) -> None:
    """A park settles the job's waiting items as it ends its own: raising there would undo
    the park and hand the item back, a counted try spent for want of Redis alone."""
    running, waiting = await claimed_items(api, auth, sessions, 2)
    async with sessions.begin() as session:
        await session.execute(update(Job).where(Job.id == running.job_id).values(budget_max_tokens=10**6))
        parked = update(Item).where(Item.id == waiting.item_id).values(status=ItemStatus.BUDGET_EXHAUSTED)
        await session.execute(parked)
    unreachable = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    try:
        async with sessions.begin() as session:
            spending = budgets.Spending(unreachable, sessions, settings.redis_key_prefix)
            resumed = await budgets.settle_waiting(session, spending, running.job_id)
    finally:
        await unreachable.aclose()
    assert resumed == [(waiting.item_id, 2)]


async def test_turns_of_one_job_do_not_wait_for_its_row(
    priced_api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    """A turn's insert does not update its job's row: with the row locked as an update locks
    it (a PATCH of the budget, a cancel), a job with a budget still runs to its end."""
    scripted_llm.usage = USAGE
    body = {"prompts": prompts(1), "config": QUICK, "budget": {"max_tokens": 50_000}}
    job_id = UUID((await post_job(priced_api, auth, body)).json()["id"])
    async with sessions.begin() as session:
        await session.execute(select(Job.id).where(Job.id == job_id).with_for_update(key_share=True))
        await asyncio.wait_for(run_worker_burst(settings), timeout=30)
    job = (await priced_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert (job["status"], job["budget"]["spent_tokens"]) == ("completed", 4 * CALL_TOKENS)


async def test_a_job_waiting_for_budget_can_be_cancelled(
    priced_api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.usage = USAGE
    body = {"prompts": prompts(1), "config": QUICK, "budget": {"max_cost_usd": 3 * CALL_USD}}
    job_id = (await post_job(priced_api, auth, body)).json()["id"]
    await run_worker_burst(settings)
    assert len(scripted_llm.requests) == 3
    waiting = (await priced_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert waiting["status"] == "budget_exhausted"
    assert waiting["budget"]["spent_cost_usd"] == pytest.approx(3 * CALL_USD)
    deleted = await priced_api.delete(f"/v1/jobs/{job_id}", headers=auth)  # it has not ended
    assert (deleted.status_code, deleted.json()["error"]["code"]) == (409, "job_running")
    cancelled = (await priced_api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["counts"]["by_status"] == {"cancelled": 1}


async def test_the_estimate_gives_calls_tokens_and_a_cost_range_and_creates_nothing(
    priced_api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    body = {"prompts": prompts(3), "config": QUICK}
    estimate = await priced_api.post("/v1/jobs/estimate", json=body, headers=auth)
    assert estimate.status_code == 200, estimate.text
    figures = estimate.json()
    # Fewest: intent, seed, the first agent agrees, refiner. Most: 2 rounds of 2 agents.
    assert figures["items"] == 3
    assert figures["calls"] == {"min": 12, "max": 21}
    assert figures["completion_tokens"] == {"min": 12 * 64, "max": 21 * 64}
    assert 0 < figures["prompt_tokens"]["min"] < figures["prompt_tokens"]["max"]
    cost = figures["cost_usd"]
    assert cost["min"] == pytest.approx(
        (figures["prompt_tokens"]["min"] * 1.0 + figures["completion_tokens"]["min"] * 2.0) / 1e6
    )
    assert 0 < cost["min"] < cost["max"]
    assert figures["unpriced_endpoints"] == []
    assert figures["prices"] == {"default": PRICES}
    assert (await priced_api.get("/v1/jobs", headers=auth)).json()["data"] == []

    unpriced = await priced_api.post(
        "/v1/jobs/estimate",
        json={**body, "config": {**QUICK, "refiner": {"endpoint": "second"}}},
        headers=auth,
    )
    assert unpriced.json()["cost_usd"] is None
    assert unpriced.json()["unpriced_endpoints"] == ["second"]
    assert unpriced.json()["calls"] == figures["calls"]

    async def calls(config: dict[str, Any]) -> dict[str, Any]:
        answer = await priced_api.post("/v1/jobs/estimate", json={**body, "config": config}, headers=auth)
        estimated: dict[str, Any] = answer.json()["calls"]
        return estimated

    assert await calls({"mode": "zero_shot"}) == {"min": 3, "max": 3}
    # The fallback is asked only after a refusal, which the estimate does not assume.
    assert await calls({**QUICK, "fallback": {"endpoint": "default"}}) == figures["calls"]
    fallback_graded = {**QUICK, "fallback": {"endpoint": "default"}, "grading": {}, "pairs": {"max_tries": 2}}
    assert await calls(fallback_graded) == {"min": 3 * (4 + 1 + 4), "max": 3 * (7 + 1 + 2 * 4)}
    # Grading adds a call; pairs a try (or max_tries of them) of three calls and a grade; the
    # baseline as many tries of a sample, a verdict and a grade.
    graded = {**QUICK, "grading": {}, "pairs": {"max_tries": 2}}
    assert await calls(graded) == {"min": 3 * (4 + 1 + 4), "max": 3 * (7 + 1 + 2 * 4)}
    baseline = {**QUICK, "grading": {}, "pairs": {"max_tries": 2, "baseline": True}}
    assert await calls(baseline) == {"min": 3 * (4 + 1 + 4 + 3), "max": 3 * (7 + 1 + 2 * (4 + 3))}
    # Ablations: a stage left out is no call; a turn budget caps the deliberation turns.
    assert await calls({**QUICK, "decompose_intents": False}) == {"min": 3 * 3, "max": 3 * 6}
    assert await calls({**QUICK, "refine": False}) == {"min": 3 * 3, "max": 3 * 6}
    assert await calls({**QUICK, "max_rounds": 0}) == {"min": 3 * 3, "max": 3 * 3}
    assert await calls({**QUICK, "max_turns": 3}) == {"min": 3 * 4, "max": 3 * 6}
    assert await calls({**QUICK, "max_turns": 1}) == {"min": 3 * 4, "max": 3 * 4}
    # A later turn reads the earlier ones: capping turns takes the largest prompts off.
    capped = await priced_api.post(
        "/v1/jobs/estimate", json={**body, "config": {**QUICK, "max_turns": 3}}, headers=auth
    )
    assert capped.json()["prompt_tokens"]["max"] < figures["prompt_tokens"]["max"]
    # An endpoint only a left-out stage names is not called, so need not be priced.
    unused = {**QUICK, "refine": False, "refiner": {"endpoint": "second"}}
    answer = (
        await priced_api.post("/v1/jobs/estimate", json={**body, "config": unused}, headers=auth)
    ).json()
    assert (answer["unpriced_endpoints"], answer["cost_usd"] is None) == ([], False)


async def test_readme_shows_the_estimate_of_the_prompts_it_names(
    priced_api: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    """README's example answer is the estimate of its three prompts, to the token: a change to
    the templates, the policies or the schemas changes it, and the README with it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Estimates.**") :]
    start = section.index("```json\n")
    example = section[start + len("```json\n") : section.index("```\n", start)]
    assert f"`{prompts(1)[0]}`" in section[:start], "README names the prompts it estimates"

    estimate = await priced_api.post(
        "/v1/jobs/estimate", json={"prompts": prompts(3), "config": QUICK}, headers=auth
    )

    assert estimate.json() == orjson.loads(example)


async def test_an_estimate_of_10000_prompts_holds_the_event_loop_briefly(
    priced_api: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    """The prompts' models and duplicates, and a cost per prompt at the prices, held every
    other request for 70 ms of CPU on the event loop; in a worker thread, 3-4 ms."""
    body = orjson.dumps({"prompts": [f"prompt number {n} " * 5 for n in range(10_000)], "config": QUICK})
    headers = {**auth, "Content-Type": "application/json"}
    # The default sets registered, as the first job of a key does.
    assert (await post_job(priced_api, auth, {"prompts": prompts(1), "config": QUICK})).status_code == 202

    response, held = await least_loop_pause(
        lambda: priced_api.post("/v1/jobs/estimate", content=body, headers=headers), times=5
    )

    assert response.status_code == 200, response.text
    assert response.json()["items"] == 10_000 and response.json()["cost_usd"]["min"] > 0
    # CI's load inflates the loop's CPU by half again or more.
    assert held < 0.013, f"the event loop was held for {held:.3f} s of CPU"


async def test_a_budget_patched_onto_a_long_job_holds_the_event_loop_briefly(
    priced_api: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    """Checking a budget renders the largest request of every deliberation turn: for 8 agents
    and 20 rounds some 13,000 requests, which held the event loop for 40 ms of CPU; in a
    worker thread, 2 ms."""
    config = {"agents": 8, "max_rounds": 20}
    job_id = (await post_job(priced_api, auth, {"prompts": prompts(1), "config": config})).json()["id"]

    response, held = await least_loop_pause(
        lambda: priced_api.patch(f"/v1/jobs/{job_id}", json={"budget": {"max_tokens": 10**9}}, headers=auth)
    )

    assert response.status_code == 200, response.text
    assert response.json()["budget"]["max_tokens"] == 10**9
    assert held < 0.010, f"the event loop was held for {held:.3f} s of CPU"


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/estimate"])
async def test_a_long_job_submitted_with_a_budget_holds_the_event_loop_briefly(
    priced_api: httpx.AsyncClient, auth: dict[str, str], path: str
) -> None:
    """The check of a budget's PATCH (above), at submission and in an estimate: it held the
    event loop for 40 ms of CPU; in a worker thread, 2-3 ms."""
    body = {"prompts": prompts(1), "config": {"agents": 8, "max_rounds": 20}, "budget": {"max_tokens": 10**9}}
    # The default sets registered, as the first job of a key does.
    assert (await post_job(priced_api, auth, {"prompts": prompts(1), "config": QUICK})).status_code == 202

    response, held = await least_loop_pause(lambda: priced_api.post(path, json=body, headers=auth))

    assert response.status_code in (200, 202), response.text
    assert held < 0.010, f"the event loop was held for {held:.3f} s of CPU"


async def test_budgets_no_call_fits_or_that_cannot_be_counted_are_refused_with_stable_codes(
    priced_api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    async def refused(body: dict[str, Any], path: str = "/v1/jobs") -> tuple[int, str]:
        answer = await priced_api.post(
            path, json={"prompts": prompts(1), "config": QUICK, **body}, headers=auth
        )
        return answer.status_code, answer.json()["error"]["code"]

    assert await refused({"budget": {"max_tokens": 10}}) == (422, "budget_too_small")
    assert await refused({"budget": {"max_cost_usd": 1e-9}}) == (422, "budget_too_small")
    assert await refused({"budget": {"max_tokens": 10}}, "/v1/jobs/estimate") == (422, "budget_too_small")
    money_unpriced = {"budget": {"max_cost_usd": 5}, "config": {**QUICK, "seed": {"endpoint": "second"}}}
    assert await refused(money_unpriced) == (422, "unpriced_endpoint")
    assert await refused({"budget": {"max_cost_usd": -1}}) == (422, "validation_error")
    assert await refused({"budget": {}}) == (422, "validation_error")
    assert await refused({"budget": {"max_tokens": 2**63}}) == (422, "validation_error")  # over BIGINT
    assert (await priced_api.get("/v1/jobs", headers=auth)).json()["data"] == []

    # A PATCH that would make the budget too small changes nothing.
    job_id = (
        await post_job(priced_api, auth, {"prompts": prompts(1), "budget": {"max_tokens": 50_000}})
    ).json()["id"]
    lowered = await priced_api.patch(
        f"/v1/jobs/{job_id}", json={"budget": {"max_tokens": 10}, "label": "x"}, headers=auth
    )
    assert (lowered.status_code, lowered.json()["error"]["code"]) == (422, "budget_too_small")
    job = (await priced_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert (job["budget"]["max_tokens"], job["label"]) == (50_000, None)
    # And a token budget may be removed.
    removed = await priced_api.patch(f"/v1/jobs/{job_id}", json={"budget": None}, headers=auth)
    assert removed.json()["budget"] is None


async def test_the_viewer_shows_job_item_and_turn_costs_and_unknown_for_an_unpriced_job(
    priced_api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.usage = USAGE
    priced_id = (await post_job(priced_api, auth, {"prompts": prompts(1), "config": QUICK})).json()["id"]
    unpriced_body = {
        "prompts": prompts(1),
        "config": {**QUICK, "grading": {"grader": {"endpoint": "second"}}},
    }
    unpriced_id = (await post_job(priced_api, auth, unpriced_body)).json()["id"]
    await run_worker_burst(settings)
    viewer = await logged_in(priced_api, auth)

    page = (await viewer.get(f"/view/jobs/{priced_id}")).text
    assert f'<span id="job-cost">${4 * CALL_USD:,.4f}</span>' in page
    assert (
        '<span id="job-cost">unknown (unpriced endpoint)</span>'
        in (await viewer.get(f"/view/jobs/{unpriced_id}")).text
    )
    listing = (await viewer.get("/view/jobs")).text
    assert f'<td class="cost">${4 * CALL_USD:,.4f}</td>' in listing
    assert '<td class="cost">unknown (unpriced endpoint)</td>' in listing
    item_id = (await priced_api.get(f"/v1/jobs/{priced_id}/items", headers=auth)).json()["data"][0]["id"]
    assert f"cost ${4 * CALL_USD:,.4f}" in (await viewer.get(f"/view/items/{item_id}")).text


async def test_a_job_is_not_announced_as_finished_while_items_wait_for_budget(
    priced: Settings, auth: dict[str, str], sessions: Sessions
) -> None:
    async with api_client(priced.model_copy(update={"callback_hosts": "127.0.0.1:9"})) as api:
        body = {
            "prompts": prompts(2),
            "callback_url": "http://127.0.0.1:9/hook",
            "budget": {"max_tokens": 50_000},
        }
        job_id = UUID((await api.post("/v1/jobs", json=body, headers=auth)).json()["id"])
    async with sessions.begin() as session:
        # One item completed after the other had stopped to wait for budget.
        for position, status in ((0, "budget_exhausted"), (1, "completed")):
            await session.execute(
                update(Item).where(Item.job_id == job_id, Item.position == position).values(status=status)
            )
        await callbacks.record_if_finished(session, job_id)
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(CallbackDelivery)) == 0


async def test_an_items_cost_is_known_when_its_own_calls_were_priced_in_the_api_as_in_exports(
    priced_api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    second_llm: ScriptedLLM,
) -> None:
    scripted_llm.usage = second_llm.usage = USAGE
    # Unpriced "second" is only the fallback, which no call needs here: every turn is priced.
    fallback = {**QUICK, "fallback": {"endpoint": "second"}}
    priced_calls = await post_job(priced_api, auth, {"prompts": prompts(1), "config": fallback})
    on_second = {**QUICK, "defaults": {"endpoint": "second"}}
    unpriced_calls = await post_job(priced_api, auth, {"prompts": prompts(1), "config": on_second})
    await run_worker_burst(settings)

    for job, cost in ((priced_calls, pytest.approx(4 * CALL_USD)), (unpriced_calls, None)):
        job_id = job.json()["id"]
        [listed] = (await priced_api.get(f"/v1/jobs/{job_id}/items", headers=auth)).json()["data"]
        item = (await priced_api.get(f"/v1/items/{listed['id']}", headers=auth)).json()
        export = await priced_api.get(f"/v1/jobs/{job_id}/export?format=jsonl", headers=auth)
        [record] = [orjson.loads(line) for line in export.text.splitlines()]
        assert item["usage"]["cost_usd"] == record["usage"]["cost_usd"] == cost


async def test_settling_a_jobs_waiting_items_needs_no_second_connection(
    priced_api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, migrated: str, redis: Redis
) -> None:
    """settle_waiting (a budget's PATCH, an item parked) holds the job's row on its session
    while it reads the job's spending. Read on a second connection, it waited for the pool's
    timeout whenever each connection was held so (as many PATCHes of one job at once)."""
    submitted = await post_job(
        priced_api, auth, {"prompts": prompts(1), "config": QUICK, "budget": {"max_tokens": 100_000}}
    )
    job_id = UUID(submitted.json()["id"])
    engine = make_engine(migrated, settings.database_timeout_s, connections=1)
    spending = budgets.Spending(redis, make_sessions(engine), f"{settings.redis_key_prefix}:test")
    try:
        async with asyncio.timeout(10.0), make_sessions(engine).begin() as session:
            # No counters in Redis yet: the spending is read from the job's turns.
            assert await budgets.settle_waiting(session, spending, job_id) == []
    finally:
        await redis.delete(spending.key(job_id))
        await engine.dispose()


async def test_a_turn_written_while_a_patch_gives_its_job_a_first_budget_is_counted(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """Until the PATCH commits, the inserts of the job's turns read its old budget (none) and
    so are not added to its counters; the PATCH has rebuilt them from the turns before then.
    A turn committed in between must be counted all the same, and must not wait for the PATCH."""
    running, waiting = await claimed_items(api, auth, sessions, 2)
    async with sessions.begin() as session:
        parked = update(Item).where(Item.id == waiting.item_id).values(status=ItemStatus.BUDGET_EXHAUSTED)
        await session.execute(parked)
    async with sessions.begin() as holder:
        # The PATCH sums the job's turns, then waits here to queue the parked item again.
        await holder.execute(select(Item.id).where(Item.id == waiting.item_id).with_for_update())
        patch = asyncio.create_task(
            api.patch(f"/v1/jobs/{running.job_id}", json={"budget": {"max_tokens": 10**6}}, headers=auth)
        )
        await eventually(lambda: waits_for_a_lock(sessions), 10, "the PATCH to wait for the item's row")
        written = await asyncio.wait_for(TurnWriter(sessions).write(turn_row(running)), 10)
        assert written == Written(True, True, None, None)  # no budget read: the worker adds nothing
    assert (await patch).status_code == 200
    spending = budgets.Spending(redis, sessions, settings.redis_key_prefix)  # the workers' counters
    assert await spending.spent(running.job_id) == (3 + 4, 0.0)


async def test_a_park_cut_off_by_a_postgres_fault_still_resumes_an_item_whose_budget_was_raised(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    """A budget's PATCH that commits after a worker found the budget spent, and before the
    worker parked its item, does not see the item waiting: the park's settle is what resumes
    it. A Postgres fault at that settle (its connection killed, as by a failover) must delay
    the item, never leave it waiting for a PATCH that has come and gone."""
    scripted_llm.usage = USAGE
    body = {"prompts": prompts(2), "config": QUICK, "budget": {"max_tokens": 3600}}
    job_id = UUID((await post_job(api, auth, body)).json()["id"])
    async with sessions.begin() as session:  # one item already waits for budget
        waiting = await session.scalar(select(Item.id).where(Item.job_id == job_id, Item.position == 0))
        await session.execute(
            update(Item).where(Item.id == waiting).values(status=ItemStatus.BUDGET_EXHAUSTED)
        )
    async with sessions.begin() as holder:
        # The PATCH raises the budget, then waits here to queue that item again, the job's row
        # locked: the other item's worker spends the old budget and comes to park it.
        await holder.execute(select(Item.id).where(Item.id == waiting).with_for_update())
        raised = {"budget": {"max_tokens": 100_000}}
        patch = asyncio.create_task(api.patch(f"/v1/jobs/{job_id}", json=raised, headers=auth))
        await eventually(lambda: waits_for_a_lock(sessions), 10, "the PATCH to wait for the item's row")
        burst = asyncio.create_task(asyncio.wait_for(run_worker_burst(settings), 60))
        parking = await eventually(lambda: settle_waiting_for_the_job(sessions), 30, "the park's settle")
        await holder.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": parking})
    assert (await patch).status_code == 200
    await burst
    for _ in range(3):  # past a lease and the grace: what the sweeper would recover, it has
        await asyncio.sleep(settings.enqueue_grace_s + 0.2)
        await sweep(settings, sessions, arq_redis)
    await asyncio.wait_for(run_worker_burst(settings), 60)

    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["counts"]["by_status"] == {"completed": 2}
    assert job["budget"]["exhausted"] is False
    assert len(scripted_llm.requests) == 8 == len(await turns_of(sessions, str(job_id)))  # none twice


async def waits_for_a_lock(sessions: Sessions) -> bool:
    """Whether the PATCH's update of the job's waiting items waits for a lock."""
    async with sessions() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'UPDATE items %'"
            )
        )
    return bool(waiting)


async def settle_waiting_for_the_job(sessions: Sessions) -> int | None:
    """The backend of a worker's settle_waiting while it waits for its job's row (a PATCH holds
    it), if one does."""
    async with sessions() as session:
        pid: int | None = await session.scalar(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'SELECT jobs.cancelled_at%FOR NO KEY UPDATE'"
            )
        )
        return pid
