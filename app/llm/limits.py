"""A cap on simultaneous requests per endpoint, shared by every worker through Redis,
that adapts to the endpoint's 429s (AIMD) and pauses when the endpoint asks for a pause.

Each endpoint's holders live in one sorted set: member = "<owner>/<random token>", score
= the moment (Redis server clock, ms) its lease runs out. Acquiring drops expired holders
and adds ours only while fewer than the cap remain, all in one Lua script so the check and
the add cannot interleave. A worker killed mid-request never releases; its slot frees
itself when the lease runs out, so the lease must outlast the longest legitimate hold. That
is long (the LLM timeout and a margin): whoever learns that an owner is dead (the sweeper,
from its heartbeat) frees its slots at once with `release_owners`, or a few kills in a row
would fill the cap with dead holders and stall every live worker until their leases end.

Waiters block (BLPOP) on "<key>:freed", a list that gets one entry per release, until a
release or the first lease's end, whichever comes first; waiting costs no polling. An
entry nobody was waiting for only makes a later waiter try once more; at most `limit` are
kept. In each process one waiter per endpoint talks to Redis at a time (blocked in BLPOP
on a connection of its own); the others queue behind it locally, in arrival order.

The adaptive cap ("<key>:aimd", a hash). Halving on every 429 (as TCP halves on every
loss) collapses on noise: with 2 % of answers 429 and 64 in flight at 200 ms there are
several 429s a second, more cuts than +1 per round trip can repair, and no more than 40 of
64 were ever in flight. So, as Google's client-side throttling does, the cut follows the
*share* of 429s rather than the event: the outcomes of requests (successes and 429s, and
503s that say when to come back; other faults say nothing about rate) are counted in
windows of WINDOW, shared by every worker. A window with more than CUT_SHARE 429s halves
the cap, as soon as its 429s pass that share of WINDOW (its verdict is certain then); a
window without adds 1 (about one round trip's worth at a cap of 40). 2 % noise then
essentially never cuts (more than 8 of 40 at p = 0.02: one window in 10^7), even the 8 % of
a harsh day rarely does (one window in 270), while a real limit that the cap overshoots
answers a large share of 429s and is cut within a window (at 30 %, nine windows in ten).
Settled on a real limit, the cap saw-tooths just under it: +1 a window until the 429s pass
20 %, then half. As TCP cuts at most once per round trip, outcomes of requests sent before
the last cut are not counted (the cap's generation is taken at acquire): they were sent at
the old cap and would cut it again for the same overload.

Pauses ("<key>:paused", a key with a PX expiry, only ever lengthened; the acquire script
answers every acquirer in every process with the time left). When the endpoint reports a
budget spent (`x-ratelimit-remaining-*` of 0), the whole endpoint waits for its
`x-ratelimit-reset-*`, at once: that is a statement about every request. A Retry-After on a
429 is the same statement only when 429s are not noise: the cut that a window's 429s
trigger also pauses every worker for that Retry-After (as Curator pauses all its requests
after a rate-limit error, and LiteLLM cools a deployment down); a sporadic 429 makes only
its own request wait (the client's retry honours it), for pausing everyone for each of 2 %
of answers with `Retry-After: 1` would stop the endpoint most of the time. Both are bounded
by the endpoint's `retry_after_max_s` against bogus values.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.metrics import LIMIT_CAP, LIMIT_PAUSE_SECONDS, LIMIT_PAUSED_UNTIL, LIMIT_WAIT_SECONDS

logger = logging.getLogger(__name__)

# Outcomes per decision, and the share of 429s in one that cuts the cap.
WINDOW = 40
CUT_SHARE = 0.2

# KEYS: holders, aimd, paused. Returns {wait ms, paused (0/1), the cap's generation}.
# Redis's own clock, so machines with skewed clocks still agree on who has expired.
_ACQUIRE = """
local pause = redis.call('PTTL', KEYS[3])
if pause > 0 then
  return {pause, 1, 0}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lease_ms = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local limit = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[2], 'cap', 'gen')
local cap = math.max(1, math.min(limit, tonumber(state[1] or limit)))
local gen = tonumber(state[2] or 0)
if redis.call('ZCARD', KEYS[1]) >= cap then
  -- Full: the ms until the first lease runs out (a dead holder's slot frees itself then).
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {math.max(1, tonumber(first[2]) - now_ms), 0, gen}
end
redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[1])
-- The key outlives its longest lease, then vanishes once the endpoint goes idle.
if redis.call('PTTL', KEYS[1]) < lease_ms then
  redis.call('PEXPIRE', KEYS[1], lease_ms)
end
return {0, 0, gen}
"""

# KEYS: holders, aimd, freed, paused. ARGV: token, outcome (ok, limited or none), limit,
# the generation taken at acquire, pause ms (0: none), the Retry-After ms that pauses if
# this outcome cuts the cap, WINDOW, CUT_SHARE.
# Release, wake one waiter, count the outcome, pause: one round trip.
# Returns {the cap, ms this release added to the pause, the pause's ms left}.
_RELEASE = """
local token, outcome, limit, gen = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local pause_ms, retry_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local window, cut_share = tonumber(ARGV[7]), tonumber(ARGV[8])
redis.call('ZREM', KEYS[1], token)
redis.call('RPUSH', KEYS[3], 1)
redis.call('LTRIM', KEYS[3], -limit, -1)
redis.call('PEXPIRE', KEYS[3], 60000)
local state = redis.call('HMGET', KEYS[2], 'cap', 'gen', 'ok', 'limited')
local cap = math.max(1, math.min(limit, tonumber(state[1] or limit)))
if outcome ~= 'none' and gen == tonumber(state[2] or 0) then
  local ok, limited = tonumber(state[3] or 0), tonumber(state[4] or 0)
  if outcome == 'ok' then ok = ok + 1 else limited = limited + 1 end
  if limited > cut_share * window then
    cap = math.max(1, math.floor(cap / 2))
    gen = gen + 1
    ok, limited = 0, 0
    pause_ms = math.max(pause_ms, retry_ms)
  elseif ok + limited >= window then
    cap = math.min(limit, cap + 1)
    ok, limited = 0, 0
  end
  redis.call('HSET', KEYS[2], 'cap', cap, 'gen', gen, 'ok', ok, 'limited', limited)
  redis.call('EXPIRE', KEYS[2], 3600)
end
local left = math.max(0, redis.call('PTTL', KEYS[4]))
local added = 0
if pause_ms > left then
  redis.call('SET', KEYS[4], 1, 'PX', pause_ms)
  added, left = pause_ms - left, pause_ms
end
return {cap, added, left}
"""

# KEYS: holders, freed. ARGV: the dead owners. Drops their slots; wakes as many waiters.
_RELEASE_OWNERS = """
local dead = {}
for i = 1, #ARGV do
  dead[ARGV[i]] = true
end
local freed = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local owner = string.match(member, '^(.*)/')
  if owner and dead[owner] then
    redis.call('ZREM', KEYS[1], member)
    redis.call('RPUSH', KEYS[2], 1)
    freed = freed + 1
  end
end
if freed > 0 then
  redis.call('PEXPIRE', KEYS[2], 60000)
end
return freed
"""

# A waiter also looks again after this long without a wake-up: the adaptive cap may have
# grown, or a waiter that took a wake-up was cancelled before it could use it.
_MAX_BLOCK_S = 1.0


@dataclass
class Slot:
    """A held slot. The holder notes what the endpoint answered; the release then counts
    it for the adaptive cap and sets the pause, in the same round trip."""

    succeeded: bool = False
    rate_limited: bool = False  # told to slow down: a 429, or a 503 with Retry-After
    retry_after_s: float = 0.0  # for how long, if it said: pauses everyone if 429s are not noise
    pause_s: float = 0.0  # the endpoint's budget is spent for this long: pauses everyone
    generation: int = 0  # the adaptive cap's, when this slot was taken

    @property
    def outcome(self) -> str:
        return "limited" if self.rate_limited else "ok" if self.succeeded else "none"


class EndpointLimiter:
    """Distributed, lease-based semaphore: at most `limit` holders per endpoint name."""

    def __init__(self, redis: Redis, key_prefix: str = "aidsafe:limits", owner: str = "") -> None:
        """`owner`: who holds the slots taken here (a worker's id), for `release_owners`."""
        self._redis = redis
        self._key_prefix = key_prefix
        self._owner = owner
        self._acquire = redis.register_script(_ACQUIRE)
        self._release_script = redis.register_script(_RELEASE)
        self._release_owners = redis.register_script(_RELEASE_OWNERS)
        self._turns: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # FIFO
        # Seconds spent waiting for slots, summed over every slot() of this limiter.
        self.waited_s = 0.0

    def key(self, endpoint: str) -> str:
        """The Redis key holding the endpoint's current holders."""
        return f"{self._key_prefix}:{endpoint}"

    @asynccontextmanager
    async def slot(self, endpoint: str, limit: int, lease_s: float) -> AsyncIterator[Slot]:
        """Hold one of `limit` slots of `endpoint` for the body of the `async with`.

        Waits until a slot is free and the endpoint is not paused (this process's waiters
        in arrival order). The slot is released on exit, on error and on cancellation; if
        the holder dies instead, it frees itself after `lease_s`.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        token = f"{self._owner}/{uuid.uuid4().hex}"
        held = Slot()
        try:
            # Inside the try: a cancel that lands after Redis added us must still release.
            held.generation = await self._wait_for_slot(endpoint, token, limit, lease_s)
            yield held
        finally:
            await asyncio.shield(self._release(endpoint, token, limit, held))

    async def release_owners(self, endpoints: Iterable[str], owners: Sequence[str]) -> int:
        """Free every slot these (dead) owners hold on these endpoints; how many were held."""
        if not owners:
            return 0
        freed = 0
        for endpoint in endpoints:
            key = self.key(endpoint)
            freed += int(await self._release_owners(keys=[key, f"{key}:freed"], args=list(owners)))
        return freed

    async def _wait_for_slot(self, endpoint: str, token: str, limit: int, lease_s: float) -> int:
        """Take a slot; the adaptive cap's generation it was taken in."""
        key = self.key(endpoint)
        lease_ms = max(1, round(lease_s * 1000))
        started = time.monotonic()
        try:
            async with self._turns[key]:
                keys = [key, f"{key}:aimd", f"{key}:paused"]
                while True:
                    wait_ms, paused, generation = await self._acquire(
                        keys=keys, args=[token, limit, lease_ms]
                    )
                    if not wait_ms:
                        return int(generation)
                    wait_s = int(wait_ms) / 1000
                    if paused:  # a release does not end a pause: no use listening for one
                        await asyncio.sleep(wait_s)
                    else:
                        # Redis 6+ takes fractional seconds; redis-py's annotation says int.
                        timeout = min(wait_s, _MAX_BLOCK_S)
                        await self._redis.blpop([f"{key}:freed"], timeout=timeout)  # type: ignore[arg-type,misc]
        finally:
            waited = time.monotonic() - started
            self.waited_s += waited
            LIMIT_WAIT_SECONDS.labels(endpoint).inc(waited)

    async def _release(self, endpoint: str, token: str, limit: int, held: Slot) -> None:
        key = self.key(endpoint)
        pause_ms, retry_ms = round(held.pause_s * 1000), round(held.retry_after_s * 1000)
        try:
            cap, added_ms, left_ms = await self._release_script(
                keys=[key, f"{key}:aimd", f"{key}:freed", f"{key}:paused"],
                args=[token, held.outcome, limit, held.generation, pause_ms, retry_ms, WINDOW, CUT_SHARE],
            )
        except RedisError:
            # Not fatal: the lease frees the slot anyway, only later.
            logger.warning("could not release limiter slot %s on %s", token, key, exc_info=True)
            return
        LIMIT_CAP.labels(endpoint).set(int(cap))
        if added_ms:
            LIMIT_PAUSE_SECONDS.labels(endpoint).inc(int(added_ms) / 1000)
            LIMIT_PAUSED_UNTIL.labels(endpoint).set(time.time() + int(left_ms) / 1000)
