"""Worker liveness: a killed worker's item resumes within seconds (its heartbeat, not its
lease), a slow one keeps its item, the heartbeat ends with its worker, and heartbeats lost
with Redis's keys take nothing back until the live workers had time to beat again."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from uuid import UUID, uuid4

import httpx
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix
from pydantic import ValidationError
from redis.asyncio import Redis
from sqlalchemy import make_url, select

from app.config import Settings
from app.queue import arq_job_id
from app.store import items
from app.store.db import Sessions
from app.store.models import Item
from tests.conftest import delete_redis_keys, eventually, start_worker, submit
from tests.redis_relay import RedisRelay
from tests.scripted_llm import ScriptedLLM, agree, stall
from tests.test_worker import one_item, turn_count
from workers import liveness
from workers.llm_limits import llm_limiter
from workers.main import connect, shutdown
from workers.queue_worker import WORKER_ID
from workers.sweeper import _arq_jobs_alive, sweep

DEFAULTS = Settings.model_fields


def long_lease(settings: Settings, **update: object) -> Settings:
    """The test settings with a production-length lease: only a heartbeat can free an item
    within the test's time."""
    return settings.model_copy(update={"lease_seconds": 60, **update})


async def item_row(sessions: Sessions, item_id: UUID) -> Item:
    async with sessions() as session:
        item = await session.get(Item, item_id)
        assert item is not None
        return item


async def test_a_killed_workers_items_resume_within_20_s_with_the_default_heartbeat(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    production = long_lease(
        settings,
        heartbeat_interval_s=DEFAULTS["heartbeat_interval_s"].default,
        heartbeat_ttl_s=DEFAULTS["heartbeat_ttl_s"].default,
        sweep_interval_s=DEFAULTS["sweep_interval_s"].default,
    )
    workers.extend(start_worker(production) for _ in range(2))
    await eventually(lambda: _live_workers(redis, production, 2), timeout_s=60, what="both workers to beat")
    scripted_llm.latency_s = 0.4
    scripted_llm.script("deliberation_turn", *[agree(False, new_thoughts=[f"point {n}"]) for n in range(40)])
    job_id = await submit(
        api, auth, [f"Prompt {n}: how are vaccines tested?" for n in range(4)], max_rounds=4
    )
    first = (await _job_items(sessions, job_id))[0].id
    await eventually(lambda: _turns_at_least(sessions, first, 3), what="three stored turns")
    holder = await _holding_process(redis, production, sessions, first, workers)

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed_at = time.monotonic()
    at_kill = await _job_items(sessions, job_id)
    lost = {
        item.id for item in at_kill if item.status == "running" and item.claimed_by == at_kill[0].claimed_by
    }
    await eventually(
        lambda: _all_claimed(sessions, lost, 2), timeout_s=20, what="every lost item claimed again"
    )
    resumed_after_s = time.monotonic() - killed_at
    await eventually(lambda: _job_finished(sessions, job_id), timeout_s=60, what="the job to finish")

    assert resumed_after_s < 20
    finished = await _job_items(sessions, job_id)
    assert [(item.status, item.attempts, item.failures, item.claimed_by) for item in finished] == [
        ("completed", 2, 1, None) if item.id in lost else ("completed", 1, 0, None) for item in finished
    ]
    turns = 0
    for item in finished:
        stored = (await api.get(f"/v1/items/{item.id}", headers=auth)).json()["turns"]
        keys = [(t["stage"], t["round"], t["agent"], t["attempt"]) for t in stored]
        assert len(keys) == len(set(keys)), "a turn was stored twice"
        turns += len(stored)
    re_spent = len(scripted_llm.requests) - turns
    assert 0 <= re_spent <= len(lost), f"{re_spent} LLM calls repeated; only those in flight may be"


async def test_a_killed_workers_taken_but_unclaimed_items_resume_with_its_heartbeat(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    """A worker takes arq jobs faster than it claims their items (here it cannot reach the
    database at all; under load its claims wait for a connection). arq marks each job in
    progress, of no worker, for its job timeout (24 h); killed before its claims, the worker
    must give them back with its heartbeat, not after the grace for lost arq jobs (made
    long here, so that only the heartbeat can resume them in time)."""
    production = long_lease(
        settings,
        heartbeat_interval_s=DEFAULTS["heartbeat_interval_s"].default,
        heartbeat_ttl_s=DEFAULTS["heartbeat_ttl_s"].default,
        sweep_interval_s=DEFAULTS["sweep_interval_s"].default,
        enqueue_grace_s=60,
    )
    await _known_redis(redis, production)
    async with _unanswering_port() as port:
        unreachable = make_url(production.database_url).set(host="127.0.0.1", port=port)
        cut_off = production.model_copy(
            update={"database_url": unreachable.render_as_string(hide_password=False)}
        )
        workers.append(start_worker(cut_off))
        await eventually(lambda: _live_workers(redis, production, 1), timeout_s=60, what="the worker to beat")
        job_id = await submit(api, auth, [f"Prompt {n}: why do leaves fall?" for n in range(4)])
        taken = [arq_job_id(item.id, item.enqueues) for item in await _job_items(sessions, job_id)]
        await eventually(lambda: _in_progress(redis, taken), what="the worker to take every job")
        workers.append(start_worker(production))
        await eventually(lambda: _live_workers(redis, production, 2), timeout_s=60, what="a second worker")

        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        killed_at = time.monotonic()
        unclaimed = {item.id for item in await _job_items(sessions, job_id)}
        await eventually(
            lambda: _all_claimed(sessions, unclaimed, 1), timeout_s=30, what="every item claimed"
        )
        resumed_after_s = time.monotonic() - killed_at
    await eventually(lambda: _job_finished(sessions, job_id), timeout_s=60, what="the job to finish")

    # The worker's last beat outlives it by up to a TTL; then one sweep; then a claim.
    assert resumed_after_s < production.heartbeat_ttl_s + production.sweep_interval_s + 2, (
        f"resumed {resumed_after_s:.1f} s after the kill"
    )
    finished = await _job_items(sessions, job_id)
    assert [(item.status, item.attempts, item.failures) for item in finished] == [("completed", 1, 0)] * 4
    turns = 0
    for item in finished:
        turns += len((await api.get(f"/v1/items/{item.id}", headers=auth)).json()["turns"])
    assert turns == len(scripted_llm.requests), "an item ran twice"
    assert not await redis.exists(*(in_progress_key_prefix + job for job in taken)), "stale arq jobs"


async def test_a_live_worker_keeps_the_jobs_it_took_before_claiming(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    arq_redis: ArqRedis,
) -> None:
    """Two workers each took an arq job and wait to claim its item: the sweeper gives back
    the dead one's at once, ahead of the backlog, and leaves the live one's alone, however
    long its claim takes."""
    job_id = await submit(api, auth, ["What makes bread rise?", "Why is ice slippery?", "What is rust?"])
    dead_item, live_item, backlog = await _job_items(sessions, job_id)
    dead_job, live_job = arq_job_id(dead_item.id, 1), arq_job_id(live_item.id, 1)
    for job in (dead_job, live_job):
        await arq_redis.set(in_progress_key_prefix + job, b"1", ex=60)  # as arq marks a taken job
    await _known_redis(redis, settings)
    dead, live = uuid4(), uuid4()
    await liveness.beat(redis, settings, live)
    # As each worker's start records the job it took, until the job ends.
    await redis.hset(liveness.taken_key(settings), mapping={dead_job: str(dead), live_job: str(live)})  # type: ignore[misc]  # redis-py types hash commands as sync or async
    # The live worker's claim waits longer than the grace for lost arq jobs: still its.
    await asyncio.sleep(settings.enqueue_grace_s + 0.2)
    await liveness.beat(redis, settings, live)

    assert await sweep(settings, sessions, arq_redis) == {"expired": 0, "lost": 1}

    assert [(i.status, i.enqueues) for i in await _job_items(sessions, job_id)] == [
        ("queued", 2),
        ("queued", 1),
        ("queued", 1),
    ]
    assert await arq_redis.zrange(settings.queue_name, 0, -1) == [
        arq_job_id(dead_item.id, 2).encode(),
        live_job.encode(),
        arq_job_id(backlog.id, 1).encode(),
    ]
    assert not await arq_redis.exists(in_progress_key_prefix + dead_job)
    assert await arq_redis.exists(in_progress_key_prefix + live_job)
    assert list(await liveness.taken_jobs(redis, settings)) == [live_job]


async def test_an_arq_job_started_while_the_sweeper_runs_is_not_taken_for_lost(
    settings: Settings, redis: Redis, arq_redis: ArqRedis
) -> None:
    """The sweeper reads the workers' records of taken jobs before it looks for lost ones. A
    job a worker started in between (its mark and record written together) is in progress
    and recorded now: alive. In progress with no record, its worker died before claiming."""
    started, orphaned, waiting, gone = (arq_job_id(uuid4(), 1) for _ in range(4))
    await arq_redis.zadd(settings.queue_name, {job: 1 for job in (started, orphaned, waiting)})
    for job in (started, orphaned):
        await arq_redis.set(in_progress_key_prefix + job, b"1", ex=60)
    # As the start script records what it marks; `gone` left its record when its job ended.
    await redis.hset(liveness.taken_key(settings), mapping={started: str(uuid4()), gone: str(uuid4())})  # type: ignore[misc]  # redis-py types hash commands as sync or async

    alive = await _arq_jobs_alive(arq_redis, settings, [started, orphaned, waiting, gone])

    assert alive == [True, False, True, False]


async def test_a_record_left_after_its_job_ended_does_not_hide_the_item_from_the_sweeper(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    arq_redis: ArqRedis,
) -> None:
    """A live worker that could not drop its record when the arq job ended (Redis away for
    that HDEL): the record must not keep the sweeper from the item once its arq job is lost."""
    job_id = await submit(api, auth, ["What makes bread rise?"])
    (item,) = await _job_items(sessions, job_id)
    job = arq_job_id(item.id, 1)
    await arq_redis.zrem(settings.queue_name, job)  # lost, as a Redis restart loses it
    live = uuid4()
    # Taken, and not in progress.
    await redis.hset(liveness.taken_key(settings), job, str(live))  # type: ignore[misc]  # redis-py types hash commands as sync or async
    await asyncio.sleep(settings.enqueue_grace_s + 0.2)
    await liveness.beat(redis, settings, live)

    assert await sweep(settings, sessions, arq_redis) == {"expired": 0, "lost": 1}

    assert await arq_redis.zrange(settings.queue_name, 0, -1) == [arq_job_id(item.id, 2).encode()]
    assert job not in await liveness.taken_jobs(redis, settings)


async def test_a_worker_slower_than_its_heartbeat_ttl_keeps_its_item(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    # One LLM call takes three heartbeat TTLs, with another worker's sweeper watching.
    quick = long_lease(settings, heartbeat_interval_s=0.3, heartbeat_ttl_s=1.0, llm_timeout_s=10.0)
    scripted_llm.script("seed_cot", stall(3))
    job_id = await submit(api, auth, ["What is a good first programming language?"])
    item_id = (await one_item(sessions, job_id)).id
    workers.extend(start_worker(quick) for _ in range(2))

    item = await eventually(lambda: _finished(sessions, item_id), what="the item to finish")

    assert (item.status, item.attempts, item.failures) == ("completed", 1, 0)
    turns = (await api.get(f"/v1/items/{item.id}", headers=auth)).json()["turns"]
    assert len(turns) == len(scripted_llm.requests), "an LLM call was made twice"


async def test_the_heartbeat_ends_with_its_worker(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    lasting = long_lease(settings, heartbeat_ttl_s=60.0, llm_timeout_s=60.0)
    scripted_llm.script("seed_cot", stall(60))
    job_id = await submit(api, auth, ["How do tides work?"])
    item_id = (await one_item(sessions, job_id)).id
    workers.append(start_worker(lasting))
    await eventually(lambda: _turns_at_least(sessions, item_id, 1), what="the intent turn")
    holder = (await item_row(sessions, item_id)).claimed_by
    assert holder is not None
    key = liveness.heartbeat_key(lasting, holder)
    assert 50_000 < await redis.pttl(key) <= 60_000

    workers[0].send_signal(signal.SIGTERM)
    assert workers[0].wait(timeout=30) is not None

    assert not await redis.exists(key), "the key outlives its worker until its TTL"
    await asyncio.sleep(lasting.heartbeat_interval_s * 1.5)
    assert not await redis.exists(key), "something still beats for the stopped worker"


@pytest.mark.parametrize("persisted", [False, True], ids=["emptied", "reloaded"])
async def test_missing_heartbeats_count_only_after_redis_kept_them_for_a_ttl(
    persisted: bool,
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    arq_redis: ArqRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis restarted: every heartbeat is gone at once, live workers' too (emptied: without
    persistence, or flushed; reloaded: from a snapshot older than the TTL, with the sweeper's
    record of the server it saw). The sweeper waits one TTL, while they beat again, before it
    believes a missing one."""
    brief = long_lease(settings, heartbeat_interval_s=0.2, heartbeat_ttl_s=1.0)
    job_id = await submit(api, auth, ["How do plants make sugar?", "Why is the sky blue?"])
    silent_id, live_id = [item.id for item in await _job_items(sessions, job_id)]
    silent, live = uuid4(), uuid4()
    limits = items.Limits(lease_s=60, max_claims=8, max_failures=5)
    assert await items.claim(sessions, silent_id, limits, holder=silent)
    assert await items.claim(sessions, live_id, limits, holder=live)
    await delete_redis_keys(brief)  # no heartbeat, no record of the server
    if persisted:
        await redis.set(f"{brief.redis_key_prefix}:liveness:redis-run-id", "the server before the restart")

    await liveness.beat(redis, brief, live)  # the live worker beats again at once
    with caplog.at_level(logging.INFO, logger="aidsafe.worker"):
        assert await sweep(brief, sessions, arq_redis) == {"expired": 0, "lost": 0}
        assert await sweep(brief, sessions, arq_redis) == {"expired": 0, "lost": 0}  # still settling
    assert [r.message for r in caplog.records if "Redis is new" in r.message] == [
        f"Redis is new to the sweeper: missing heartbeats count after {brief.heartbeat_ttl_s} s"
    ], "said once per server, not at every sweep"
    await asyncio.sleep(brief.heartbeat_ttl_s + 0.1)
    await liveness.beat(redis, brief, live)  # ... and on
    assert await sweep(brief, sessions, arq_redis) == {"expired": 1, "lost": 0}

    taken, kept = await item_row(sessions, silent_id), await item_row(sessions, live_id)
    assert (taken.status, taken.failures, taken.error_message) == (
        "queued",
        1,
        "worker lost (heartbeat stopped)",
    )
    assert (kept.status, kept.failures) == ("running", 0)


async def test_a_dead_workers_llm_slots_are_freed_with_its_items(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    arq_redis: ArqRedis,
) -> None:
    """A killed worker never releases its slots of the shared LLM cap. Left to their leases
    (the LLM timeout and a margin, 25 s by default), a few kills in a row fill the cap and
    every live worker waits; the sweeper frees them with the dead worker's items. A live
    worker's slot stays."""
    job_id = await submit(api, auth, ["What makes bread rise?"])
    item_id = (await one_item(sessions, job_id)).id
    dead, live = uuid4(), uuid4()
    assert await items.claim(sessions, item_id, items.Limits(60, 8, 5), holder=dead)
    await _known_redis(redis, settings)
    await liveness.beat(redis, settings, live)
    cap, lease_s = 3, 60.0
    async with AsyncExitStack() as held:
        for owner in (dead, dead, live):
            limiter = llm_limiter(arq_redis, settings, owner=owner)
            await held.enter_async_context(limiter.slot("default", cap, lease_s))

        assert await sweep(settings, sessions, arq_redis) == {"expired": 1, "lost": 0}

        async with asyncio.timeout(2):  # not the 60 s of the dead worker's leases
            async with llm_limiter(arq_redis, settings, owner=live).slot("default", cap, lease_s):
                holders = await redis.zrange(llm_limiter(arq_redis, settings).key("default"), 0, -1)
    assert sorted(holder.decode().split("/")[0] for holder in holders) == [str(live)] * 2


async def test_a_redis_that_denies_info_still_gets_expired_leases_swept(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """Where INFO is denied (an ACL, a managed Redis) the sweeper cannot tell a restart from
    dead workers, but it must still sweep: leases, lost arq jobs."""
    job_id = await submit(api, auth, ["Why do cats purr?"])
    item_id = (await one_item(sessions, job_id)).id
    expired = items.Limits(lease_s=0, max_claims=8, max_failures=5)
    assert await items.claim(sessions, item_id, expired, holder=uuid4())
    user = f"aidsafe-test-no-info-{uuid4().hex}"
    await redis.acl_setuser(
        user, enabled=True, nopass=True, categories=["+@all"], commands=["-info"], keys=["*"], channels=["*"]
    )
    denied = await create_pool(dataclasses.replace(RedisSettings.from_dsn(settings.redis_url), username=user))
    try:
        assert await sweep(settings, sessions, denied) == {"expired": 1, "lost": 0}
    finally:
        await denied.aclose()
        await redis.acl_deluser(user)
    assert (await item_row(sessions, item_id)).status == "queued"


async def test_a_worker_busy_with_its_shared_redis_pool_still_beats(
    settings: Settings, arq_redis: ArqRedis, redis: Redis
) -> None:
    """Items' commands queue for the worker's pool (its lock, on a saturated machine for
    seconds); a heartbeat queued behind them looked like a dead worker's."""
    brief = settings.model_copy(update={"heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 1.0})
    worker_id = uuid4()
    ctx = {"settings": brief, "redis": arq_redis, WORKER_ID: worker_id}
    await connect(ctx)
    try:
        key = liveness.heartbeat_key(brief, worker_id)
        async with arq_redis.connection_pool._lock:  # every command of the pool waits now
            await asyncio.sleep(brief.heartbeat_ttl_s * 2.5)
            assert await redis.pttl(key) > 0, "a busy worker looks dead"
    finally:
        await shutdown(ctx)
    assert not await redis.exists(key), "the key outlives its stopped worker"


async def test_a_heartbeat_stuck_on_a_silent_connection_beats_again_on_a_new_one(
    settings: Settings, redis: Redis
) -> None:
    """A connection whose peer vanished without a reset (a partition, a host gone) answers
    nothing, for as long as TCP keeps trying; the worker is alive and must stay so."""
    brief = settings.model_copy(update={"heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 1.0})
    target = redis.connection_pool.connection_kwargs
    relay = RedisRelay(target["host"], target["port"])
    await relay.start()
    client = Redis(host="127.0.0.1", port=relay.port, db=target.get("db", 0))
    worker_id = uuid4()
    await liveness.beat(client, brief, worker_id)
    heartbeat = asyncio.create_task(liveness.beat_forever(client, brief, worker_id))
    try:
        relay.silence()  # the connection the pool holds now answers nothing
        await asyncio.sleep(brief.heartbeat_ttl_s * 2)
        assert await redis.exists(liveness.heartbeat_key(brief, worker_id)), "a live worker looks dead"
    finally:
        heartbeat.cancel()
        await client.aclose()
        relay.close()


async def _known_redis(redis: Redis, settings: Settings) -> None:
    """Record the Redis server as the sweeper's own: missing heartbeats count at once."""
    run_id = (await redis.info("server"))["run_id"]
    await redis.set(f"{settings.redis_key_prefix}:liveness:redis-run-id", run_id)


@asynccontextmanager
async def _unanswering_port() -> AsyncIterator[int]:
    """A port that accepts connections and answers nothing: a database out of reach."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def _in_progress(redis: Redis, job_ids: list[str]) -> bool:
    existing: int = await redis.exists(*(in_progress_key_prefix + job for job in job_ids))
    return existing == len(job_ids)


async def _all_claimed(sessions: Sessions, item_ids: set[UUID], attempts: int) -> bool:
    async with sessions() as session:
        rows = await session.scalars(select(Item).where(Item.id.in_(item_ids)))
        return all(item.attempts >= attempts and item.status in ("running", "completed") for item in rows)


async def _turns_at_least(sessions: Sessions, item_id: UUID, n: int) -> bool:
    return await turn_count(sessions, item_id) >= n


async def _job_items(sessions: Sessions, job_id: str) -> list[Item]:
    async with sessions() as session:
        rows = await session.scalars(select(Item).where(Item.job_id == UUID(job_id)).order_by(Item.position))
        return list(rows)


async def _job_finished(sessions: Sessions, job_id: str) -> bool:
    return all(
        item.status in ("completed", "failed", "cancelled") for item in await _job_items(sessions, job_id)
    )


async def _finished(sessions: Sessions, item_id: UUID) -> Item | None:
    item = await item_row(sessions, item_id)
    return item if item.status in ("completed", "failed", "cancelled") else None


async def _holding_process(
    redis: Redis,
    settings: Settings,
    sessions: Sessions,
    item_id: UUID,
    workers: list[subprocess.Popen[bytes]],
) -> subprocess.Popen[bytes]:
    """The worker process that holds the item, by its heartbeat key's value."""
    holder = (await item_row(sessions, item_id)).claimed_by
    assert holder is not None
    where = await redis.get(liveness.heartbeat_key(settings, holder))
    assert where is not None
    pid = int(where.decode().rsplit(" ", 1)[1])
    return next(process for process in workers if process.pid == pid)


async def _live_workers(redis: Redis, settings: Settings, n: int) -> bool:
    return len([key async for key in redis.scan_iter(liveness.heartbeat_key(settings, "*"))]) >= n


def test_a_heartbeat_must_outlive_three_intervals() -> None:
    """One beat may hang for an interval before it gives up; two more must still fit."""
    assert Settings(heartbeat_interval_s=2.0, heartbeat_ttl_s=6.0).heartbeat_ttl_s == 6.0
    with pytest.raises(ValidationError, match="three times"):
        Settings(heartbeat_interval_s=2.0, heartbeat_ttl_s=5.9)
