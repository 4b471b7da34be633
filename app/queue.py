"""The arq queue as the API and the sweeper use it: one arq job per item."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, ReadOnlyError, TimeoutError

RUN_ITEM = "run_item"
_BATCH = 1000  # jobs per Redis call: bounded requests, and Redis is not blocked for long


# A worker's commands are tried again through a Redis restart (about a minute) instead of
# letting the first ConnectionError end its poll loop. An API request's are tried again once,
# on a new connection: a Redis that is away or hung costs the client seconds (a 503), not a
# minute per command.
WORKER_RETRIES = 40
REQUEST_RETRIES = 1


def redis_settings(redis_url: str, retries: int) -> RedisSettings:
    """arq's connection, each command tried again up to `retries` times, on a new connection,
    after a connection error, (once `bound_calls` set one) a timeout, or a READONLY: a
    failover can leave a connection on the old primary, now a replica, for good."""
    settings = RedisSettings.from_dsn(redis_url)
    settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=retries)
    settings.retry_on_error = [ConnectionError, TimeoutError, ReadOnlyError]
    settings.conn_retries = 30
    return settings


async def bound_calls(pool: ArqRedis, timeout_s: float) -> None:
    """Give arq's pool the read timeout its settings lack: a call that hears nothing for
    `timeout_s` raises TimeoutError, which `redis_settings`' retry answers by sending it again
    on a new connection. What is sent again must be harmless to repeat, as it already must be
    for a connection that broke."""
    connections = pool.connection_pool
    connections.connection_kwargs["socket_timeout"] = timeout_s
    # A connection keeps the options it was made with, reconnecting too: close those made
    # before (arq's ping and server info at start-up) and forget them, so none is used again.
    await connections.disconnect()
    connections.reset()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated


def arq_job_id(item_id: UUID, enqueues: int) -> str:
    # arq refuses a job id it still holds a result or in-progress key for; the enqueue
    # counter makes every re-enqueue of an item a new id.
    return f"item:{item_id}:{enqueues}"


def item_of_job(job_id: str) -> tuple[UUID, int]:
    """The (item id, enqueue counter) an arq_job_id was made of."""
    _, item_id, enqueues = job_id.split(":")
    return UUID(item_id), int(enqueues)


# What ArqRedis.enqueue_job writes for each job (the pickled job under arq:job:<id> with
# arq's expiry, and the id in the queue's sorted set), for many jobs in one call, with NX
# in place of its WATCH/EXISTS check: a job that is already there stays as it is. ARGV[4]
# "ahead": the jobs go before every job now in the queue.
_ENQUEUE = """
local job_key_prefix, expiry_ms, score = ARGV[1], ARGV[2], tonumber(ARGV[3])
if ARGV[4] == '1' then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if head[2] then score = math.min(score, tonumber(head[2]) - 1) end
end
for i = 5, #ARGV, 2 do
  redis.call('SET', job_key_prefix .. ARGV[i], ARGV[i + 1], 'PX', expiry_ms, 'NX')
  -- scores rise with the item's place (all in the past): workers take prompts in order
  redis.call('ZADD', KEYS[1], 'NX', tonumber(score) - (#ARGV - i) / 2, ARGV[i])
end
return 0
"""


async def enqueue_items(
    redis: ArqRedis, queue_name: str, items: Iterable[tuple[UUID, int]], *, ahead: bool = False
) -> None:
    """Enqueue (item id, enqueue counter) pairs as arq jobs of RUN_ITEM: one Redis call
    per 1,000 rather than arq's four round trips per job. Duplicates are harmless: a worker
    claims an item in Postgres before running it, and a second arq job finds nothing.
    `ahead`: before the jobs already waiting (items taken back from a dead worker resume
    first, not behind the backlog)."""
    enqueue = redis.register_script(_ENQUEUE)
    pending = list(items)
    for start in range(0, len(pending), _BATCH):
        enqueued_ms = timestamp_ms()
        args: list[str | bytes | int] = [job_key_prefix, redis.expires_extra_ms, enqueued_ms, int(ahead)]
        for item_id, enqueues in pending[start : start + _BATCH]:
            job = serialize_job(
                RUN_ITEM, (str(item_id),), {}, None, enqueued_ms, serializer=redis.job_serializer
            )
            args += [arq_job_id(item_id, enqueues), job]
        await enqueue(keys=[queue_name], args=args)
