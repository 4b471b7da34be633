"""Worker liveness: every worker process keeps a short-lived key in Redis alive, and the
sweeper takes back the running items of workers whose key is gone.

A worker's claims carry its id (`items.claimed_by`). Its heartbeat is a task of its own that
does nothing but set the key, on a Redis client of its own (`Heartbeat`), so a slow LLM call
or a busy item, or many items' commands queued for the worker's pool, never delays it; only an
event loop blocked for longer than the key's TTL would (a runaway computation, or a pause of
the whole process), and then the worker loses its items as a dead one would. That is safe:
every write under a claim is fenced by it (a worker whose item was taken over gets ClaimLost
at its next write), and the lease in Postgres stays the backstop, should heartbeats be lost
and the sweeper not notice.

Heartbeats missing because Redis restarted, failed over or was flushed are not deaths: the
sweeper remembers the Redis server's run id and, when it changes or its record is gone,
trusts no missing heartbeat for one TTL, while the live workers set their keys again.

Before its claim, an item is held only by its arq job, which arq marks in progress (of no
worker) for its job timeout when a worker takes it; a worker may hold many such jobs while
their claims wait for a database connection. Each is recorded under its worker in the same
script call that marks it (`workers.queue_worker.QueueWorker`), until the job ends (its record
goes in the transaction that ends it, `QueueWorker.finish_job`, or by `job_ended`), so
that the sweeper gives back a dead worker's unclaimed items with its running ones instead of
after the grace for lost arq jobs, and keeps a live worker's however long its claims wait. A
record whose job is no longer in progress (its HDEL failed) is dropped by the sweeper, or it
would hide its item from the grace for lost jobs for as long as its worker lives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import ReadOnlyError, ResponseError

from app.config import Settings

log = logging.getLogger("aidsafe.worker")


def heartbeat_key(settings: Settings, worker_id: UUID | str) -> str:
    return f"{settings.redis_key_prefix}:workers:{worker_id}"


def _sweeper_key(settings: Settings, name: str) -> str:
    return f"{settings.redis_key_prefix}:liveness:{name}"


def taken_key(settings: Settings) -> str:
    """A hash: arq job id -> the worker that took it, until the job ends."""
    return _sweeper_key(settings, "taken")


def process() -> str:
    """Where a worker runs, for operators: the value of its heartbeat key."""
    return f"{socket.gethostname()} pid {os.getpid()}"


async def beat(redis: Redis, settings: Settings, worker_id: UUID) -> None:
    await redis.set(heartbeat_key(settings, worker_id), process(), px=int(settings.heartbeat_ttl_s * 1000))


async def beat_forever(redis: Redis, settings: Settings, worker_id: UUID) -> None:
    while True:
        await asyncio.sleep(settings.heartbeat_interval_s)
        try:
            # A connection whose peer vanished without a reset would hold this beat until TCP
            # gives up, many minutes after the key expired while the worker kept claiming: give
            # it up instead (the client drops the connection) and beat on a new one next time.
            async with asyncio.timeout(settings.heartbeat_interval_s):
                await beat(redis, settings, worker_id)
        except Exception:  # Redis away: the next beat may land before the key expires
            log.warning("heartbeat failed", exc_info=True)


class Heartbeat:
    """A worker's heartbeat, on a Redis client of its own: in the worker's shared pool it
    queued behind the items' commands for the pool's lock, and on a saturated machine (10,000
    items, cap 256, 2 cores) missed its TTL while the worker was busy, not dead: the sweeper
    then gave its items to the other worker, which bought their LLM answers again."""

    def __init__(self, redis: Redis, settings: Settings, worker_id: UUID) -> None:
        self._redis, self._settings, self._worker_id = redis, settings, worker_id
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings, worker_id: UUID) -> Heartbeat:
        """Beat once (a claim without a heartbeat looks dead), then every interval."""
        timeout_s = settings.redis_timeout_s  # the queue's bound on a Redis that stops answering
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_error=[ReadOnlyError],  # a failover's old primary: beat on a new connection
        )
        try:
            await beat(redis, settings, worker_id)
        except BaseException:
            await redis.aclose()
            raise
        heartbeat = cls(redis, settings, worker_id)
        heartbeat._task = asyncio.create_task(beat_forever(redis, settings, worker_id))
        return heartbeat

    async def stop(self) -> None:
        """Stop beating and drop the key: any item still held is free for the sweeper at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # it has stopped; a cancellation of ours still raises
        try:
            await self._redis.delete(heartbeat_key(self._settings, self._worker_id))
        except Exception:  # the key expires by itself
            log.warning("could not drop the heartbeat key", exc_info=True)
        finally:
            await self._redis.aclose()


async def job_ended(redis: Redis, settings: Settings, job_id: str) -> None:
    """The arq job the worker took ended without running (arq's finish_failed_job): its record goes."""
    try:
        await redis.hdel(taken_key(settings), job_id)  # type: ignore[misc]  # redis-py types hash commands as sync or async
    except Exception:  # the sweeper drops a record whose job is no longer in progress
        log.warning("could not drop the record of a taken job", exc_info=True)


async def taken_jobs(redis: Redis, settings: Settings) -> dict[str, UUID]:
    """The arq jobs taken and not ended, with the workers that took them."""
    taken = await redis.hgetall(taken_key(settings))  # type: ignore[misc]  # redis-py types hash commands as sync or async
    return {job_id.decode(): UUID(worker_id.decode()) for job_id, worker_id in taken.items()}


async def forget_taken(redis: Redis, settings: Settings, job_ids: Sequence[str]) -> None:
    if job_ids:
        await redis.hdel(taken_key(settings), *job_ids)  # type: ignore[misc]  # redis-py types hash commands as sync or async


# KEYS: the Redis server's run id as last seen, the settling marker, then the heartbeats.
# ARGV: the server's run id now, the TTL in ms. 'new' when the run id changed (settling
# starts), nil while settling, else 0/1 per heartbeat.
_ALIVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  return 'new'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return false
end
local alive = {}
for i = 3, #KEYS do
  alive[i - 2] = redis.call('EXISTS', KEYS[i])
end
return alive
"""


async def dead_holders(redis: Redis, settings: Settings, holders: Sequence[UUID]) -> list[UUID]:
    """The workers among `holders` whose heartbeat is gone; none while Redis's keys settle."""
    if not holders:
        return []
    try:
        run_id = (await redis.info("server"))["run_id"]
    except (ResponseError, KeyError) as error:
        # INFO denied (an ACL, a managed Redis) or without a run id: a restart cannot be told
        # from dead workers, so none is trusted; their leases still free their items.
        log.warning("no Redis run id (%r): dead workers are found by their leases only", error)
        return []
    keys = [_sweeper_key(settings, "redis-run-id"), _sweeper_key(settings, "settling")]
    keys += [heartbeat_key(settings, holder) for holder in holders]
    ttl_ms = int(settings.heartbeat_ttl_s * 1000)
    alive = await redis.register_script(_ALIVE)(keys=keys, args=[run_id, ttl_ms])
    if alive == b"new":  # once per Redis server, not at every sweep while its keys settle
        log.info("Redis is new to the sweeper: missing heartbeats count after %s s", settings.heartbeat_ttl_s)
    if not isinstance(alive, list):
        return []
    return [holder for holder, is_alive in zip(holders, alive, strict=True) if not is_alive]
