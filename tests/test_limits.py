"""Shared endpoint limits on the real Redis: the concurrency cap (EndpointLimiter), which
survives crashes and cancellations and backs off on 429, and the per-minute request and
token budgets (EndpointRates), kept by worker processes together."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from redis.asyncio import Redis

from app.config import EndpointConfig, Settings
from app.deliberation.ports import ChatRequest
from app.deliberation.stages import DELIBERATION, SEED
from app.llm.client import OpenAICompatibleClient
from app.llm.limits import EndpointLimiter
from app.llm.rates import EndpointRates
from app.store.db import Sessions
from bench.audit import status_counts
from tests.conftest import eventually, start_worker, submit
from tests.scripted_llm import ScriptedLLM, chat_request, http_error

REDIS_URL = "redis://127.0.0.1:6379/0"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def key_prefix(redis: Redis) -> AsyncIterator[str]:
    prefix = f"test:limits:{uuid.uuid4().hex}"
    yield prefix
    keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)


async def holders(redis: Redis, limiter: EndpointLimiter, endpoint: str = "default") -> int:
    return int(await redis.zcard(limiter.key(endpoint)))


def deliberation_request() -> ChatRequest:
    return chat_request(DELIBERATION, "Critique the thoughts.", max_tokens=128)


async def test_never_more_than_limit_in_flight_across_clients_with_own_connections(
    scripted_llm: ScriptedLLM, key_prefix: str
) -> None:
    scripted_llm.latency_s = 0.1
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url, max_concurrency=2)}
    connections = [Redis.from_url(REDIS_URL) for _ in range(4)]
    clients = [
        OpenAICompatibleClient(endpoints, EndpointLimiter(conn, key_prefix), timeout_s=5)
        for conn in connections
    ]
    try:
        await asyncio.gather(*(client.chat(deliberation_request()) for client in clients for _ in range(3)))
    finally:
        for client in clients:
            await client.aclose()
        for conn in connections:
            await conn.aclose()

    assert len(scripted_llm.requests) == 12
    assert scripted_llm.max_in_flight == 2


async def test_dead_holders_slot_frees_itself_after_its_lease(redis: Redis, key_prefix: str) -> None:
    lease_s = 1.0
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(
            f"""
            import asyncio
            from redis.asyncio import Redis
            from app.llm.limits import EndpointLimiter

            async def hold_forever():
                limiter = EndpointLimiter(Redis.from_url({REDIS_URL!r}), {key_prefix!r})
                async with limiter.slot("default", 1, {lease_s}):
                    print("acquired", flush=True)
                    await asyncio.sleep(3600)

            asyncio.run(hold_forever())
            """
        ),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdout is not None
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), timeout=10) == b"acquired\n"
        acquired_at = time.monotonic()
    finally:
        holder.send_signal(signal.SIGKILL)  # no finally blocks, no release: a crash
        await holder.wait()
    limiter = EndpointLimiter(redis, key_prefix)

    async with asyncio.timeout(lease_s + 2), limiter.slot("default", 1, lease_s):
        freed_after = time.monotonic() - acquired_at

    assert lease_s - 0.1 <= freed_after <= lease_s + 0.3


async def test_slot_is_released_on_normal_exit(redis: Redis, key_prefix: str) -> None:
    limiter = EndpointLimiter(redis, key_prefix)

    async with limiter.slot("default", 1, 30):
        assert await holders(redis, limiter) == 1

    assert await holders(redis, limiter) == 0


async def test_slot_is_released_when_the_body_raises(redis: Redis, key_prefix: str) -> None:
    limiter = EndpointLimiter(redis, key_prefix)

    with pytest.raises(RuntimeError):
        async with limiter.slot("default", 1, 30):
            raise RuntimeError("request failed")

    assert await holders(redis, limiter) == 0


async def test_slot_is_released_when_its_holder_is_cancelled(redis: Redis, key_prefix: str) -> None:
    limiter = EndpointLimiter(redis, key_prefix)
    acquired = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot("default", 1, 30):
            acquired.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await acquired.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await holders(redis, limiter) == 0


async def test_cancelled_waiter_leaves_no_slot_behind(redis: Redis, key_prefix: str) -> None:
    limiter = EndpointLimiter(redis, key_prefix)

    async with limiter.slot("default", 1, 30):
        waiter = asyncio.create_task(_enter_and_leave(limiter.slot("default", 1, 30)))
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await holders(redis, limiter) == 1

    assert await holders(redis, limiter) == 0


async def _hold_and_note(limiter: EndpointLimiter, served: list[str], name: str) -> None:
    async with limiter.slot("default", 1, 30):
        served.append(name)
        await asyncio.sleep(0.01)


async def test_waiters_of_one_process_get_freed_slots_in_arrival_order(redis: Redis, key_prefix: str) -> None:
    limiter = EndpointLimiter(redis, key_prefix)
    served: list[str] = []

    async with limiter.slot("default", 1, 30):
        waiters = []
        for n in range(5):
            waiters.append(asyncio.create_task(_hold_and_note(limiter, served, str(n))))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert served == []
    await asyncio.gather(*waiters)

    assert served == ["0", "1", "2", "3", "4"]
    assert await holders(redis, limiter) == 0


async def test_cancelled_waiters_do_not_hold_up_the_ones_behind_them(redis: Redis, key_prefix: str) -> None:
    limiter = EndpointLimiter(redis, key_prefix)
    served: list[str] = []

    async with limiter.slot("default", 1, 30):
        first = asyncio.create_task(_hold_and_note(limiter, served, "first"))  # the one at Redis
        await asyncio.sleep(0.05)
        second = asyncio.create_task(_hold_and_note(limiter, served, "second"))
        third = asyncio.create_task(_hold_and_note(limiter, served, "third"))
        await asyncio.sleep(0.05)
        first.cancel()
        second.cancel()
    await asyncio.wait_for(third, timeout=5)

    assert served == ["third"]
    assert first.cancelled() and second.cancelled()
    assert await holders(redis, limiter) == 0


async def test_waiting_time_is_accumulated_for_metrics(redis: Redis, key_prefix: str) -> None:
    limiter = EndpointLimiter(redis, key_prefix)

    async def hold_briefly() -> None:
        async with limiter.slot("default", 1, 30):
            await asyncio.sleep(0.2)

    await asyncio.gather(hold_briefly(), hold_briefly())

    assert 0.15 <= limiter.waited_s < 1.0


async def test_endpoints_are_limited_separately(redis: Redis, key_prefix: str) -> None:
    limiter = EndpointLimiter(redis, key_prefix)

    async with (
        limiter.slot("small-gpu", 1, 30),
        asyncio.timeout(1),
        limiter.slot("big-gpu", 1, 30),
    ):
        assert await holders(redis, limiter, "big-gpu") == 1


async def _enter_and_leave(slot: AbstractAsyncContextManager[None]) -> None:
    async with slot:
        pass


async def test_requests_per_minute_budget_is_shared_across_clients(
    redis: Redis, key_prefix: str, scripted_llm: ScriptedLLM
) -> None:
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url, requests_per_minute=3)}
    clients = [
        OpenAICompatibleClient(endpoints, rates=EndpointRates(redis, key_prefix, window_s=1.0))
        for _ in range(2)
    ]
    request = chat_request(SEED, "hi", max_tokens=16)
    started = time.monotonic()
    await asyncio.gather(*(clients[n % 2].chat(request) for n in range(7)))
    elapsed = time.monotonic() - started
    for client in clients:
        await client.aclose()

    times = sorted(r.received_at for r in scripted_llm.requests)
    assert elapsed >= 2.0, "7 requests at 3 per 1 s window need at least 2 s"
    assert all(later - earlier >= 0.95 for earlier, later in zip(times, times[3:], strict=False))


async def test_a_429_halves_the_adaptive_cap_and_successes_grow_it_back(
    redis: Redis, key_prefix: str
) -> None:
    limiter = EndpointLimiter(redis, key_prefix)

    async def held_at_once(n: int) -> int:
        """How many of n slots can be held together (a request that waits 0.3 s gets none)."""
        async with AsyncExitStack() as held:
            for got in range(n):
                try:
                    await asyncio.wait_for(held.enter_async_context(limiter.slot("default", 8, 30)), 0.3)
                except TimeoutError:
                    return got
            return n

    assert await limiter.rate_limited("default", 8) == 4
    assert await limiter.rate_limited("default", 8) == 4, "a burst of 429s is one cut"
    assert await held_at_once(8) == 4
    for _ in range(40):  # each success adds 1/cap
        async with limiter.slot("default", 8, 30) as slot:
            slot.succeeded = True

    assert await held_at_once(8) == 8


async def test_a_429_seen_by_one_client_halves_the_shared_cap_until_successes_restore_it(
    scripted_llm: ScriptedLLM, key_prefix: str
) -> None:
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url, max_concurrency=4)}
    connections = [Redis.from_url(REDIS_URL) for _ in range(2)]
    limiters = [EndpointLimiter(conn, key_prefix) for conn in connections]
    clients = [
        OpenAICompatibleClient(endpoints, limiter, timeout_s=5, backoff_base_s=0.01, backoff_max_s=0.05)
        for limiter in limiters
    ]

    async def burst(n: int) -> int:
        """n requests at once through both clients; the most the server had in flight."""
        scripted_llm.reset()
        scripted_llm.latency_s = 0.1
        await asyncio.gather(*(clients[i % 2].chat(deliberation_request()) for i in range(n)))
        return scripted_llm.max_in_flight

    try:
        scripted_llm.script("deliberation_turn", http_error(429, retry_after=0))
        await clients[0].chat(deliberation_request())  # 429, then a success on the retry
        in_flight_after_429 = await burst(4)
        for _ in range(3):  # each success adds 1/cap: about `cap` successes per step back up
            await burst(4)
        in_flight_restored = await burst(4)
    finally:
        for client in clients:
            await client.aclose()
        for conn in connections:
            await conn.aclose()

    assert in_flight_after_429 == 2, "the other client too must keep to the halved cap"
    assert in_flight_restored == 4


# --- worker processes sharing per-minute budgets -------------------------------------------

BUDGET_WINDOW_S = 60  # the workers' window: per minute, as providers count
BUDGET_PROMPTS = 15  # 60 LLM calls, about 114,000 tokens: minutes' worth of the budgets below
QUIET_S = 2.0


@pytest.fixture
def spend_budget(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> Callable[..., Awaitable[dict[str, int]]]:
    """spend(**budget): three worker processes share `budget` (Settings fields) on one job;
    once the LLM has heard nothing for QUIET_S (the budget is spent and the rest of the work
    waits for the window to slide), the job's items by status. Unlimited, the whole job
    would be done within seconds."""

    async def spend(**budget: int) -> dict[str, int]:
        scripted_llm.latency_s = 0.05
        job_id = await submit(api, auth, [f"Prompt {n}: how do tides work?" for n in range(BUDGET_PROMPTS)])
        # One item at a time each: a spent budget then still leaves some items completed.
        budgeted = settings.model_copy(update={"worker_max_jobs": 1, **budget})
        workers.extend(start_worker(budgeted) for _ in range(3))
        await eventually(lambda: _quiet(scripted_llm), timeout_s=40, what="the LLM to go quiet")
        return await status_counts(sessions, UUID(job_id))

    return spend


async def _quiet(scripted_llm: ScriptedLLM) -> bool:
    requests = scripted_llm.requests
    return bool(requests) and time.monotonic() - requests[-1].received_at > QUIET_S


async def test_worker_processes_together_keep_to_the_requests_per_minute_budget(
    spend_budget: Callable[..., Awaitable[dict[str, int]]], scripted_llm: ScriptedLLM
) -> None:
    items = await spend_budget(llm_requests_per_minute=30)

    busiest_requests, _ = scripted_llm.busiest_window(BUDGET_WINDOW_S)
    assert busiest_requests <= 30, "more than 30 requests within a minute"
    assert busiest_requests == 30, "the budget should be used up before anything waits"
    assert 0 < items.get("completed", 0) < BUDGET_PROMPTS, items


async def test_worker_processes_together_keep_to_the_tokens_per_minute_budget(
    spend_budget: Callable[..., Awaitable[dict[str, int]]], scripted_llm: ScriptedLLM
) -> None:
    items = await spend_budget(llm_tokens_per_minute=40_000)

    _, busiest_tokens = scripted_llm.busiest_window(BUDGET_WINDOW_S)
    assert busiest_tokens <= 40_000, f"{busiest_tokens} tokens within a minute"
    assert 0 < items.get("completed", 0) < BUDGET_PROMPTS, items
