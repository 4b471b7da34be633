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
kept. In each process one task per endpoint talks to Redis for all its waiters, taking as
many slots in one round trip as wait and are free (blocked in BLPOP on a connection of its
own while none is); the waiters get them in arrival order.

Kept slots (keep_s > 0, as the workers run it). Two scripts per request cost a worker about
a tenth of its CPU at a cap of 256, so a process hands a slot it released to its own next
request, waiting or still to come: a success changes nothing anyone else must learn at once.
A kept slot still counts against the cap in Redis (the cap holds whoever uses it), goes back,
with the others kept as long, in one round trip once unused for keep_s, and carries requests
only within REUSE_S of Redis giving it (its lease there is that much longer, so it always
covers a new request's). A 429 or a pause always goes to Redis at once. Successes counted
here go with the process's next script; a cut or pause learnt from any answer stops the
reuse of older slots, so another process learns of a cut at its own next script (at a high
cap, a small fraction of REUSE_S later). The costs: a slot unused by one process may wait up
to twice keep_s before another gets it, and a killed worker's slots free themselves REUSE_S
later (the sweeper frees them well before).

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
Larger windows cut a harsh day less but a real limit later, and its overshoot is slight:
at 60 and 80 answers the rate-limit benchmark drew 4.8-5.5 % and 5.9 % of 429s, against
3.8-4.4 % at 40 (bench/RESULTS.md, "Issue 12 target 1: hedged requests").
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
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.metrics import LIMIT_CAP, LIMIT_PAUSE_SECONDS, LIMIT_PAUSED_UNTIL, LIMIT_WAIT_SECONDS

logger = logging.getLogger(__name__)

# Outcomes per decision, and the share of 429s in one that cuts the cap.
WINDOW = 40
CUT_SHARE = 0.2

# Counts outcomes for the adaptive cap: ok_n successes and limited_n 429s of requests sent at
# the cap's generation `gen` (outcomes of an older one are not counted). Several successes
# arrive at once from a process that kept its slots (below): each full window of them adds 1.
# Returns the cap, its generation now, and whether these outcomes cut it.
_COUNT = """
local function count(aimd, limit, gen, ok_n, limited_n, window, cut_share)
  local state = redis.call('HMGET', aimd, 'cap', 'gen', 'ok', 'limited')
  local cap = math.max(1, math.min(limit, tonumber(state[1] or limit)))
  local now_gen = tonumber(state[2] or 0)
  if ok_n + limited_n == 0 or gen ~= now_gen then
    return cap, now_gen, false
  end
  local ok, limited = tonumber(state[3] or 0) + ok_n, tonumber(state[4] or 0) + limited_n
  local cut = limited > cut_share * window
  if cut then
    cap = math.max(1, math.floor(cap / 2))
    now_gen = now_gen + 1
    ok, limited = 0, 0
  elseif ok + limited >= window then
    cap = math.min(limit, cap + math.floor((ok + limited) / window))
    ok, limited = (ok + limited) % window, 0
  end
  redis.call('HSET', aimd, 'cap', cap, 'gen', now_gen, 'ok', ok, 'limited', limited)
  redis.call('EXPIRE', aimd, 3600)
  return cap, now_gen, cut
end
"""

# KEYS: holders, aimd, paused. ARGV: limit, lease ms, then the successes not yet counted:
# generation, how many, WINDOW, CUT_SHARE; then the tokens wanted, in order.
# Returns {wait ms (0: some taken), paused (0/1), the cap's generation, how many taken}: the
# first ones, as many as are free.
# Redis's own clock, so machines with skewed clocks still agree on who has expired.
_ACQUIRE = (
    _COUNT
    + """
local limit, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local cap, gen = count(KEYS[2], limit, tonumber(ARGV[3]), tonumber(ARGV[4]), 0,
  tonumber(ARGV[5]), tonumber(ARGV[6]))
local pause = redis.call('PTTL', KEYS[3])
if pause > 0 then
  return {pause, 1, gen, 0}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local free = cap - redis.call('ZCARD', KEYS[1])
if free <= 0 then
  -- Full: the ms until the first lease runs out (a dead holder's slot frees itself then).
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {math.max(1, tonumber(first[2]) - now_ms), 0, gen, 0}
end
local taken = math.min(free, #ARGV - 6)
for i = 1, taken do
  redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[6 + i])
end
-- The key outlives its longest lease, then vanishes once the endpoint goes idle.
if redis.call('PTTL', KEYS[1]) < lease_ms then
  redis.call('PEXPIRE', KEYS[1], lease_ms)
end
return {0, 0, gen, taken}
"""
)

# KEYS: holders, aimd, freed, paused. ARGV: limit, generation, successes, 429s (of that
# generation), pause ms (0: none), the Retry-After ms that pauses if these outcomes cut the
# cap, WINDOW, CUT_SHARE, then the tokens released (none: only counting).
# Release, wake as many waiters, count the outcomes, pause: one round trip.
# Returns {the cap, ms this release added to the pause, the pause's ms left, the generation}.
_RELEASE = (
    _COUNT
    + """
local limit = tonumber(ARGV[1])
local pause_ms, retry_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
if #ARGV > 8 then
  local tokens = {unpack(ARGV, 9)}
  redis.call('ZREM', KEYS[1], unpack(tokens))
  for _ = 1, #tokens do
    redis.call('RPUSH', KEYS[3], 1)
  end
  redis.call('LTRIM', KEYS[3], -limit, -1)
  redis.call('PEXPIRE', KEYS[3], 60000)
end
local cap, gen, cut = count(KEYS[2], limit, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[7]), tonumber(ARGV[8]))
if cut then
  pause_ms = math.max(pause_ms, retry_ms)
end
local left = math.max(0, redis.call('PTTL', KEYS[4]))
local added = 0
if pause_ms > left then
  redis.call('SET', KEYS[4], 1, 'PX', pause_ms)
  added, left = pause_ms - left, pause_ms
end
return {cap, added, left, gen}
"""
)

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
# grown, or a waiter that took a wake-up was cancelled before it could use it. The Redis
# client's socket timeout must be longer, or every such wait would end in a timeout.
MAX_BLOCK_S = 1.0

# A slot kept by its process (keep_s > 0) carries its requests for this long at most after
# Redis gave it; its Redis lease is this much longer. Then it goes back, as every 429 does.
REUSE_S = 2.0


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


@dataclass
class _Lease:
    """A slot this process holds in Redis, in use or kept for its next request."""

    token: str
    generation: int  # the adaptive cap's, when Redis gave it
    ends: float  # time.monotonic() by which its lease in Redis has surely run out
    idle_since: float = 0.0


@dataclass
class _Waiter:
    lease_s: float
    handed: asyncio.Future[_Lease]


@dataclass
class _Local:
    """What this process knows of one endpoint, and the slots it keeps unused."""

    limit: int = 1
    idle: deque[_Lease] = field(default_factory=deque)  # the most recently used on the right
    waiters: deque[_Waiter] = field(default_factory=deque)  # in arrival order
    generation: int = 0  # the adaptive cap's, as Redis last answered
    paused_until: float = 0.0  # time.monotonic(), as Redis last answered
    uncounted_ok: int = 0  # successes at `generation` not yet counted in Redis
    taker: asyncio.Task[None] | None = None  # takes slots from Redis for the waiters
    blocked: bool = False  # the taker waits for a release or for a pause to end
    returner: asyncio.Task[None] | None = None  # gives the unused kept ones back

    def learn(self, generation: int, paused_ms: int) -> None:
        if generation > self.generation:  # a cut: successes sent before it no longer count
            self.generation, self.uncounted_ok = generation, 0
        if paused_ms:
            self.paused_until = max(self.paused_until, time.monotonic() + paused_ms / 1000)

    def usable(self, lease: _Lease, lease_s: float, now: float) -> bool:
        """May `lease` carry a new request that holds it for up to `lease_s`?"""
        current = lease.generation == self.generation and self.paused_until <= now
        return current and lease.ends - now >= lease_s

    def reuse(self, lease_s: float) -> _Lease | None:
        # The others are older still: if the newest cannot carry the request, none can.
        if self.idle and self.usable(self.idle[-1], lease_s, time.monotonic()):
            return self.idle.pop()
        return None

    def live_waiters(self) -> deque[_Waiter]:
        """The waiters not cancelled, dropping the others."""
        if any(waiter.handed.done() for waiter in self.waiters):
            self.waiters = deque(waiter for waiter in self.waiters if not waiter.handed.done())
        return self.waiters


class EndpointLimiter:
    """Distributed, lease-based semaphore: at most `limit` holders per endpoint name."""

    def __init__(
        self, redis: Redis, key_prefix: str = "aidsafe:limits", owner: str = "", keep_s: float = 0.0
    ) -> None:
        """`redis`: a client whose socket timeout, if it has one, is longer than MAX_BLOCK_S
        (a ValueError otherwise). `owner`: who holds the slots taken here (a worker's id), for
        `release_owners`.
        `keep_s`: how long a released slot may stay with this process, unused, for its next
        request (0: none stays; see the module's docstring). Close with `aclose`."""
        if keep_s < 0:
            raise ValueError(f"keep_s must not be negative, got {keep_s}")
        socket_timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout is not None and socket_timeout <= MAX_BLOCK_S:
            raise ValueError(
                f"the Redis client's socket_timeout ({socket_timeout} s) must be longer than the "
                f"limiter's blocking waits ({MAX_BLOCK_S} s)"
            )
        self._redis = redis
        self._key_prefix = key_prefix
        self._owner = owner
        self._keep_s = keep_s
        self._reuse_s = REUSE_S if keep_s else 0.0
        self._acquire = redis.register_script(_ACQUIRE)
        self._release_script = redis.register_script(_RELEASE)
        self._release_owners = redis.register_script(_RELEASE_OWNERS)
        self._local: defaultdict[str, _Local] = defaultdict(_Local)
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
        local = self._local[endpoint]
        local.limit = limit
        lease = None if local.live_waiters() else local.reuse(lease_s)
        if lease is None:
            lease = await self._wait_for_slot(endpoint, local, lease_s)
        held = Slot(generation=lease.generation)
        try:
            yield held
        finally:
            if held.outcome == "ok" and held.generation == local.generation:
                local.uncounted_ok += 1
            if not self._pass_on(endpoint, local, lease, lease_s, held):
                await asyncio.shield(self._release(endpoint, local, [lease.token], held))

    async def release_owners(self, endpoints: Iterable[str], owners: Sequence[str]) -> int:
        """Free every slot these (dead) owners hold on these endpoints; how many were held."""
        if not owners:
            return 0
        freed = 0
        for endpoint in endpoints:
            key = self.key(endpoint)
            freed += int(await self._release_owners(keys=[key, f"{key}:freed"], args=list(owners)))
        return freed

    async def aclose(self) -> None:
        """Give back the slots kept unused (they would otherwise wait for their leases)."""
        for endpoint, local in self._local.items():
            for task in (local.taker, local.returner):
                if task is not None:
                    task.cancel()
            if local.idle:
                tokens = [lease.token for lease in local.idle]
                local.idle.clear()
                await self._release(endpoint, local, tokens)

    async def _wait_for_slot(self, endpoint: str, local: _Local, lease_s: float) -> _Lease:
        """Wait in line for a slot: one released here, or one the taker gets from Redis."""
        waiter = _Waiter(lease_s, asyncio.get_running_loop().create_future())
        local.waiters.append(waiter)
        if local.taker is None:
            local.taker = asyncio.create_task(self._take_for_waiters(endpoint, local))
        started = time.monotonic()
        try:
            return await waiter.handed
        except asyncio.CancelledError:
            if local.blocked and not local.live_waiters() and local.taker is not None:
                # It waits for none now, and the next waiter must not wait for its wait to end.
                local.taker.cancel()
                local.taker = None
            # Cancelled just as a slot was handed over: it must not be lost.
            handed = waiter.handed
            if handed.done() and not handed.cancelled() and handed.exception() is None:
                lease = handed.result()
                if not self._pass_on(endpoint, local, lease, lease_s):
                    await asyncio.shield(self._release(endpoint, local, [lease.token]))
            raise
        finally:
            waited = time.monotonic() - started
            self.waited_s += waited
            LIMIT_WAIT_SECONDS.labels(endpoint).inc(waited)

    async def _take_for_waiters(self, endpoint: str, local: _Local) -> None:
        """Take slots from Redis for this process's waiters, as many at once as wait, until
        none waits. One such task per endpoint: the others wait here, not at Redis."""
        key = self.key(endpoint)
        keys = [key, f"{key}:aimd", f"{key}:paused"]
        try:
            while waiters := local.live_waiters():
                longest_s = max(waiter.lease_s for waiter in waiters)
                lease_s = longest_s + self._reuse_s  # in Redis: REUSE_S longer if slots are kept
                tokens = [f"{self._owner}/{uuid.uuid4().hex}" for _ in waiters]
                generation, uncounted, local.uncounted_ok = local.generation, local.uncounted_ok, 0
                asked = time.monotonic()  # Redis's leases surely end later than this one's
                args = [local.limit, max(1, round(lease_s * 1000)), generation, uncounted, WINDOW, CUT_SHARE]
                try:
                    wait_ms, paused, generation, taken = await self._acquire(keys=keys, args=[*args, *tokens])
                except Exception:
                    # Redis may have added them before the answer was lost.
                    await asyncio.shield(self._release(endpoint, local, tokens))
                    raise
                local.learn(int(generation), int(wait_ms) if paused else 0)
                for token in tokens[: int(taken)]:
                    lease = _Lease(token, int(generation), asked + lease_s)
                    if waiters := local.live_waiters():
                        waiters.popleft().handed.set_result(lease)
                    elif not self._pass_on(endpoint, local, lease, longest_s):  # its waiter left
                        await asyncio.shield(self._release(endpoint, local, [token]))
                if taken:
                    continue
                wait_s = int(wait_ms) / 1000
                local.blocked = True
                try:
                    if paused:  # a release does not end a pause: no use listening for one
                        await asyncio.sleep(wait_s)
                    else:
                        # Redis 6+ takes fractional seconds; redis-py's annotation says int.
                        timeout = min(wait_s, MAX_BLOCK_S)
                        await self._redis.blpop([f"{key}:freed"], timeout=timeout)  # type: ignore[arg-type,misc]
                finally:
                    local.blocked = False
        except Exception as error:  # Redis unreachable: this round's waiters get the error
            for waiter in local.live_waiters():
                waiter.handed.set_exception(error)
        finally:
            if local.taker is asyncio.current_task():  # not cancelled and replaced
                local.taker = None

    def _pass_on(
        self, endpoint: str, local: _Local, lease: _Lease, lease_s: float, held: Slot | None = None
    ) -> bool:
        """Hand a slot this process no longer uses (held last by `held`, for up to `lease_s`)
        to its first waiter, or keep it for its next request, if that changes nothing for
        anyone else: no 429 or pause to tell, and the slot still usable. False: it goes back
        to Redis."""
        if not self._keep_s or (held is not None and (held.rate_limited or held.pause_s)):
            return False
        now = time.monotonic()
        if waiters := local.live_waiters():
            if not local.usable(lease, waiters[0].lease_s, now):
                return False
            waiters.popleft().handed.set_result(lease)
            return True
        if not local.usable(lease, lease_s, now):
            return False
        lease.idle_since = now
        local.idle.append(lease)
        if local.returner is None:
            local.returner = asyncio.create_task(self._return_unused(endpoint, local))
        return True

    async def _return_unused(self, endpoint: str, local: _Local) -> None:
        """Give Redis back, together, the slots kept unused for keep_s or no longer usable."""
        try:
            while local.idle:
                await asyncio.sleep(self._keep_s)
                now = time.monotonic()
                unused = [
                    lease
                    for lease in local.idle
                    if now - lease.idle_since >= self._keep_s or not local.usable(lease, 0.0, now)
                ]
                for lease in unused:
                    local.idle.remove(lease)
                if unused:
                    await asyncio.shield(self._release(endpoint, local, [lease.token for lease in unused]))
        finally:
            local.returner = None

    async def _release(
        self, endpoint: str, local: _Local, tokens: list[str], held: Slot | None = None
    ) -> None:
        """Release `tokens` (the one `held` held, if given), and count the successes not yet
        counted and its 429."""
        key = self.key(endpoint)
        generation, uncounted, local.uncounted_ok = local.generation, local.uncounted_ok, 0
        limited = int(held is not None and held.rate_limited and held.generation == generation)
        pause_ms = round(held.pause_s * 1000) if held else 0
        retry_ms = round(held.retry_after_s * 1000) if held else 0
        args = [local.limit, generation, uncounted, limited, pause_ms, retry_ms, WINDOW, CUT_SHARE]
        try:
            cap, added_ms, left_ms, generation = await self._release_script(
                keys=[key, f"{key}:aimd", f"{key}:freed", f"{key}:paused"], args=[*args, *tokens]
            )
        except RedisError:
            # Not fatal: the lease frees the slot anyway, only later. But Redis may have lost
            # every slot (a restart), and one kept here would be over the cap: none is reused.
            logger.warning("could not release limiter slots %s on %s", tokens, key, exc_info=True)
            for lease in local.idle:
                lease.ends = 0.0
            return
        local.learn(int(generation), int(left_ms))
        LIMIT_CAP.labels(endpoint).set(int(cap))
        if added_ms:
            LIMIT_PAUSE_SECONDS.labels(endpoint).inc(int(added_ms) / 1000)
            LIMIT_PAUSED_UNTIL.labels(endpoint).set(time.time() + int(left_ms) / 1000)
