"""A job's budget as the workers enforce it and the API changes it.

Before each LLM call an item's worker reads the job's row: once its recorded totals (kept up
by every turn's insert) reach the budget, the call is not started and the item is parked as
`budget_exhausted`, its turns kept. Calls already in flight in other items finish and are
recorded, so a job can exceed its budget by at most its calls in flight. Raising (or
removing) the budget puts the parked items back in the queue; they resume from their turns.
"""

from __future__ import annotations

import logging
from uuid import UUID

from arq.connections import ArqRedis
from sqlalchemy import ColumnElement, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.costs import BudgetExhausted
from app.deliberation.ports import ChatReply, ChatRequest, LLMClient
from app.queue import enqueue_items
from app.store import callbacks, items
from app.store.db import Sessions, driver_connection
from app.store.driver_statements import DriverStatement
from app.store.endings import CANCELLED, Ending, ending_values
from app.store.models import Item, ItemStatus, Job

log = logging.getLogger("aidsafe.budgets")

WAITING = Ending(
    ItemStatus.BUDGET_EXHAUSTED,
    "budget_exhausted",
    "the job's budget is spent; raising it (PATCH /v1/jobs/{id}) resumes the item",
)


def exhausted() -> ColumnElement[bool]:
    """SQL: the job's recorded totals have reached its budget."""
    return or_(
        and_(Job.budget_max_cost_usd.is_not(None), Job.spent_usd >= Job.budget_max_cost_usd),
        and_(Job.budget_max_tokens.is_not(None), Job.spent_tokens >= Job.budget_max_tokens),
    )


# One primary-key read per call, on the driver's fast path.
_EXHAUSTED = DriverStatement(select(exists().where(Job.id == bindparam("job_id"), exhausted())))


class MeteredLLM:
    """The LLM client one claimed item calls through: no call starts once the job's budget is
    spent (BudgetExhausted)."""

    def __init__(self, llm: LLMClient, sessions: Sessions, job_id: UUID) -> None:
        self._llm, self._sessions, self._job_id = llm, sessions, job_id

    async def chat(self, request: ChatRequest) -> ChatReply:
        async with driver_connection(self._sessions) as connection:
            if await _EXHAUSTED.fetchval(connection, job_id=self._job_id):
                raise BudgetExhausted(f"job {self._job_id}: budget spent")
        return await self._llm.chat(request)


async def park(sessions: Sessions, redis: ArqRedis, queue_name: str, claim: items.Claim) -> Ending | None:
    """End the claim as waiting for budget, then settle it at once if the budget was raised or
    the job cancelled meanwhile (the check before the call may have read the old row)."""
    ending = await items.end(sessions, claim, WAITING)
    async with sessions.begin() as session:
        resumed = await settle_waiting(session, claim.job_id)
    try:
        await enqueue_items(redis, queue_name, resumed)
    except Exception:  # committed: the sweeper enqueues queued items whose arq job is missing
        log.exception("enqueue failed for job %s; the sweeper will enqueue its resumed items", claim.job_id)
    return ending


async def settle_waiting(session: AsyncSession, job_id: UUID) -> list[tuple[UUID, int]]:
    """In the caller's transaction, with the job's row locked (a concurrent PATCH, cancel or
    park waits for it): the job's waiting items are cancelled if the job was, and queued
    again if its budget is no longer spent. The (item id, enqueue counter) pairs to enqueue
    once the caller has committed."""
    job = (
        await session.execute(
            select(Job.cancelled_at, Job.callback_url, exhausted().label("exhausted"))
            .where(Job.id == job_id)
            .with_for_update()
        )
    ).one()
    waiting = and_(Item.job_id == job_id, Item.status == ItemStatus.BUDGET_EXHAUSTED)
    if job.cancelled_at is not None:
        await session.execute(update(Item).where(waiting).values(ending_values(CANCELLED)))
        if job.callback_url is not None:
            await callbacks.record_if_finished(session, job_id)
        return []
    if job.exhausted:
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
