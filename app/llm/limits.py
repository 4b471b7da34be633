"""A cap on simultaneous requests per endpoint, shared by every worker through Redis,
that backs off when the endpoint answers 429 and recovers as requests succeed (AIMD).

Each endpoint's holders live in one sorted set: member = a random token, score = the
moment (Redis server clock, ms) its lease runs out. Acquiring drops expired holders and
adds ours only while fewer than `limit` remain, all in one Lua script so the check and
the add cannot interleave. A worker killed mid-request never releases; its slot frees
itself when the lease runs out, so the lease must outlast the longest legitimate hold.

The adaptive cap lives beside it in "<key>:cap": a 429 halves it (at most once per
cooldown, so one burst of 429s is one cut), each success adds 1/cap (about +1 per cap
successes), never above the configured limit nor below 1.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.metrics import LIMIT_WAIT_SECONDS

logger = logging.getLogger(__name__)

# Redis's own clock, so machines with skewed clocks still agree on who has expired.
_ACQUIRE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lease_ms = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local limit = tonumber(ARGV[2])
local adapted = tonumber(redis.call('GET', KEYS[2]) or limit)
if redis.call('ZCARD', KEYS[1]) >= math.max(1, math.min(limit, math.floor(adapted))) then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[1])
-- The key outlives its longest lease, then vanishes once the endpoint goes idle.
if redis.call('PTTL', KEYS[1]) < lease_ms then
  redis.call('PEXPIRE', KEYS[1], lease_ms)
end
return 1
"""

_CUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or 0) > now - cooldown then
  return tostring(redis.call('GET', KEYS[1]) or limit)
end
local cap = math.max(1, math.min(limit, tonumber(redis.call('GET', KEYS[1]) or limit)) / 2)
redis.call('SET', KEYS[1], tostring(cap), 'EX', 3600)
redis.call('SET', KEYS[2], now, 'EX', 3600)
return tostring(cap)
"""

_GROW = """
local cap = tonumber(redis.call('GET', KEYS[1]) or 0)
if cap == 0 then
  return 0
end
cap = cap + 1 / cap
if cap >= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], tostring(cap), 'EX', 3600)
end
return 0
"""
_CUT_COOLDOWN_MS = 2000

# Short jittered polls: waiters on many machines do not wake in lockstep.
_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.05


class EndpointLimiter:
    """Distributed, lease-based semaphore: at most `limit` holders per endpoint name."""

    def __init__(self, redis: Redis, key_prefix: str = "aidsafe:limits") -> None:
        self._redis = redis
        self._key_prefix = key_prefix
        self._acquire = redis.register_script(_ACQUIRE)
        self._cut = redis.register_script(_CUT)
        self._grow = redis.register_script(_GROW)
        # Seconds spent waiting for slots, summed over every slot() of this limiter.
        self.waited_s = 0.0

    def key(self, endpoint: str) -> str:
        """The Redis key holding the endpoint's current holders."""
        return f"{self._key_prefix}:{endpoint}"

    @asynccontextmanager
    async def slot(self, endpoint: str, limit: int, lease_s: float) -> AsyncIterator[None]:
        """Hold one of `limit` slots of `endpoint` for the body of the `async with`.

        Waits (polling) until a slot is free. The slot is released on exit, on error and
        on cancellation; if the holder dies instead, it frees itself after `lease_s`.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        key = self.key(endpoint)
        token = uuid.uuid4().hex
        try:
            # Inside the try: a cancel that lands after Redis added us must still release.
            await self._wait_for_slot(key, token, limit, lease_s)
            yield
        finally:
            await asyncio.shield(self._release(key, token))

    async def _wait_for_slot(self, key: str, token: str, limit: int, lease_s: float) -> None:
        lease_ms = max(1, round(lease_s * 1000))
        started = time.monotonic()
        try:
            # Polling, not an asyncio.Event: the slot is freed by other processes.
            keys = [key, f"{key}:cap"]
            while not await self._acquire(keys=keys, args=[token, limit, lease_ms]):  # noqa: ASYNC110
                await asyncio.sleep(random.uniform(_POLL_MIN_S, _POLL_MAX_S))
        finally:
            waited = time.monotonic() - started
            self.waited_s += waited
            LIMIT_WAIT_SECONDS.labels(key.removeprefix(f"{self._key_prefix}:")).inc(waited)

    async def rate_limited(self, endpoint: str, limit: int) -> float:
        """The endpoint said 429: halve its adaptive cap (once per cooldown); the new cap."""
        key = self.key(endpoint)
        return float(await self._cut(keys=[f"{key}:cap", f"{key}:cut_at"], args=[limit, _CUT_COOLDOWN_MS]))

    async def succeeded(self, endpoint: str, limit: int) -> None:
        """A request went through: let the adaptive cap grow back towards `limit`."""
        await self._grow(keys=[f"{self.key(endpoint)}:cap"], args=[limit])

    async def adapted_cap(self, endpoint: str, limit: int) -> float:
        value = await self._redis.get(f"{self.key(endpoint)}:cap")
        return min(float(limit), float(value)) if value is not None else float(limit)

    async def _release(self, key: str, token: str) -> None:
        try:
            await self._redis.zrem(key, token)
        except RedisError:
            # Not fatal: the lease frees the slot anyway, only later.
            logger.warning("could not release limiter slot %s on %s", token, key, exc_info=True)
