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
from redis.exceptions import ConnectionError, TimeoutError

RUN_ITEM = "run_item"
_BATCH = 1000  # jobs per pipeline: a bounded request and reply per round trip


def redis_settings(redis_url: str) -> RedisSettings:
    """arq's connection, retrying each command through a Redis restart (about a minute)
    instead of letting the first ConnectionError end the worker's poll loop."""
    settings = RedisSettings.from_dsn(redis_url)
    settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=40)
    settings.retry_on_error = [ConnectionError, TimeoutError]
    settings.conn_retries = 30
    return settings


def arq_job_id(item_id: UUID, enqueues: int) -> str:
    # arq refuses a job id it still holds a result or in-progress key for; the enqueue
    # counter makes every re-enqueue of an item a new id.
    return f"item:{item_id}:{enqueues}"


async def enqueue_items(redis: ArqRedis, queue_name: str, items: Iterable[tuple[UUID, int]]) -> None:
    """Enqueue (item id, enqueue counter) pairs as arq jobs of RUN_ITEM, in a few pipelined
    round trips rather than arq's four per job. Duplicates are harmless: a worker claims
    an item in Postgres before running it, and a second arq job finds nothing to claim."""
    pending = list(items)
    for start in range(0, len(pending), _BATCH):
        enqueued_ms = timestamp_ms()
        async with redis.pipeline(transaction=False) as pipe:
            for item_id, enqueues in pending[start : start + _BATCH]:
                job_id = arq_job_id(item_id, enqueues)
                job = serialize_job(
                    RUN_ITEM, (str(item_id),), {}, None, enqueued_ms, serializer=redis.job_serializer
                )
                # What ArqRedis.enqueue_job writes, without its WATCH/EXISTS round trips:
                # NX keeps a job that is already there as it is.
                pipe.set(job_key_prefix + job_id, job, px=redis.expires_extra_ms, nx=True)
                pipe.zadd(queue_name, {job_id: enqueued_ms}, nx=True)
            await pipe.execute()
