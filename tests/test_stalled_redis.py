"""A Redis that stops answering (hung, not restarted) fails the workers' LLM limiter, rate
budget and spending calls after `llm_redis_timeout_s`, so an item's LLM call ends as a transient fault
instead of holding its worker forever; the limiter's blocking waits stay shorter than that
timeout; and one that turned replica (a failover) is unavailable to the API, not a bug. Each
test stops (SIGSTOP) or demotes a redis-server of its own, never the shared one."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select

from app.config import EndpointConfig, Settings
from app.costs import Budget
from app.deliberation.ports import LLMUnavailable
from app.deliberation.stages import SEED
from app.llm.client import OpenAICompatibleClient
from app.llm.limits import MAX_BLOCK_S, EndpointLimiter
from app.llm.rates import EndpointRates
from app.queue import redis_settings
from app.store.budgets import Meter
from app.store.db import Sessions
from app.store.models import Job
from tests.conftest import api_client, eventually, submit
from tests.scripted_llm import ScriptedLLM, chat_request, stall
from workers.llm_limits import llm_limiter, llm_redis
from workers.main import WORKER, Worker, connect, shutdown, worker_settings
from workers.queue_worker import QueueWorker

TIMEOUT_S = 2.0  # the least llm_redis_timeout_s allowed
# A call on a hung Redis fails within this: its own timeout, and the release of what it may
# have taken, which times out too.
FAILS_WITHIN_S = 3 * TIMEOUT_S
NEVER_S = 30.0  # the test's own bound: without a socket timeout these waits never end


@dataclass(frozen=True)
class OwnRedis:
    url: str
    process: subprocess.Popen[bytes]

    def stall(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A redis-server on a free loopback port, for this test alone."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        ["redis-server", *options, "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the test's redis-server did not start") from None
                time.sleep(0.05)
        yield OwnRedis(f"redis://127.0.0.1:{port}/0", process)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait()


@pytest.fixture
def stalling(settings: Settings, own_redis: OwnRedis) -> Settings:
    """The session's settings with the limits' Redis on `own_redis`."""
    return settings.model_copy(update={"redis_url": own_redis.url, "llm_redis_timeout_s": TIMEOUT_S})


@pytest.fixture
async def limits(stalling: Settings, own_redis: OwnRedis) -> AsyncIterator[Redis]:
    """The workers' client for the limits, on `own_redis`, with a connection already open."""
    client = llm_redis(stalling)
    await client.ping()
    yield client
    own_redis.resume()  # closing must not wait on a stopped server
    await client.aclose()


async def fails_fast(call: Any) -> float:
    """How long `call` took to fail with a RedisError."""
    started = time.monotonic()
    with pytest.raises(RedisError):
        async with asyncio.timeout(NEVER_S):
            await call()
    return time.monotonic() - started


async def test_a_slot_request_fails_within_the_timeout_when_redis_hangs(
    limits: Redis, stalling: Settings, own_redis: OwnRedis
) -> None:
    limiter = llm_limiter(limits, stalling)
    async with limiter.slot("default", 1, lease_s=10):
        pass
    own_redis.stall()

    async def take_a_slot() -> None:
        async with limiter.slot("default", 1, lease_s=10):
            pass

    assert await fails_fast(take_a_slot) < FAILS_WITHIN_S


async def test_a_rate_reservation_fails_within_the_timeout_when_redis_hangs(
    limits: Redis, stalling: Settings, own_redis: OwnRedis
) -> None:
    rates = EndpointRates(limits, key_prefix=f"{stalling.redis_key_prefix}:rates")
    await rates.reserve("default", rpm=100, tpm=None, tokens=10)
    own_redis.stall()

    assert await fails_fast(lambda: rates.reserve("default", rpm=100, tpm=None, tokens=10)) < FAILS_WITHIN_S


async def test_a_waiter_blocked_for_a_slot_fails_within_the_timeout_when_redis_hangs(
    limits: Redis, stalling: Settings, own_redis: OwnRedis
) -> None:
    limiter = llm_limiter(limits, stalling)

    async def wait_for_the_slot() -> None:
        async with limiter.slot("default", 1, lease_s=10):
            pass

    async with limiter.slot("default", 1, lease_s=10):
        waiter = asyncio.create_task(fails_fast(wait_for_the_slot))
        await asyncio.sleep(0.5)  # in its BLPOP
        own_redis.stall()
        try:
            took = await waiter
        finally:
            own_redis.resume()  # for this slot's release

    assert took < FAILS_WITHIN_S + MAX_BLOCK_S


async def test_a_wait_for_a_slot_longer_than_the_timeout_ends_with_the_slot(
    limits: Redis, stalling: Settings
) -> None:
    limiter = llm_limiter(limits, stalling)
    holding = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot("default", 1, lease_s=10):
            holding.set()
            await asyncio.sleep(2.5 * TIMEOUT_S)

    holder = asyncio.create_task(hold())
    await holding.wait()
    started = time.monotonic()
    async with limiter.slot("default", 1, lease_s=10):
        waited = time.monotonic() - started
    await holder

    assert waited > 2 * TIMEOUT_S


def test_the_limits_timeout_must_outlast_the_limiters_blocking_waits() -> None:
    with pytest.raises(ValueError, match="socket_timeout"):
        EndpointLimiter(Redis.from_url("redis://127.0.0.1:6379/0", socket_timeout=MAX_BLOCK_S))
    with pytest.raises(ValidationError):
        Settings(llm_redis_timeout_s=MAX_BLOCK_S)


async def test_a_workers_llm_call_ends_as_unavailable_when_redis_hangs(
    stalling: Settings,
    own_redis: OwnRedis,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    # arq's pool (the queue) stays on the shared Redis; the limits and the heartbeat go to own_redis.
    # No slot kept between calls: each goes to Redis.
    once = stalling.model_copy(update={"llm_max_retries": 0, "llm_slot_keep_s": 0.0})
    ctx: dict[str, Any] = {**worker_settings(once)["ctx"], "redis": arq_redis}
    await connect(ctx)
    worker: Worker = ctx[WORKER]
    try:
        request = chat_request(SEED, "How do tides work?")
        await worker.llm.chat(request)  # a slot taken and given back: a connection is open
        own_redis.stall()
        started = time.monotonic()
        with pytest.raises(LLMUnavailable):
            async with asyncio.timeout(NEVER_S):
                await worker.llm.chat(request)
        assert time.monotonic() - started < FAILS_WITHIN_S
    finally:
        own_redis.resume()
        await shutdown(ctx)


async def test_a_budgeted_jobs_spending_on_a_hung_redis_delays_its_item_and_never_hangs(
    stalling: Settings, own_redis: OwnRedis, arq_redis: ArqRedis, scripted_llm: ScriptedLLM
) -> None:
    # The spending a worker reads before each call of a job with a budget, and adds to after
    # each turn, is on the limits' client: a hung Redis is an outage there too, not a hang.
    ctx: dict[str, Any] = {**worker_settings(stalling)["ctx"], "redis": arq_redis}
    await connect(ctx)
    worker: Worker = ctx[WORKER]
    budget = Budget(max_tokens=1_000_000)
    meter = Meter(worker.llm, worker.spending, uuid.uuid4(), budget)
    try:
        await meter.recorded(budget, 10, None)  # a connection is open
        own_redis.stall()
        assert await fails_fast(lambda: worker.spending.spent(uuid.uuid4())) < FAILS_WITHIN_S
        started = time.monotonic()
        with pytest.raises(LLMUnavailable):  # the worker hands the item back without a failure
            async with asyncio.timeout(NEVER_S):
                await meter.chat(chat_request(SEED, "How do tides work?"))
        assert time.monotonic() - started < FAILS_WITHIN_S

        started = time.monotonic()
        async with asyncio.timeout(NEVER_S):
            await meter.recorded(budget, 10, None)  # the turn is stored: counted or not, on we go
        assert time.monotonic() - started < 2 * FAILS_WITHIN_S
        assert scripted_llm.requests == []  # no call started on an unread budget
    finally:
        own_redis.resume()
        await shutdown(ctx)


async def test_a_budget_patch_on_a_redis_that_turned_replica_answers_503_and_changes_nothing(
    settings: Settings, own_redis: OwnRedis, auth: dict[str, str], sessions: Sessions
) -> None:
    """A failover leaves clients on a replica for a moment: its READONLY answers mean Redis is
    unavailable for now (a retry can go through), not a bug (500)."""
    async with api_client(settings.model_copy(update={"redis_url": own_redis.url})) as api:
        job_id = await submit(api, auth, ["How do tides work?"])
        admin = Redis.from_url(own_redis.url)
        try:
            await admin.replicaof("127.0.0.1", "9")  # a master it cannot reach: it refuses writes
        finally:
            await admin.aclose()
        refused = await api.patch(f"/v1/jobs/{job_id}", json={"budget": {"max_tokens": 10**6}}, headers=auth)

    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "unavailable")
    assert refused.headers["Retry-After"] == "2"
    async with sessions() as session:
        assert await session.scalar(select(Job.budget_max_tokens).where(Job.id == uuid.UUID(job_id))) is None


async def test_an_answer_received_while_redis_hangs_is_kept_not_bought_again(
    settings: Settings, own_redis: OwnRedis, scripted_llm: ScriptedLLM
) -> None:
    """Its tokens-per-minute reservation cannot be settled (Redis hung after the POST), but the
    answer is paid for: the call returns it instead of sending the request again."""
    stalling = settings.model_copy(update={"redis_url": own_redis.url, "llm_redis_timeout_s": TIMEOUT_S})
    limits = llm_redis(stalling)
    await limits.ping()
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url, tokens_per_minute=1_000_000)}
    rates = EndpointRates(limits, f"{stalling.redis_key_prefix}:rates")
    client = OpenAICompatibleClient(
        endpoints, rates=rates, timeout_s=10, max_retries=5, backoff_base_s=0.5, backoff_max_s=1.0
    )
    scripted_llm.script("seed_cot", stall(1.0))  # the answer comes a second after its POST
    try:
        call = asyncio.create_task(client.chat(chat_request(SEED, "hi", max_tokens=16)))

        async def posted() -> bool:  # reserved in Redis, then posted
            return scripted_llm.in_flight > 0

        await eventually(posted, NEVER_S, "the request posted")
        own_redis.stall()
        await asyncio.sleep(1.0 + TIMEOUT_S + 0.3)  # the answer came; its settle timed out
        own_redis.resume()
        reply = await asyncio.wait_for(call, NEVER_S)
    finally:
        own_redis.resume()
        await client.aclose()
        await limits.aclose()

    assert reply.content
    assert (len(scripted_llm.requests_for("seed_cot")), scripted_llm.ok_answers) == (1, 1)


async def test_a_worker_rides_out_a_redis_that_turned_replica_for_a_while(
    settings: Settings, own_redis: OwnRedis, auth: dict[str, str], scripted_llm: ScriptedLLM
) -> None:
    """A failover leaves the workers on a replica for a moment: its READONLY answers, which the
    pool does not retry, fail polls, job starts and job ends. The worker waits them out and goes
    on: it neither stops polling nor leaves an item's job marked as running."""
    on_own = settings.model_copy(update={"redis_url": own_redis.url, "llm_redis_timeout_s": TIMEOUT_S})
    worker = QueueWorker(**worker_settings(on_own, sweeper=False), handle_signals=False)
    polling = asyncio.create_task(worker.main())
    admin = Redis.from_url(own_redis.url)
    try:
        async with asyncio.timeout(NEVER_S * 5), api_client(on_own) as api:
            scripted_llm.script("intent_decomposition", stall(1.0))
            first = await submit(api, auth, ["How do tides work?"])

            async def posted() -> bool:
                return scripted_llm.in_flight > 0

            await eventually(posted, NEVER_S, "the item's first call")
            await admin.replicaof("127.0.0.1", "9")  # a master it cannot reach: it refuses writes
            await asyncio.sleep(3.0)
            await admin.replicaof("no", "one")
            second = await submit(api, auth, ["How do clouds form?"])

            async def completed(job_id: str) -> bool:
                status: str = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["status"]
                return status == "completed"

            for job_id in (first, second):
                await eventually(partial(completed, job_id), 60, f"job {job_id} completed")
            assert not polling.done()

            async def ended() -> bool:  # an arq job of a retried item may still be ending
                return all(task.done() for task in worker.tasks.values())

            await eventually(ended, 60, "the worker's arq jobs ended")
    finally:
        await admin.aclose()
        polling.cancel()
        # Bounded: a poll loop that will not stop must fail the test, not hold the run.
        await asyncio.wait_for(asyncio.gather(polling, return_exceptions=True), NEVER_S)
        await asyncio.wait_for(worker.close(), NEVER_S)


async def test_a_worker_told_to_stop_while_redis_refuses_it_does_not_wait_redis_out(
    settings: Settings, own_redis: OwnRedis, auth: dict[str, str], scripted_llm: ScriptedLLM
) -> None:
    """Its jobs' ends, which Redis refuses, are given up at once: waiting them out would hold
    its shutdown for as long as Redis is away (and a SIGKILL would end it). The sweeper hands
    its items back once it is gone."""
    on_own = settings.model_copy(update={"redis_url": own_redis.url, "llm_redis_timeout_s": TIMEOUT_S})
    # Its pool tries a refused call again once, not for a minute as a worker's does.
    impatient = {"redis_settings": redis_settings(own_redis.url, 1), "handle_signals": False}
    worker = QueueWorker(**{**worker_settings(on_own, sweeper=False), **impatient})
    polling = asyncio.create_task(worker.main())
    admin = Redis.from_url(own_redis.url)
    try:
        async with asyncio.timeout(NEVER_S * 3), api_client(on_own) as api:
            scripted_llm.script("intent_decomposition", stall(5.0))
            await submit(api, auth, ["How do tides work?"])

            async def posted() -> bool:
                return scripted_llm.in_flight > 0

            await eventually(posted, NEVER_S, "the item's first call")
            await admin.replicaof("127.0.0.1", "9")  # a master it cannot reach: it refuses writes
            running = list(worker.tasks.values())
            assert running
            worker.handle_sig(signal.SIGTERM)  # the item is cancelled and handed back; its arq job ends

            async def ended() -> bool:
                return all(task.done() for task in running)

            await eventually(ended, 15, "the worker's arq jobs ended")
    finally:
        await admin.replicaof("no", "one")
        await admin.aclose()
        polling.cancel()
        # Bounded: a poll loop that will not stop must fail the test, not hold the run.
        await asyncio.wait_for(asyncio.gather(polling, return_exceptions=True), NEVER_S)
        await asyncio.wait_for(worker.close(), NEVER_S)
