"""Requests-per-minute and tokens-per-minute budgets per endpoint, shared through Redis.

Two sliding windows per endpoint, each a sorted set scored by the Redis server clock (ms):
one member per request, and one per request's tokens ("<id>:<tokens>"). A request reserves
its estimated tokens (prompt estimate + max_tokens) before it is sent and settles them to
the real usage when the answer comes, so TPM is enforced before the fact and corrected
after it. Checking and reserving happen in one Lua script.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

from app.metrics import LIMIT_WAIT_SECONDS

_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, rpm, tpm = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, window = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local function wait_for(key)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  return wait_for(KEYS[1])
end
if tpm > 0 then
  local used = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    used = used + tonumber(string.match(member, ':(%d+)$'))
  end
  -- used > 0: a request bigger than the whole budget still goes, alone
  if used > 0 and used + tokens > tpm then
    return wait_for(KEYS[2])
  end
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('ZADD', KEYS[2], now, id .. ':' .. tokens)
redis.call('PEXPIRE', KEYS[1], window + 1000)
redis.call('PEXPIRE', KEYS[2], window + 1000)
return 0
"""

_SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1] .. ':' .. ARGV[2])
if score then
  redis.call('ZREM', KEYS[1], ARGV[1] .. ':' .. ARGV[2])
  redis.call('ZADD', KEYS[1], score, ARGV[1] .. ':' .. ARGV[3])
end
return 0
"""


@dataclass(frozen=True)
class Reservation:
    endpoint: str
    id: str
    tokens: int


class EndpointRates:
    """Sliding-window RPM/TPM budgets; `window_s` is 60 in production, shorter in tests."""

    def __init__(self, redis: Redis, key_prefix: str = "aidsafe:rates", window_s: float = 60.0) -> None:
        self._key_prefix = key_prefix
        self._window_ms = round(window_s * 1000)
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)

    def _keys(self, endpoint: str) -> list[str]:
        return [f"{self._key_prefix}:{endpoint}:requests", f"{self._key_prefix}:{endpoint}:tokens"]

    async def reserve(self, endpoint: str, rpm: int | None, tpm: int | None, tokens: int) -> Reservation:
        """Wait until one more request of about `tokens` tokens fits both budgets; count it."""
        reservation = Reservation(endpoint, uuid.uuid4().hex, max(0, tokens))
        started = time.monotonic()
        try:
            while True:
                wait_ms = await self._reserve(
                    keys=self._keys(endpoint),
                    args=[reservation.id, rpm or 0, tpm or 0, reservation.tokens, self._window_ms],
                )
                if not wait_ms:
                    return reservation
                # Jitter, so waiters on many machines do not all retry at the same instant.
                await asyncio.sleep(int(wait_ms) / 1000 * random.uniform(1.0, 1.2))
        finally:
            LIMIT_WAIT_SECONDS.labels(endpoint).inc(time.monotonic() - started)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Replace the estimate with the tokens the request really used."""
        await self._settle(
            keys=self._keys(reservation.endpoint)[1:],
            args=[reservation.id, reservation.tokens, actual_tokens],
        )
