"""What a worker's LLM calls wait on, shared through Redis with the other workers: the
Redis client they use, and the LLM cap (app/llm/limits.py) under this deployment's keys."""

from __future__ import annotations

from uuid import UUID

from redis.asyncio import Redis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from app.config import Settings
from app.llm.limits import EndpointLimiter


def llm_redis(settings: Settings) -> Redis:
    """The Redis client of what each LLM call waits on (the limiter, rate budgets, and the
    spending of jobs with a budget): a pool of its own, with a socket timeout (arq's has
    none), so that a Redis that stops answering (hung, not restarted) fails an item's LLM
    call with a RedisError, which the client retries as a transient fault (the spending read
    before the call: the item waits as in an outage, `budgets.Meter`), instead of holding it
    forever. A connection error (a pooled connection that a restarted Redis dropped) or a
    READONLY (one a failover left on the old primary, now a replica) is tried again once, at
    once, on a new connection; a timeout is not: the client backs off."""
    client: Redis = Redis.from_url(  # redis-py leaves from_url's return unannotated
        settings.redis_url,
        socket_timeout=settings.llm_redis_timeout_s,
        socket_connect_timeout=settings.llm_redis_timeout_s,
        retry=RedisRetry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError, ReadOnlyError],
    )
    return client


def llm_limiter(
    redis: Redis, settings: Settings, owner: UUID | None = None, keep_s: float = 0.0
) -> EndpointLimiter:
    """The shared LLM cap; its slots taken by `owner` (a worker) carry its id."""
    return EndpointLimiter(
        redis, key_prefix=f"{settings.redis_key_prefix}:limits", owner=str(owner or ""), keep_s=keep_s
    )
