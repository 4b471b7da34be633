"""Workers under faults: killed mid-item, shut down, lost queue entries, expired leases,
an unavailable LLM, cancellation, and a 50-prompt job with every turn retrievable."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from importlib.metadata import entry_points
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from arq.connections import ArqRedis, create_pool
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from sqlalchemy import func, select, update

from app.config import Settings
from app.deliberation.ports import LLMUnavailable
from app.events import stream_key
from app.llm.breaker import FAILURES_TO_OPEN
from app.queue import WORKER_RETRIES, arq_job_id, bound_calls, line_key, redis_settings
from app.store import items
from app.store.db import Sessions
from app.store.models import Item, TurnRow
from tests.conftest import eventually, failing_once, run_worker_burst, start_worker, submit
from tests.scripted_llm import ScriptedLLM, agree, http_error, stall
from tests.test_endings import LIMITS, claimed_item, expire_lease
from workers import liveness
from workers.main import _end_in_outage, worker_settings
from workers.queue_worker import START_SCRIPT, WORKER_ID, JobStart, QueueWorker
from workers.sweeper import sweep


async def one_item(sessions: Sessions, job_id: str) -> Item:
    async with sessions() as session:
        return (await session.scalars(select(Item).where(Item.job_id == UUID(job_id)))).one()


async def turn_count(sessions: Sessions, item_id: UUID) -> int:
    async with sessions() as session:
        return await session.scalar(select(func.count()).where(TurnRow.item_id == item_id)) or 0


async def test_a_worker_killed_mid_item_costs_at_most_its_call_in_flight(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    scripted_llm.latency_s = 0.4
    scripted_llm.script("deliberation_turn", *[agree(False, new_thoughts=[f"point {n}"]) for n in range(5)])
    job_id = await submit(api, auth, ["Explain how vaccines are tested."], agents=2, max_rounds=4)
    item_id = (await one_item(sessions, job_id)).id

    workers.append(start_worker(settings))
    await eventually(lambda: _at_least(sessions, item_id, 3), what="three stored turns")
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    stored_at_kill = await turn_count(sessions, item_id)

    workers.append(start_worker(settings))  # its sweeper re-enqueues once the lease expires
    item = await eventually(lambda: _finished(sessions, item_id), what="the item to finish")

    assert item.status == "completed"
    assert item.attempts == 2
    turns = (await api.get(f"/v1/items/{item_id}", headers=auth)).json()["turns"]
    keys = [(t["stage"], t["round"], t["agent"], t["attempt"]) for t in turns]
    assert len(keys) == len(set(keys)), "a turn was stored twice"
    assert len(turns) > stored_at_kill
    re_spent = len(scripted_llm.requests) - len(turns)
    assert 0 <= re_spent <= 1, f"{re_spent} LLM calls repeated; only the one in flight may be"


async def _at_least(sessions: Sessions, item_id: UUID, n: int) -> bool:
    return await turn_count(sessions, item_id) >= n


async def _finished(sessions: Sessions, item_id: UUID) -> Item | None:
    async with sessions() as session:
        item = await session.get(Item, item_id)
        return item if item is not None and item.status in ("completed", "failed", "cancelled") else None


async def test_worker_processes_together_never_exceed_the_endpoint_cap(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    scripted_llm.latency_s = 0.2
    capped = settings.model_copy(update={"llm_max_concurrency": 2, "worker_max_jobs": 4})
    job_id = await submit(api, auth, [f"Prompt {n}: how do magnets work?" for n in range(8)])

    workers.extend(start_worker(capped) for _ in range(3))
    await eventually(lambda: _job_finished(api, auth, job_id), timeout_s=60, what="the job to finish")

    assert scripted_llm.max_in_flight == 2, "3 workers x 4 jobs must share a cap of 2"


async def _job_finished(api: httpx.AsyncClient, auth: dict[str, str], job_id: str) -> bool:
    status: str = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["status"]
    return status == "completed"


async def test_sigterm_releases_the_running_item_at_once(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    scripted_llm.script("seed_cot", stall(60))
    job_id = await submit(api, auth, ["What is a good first programming language?"])
    item_id = (await one_item(sessions, job_id)).id
    workers.append(start_worker(settings.model_copy(update={"llm_timeout_s": 60})))
    await eventually(lambda: _at_least(sessions, item_id, 1), what="the intent turn")

    workers[0].send_signal(signal.SIGTERM)
    assert workers[0].wait(timeout=30) is not None

    item = await one_item(sessions, job_id)
    assert item.status == "queued"
    assert item.lease_until is None
    assert item.error_message == "worker shut down"


async def test_sweeper_re_enqueues_queued_items_whose_arq_job_was_lost(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
) -> None:
    job_id = await submit(api, auth, ["Tell me about tides.", "Is coffee bad for you?"])
    await arq_redis.delete(settings.queue_name)  # what a Redis restart without persistence does
    await asyncio.sleep(settings.enqueue_grace_s + 0.2)

    swept = await sweep(settings, sessions, arq_redis)
    await run_worker_burst(settings)

    assert swept == {"expired": 0, "lost": 2}
    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["counts"]["by_status"] == {"completed": 2}


async def test_sweeper_re_enqueues_a_queued_item_whose_worker_died_before_claiming_it(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
) -> None:
    job_id = await submit(api, auth, ["Tell me about tides."])
    item = await one_item(sessions, job_id)
    # What arq leaves behind when its worker is killed between taking the job and the claim:
    # the job still in the queue, marked in progress for as long as arq's job timeout.
    taken = in_progress_key_prefix + arq_job_id(item.id, item.enqueues)
    await arq_redis.set(taken, b"1", ex=60)  # arq: its job timeout, 24 h here
    await asyncio.sleep(settings.enqueue_grace_s + 0.2)

    swept = await sweep(settings, sessions, arq_redis)
    assert swept == {"expired": 0, "lost": 1}
    await run_worker_burst(settings)

    assert (await one_item(sessions, job_id)).status == "completed"
    assert not await arq_redis.exists(taken)


async def test_sweeper_leaves_queued_items_with_a_live_arq_job_alone(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
) -> None:
    await submit(api, auth, ["Tell me about tides."])
    await asyncio.sleep(settings.enqueue_grace_s + 0.2)

    swept = await sweep(settings, sessions, arq_redis)

    assert swept == {"expired": 0, "lost": 0}
    assert await arq_redis.zcard(settings.queue_name) == 1


async def test_sweeper_recovers_an_item_whose_lease_expired(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
) -> None:
    job_id = await submit(api, auth, ["How do plants make sugar?"])
    item_id = (await one_item(sessions, job_id)).id
    # A worker takes the arq job, claims the item and dies without a trace.
    assert await arq_redis.zrange(settings.queue_name, 0, -1) == [f"item:{item_id}:1".encode()]
    await arq_redis.set(f"arq:in-progress:item:{item_id}:1", b"1", ex=60)
    assert await items.claim(sessions, item_id, items.Limits(lease_s=1, max_claims=8, max_failures=5))
    await asyncio.sleep(1.2)

    swept = await sweep(settings, sessions, arq_redis)

    assert swept["expired"] == 1
    assert await arq_redis.zrange(settings.queue_name, 0, -1) == [f"item:{item_id}:2".encode()]
    assert not await arq_redis.exists(f"arq:in-progress:item:{item_id}:1"), "the dead job still blocks"
    await run_worker_burst(settings)
    item = await one_item(sessions, job_id)
    assert (item.status, item.attempts, item.failures, item.enqueues) == ("completed", 2, 1, 2)


async def test_an_item_taken_back_from_a_dead_worker_goes_before_the_backlog(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
) -> None:
    job_id = await submit(api, auth, ["How do plants make sugar?", "Why is the sky blue?", "What is rust?"])
    async with sessions() as session:
        first, *backlog = await session.scalars(
            select(Item.id).where(Item.job_id == UUID(job_id)).order_by(Item.position)
        )
    assert await items.claim(sessions, first, items.Limits(lease_s=1, max_claims=8, max_failures=5))
    await asyncio.sleep(1.2)

    assert (await sweep(settings, sessions, arq_redis))["expired"] == 1

    queue = await arq_redis.zrange(settings.queue_name, 0, -1)
    assert queue == [arq_job_id(first, 2).encode(), *(arq_job_id(i, 1).encode() for i in backlog)]


async def test_an_unavailable_llm_delays_the_item_and_loses_nothing(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    attempts_per_call = settings.llm_max_retries + 1
    scripted_llm.script("seed_cot", *[http_error(503)] * attempts_per_call)
    job_id = await submit(api, auth, ["How do I make my home office quieter?"])

    await run_worker_burst(settings)

    item = await one_item(sessions, job_id)
    assert (item.status, item.attempts, item.failures) == ("completed", 2, 0)
    detail = (await api.get(f"/v1/items/{item.id}", headers=auth)).json()
    intent_turns = [t for t in detail["turns"] if t["stage"] == "intent"]
    assert len(intent_turns) == 1, "the stored intent turn was asked again after the outage"
    assert len(scripted_llm.requests_for("intent_decomposition")) == 1


async def test_an_item_whose_endpoint_is_taken_for_down_waits_in_the_queue_not_in_a_slot(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    arq_redis: ArqRedis,
) -> None:
    # One claim's ten failures in a row open the endpoint's breaker: the next claim sends
    # nothing and is deferred until the endpoint is tried again (the breaker's pause, the
    # longest back-off), instead of spending its retries in a worker slot.
    open_s = 30.0
    down = settings.model_copy(
        update={
            "llm_max_retries": FAILURES_TO_OPEN - 1,
            "llm_backoff_base_s": 0.001,
            "llm_backoff_max_s": open_s,
        }
    )
    scripted_llm.script("intent_decomposition", *[http_error(503)] * FAILURES_TO_OPEN)
    job_id = await submit(api, auth, ["How do I make my home office quieter?"])
    item_id = (await one_item(sessions, job_id)).id

    worker = asyncio.create_task(run_worker_burst(down))
    try:
        item = await eventually(lambda: _ended_claims(sessions, item_id, 2), what="two claims ended")
        queued = await arq_redis.zrange(settings.queue_name, 0, -1, withscores=True)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)

    assert (item.status, item.failures) == ("queued", 0)
    assert "is down" in (item.error_message or "")
    assert len(scripted_llm.requests) == FAILURES_TO_OPEN, "the second claim sent nothing"
    [(_, due_ms)] = queued
    assert due_ms > timestamp_ms() + (open_s - 10) * 1000


async def _ended_claims(sessions: Sessions, item_id: UUID, claims: int) -> Item | None:
    async with sessions() as session:
        item = await session.get(Item, item_id)
        return item if item is not None and item.attempts >= claims and item.status != "running" else None


async def test_a_completion_cut_off_by_a_postgres_fault_is_handed_back_and_buys_nothing_twice(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    # It was left running under its live worker, until its lease ran out and a sweep took it.
    job_id = await submit(api, auth, ["How do I make my home office quieter?"])
    async with failing_once(sessions, "cots", f"NEW.job_id = '{job_id}'"):
        await run_worker_burst(settings)

    item = await one_item(sessions, job_id)
    assert (item.status, item.attempts, item.failures) == ("completed", 2, 1)
    assert len(scripted_llm.requests) == await turn_count(sessions, item.id), "an answer was bought twice"
    assert (await api.get(f"/v1/items/{item.id}", headers=auth)).json()["cot"]["response"]


async def test_an_outages_hand_back_cut_off_by_a_postgres_fault_still_hands_the_item_back(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    scripted_llm.script("seed_cot", *[http_error(503)] * (settings.llm_max_retries + 1))
    job_id = await submit(api, auth, ["How do I make my home office quieter?"])
    async with failing_once(sessions, "items", "NEW.error_message LIKE 'llm_unavailable%'"):
        await run_worker_burst(settings)

    item = await one_item(sessions, job_id)
    assert (item.status, item.attempts, item.failures) == ("completed", 2, 1)
    assert len(scripted_llm.requests_for("intent_decomposition")) == 1


async def test_an_outage_that_ends_a_claim_already_lost_is_not_logged_as_putting_the_item_back(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing is written for a lost claim (another worker holds the item): the log said the
    item was put back all the same."""
    _, lost = await claimed_item(api, auth, sessions)
    await expire_lease(sessions, lost.item_id)
    assert await items.claim(sessions, lost.item_id, LIMITS) is not None  # another worker's now

    with caplog.at_level(logging.WARNING, logger="aidsafe.worker"):
        ending = await _end_in_outage(settings, sessions, lost, LLMUnavailable("HTTP 503"))

    assert ending is None
    assert [r.getMessage() for r in caplog.records if r.name == "aidsafe.worker"] == [
        f"item {lost.item_id} not put back, its claim was lost; the LLM was unavailable: HTTP 503"
    ]


async def test_an_llm_outage_does_not_use_up_the_items_attempts(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    # Refused by an open breaker, an outage's claims are instant: counted, an outage of a few
    # hours failed every item it touched.
    max_attempts, outage_claims = 2, 3
    scripted_llm.script(
        "intent_decomposition", *[http_error(503)] * (settings.llm_max_retries + 1) * outage_claims
    )
    job_id = await submit(api, auth, ["What is the capital of Peru?"])

    await run_worker_burst(settings.model_copy(update={"item_max_attempts": max_attempts}))

    item = await one_item(sessions, job_id)
    assert (item.status, item.attempts, item.failures) == ("completed", outage_claims + 1, 0)
    assert item.outage_claims == outage_claims


async def test_an_item_fails_llm_unavailable_once_the_llm_was_unavailable_to_it_too_long(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    max_outage_s = 0.5
    scripted_llm.script("intent_decomposition", *[http_error(503)] * 100)  # down for the test
    job_id = await submit(api, auth, ["What is the capital of Peru?"])

    # The attempts' bound, well above the claims the outage takes, only stops a run that
    # would otherwise wait for the outage's end.
    bounded = {"item_max_outage_s": max_outage_s, "item_max_attempts": 6}
    await run_worker_burst(settings.model_copy(update=bounded))

    item = await one_item(sessions, job_id)
    assert (item.status, item.error_code, item.failures) == ("failed", "llm_unavailable", 0)
    assert (item.error_message or "").startswith(
        "the LLM was unavailable for more than 0.5 s; last: the LLM endpoint 'default'"
    )
    assert item.finished_at and item.llm_unavailable_since
    assert (item.finished_at - item.llm_unavailable_since).total_seconds() > max_outage_s
    assert item.outage_claims == item.attempts - 1, "every claim but the last was put back"


async def test_an_item_that_waited_out_a_backlog_longer_than_the_max_outage_survives_one_blip(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    # The outage clock ran while the item waited in the queue: after a backlog longer than
    # item_max_outage_s, one blip on its next claim failed it llm_unavailable at once.
    scripted_llm.script("intent_decomposition", *[http_error(503)] * (settings.llm_max_retries + 1))
    job_id = await submit(api, auth, ["What is the capital of Peru?"])
    item_id = (await one_item(sessions, job_id)).id
    async with sessions.begin() as session:  # put back by an outage 2 h ago, queued since
        put_back = update(Item).where(Item.id == item_id)
        since = func.now() - timedelta(hours=2)
        await session.execute(put_back.values(llm_unavailable_since=since, attempts=1, outage_claims=1))

    await run_worker_burst(settings.model_copy(update={"item_max_outage_s": 3600}))

    item = await one_item(sessions, job_id)
    assert (item.status, item.attempts, item.outage_claims, item.failures) == ("completed", 3, 2, 0)


async def test_an_item_past_a_thousand_outage_claims_is_still_deferred_by_its_back_off(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    arq_redis: ArqRedis,
) -> None:
    # Outage claims are bounded by time alone: an item can pass a thousand of them (days at
    # the longest back-off), where the back-off's 2 ** attempt is too large for a float.
    # That claim's arq job failed with an OverflowError instead of being deferred.
    scripted_llm.script("intent_decomposition", *[http_error(503)] * (settings.llm_max_retries + 1))
    job_id = await submit(api, auth, ["What is the capital of Peru?"])
    item_id = (await one_item(sessions, job_id)).id
    async with sessions.begin() as session:
        long_outage = update(Item).where(Item.id == item_id).values(attempts=1100, outage_claims=1100)
        await session.execute(long_outage)

    worker = asyncio.create_task(run_worker_burst(settings))
    try:
        item = await eventually(lambda: _ended_claims(sessions, item_id, 1101), what="the claim ended")
        retry = await eventually(
            lambda: arq_redis.zrange(settings.queue_name, 0, -1), timeout_s=5, what="its deferred run"
        )
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)

    assert (item.status, item.outage_claims, item.failures) == ("queued", 1101, 0)
    assert len(retry) == 1


async def test_cancelling_a_job_stops_its_running_item(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    scripted_llm.latency_s = 0.3
    scripted_llm.script("deliberation_turn", *[agree(False, new_thoughts=["more"]) for _ in range(40)])
    job_id = await submit(api, auth, ["Explain inflation."], agents=2, max_rounds=20)
    item_id = (await one_item(sessions, job_id)).id
    workers.append(start_worker(settings))
    await eventually(lambda: _at_least(sessions, item_id, 3), what="the item to be running")

    response = await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert response.status_code == 200
    item = await eventually(lambda: _finished(sessions, item_id), what="the item to stop")

    assert item.status == "cancelled"
    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "cancelled"


async def test_a_job_cancelled_while_its_items_request_is_out_ends_it_cancelled_though_the_llm_rejected_it(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    # The rejection ends the claim before the lease's next renewal sees the cancel: the item
    # of a cancelled job failed llm_request_rejected.
    scripted_llm.latency_s = 1.0
    scripted_llm.script("intent_decomposition", http_error(400))
    job_id = await submit(api, auth, ["Explain inflation."])
    renewed_late = settings.model_copy(update={"lease_seconds": 60})

    worker = asyncio.create_task(run_worker_burst(renewed_late))
    try:
        await eventually(lambda: _asked(scripted_llm), what="the request to be out")
        assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200
        await asyncio.wait_for(worker, timeout=30)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)

    item = await one_item(sessions, job_id)
    assert (item.status, item.error_code, item.attempts) == ("cancelled", None, 1)
    assert len(scripted_llm.requests) == 1


async def _asked(scripted_llm: ScriptedLLM) -> bool:
    return scripted_llm.in_flight > 0


async def test_fifty_prompts_complete_with_every_turn_retrievable_over_http(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    prompts = [f"Question {n}: how do I keep houseplant number {n} alive?" for n in range(50)]
    job_id = await submit(api, auth, prompts)

    await run_worker_burst(settings)

    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "completed"
    assert job["counts"]["by_status"] == {"completed": 50}
    item_ids: list[str] = []
    cursor = None
    while True:
        params = {"limit": 20, **({"cursor": cursor} if cursor else {})}
        page = (await api.get(f"/v1/jobs/{job_id}/items", params=params, headers=auth)).json()
        item_ids += [i["id"] for i in page["data"]]
        if not (cursor := page["next_cursor"]):
            break
    assert len(item_ids) == 50
    turns = 0
    for item_id in item_ids:
        detail = (await api.get(f"/v1/items/{item_id}", headers=auth)).json()
        assert [t["stage"] for t in detail["turns"]] == ["intent", "seed", "deliberation", "refine"]
        assert detail["cot"]["refined_thoughts"]
        turns += len(detail["turns"])
    assert turns == len(scripted_llm.requests) == job["usage"]["llm_calls"]


def test_worker_entry_point_runs_items_and_starts_the_sweeper(settings: Settings) -> None:
    from app.queue import RUN_ITEM
    from workers.main import run, startup

    (script,) = entry_points(group="console_scripts", name="aidsafe-worker")
    assert script.load() is run
    options = worker_settings(settings)
    assert [f.__name__ for f in options["functions"]] == [RUN_ITEM]
    assert options["on_startup"] is startup


def _polling_worker(settings: Settings, arq_redis: ArqRedis, **overrides: Any) -> QueueWorker:
    """A worker to call start_jobs on, as its poll loop does: no startup, so a job it starts
    must have no arq job key (it ends at once, as expired)."""
    options = {**worker_settings(settings, sweeper=False), "handle_signals": False, **overrides}
    return QueueWorker(**options, redis_pool=arq_redis)


Queue = Callable[[dict[str, float]], Awaitable[list[bytes]]]


@pytest.fixture
def poll_settings(settings: Settings) -> Settings:
    """The session's settings with a queue of this test's own: a worker's start script reads
    the queue itself, and would start a job another test of the session left in its queue."""
    return settings.model_copy(update={"queue_name": f"{settings.queue_name}:poll:{uuid4().hex}"})


@pytest.fixture
async def queued(poll_settings: Settings, arq_redis: ArqRedis) -> AsyncIterator[Queue]:
    """Puts arq job ids in the test queue at the given scores; afterwards drops them, their
    in-progress marks and their taken records."""
    added: list[str] = []

    async def queue(jobs: dict[str, float]) -> list[bytes]:
        await arq_redis.zadd(poll_settings.queue_name, jobs)
        added.extend(jobs)
        return [job_id.encode() for job_id in jobs]

    yield queue
    if added:
        await arq_redis.zrem(poll_settings.queue_name, *added)
        await arq_redis.delete(*(in_progress_key_prefix + job_id for job_id in added))
        await arq_redis.hdel(liveness.taken_key(poll_settings), *added)  # type: ignore[misc]  # redis-py types hash commands as sync or async


async def test_a_poll_starts_jobs_in_one_round_trip_however_many_run(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    """arq checks and marks each job it reads at the queue's head in a transaction of its own
    (WATCH, EXISTS, ZSCORE, MULTI, PSETEX, EXEC), and a running job stays there: with many
    running, most of a worker's polls went to them. Here one script call does it all."""
    run, now = uuid4().hex, timestamp_ms()
    running = {f"test:{run}:running:{n}": now - 1000 for n in range(20)}
    due, deferred = f"test:{run}:due", f"test:{run}:deferred"
    head = await queued({**running, due: now - 500, deferred: now + 60_000})
    for job_id in running:
        await arq_redis.psetex(in_progress_key_prefix + job_id, 60_000, b"1")
    await arq_redis.script_load(START_SCRIPT)  # else the first call is refused, loaded, sent again
    worker = _polling_worker(poll_settings, arq_redis)
    end = f"test:{run}:end"
    async with arq_redis.monitor() as monitor:
        await worker.start_jobs(head)
        await arq_redis.echo(end)
        sent: list[str] = []
        in_script: list[str] = []
        while end not in (command := await monitor.next_command())["command"]:
            if run in command["command"] or poll_settings.queue_name in command["command"]:
                by_script = command["client_type"] == "lua"
                (in_script if by_script else sent).append(command["command"])
    assert [command.split()[0].upper() for command in sent] == ["EVALSHA"]
    assert set(worker.tasks) == {due}
    # Recorded as this worker's in the same call: no kill can fall between the mark and this.
    record = f"HSET {liveness.taken_key(poll_settings)} "  # not the line's record's (app/queue.py)
    recorded = [command for command in in_script if command.startswith(record)]
    assert len(recorded) == 1 and due in recorded[0] and str(worker.ctx[WORKER_ID]) in recorded[0]
    await asyncio.gather(*worker.tasks.values())  # arq ends it, expired: there is no job to run
    assert worker.job_counter == 0
    assert await arq_redis.zscore(poll_settings.queue_name, due) is None
    assert await arq_redis.zscore(poll_settings.queue_name, deferred) is not None
    # Its record went with it, though arq never ran the item: left, it would hide the item
    # from the sweeper's grace for lost jobs for as long as this worker lives.
    assert due not in await liveness.taken_jobs(arq_redis, poll_settings)


async def test_two_workers_polling_at_once_start_a_job_once(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    head = await queued({f"test:{uuid4().hex}:due": timestamp_ms() - 500})
    first, second = _polling_worker(poll_settings, arq_redis), _polling_worker(poll_settings, arq_redis)
    await asyncio.gather(first.start_jobs(head), second.start_jobs(head))
    assert len(first.tasks) + len(second.tasks) == 1
    await asyncio.gather(*first.tasks.values(), *second.tasks.values())


async def test_a_poll_starts_the_first_jobs_due_up_to_its_free_slots(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    run, now = uuid4().hex, timestamp_ms()
    head = await queued({f"test:{run}:{n}": now - 1000 + n for n in range(5)})
    worker = _polling_worker(poll_settings, arq_redis, max_jobs=2)
    await worker.start_jobs(head)
    assert sorted(worker.tasks) == [job_id.decode() for job_id in head[:2]]
    assert worker.job_counter == 2
    await asyncio.gather(*worker.tasks.values())
    assert worker.job_counter == 0


async def test_a_poll_looks_past_the_running_jobs_at_the_queues_head_as_far_as_its_scan_limit(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    run, now = uuid4().hex, timestamp_ms()
    running = {f"test:{run}:running:{n}": now - 2000 for n in range(600)}  # over two chunks read
    head = await queued({**running, f"test:{run}:due": now - 1000, f"test:{run}:later": now - 500})
    for job_id in running:
        await arq_redis.psetex(in_progress_key_prefix + job_id, 60_000, b"1")

    first = _polling_worker(poll_settings, arq_redis, max_jobs=1, queue_scan_limit=len(running) + 1)
    await first.start_jobs(head[:1])
    assert set(first.tasks) == {f"test:{run}:due"}, "the script read past the head's running jobs"
    await asyncio.gather(*first.tasks.values())  # ended by arq, as expired: out of the queue

    short = _polling_worker(poll_settings, arq_redis, queue_scan_limit=len(running))
    await short.start_jobs(head[:1])
    assert not short.tasks, "the next due job lies past the scan limit"


def _start_call(
    settings: Settings, *, wanted: int = 1, scan_limit: int = 1000, ttl_ms: int = 60_000
) -> tuple[list[str], list[Any]]:
    """The start script's keys and arguments for one poll of a new worker, as QueueWorker sends them."""
    answer = f"{settings.redis_key_prefix}:starts:{uuid4()}"
    keys = [settings.queue_name, liveness.taken_key(settings), answer, line_key(settings.queue_name)]
    return keys, [in_progress_key_prefix, ttl_ms, timestamp_ms(), wanted, str(uuid4()), scan_limit]


async def test_a_start_sent_again_answers_the_jobs_it_marked(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    """The pool sends a command again when its connection broke, maybe after Redis ran it: the
    jobs the first run marked would otherwise stay marked, started by no one, for a day."""
    head = await queued({f"test:{uuid4().hex}:due": timestamp_ms() - 500})
    start = arq_redis.register_script(START_SCRIPT)
    keys, args = _start_call(poll_settings)

    first, again = await start(keys=keys, args=args), await start(keys=keys, args=args)

    assert first[::2] == head
    assert again == first


async def test_a_running_job_is_not_due_so_a_poll_sees_the_jobs_behind_it(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    """arq leaves a running job at the queue's head: every poll read past all running jobs (many
    workers' thousands, past the scan limit: the jobs due behind went unseen). Marked, a job is
    scored for when its mark runs out, out of the due range."""
    head = await queued({f"test:{uuid4().hex}:{n}": timestamp_ms() - 1000 + n for n in range(2)})
    start = arq_redis.register_script(START_SCRIPT)
    ttl_ms = 60_000

    async def poll(scan_limit: int) -> list[bytes]:
        keys, args = _start_call(poll_settings, scan_limit=scan_limit, ttl_ms=ttl_ms)
        marked: list[bytes] = (await start(keys=keys, args=args))[::2]
        return marked

    before = timestamp_ms()
    assert await poll(scan_limit=1) == head[:1]
    assert await arq_redis.zscore(poll_settings.queue_name, head[0]) >= before + ttl_ms
    assert await poll(scan_limit=1) == head[1:], "the first, running, is not in the way"


async def test_a_poll_reading_past_its_first_chunk_skips_no_due_job(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    """The jobs a chunk marks leave the due range, so the next chunk starts that much nearer
    the head: read at the old offset, as many due jobs were skipped. Running jobs still due
    (an older release's, during an upgrade) fill the rest of the first chunk."""
    run, now = uuid4().hex, timestamp_ms()
    running = {f"test:{run}:running:{n:03}": now - 2000 for n in range(255)}
    due = {f"test:{run}:due:0": now - 3000, f"test:{run}:due:1": now - 1000, f"test:{run}:due:2": now - 999}
    await queued({**running, **due})
    for job_id in running:
        await arq_redis.psetex(in_progress_key_prefix + job_id, 60_000, b"1")
    keys, args = _start_call(poll_settings, wanted=3)

    marked = await arq_redis.register_script(START_SCRIPT)(keys=keys, args=args)

    assert [job_id.decode() for job_id in marked[::2]] == list(due)


async def test_a_job_cancelled_mid_run_is_due_again_as_it_was(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    """Its start moved it past its mark's end; arq runs a cancelled job again (a worker's
    SIGTERM): it must be due at once, not when its mark would have run out, a day later."""
    started_at = timestamp_ms() - 60_000
    (job,) = await queued({f"test:{uuid4().hex}:cancelled": timestamp_ms() + 86_400_000})
    job_id = job.decode()
    await arq_redis.set(in_progress_key_prefix + job_id, b"1")
    worker = _polling_worker(poll_settings, arq_redis)
    worker.starts[job_id] = JobStart(started_at)

    await worker.finish_job(job_id, False, None, None, False, None, None)

    assert await arq_redis.zscore(poll_settings.queue_name, job_id) == started_at
    assert not await arq_redis.exists(in_progress_key_prefix + job_id)


async def test_a_runs_end_leaves_the_start_of_the_same_job_run_again_meanwhile(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    """A job due again at once (a Retry without delay) can start anew here before its last run
    has ended (arq awaits that run's end shielded): the old run's end dropped the new run's
    start, whose own end then failed (KeyError) and took the worker's poll loop with it."""
    (job,) = await queued({f"test:{uuid4().hex}:again": timestamp_ms() - 500})
    job_id = job.decode()
    worker = _polling_worker(poll_settings, arq_redis)
    old_run = asyncio.create_task(worker.run_job(job_id, timestamp_ms() - 500))
    await asyncio.sleep(0)  # started: reading its job from Redis
    worker.starts[job_id] = new_start = JobStart(timestamp_ms())

    await old_run  # ends as expired (no job key)

    assert worker.starts.get(job_id) is new_start


async def test_a_retry_sent_again_defers_its_job_once(
    poll_settings: Settings, arq_redis: ArqRedis, queued: Queue
) -> None:
    """A job tried again later gets its new score set, not added: arq's ZINCRBY, sent again
    after a reply that timed out, would push it back by the time it had waited, twice."""
    started_at = timestamp_ms() - 3_600_000  # an hour in the backlog
    (job,) = await queued({f"test:{uuid4().hex}:retried": started_at})
    job_id = job.decode()
    await arq_redis.set(in_progress_key_prefix + job_id, b"1")
    worker = _polling_worker(poll_settings, arq_redis)
    worker.starts[job_id] = JobStart(started_at)
    incr = 5_000 + (timestamp_ms() - started_at)  # as arq computes it: due 5 s from now

    for _ in range(2):
        await worker.finish_job(job_id, False, None, None, False, incr, None)

    assert await arq_redis.zscore(poll_settings.queue_name, job_id) == started_at + incr
    assert not await arq_redis.exists(in_progress_key_prefix + job_id)


async def test_a_worker_logs_no_line_for_every_item_it_runs(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """arq's two lines per job (started, done) were most of a worker's log and ~2 % of its CPU."""
    job_id = await submit(api, auth, ["Tell me about tides."])
    item = await one_item(sessions, job_id)
    with caplog.at_level(logging.INFO, logger="arq.worker"):
        await run_worker_burst(settings)

    assert (await one_item(sessions, job_id)).status == "completed"
    arq_lines = [record.getMessage() for record in caplog.records if record.name == "arq.worker"]
    assert any("Starting worker" in line for line in arq_lines)  # its other lines stay
    assert not [line for line in arq_lines if str(item.id) in line]


async def test_an_items_progress_event_and_its_jobs_record_go_with_its_arq_jobs_end_in_one_transaction(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, arq_redis: ArqRedis
) -> None:
    """Three round trips per item were one: followers hear of the end exactly when arq ends
    the job, and the record that kept the job the worker's goes in the same breath."""
    job_id = UUID(await submit(api, auth, ["a"]))
    stream = stream_key(settings, job_id)
    end = f"test:{uuid4().hex}:end"
    async with arq_redis.monitor() as monitor:
        await run_worker_burst(settings)
        await arq_redis.echo(end)
        sent = []
        while end not in (command := await monitor.next_command())["command"]:
            if command["client_type"] != "lua":
                sent.append(command["command"].split())

    lines = [" ".join(words) for words in sent]
    names = [words[0].upper() for words in sent]
    (xadd,) = [at for at, line in enumerate(lines) if names[at] == "XADD" and stream in line]
    begun = max(at for at in range(xadd) if names[at] == "MULTI")
    ended = xadd + names[xadd:].index("EXEC")

    def sent_to(name: str, key: str, span: range) -> bool:
        return any(names[at] == name and key in lines[at] for at in span)

    inside, before, after = range(begun, ended), range(begun), range(ended, len(sent))
    assert sent_to("ZREM", settings.queue_name, inside)  # arq's end of the job
    assert sent_to("EXPIRE", stream, inside)
    taken = liveness.taken_key(settings)
    assert sent_to("HDEL", taken, inside)
    assert not sent_to("HDEL", taken, before) and not sent_to("HDEL", taken, after)


async def test_a_task_cancelled_mid_redis_call_on_the_workers_pool_always_stops(settings: Settings) -> None:
    """How a worker stops: arq cancels its poll loop and its jobs' tasks. The worker's pool
    bounds each call (a socket timeout), and redis-py bounds a write with asyncio.wait_for,
    which on Python 3.11 swallowed a cancellation that came as the write ended (two cancels
    in five here): the task went on, and a worker told to stop polled on for good. Python
    3.12's wait_for does not (the project requires it)."""
    pool = await create_pool(redis_settings(settings.redis_url, WORKER_RETRIES))
    await bound_calls(pool, settings.redis_timeout_s)

    async def poll_forever() -> None:  # arq's poll
        while True:
            await pool.zrangebyscore(settings.queue_name, "-inf", timestamp_ms(), start=0, num=1)

    try:
        went_on = 0
        for attempt in range(300):
            polling = asyncio.create_task(poll_forever())
            await asyncio.sleep(attempt % 30 / 10_000)  # cancels land all through a call
            polling.cancel()
            done, _ = await asyncio.wait([polling], timeout=2.0)
            if not done:
                went_on += 1
                while not polling.done():
                    polling.cancel()
                    await asyncio.wait([polling], timeout=0.1)
        assert went_on == 0
    finally:
        await pool.aclose()
