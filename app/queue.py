"""The arq queue as the API and the sweeper use it: one arq job per item."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from uuid import UUID

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

RUN_ITEM = "run_item"
_BATCH = 500  # enqueue concurrently, but not 10,000 coroutines at once


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
    """Enqueue (item id, enqueue counter) pairs. Duplicates are harmless: a worker claims
    an item in Postgres before running it, and a second arq job finds nothing to claim."""
    pending = list(items)
    for start in range(0, len(pending), _BATCH):
        await asyncio.gather(
            *(
                redis.enqueue_job(
                    RUN_ITEM, str(item_id), _job_id=arq_job_id(item_id, n), _queue_name=queue_name
                )
                for item_id, n in pending[start : start + _BATCH]
            )
        )
