"""A job's budget as the workers enforce it and the API changes it.

What a job has spent is counted in Redis, not on the job's row: with hundreds of calls of one
job in flight, a counter on that row would make every turn's insert wait for its lock. Each
turn recorded for a job with a budget adds its tokens and cost to the job's counters (one
Redis round trip), and before each LLM call of such a job its worker reads them (another):
once they reach the budget the call is not started and the item is parked as
`budget_exhausted`, its turns kept. Calls already in flight finish and are recorded, so a job
can exceed its budget by at most its calls in flight. A job without a budget costs nothing
here: its workers neither read nor add (the claim and each turn's insert say whether the job
has a budget, from the job's row, without locking it).

The turns stay the record (the API's totals are sums over them); the counters are rebuilt
from the turns when missing (a Redis restart, expiry, or a changed budget, which drops them).
A rebuild creates the counters before summing the turns, and finishes only the counters it
created (not those another caller created after they were dropped again), so a turn is never
missed: one recorded while the sum runs may be counted twice, which can stop a job early by at
most its calls in flight, never late. So may a turn whose add the Redis client sent again after a
connection dropped before the answer came (the client tries a connection error once more).
Raising (or removing) the budget puts the parked items back in the queue; they resume from
their turns.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from uuid import UUID, uuid4

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.costs import Budget, BudgetExhausted
from app.deliberation.ports import ChatReply, ChatRequest, LLMClient, LLMUnavailable
from app.queue import enqueue_items
from app.store import callbacks, items
from app.store.db import Sessions
from app.store.endings import CANCELLED, Ending, ending_values
from app.store.models import Item, ItemStatus, Job, TurnRow

log = logging.getLogger("aidsafe.budgets")

WAITING = Ending(
    ItemStatus.BUDGET_EXHAUSTED,
    "budget_exhausted",
    "the job's budget is spent; raising it (PATCH /v1/jobs/{id}) resumes the item",
)

# What settling a job's waiting items reads of the job's row (_lock).
_JobRow = Row[datetime | None, str | None, float | None, int | None, UUID]

# Counters of a job nobody reads or adds to for a day go (and are rebuilt if it resumes).
_TTL_MS = 24 * 3600 * 1000
# Counters being rebuilt go sooner: a rebuilder that dies midway must not leave them.
_REBUILD_TTL_MS = 30 * 1000

# Add to counters that exist (missing ones are rebuilt from the turns, which hold this turn).
_ADD = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
redis.call('hincrby', KEYS[1], 'tokens', ARGV[1])
redis.call('hincrbyfloat', KEYS[1], 'usd', ARGV[2])
if redis.call('hget', KEYS[1], 'ready') == '1' then redis.call('pexpire', KEYS[1], ARGV[3]) end
return 1
"""
# The counters if ready; else 'rebuild' if this caller (ARGV[2], its rebuild's token) starts
# their rebuild (they were missing) or started it (its call sent again), or 'wait' if another
# caller's rebuild runs.
_READ = """
local tokens, usd, ready, rebuilder = unpack(
  redis.call('hmget', KEYS[1], 'tokens', 'usd', 'ready', 'rebuilder'))
if ready == '1' then return {tokens, usd} end
if ready then return rebuilder == ARGV[2] and 'rebuild' or 'wait' end
redis.call('hset', KEYS[1], 'tokens', 0, 'usd', 0, 'ready', 0, 'rebuilder', ARGV[2])
redis.call('pexpire', KEYS[1], ARGV[1])
return 'rebuild'
"""
# Finish it: the turns' sums join what was added meanwhile, once (a call sent again after its
# reply was lost finds the counters ready and returns them). Only the rebuild its token
# started: dropped and started again by another caller meanwhile, the counters are that
# caller's to finish, from a sum that holds the turns this caller's may lack.
_FINISH = """
local ready, rebuilder = unpack(redis.call('hmget', KEYS[1], 'ready', 'rebuilder'))
if not ready or rebuilder ~= ARGV[4] then return nil end
if ready == '1' then return redis.call('hmget', KEYS[1], 'tokens', 'usd') end
local tokens = redis.call('hincrby', KEYS[1], 'tokens', ARGV[1])
local usd = redis.call('hincrbyfloat', KEYS[1], 'usd', ARGV[2])
redis.call('hset', KEYS[1], 'ready', 1)
redis.call('pexpire', KEYS[1], ARGV[3])
return {tokens, usd}
"""


class Spending:
    """Every job's spent tokens and USD, as counted in Redis (see the module's docstring)."""

    def __init__(self, redis: Redis, sessions: Sessions, key_prefix: str) -> None:
        self._redis, self._sessions, self._key_prefix = redis, sessions, key_prefix
        self._add = redis.register_script(_ADD)
        self._read = redis.register_script(_READ)
        self._finish = redis.register_script(_FINISH)

    def key(self, job_id: UUID) -> str:
        return f"{self._key_prefix}:spent:{job_id}"

    async def add(self, job_id: UUID, tokens: int, usd: float | None) -> None:
        await self._add(keys=[self.key(job_id)], args=[tokens, repr(usd or 0.0), _TTL_MS])

    async def spent(self, job_id: UUID, session: AsyncSession | None = None) -> tuple[int, float]:
        """(tokens, USD) the job's recorded turns used; unpriced turns add no USD. A caller
        in a session passes it: the turns are then read on its connection, not on a second
        one, which a pool whose connections are all so held would never hand out. (Under
        READ COMMITTED, Postgres's default, that read still sees every turn committed before
        it, so no turn is missed between the counters' rebuild mark and the sum.)"""
        key, token = self.key(job_id), uuid4().hex
        counters = await self._read(keys=[key], args=[_REBUILD_TTL_MS, token])
        if isinstance(counters, list):
            return int(counters[0]), float(counters[1])
        if session is None:
            async with self._sessions() as own:
                recorded = await _recorded(own, job_id)
        else:
            recorded = await _recorded(session, job_id)
        if counters != b"rebuild":  # another caller rebuilds: the turns answer meanwhile
            return recorded
        finished = await self._finish(keys=[key], args=[recorded[0], repr(recorded[1]), _TTL_MS, token])
        return recorded if finished is None else (int(finished[0]), float(finished[1]))

    async def forget(self, job_id: UUID) -> None:
        """Drop the job's counters: the next read rebuilds them from the turns."""
        await self._redis.delete(self.key(job_id))


async def _spent(
    session: AsyncSession, spending: Spending, job_id: UUID, budget_changed: bool
) -> tuple[int, float]:
    """For settle_waiting. The turns answer when the counters cannot: a park that raised here
    would be undone and its item handed back, a counted try spent for want of Redis alone."""
    if budget_changed:
        return await _recorded(session, job_id)
    try:
        return await spending.spent(job_id, session)
    except RedisError:
        log.warning("budget counters of job %s unreadable; summing its turns", job_id, exc_info=True)
        return await _recorded(session, job_id)


async def _recorded(session: AsyncSession, job_id: UUID) -> tuple[int, float]:
    row = (
        await session.execute(
            select(
                func.coalesce(func.sum(TurnRow.prompt_tokens + TurnRow.completion_tokens), 0),
                func.coalesce(func.sum(TurnRow.cost_usd), 0.0),
            ).where(TurnRow.job_id == job_id)
        )
    ).one()
    return int(row[0]), float(row[1] or 0.0)


class Meter:
    """The budget of one claimed item's job, between the item's LLM calls and its turn log:
    no call starts once the job's budget is spent (BudgetExhausted), and each recorded turn
    of a job with a budget is added to its counters. The budget is the claim's, then what
    each turn's insert read from the job's row, so a PATCH applies from an item's next call."""

    def __init__(self, llm: LLMClient, spending: Spending, job_id: UUID, budget: Budget | None) -> None:
        self._llm, self._spending, self._job_id, self._budget = llm, spending, job_id, budget

    async def chat(self, request: ChatRequest) -> ChatReply:
        if self._budget is not None and self._budget.reached(*await self._spent()):
            raise BudgetExhausted(f"job {self._job_id}: budget spent")
        return await self._llm.chat(request)

    async def _spent(self) -> tuple[int, float]:
        try:
            return await self._spending.spent(self._job_id)
        except RedisError as exc:  # as an LLM outage: the item waits, its tries are not used up
            raise LLMUnavailable(
                f"budget counters unreadable: {exc!r}", "the job's spending could not be read"
            ) from exc

    async def recorded(self, budget: Budget | None, tokens: int, usd: float | None) -> None:
        """A turn was stored; `budget`: the job's as its insert read it. If its counters
        cannot be added to, they are dropped, to be rebuilt from the turns at the next read;
        if Redis cannot even drop them they miss this turn until they expire, which lets the
        job overrun its budget by this turn. Failing the item would not count it either: its
        turn is stored, and a resumed item adds only new turns."""
        self._budget = budget
        if budget is None:
            return
        try:
            await self._spending.add(self._job_id, tokens, usd)
        except RedisError:
            log.warning("could not count a turn of job %s against its budget", self._job_id, exc_info=True)
            with contextlib.suppress(RedisError):
                await self._spending.forget(self._job_id)


async def park(
    sessions: Sessions, spending: Spending, redis: ArqRedis, queue_name: str, claim: items.Claim
) -> Ending | None:
    """End the claim as waiting for budget and settle the job's waiting items, in one
    transaction that locks the job's row first: a budget's PATCH (or a cancel) committed before
    it is seen by the settle, and one after it finds the item waiting, so none is missed (the
    check before the call may have read the old budget). If this raises, nothing was written
    and the claim still holds: the caller hands the item back (if it cannot either, the lease's
    expiry does), rather than leave it waiting for a PATCH that has come and gone."""
    async with sessions.begin() as session:
        job = await _lock(session, claim.job_id)  # first, as a PATCH or a cancel takes it
        ending = await items.write_ending(session, claim, WAITING)
        resumed = await _settle(session, spending, claim.job_id, job)
    try:
        await enqueue_items(redis, queue_name, resumed, share=job.owner_key_id)
    except Exception:  # committed: the sweeper enqueues queued items whose arq job is missing
        log.exception("enqueue failed for job %s; the sweeper will enqueue its resumed items", claim.job_id)
    return ending


async def settle_waiting(
    session: AsyncSession, spending: Spending, job_id: UUID, *, budget_changed: bool = False
) -> list[tuple[UUID, int]]:
    """In the caller's transaction, with the job's row locked (a concurrent PATCH, cancel or
    park waits for it, inserts of its turns do not): the job's waiting items are cancelled if
    the job was, and queued again if its budget is no longer spent (by the counters the
    workers read, so an item is not resumed only to park again). The (item id, enqueue
    counter) pairs to enqueue once the caller has committed.

    `budget_changed`: the caller changed the budget and dropped the counters. The spending is
    then summed from the turns and the counters are left missing, to be rebuilt by the first
    read after the commit: until then the inserts of the job's turns read the budget it had,
    none perhaps, and are not added to any counters, so counters rebuilt now would miss them."""
    return await _settle(session, spending, job_id, await _lock(session, job_id), budget_changed)


async def _lock(session: AsyncSession, job_id: UUID) -> _JobRow:
    """Lock the job's row and read what settling its waiting items needs of it."""
    return (
        await session.execute(
            select(
                Job.cancelled_at,
                Job.callback_url,
                Job.budget_max_cost_usd,
                Job.budget_max_tokens,
                Job.owner_key_id,
            )
            .where(Job.id == job_id)
            .with_for_update(key_share=True)  # NO KEY UPDATE: turn inserts (key share) go on
        )
    ).one()


async def _settle(
    session: AsyncSession, spending: Spending, job_id: UUID, job: _JobRow, budget_changed: bool = False
) -> list[tuple[UUID, int]]:
    """settle_waiting, the job's row locked and read (`_lock`)."""
    waiting = (Item.job_id == job_id) & (Item.status == ItemStatus.BUDGET_EXHAUSTED)
    if job.cancelled_at is not None:
        await session.execute(update(Item).where(waiting).values(ending_values(CANCELLED)))
        if job.callback_url is not None:
            await callbacks.record_if_finished(session, job_id)
        return []
    budget = Budget.of(job.budget_max_cost_usd, job.budget_max_tokens)
    if budget is not None and budget.reached(*await _spent(session, spending, job_id, budget_changed)):
        return []
    requeued = await session.execute(
        update(Item)
        .where(waiting)
        .values(
            status=ItemStatus.QUEUED,
            error_code=None,
            error_message=None,
            updated_at=func.now(),
            enqueues=Item.enqueues + 1,  # a fresh arq job id
        )
        .returning(Item.id, Item.enqueues)
    )
    return [(row.id, row.enqueues) for row in requeued]
