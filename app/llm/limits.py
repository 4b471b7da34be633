"""A cap on simultaneous requests per endpoint, shared by every worker through Redis,
that backs off when the endpoint answers 429 and recovers as requests succeed (AIMD).

Each endpoint's holders live in one sorted set: member = a random token, score = the
moment (Redis server clock, ms) its lease runs out. Acquiring drops expired holders and
adds ours only while fewer than `limit` remain, all in one Lua script so the check and
the add cannot interleave. A worker killed mid-request never releases; its slot frees
itself when the lease runs out, so the lease must outlast the longest legitimate hold.

Waiters block (BLPOP) on "<key>:freed", a list that gets one entry per release, until a
release or the first lease's end, whichever comes first; waiting costs no polling. An
entry nobody was waiting for only makes a later waiter try once more; at most `limit` are
kept. In each process one waiter per endpoint talks to Redis at a time (blocked in BLPOP
on a connection of its own); the others queue behind it locally, in arrival order.

The adaptive cap lives beside it in "<key>:cap": a 429 halves it (at most once per
cooldown, so one burst of 429s is one cut), each success adds 1/cap (about +1 per cap
successes), never above the configured limit nor below 1.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

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
  -- Full: the ms until the first lease runs out (a dead holder's slot frees itself then).
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(first[2]) - now_ms)
end
redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[1])
-- The key outlives its longest lease, then vanishes once the endpoint goes idle.
if redis.call('PTTL', KEYS[1]) < lease_ms then
  redis.call('PEXPIRE', KEYS[1], lease_ms)
end
return 0
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

_GROW_FUNCTION = """
local function grow(cap_key, limit)
  local cap = tonumber(redis.call('GET', cap_key) or 0)
  if cap == 0 then
    return
  end
  cap = cap + 1 / cap
  if cap >= limit then
    redis.call('DEL', cap_key)
  else
    redis.call('SET', cap_key, tostring(cap), 'EX', 3600)
  end
end
"""

# Release, wake one waiter, and (after a success) grow the cap: one round trip.
_RELEASE = (
    _GROW_FUNCTION
    + """
local limit = tonumber(ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[3], 1)
redis.call('LTRIM', KEYS[3], -limit, -1)
redis.call('PEXPIRE', KEYS[3], 60000)
if ARGV[2] == '1' then
  grow(KEYS[2], limit)
end
return 0
"""
)
_CUT_COOLDOWN_MS = 2000

# A waiter also looks again after this long without a wake-up: the adaptive cap may have
# grown, or a waiter that took a wake-up was cancelled before it could use it.
_MAX_BLOCK_S = 1.0


@dataclass
class Slot:
    """A held slot. Set `succeeded` when the request went through: the release then grows
    the adaptive cap back in the same round trip."""

    succeeded: bool = False


class EndpointLimiter:
    """Distributed, lease-based semaphore: at most `limit` holders per endpoint name."""

    def __init__(self, redis: Redis, key_prefix: str = "aidsafe:limits") -> None:
        self._redis = redis
        self._key_prefix = key_prefix
        self._acquire = redis.register_script(_ACQUIRE)
        self._cut = redis.register_script(_CUT)
        self._release_script = redis.register_script(_RELEASE)
        self._turns: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # FIFO
        # Seconds spent waiting for slots, summed over every slot() of this limiter.
        self.waited_s = 0.0

    def key(self, endpoint: str) -> str:
        """The Redis key holding the endpoint's current holders."""
        return f"{self._key_prefix}:{endpoint}"

    @asynccontextmanager
    async def slot(self, endpoint: str, limit: int, lease_s: float) -> AsyncIterator[Slot]:
        """Hold one of `limit` slots of `endpoint` for the body of the `async with`.

        Waits until a slot is free (this process's waiters in arrival order). The slot is
        released on exit, on error and on cancellation; if the holder dies instead, it
        frees itself after `lease_s`.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        key = self.key(endpoint)
        token = uuid.uuid4().hex
        held = Slot()
        try:
            # Inside the try: a cancel that lands after Redis added us must still release.
            await self._wait_for_slot(key, token, limit, lease_s)
            yield held
        finally:
            await asyncio.shield(self._release(key, token, limit, held.succeeded))

    async def _wait_for_slot(self, key: str, token: str, limit: int, lease_s: float) -> None:
        lease_ms = max(1, round(lease_s * 1000))
        started = time.monotonic()
        try:
            async with self._turns[key]:
                keys = [key, f"{key}:cap"]
                while wait_ms := await self._acquire(keys=keys, args=[token, limit, lease_ms]):
                    await self._redis.blpop([f"{key}:freed"], timeout=min(int(wait_ms) / 1000, _MAX_BLOCK_S))
        finally:
            waited = time.monotonic() - started
            self.waited_s += waited
            LIMIT_WAIT_SECONDS.labels(key.removeprefix(f"{self._key_prefix}:")).inc(waited)

    async def rate_limited(self, endpoint: str, limit: int) -> float:
        """The endpoint said 429: halve its adaptive cap (once per cooldown); the new cap."""
        key = self.key(endpoint)
        return float(await self._cut(keys=[f"{key}:cap", f"{key}:cut_at"], args=[limit, _CUT_COOLDOWN_MS]))

    async def _release(self, key: str, token: str, limit: int, succeeded: bool) -> None:
        try:
            await self._release_script(
                keys=[key, f"{key}:cap", f"{key}:freed"], args=[token, int(succeeded), limit]
            )
        except RedisError:
            # Not fatal: the lease frees the slot anyway, only later.
            logger.warning("could not release limiter slot %s on %s", token, key, exc_info=True)
