"""The queue's line is shared fairly between API keys: a key's new job interleaves with the
backlog of another key's, one item for one, instead of waiting behind it all."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import httpx
import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from sqlalchemy import select, update

from app.config import Settings
from app.llm.batch_api import BatchAPI
from app.queue import LINE_END, arq_job_id, enqueue_items, item_of_job, line_key
from app.store import budgets, items
from app.store.db import Sessions
from app.store.models import Item, ItemStatus, Job
from tests.conftest import delete_redis_keys, new_key, run_worker_burst, submit
from tests.scripted_llm import ScriptedLLM
from workers import liveness
from workers.queue_worker import START_SCRIPT
from workers.sweeper import sweep
from workers.waves import run_round


@pytest.fixture(autouse=True)
async def empty_line(settings: Settings) -> None:
    await delete_redis_keys(settings)  # the queue, its line's record and arq's keys of its jobs


def _jobs(count: int) -> list[tuple[UUID, int]]:
    return [(uuid4(), 1) for _ in range(count)]


def _ids(jobs: list[tuple[UUID, int]]) -> list[str]:
    return [arq_job_id(item_id, enqueues) for item_id, enqueues in jobs]


async def _line(arq_redis: ArqRedis, settings: Settings) -> list[str]:
    return [job_id.decode() for job_id in await arq_redis.zrange(settings.queue_name, 0, -1)]


async def test_a_keys_new_job_interleaves_with_another_keys_backlog(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    backlog, newcomer = _jobs(100), _jobs(10)
    await enqueue_items(arq_redis, settings.queue_name, backlog, share=uuid4())
    await enqueue_items(arq_redis, settings.queue_name, newcomer, share=uuid4())

    line = await _line(arq_redis, settings)

    assert set(line[:20]) == set(_ids(backlog[:10]) + _ids(newcomer)), "one of each, from the front"
    assert [job for job in line if job in _ids(newcomer)] == _ids(newcomer), "each share in its order"
    assert [job for job in line if job in _ids(backlog)] == _ids(backlog)


async def test_a_keys_second_job_waits_behind_its_first_and_the_line_moves_on(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    heavy, light = uuid4(), uuid4()
    first, second = _jobs(30), _jobs(5)
    await enqueue_items(arq_redis, settings.queue_name, first, share=heavy)
    await enqueue_items(arq_redis, settings.queue_name, second, share=heavy)
    assert await _line(arq_redis, settings) == _ids(first + second)

    # Twenty of the first job ran: a key that comes now starts at the front, not where the
    # line began, and not behind the heavy key's last place either.
    await arq_redis.zrem(settings.queue_name, *_ids(first[:20]))
    late = _jobs(3)
    await enqueue_items(arq_redis, settings.queue_name, late, share=light)
    assert set((await _line(arq_redis, settings))[:6]) == set(_ids(first[20:23] + late))


async def test_a_key_back_after_an_empty_line_is_not_held_back_by_what_it_ran_before(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    old, other = uuid4(), uuid4()
    ran = _jobs(50)
    await enqueue_items(arq_redis, settings.queue_name, ran, share=old)
    await arq_redis.zrem(settings.queue_name, *_ids(ran))  # all ran: the line is empty

    again, newcomer = _jobs(4), _jobs(4)
    await enqueue_items(arq_redis, settings.queue_name, again, share=old)
    await enqueue_items(arq_redis, settings.queue_name, newcomer, share=other)

    line = await _line(arq_redis, settings)
    assert set(line[:2]) == {_ids(again)[0], _ids(newcomer)[0]}


async def test_calls_of_more_than_one_batch_keep_their_order(settings: Settings, arq_redis: ArqRedis) -> None:
    """enqueue_items sends 1,000 jobs a call: each later call goes on where the one before ended."""
    shared, neutral, ahead = _jobs(2_500), _jobs(1_500), _jobs(1_200)
    await enqueue_items(arq_redis, settings.queue_name, shared, share=uuid4())
    assert await _line(arq_redis, settings) == _ids(shared)
    await arq_redis.zrem(settings.queue_name, *_ids(shared)[:100])

    await enqueue_items(arq_redis, settings.queue_name, neutral)
    line = await _line(arq_redis, settings)
    assert [job for job in line if job in set(_ids(neutral))] == _ids(neutral)

    await enqueue_items(arq_redis, settings.queue_name, ahead, ahead=True)
    assert (await _line(arq_redis, settings))[: len(ahead)] == _ids(ahead)


async def test_places_are_due_and_below_the_times_arq_scores_with(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    jobs = _jobs(3)
    await enqueue_items(arq_redis, settings.queue_name, jobs, share=uuid4())
    scores = [score for _, score in await arq_redis.zrange(settings.queue_name, 0, -1, withscores=True)]
    assert all(score < LINE_END < timestamp_ms() for score in scores)
    # The line's record keeps one place per share and the furthest, not one per job.
    assert await arq_redis.hlen(line_key(settings.queue_name)) == 2  # type: ignore[misc]  # redis-py types hash commands as sync or async


async def _start(settings: Settings, arq_redis: ArqRedis, wanted: int) -> list[str]:
    """One poll of the start script, as QueueWorker sends it; the jobs it marked."""
    keys = [
        settings.queue_name,
        liveness.taken_key(settings),
        f"{settings.redis_key_prefix}:starts:{uuid4()}",
        line_key(settings.queue_name),
    ]
    args: list[str | int] = [in_progress_key_prefix, 60_000, timestamp_ms(), wanted, str(uuid4()), 1000]
    marked = await arq_redis.register_script(START_SCRIPT)(keys=keys, args=args)
    return [job_id.decode() for job_id in marked[::2]]


async def test_a_job_due_by_its_time_takes_its_turn_from_the_front_of_the_line(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    """A Retry's backoff is a time (arq scores it so): once over, the item would otherwise wait
    behind every place in line, those given after its backoff ended too, and with a line that
    keeps growing it would never run. One queued by an older release, with a time, likewise.
    It takes its turn with the first of each key's."""
    await enqueue_items(arq_redis, settings.queue_name, _jobs(20), share=uuid4())
    retried, deferred = f"test:{uuid4().hex}:retried", f"test:{uuid4().hex}:deferred"
    await arq_redis.zadd(
        settings.queue_name, {retried: timestamp_ms() - 1, deferred: timestamp_ms() + 60_000}
    )
    await enqueue_items(arq_redis, settings.queue_name, _jobs(20), share=uuid4())  # came after it

    started: list[str] = []
    try:
        started += await _start(settings, arq_redis, wanted=3)
        assert retried in started
        assert await arq_redis.zscore(settings.queue_name, deferred) > timestamp_ms(), "not due: left"
    finally:
        await arq_redis.delete(*(in_progress_key_prefix + job_id for job_id in started))


async def test_a_worker_runs_a_second_keys_job_between_the_first_keys_prompts(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    """Through the API: each job is queued as its key's share. One slot, so items run one by one."""
    heavy, light = await new_key(sessions, "heavy"), await new_key(sessions, "light")
    await submit(api, heavy, [f"heavy prompt {n}" for n in range(6)], max_rounds=1)
    await submit(api, light, [f"light prompt {n}" for n in range(2)], max_rounds=1)

    await asyncio.wait_for(run_worker_burst(settings, max_jobs=1), timeout=120)

    started: list[str] = []  # each prompt, at its first request
    for request in scripted_llm.requests:
        text = str(request.body["messages"])
        prompt = next(
            (
                f"{who} prompt {n}"
                for who in ("heavy", "light")
                for n in range(6)
                if f"{who} prompt {n}" in text
            ),
            None,
        )
        if prompt and prompt not in started:
            started.append(prompt)
    assert len(started) == 8
    assert started.index("light prompt 1") < started.index("heavy prompt 3"), started


async def test_jobs_due_again_and_again_do_not_take_every_turn(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    """A key's items on an endpoint that is down come back after each back-off, again and
    again. Put first in line each time, they took every free slot for as long as one was due,
    and another key's items, on an endpoint that answers, waited out the whole outage."""
    waiting = _jobs(1)
    await enqueue_items(arq_redis, settings.queue_name, waiting, share=uuid4())
    started: list[str] = []
    try:
        for _ in range(3):  # a job due again at every poll, one free slot each
            retried = f"test:{uuid4().hex}:retried"
            await arq_redis.zadd(settings.queue_name, {retried: timestamp_ms() - 1})
            started += await _start(settings, arq_redis, wanted=1)
        assert _ids(waiting)[0] in started
    finally:
        await arq_redis.delete(*(in_progress_key_prefix + job_id for job_id in started))


async def test_items_queued_again_after_a_batch_wave_take_their_keys_turns(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, arq_redis: ArqRedis
) -> None:
    """A batch job's items are queued again after each wave (workers/waves.py), every key's in
    one call: in the order Postgres gave them, a key's 3 waited behind another key's 30."""
    heavy_job = await submit(api, await new_key(sessions, "heavy"), [f"heavy {n}" for n in range(30)])
    light_job = await submit(api, await new_key(sessions, "light"), [f"light {n}" for n in range(3)])
    jobs = [UUID(heavy_job), UUID(light_job)]
    async with sessions.begin() as session:  # as a wave's answers leave them, the queue emptied
        await session.execute(
            update(Item).where(Item.job_id.in_(jobs)).values(status=ItemStatus.AWAITING_BATCH)
        )
        job_of = dict(
            (await session.execute(select(Item.id, Item.job_id).where(Item.job_id.in_(jobs)))).all()
        )
    await delete_redis_keys(settings)

    batch_api = BatchAPI(settings.endpoints(), settings.batch_call_timeout_s)
    try:
        await run_round(settings, sessions, arq_redis, batch_api)
    finally:
        await batch_api.aclose()

    line = [job_of.get(item_of_job(job_id)[0]) for job_id in await _line(arq_redis, settings)]
    ours = [job for job in line if job is not None]
    assert len(ours) == 33
    assert ours[:6].count(jobs[1]) == 3, "one of each key's, from the front"


async def test_items_a_park_resumes_take_their_keys_turn(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, arq_redis: ArqRedis
) -> None:
    """A worker parking its item for budget queues again the job's items waiting for budget
    if the budget was raised meanwhile: as the job's key's share, not at the front of the line."""
    auth = await new_key(sessions, "budgeted")
    job_id = UUID(await submit(api, auth, ["first prompt", "second prompt"]))
    async with sessions.begin() as session:
        owner = await session.scalar(select(Job.owner_key_id).where(Job.id == job_id))
        by_position = select(Item.id).where(Item.job_id == job_id).order_by(Item.position)
        waiting, running = (await session.scalars(by_position)).all()
        await session.execute(
            update(Item).where(Item.id == waiting).values(status=ItemStatus.BUDGET_EXHAUSTED)
        )
    await delete_redis_keys(settings)  # the line as the workers would find it: empty
    claim = await items.claim(sessions, running, items.Limits(lease_s=60, max_claims=10, max_failures=5))
    assert claim is not None

    spending = budgets.Spending(arq_redis, sessions, settings.redis_key_prefix)
    await budgets.park(sessions, spending, arq_redis, settings.queue_name, claim)

    # The budget is not spent (the job has none): the parked item goes back too.
    assert {item_of_job(job)[0] for job in await _line(arq_redis, settings)} == {waiting, running}
    assert await arq_redis.hget(line_key(settings.queue_name), str(owner)) is not None  # type: ignore[misc]  # redis-py types hash commands as sync or async


async def test_items_whose_arq_jobs_were_lost_are_queued_again_as_their_keys_shares(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, arq_redis: ArqRedis
) -> None:
    """A Redis restarted without its data loses every queued item's arq job: the sweeper
    queues them again as their keys' shares, not all of them first come, first served."""
    heavy, light = await new_key(sessions, "heavy"), await new_key(sessions, "light")
    await submit(api, heavy, [f"heavy prompt {n}" for n in range(30)])
    light_job = UUID(await submit(api, light, ["light prompt 0", "light prompt 1"]))
    await delete_redis_keys(settings)  # the queue and the line's record, as after such a restart
    await asyncio.sleep(settings.enqueue_grace_s + 0.2)

    await sweep(settings, sessions, arq_redis)

    async with sessions() as session:
        light_items = set((await session.scalars(select(Item.id).where(Item.job_id == light_job))).all())
        light_key = await session.scalar(select(Job.owner_key_id).where(Job.id == light_job))
    line = [item_of_job(job)[0] for job in await _line(arq_redis, settings)]
    assert len(line) == 32
    assert light_items <= set(line[:4]), "each key's items from the front"
    # As shares: on an empty line, items of no one's share would stand there alike.
    assert await arq_redis.hget(line_key(settings.queue_name), str(light_key)) is not None  # type: ignore[misc]  # redis-py types hash commands as sync or async
