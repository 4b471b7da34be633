"""The sweeper: what re-enqueues the items that would otherwise wait for ever, because their
worker died, or their arq job was taken and never claimed, or is gone. One worker a sweep
interval runs it (`workers.main`)."""

from __future__ import annotations

import logging
from uuid import UUID

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

from app.config import Settings
from app.queue import arq_job_id, enqueue_items, enqueue_shares, item_of_job
from app.store import items
from app.store.db import Sessions
from workers import liveness
from workers.llm_limits import llm_limiter

log = logging.getLogger("aidsafe.worker")


async def sweep(settings: Settings, sessions: Sessions, redis: ArqRedis) -> dict[str, int]:
    """Re-enqueue what would otherwise wait: items whose worker died (its heartbeat stopped,
    and then its LLM slots are freed too, or their lease expired); queued items whose arq job
    a worker took and did not claim, recorded as a worker's now dead; and queued items whose
    arq job is gone (Redis restarted, enqueue lost after commit) or was otherwise missed, or
    marked in progress by no worker's record, after the grace period."""
    taken = await _taken_and_in_progress(redis, settings)
    holders = {*await items.running_holders(sessions), *taken.values()}
    dead = await liveness.dead_holders(redis, settings, list(holders))
    expired = await items.take_lost_claims(sessions, dead)
    # Their LLM slots too: held until their leases end (the LLM timeout and a margin), a few
    # dead workers' slots would fill the cap and stall the live ones.
    freed = await llm_limiter(redis, settings).release_owners(settings.endpoints(), [str(d) for d in dead])
    if freed:
        log.info("sweeper freed %d LLM slots of dead workers", freed)
    abandoned = [job_id for job_id, holder in taken.items() if holder in dead]
    # Before the grace check below: these get a new updated_at, which keeps them out of it.
    untaken = await items.take_back_unclaimed(sessions, [item_of_job(job_id) for job_id in abandoned])
    # Not lost: those whose arq job a live worker took and is claiming (its claim may wait
    # for a database connection longer than the grace).
    waiting = [
        (item_id, enqueues)
        for item_id, enqueues in await items.queued_unclaimed(sessions, settings.enqueue_grace_s)
        if arq_job_id(item_id, enqueues) not in taken
    ]
    alive = await _arq_jobs_alive(redis, settings, [arq_job_id(i, n) for i, n in waiting])
    lost = [item_id for (item_id, _), is_alive in zip(waiting, alive, strict=True) if not is_alive]
    present = [item_id for (item_id, _), is_alive in zip(waiting, alive, strict=True) if is_alive]
    await items.touch(sessions, present)
    requeued = await items.renumber(sessions, lost)
    requeued_items = [item for share in requeued.values() for item in share]
    renumbered = [*expired, *untaken, *requeued_items]
    # A dead worker's arq jobs would sit in the queue, in progress, until arq's job timeout.
    await _forget_arq_jobs(redis, settings.queue_name, renumbered)
    # Those a dead worker had begun or taken had reached the front: they resume first. Those
    # whose arq job was lost otherwise (a Redis restart, say) take their keys' turns, as when
    # they were first queued.
    await enqueue_items(redis, settings.queue_name, [*expired, *untaken], ahead=True)
    await enqueue_shares(redis, settings.queue_name, requeued)
    await liveness.forget_taken(redis, settings, abandoned)
    if renumbered:
        log.info(
            "sweeper re-enqueued %d expired items, %d unclaimed by dead workers and %d lost",
            len(expired),
            len(untaken),
            len(requeued_items),
        )
    return {"expired": len(expired), "lost": len(untaken) + len(requeued_items)}


async def _taken_and_in_progress(redis: ArqRedis, settings: Settings) -> dict[str, UUID]:
    """The arq jobs recorded as taken, with the workers that took them, dropping the records
    of jobs no longer in progress: their worker failed to drop them when the job ended, and
    they would hide its item from the grace for lost jobs for as long as that worker lives."""
    taken = await liveness.taken_jobs(redis, settings)
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in taken:
            pipe.exists(in_progress_key_prefix + job_id)
        running = await pipe.execute() if taken else []
    ended = [job_id for job_id, is_running in zip(taken, running, strict=True) if not is_running]
    await liveness.forget_taken(redis, settings, ended)
    return {job_id: worker for job_id, worker in taken.items() if job_id not in ended}


async def _arq_jobs_alive(redis: ArqRedis, settings: Settings, job_ids: list[str]) -> list[bool]:
    """Whether each arq job of a queued item is still on its way, one round trip: waiting in
    the queue (or deferred), or in progress and recorded as a worker's, which claims its
    item at once (if that worker died, the sweep that learns so gives the item back). Each
    job's progress mark is read before its record, and the start script writes both in one:
    a job started while this sweep runs is seen as waiting or as recorded, never as neither.
    It was (the sweep read the records first), and on a busy machine every sweep took tens
    of items just started for lost: a new arq job each, and the one running failed as
    expired. (No MULTI: at thousands of waiting items it would hold Redis for its length.)
    In progress with no record, the worker that took it died before claiming, and arq keeps
    a job in the queue and in progress until its job timeout (24 h)."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.zscore(settings.queue_name, job_id)
            pipe.exists(in_progress_key_prefix + job_id)
            pipe.hexists(liveness.taken_key(settings), job_id)
        answers = await pipe.execute()
    return [
        (score is not None and not running) or bool(running and taken)
        for score, running, taken in zip(answers[::3], answers[1::3], answers[2::3], strict=True)
    ]


async def _forget_arq_jobs(redis: ArqRedis, queue_name: str, renumbered: list[tuple[UUID, int]]) -> None:
    """Drop every earlier arq job of these items: their ids are 1 .. current counter - 1."""
    old = [arq_job_id(item_id, n) for item_id, current in renumbered for n in range(1, current)]
    if not old:
        return
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(queue_name, *old)
        for prefix in (job_key_prefix, in_progress_key_prefix, retry_key_prefix):
            pipe.delete(*(prefix + job_id for job_id in old))
        await pipe.execute()
