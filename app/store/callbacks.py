"""Job callbacks as rows: the outbox a job's end is written to, claimed by workers to send,
and the log of every attempt for the job's owner.

A delivery is written in the transaction that finishes the job (its last item's ending, or
the cancel that ended its last queued items), so a job that ended has its delivery even if
the process died right after the commit; the workers send what is due, whoever wrote it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Executable,
    Integer,
    Interval,
    bindparam,
    exists,
    func,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.storable import replace_unstorable
from app.store.db import Sessions
from app.store.models import (
    FINISHED,
    CallbackAttempt,
    CallbackDelivery,
    CallbackStatus,
    Item,
    Job,
    sql_constant,
)

EVENT = "job.finished"


async def record_if_finished(session: AsyncSession, job_id: UUID) -> None:
    """In the caller's transaction, after it ended items of a job that names a callback:
    write the job's delivery if no item is left to run. Call it last in the transaction.

    Two transactions ending a job's last two items each see the other's item unfinished
    (neither has committed), so they take turns here: the lock (the job's, for the rest of
    the transaction) comes after their item updates, and the check after the lock reads what
    the other committed. Exactly one of them finds the job finished; a unique job_id keeps
    any later call (a cancel of a finished job) from writing a second delivery."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(str(job_id), 0))))
    unfinished = exists().where(Item.job_id == job_id, Item.status.not_in(FINISHED))  # waiting ones too
    if await session.scalar(select(unfinished)):
        return
    job = (
        await session.execute(
            select(Job.owner_key_id, Job.callback_url, Job.cancelled_at, Job.item_count, Job.plan).where(
                Job.id == job_id
            )
        )
    ).one()
    if job.callback_url is None:
        return
    rows = (
        await session.execute(
            select(Item.status, func.count(), func.max(Item.finished_at))
            .where(Item.job_id == job_id)
            .group_by(Item.status)
        )
    ).all()
    by_status = {status: count for status, count, _ in rows}
    finished_at = max((last for _, _, last in rows if last is not None), default=None)
    delivery_id = uuid4()
    payload = {
        "event": EVENT,
        "delivery_id": str(delivery_id),
        "job_id": str(job_id),
        "mode": str(job.plan.mode),
        "status": "cancelled" if job.cancelled_at else "completed",  # as GET /v1/jobs/{id} says
        "counts": {"total": job.item_count, "by_status": by_status},
        "finished_at": finished_at.isoformat() if finished_at else None,
    }
    await session.execute(
        insert(CallbackDelivery)
        .values(
            id=delivery_id,
            job_id=job_id,
            owner_key_id=job.owner_key_id,
            url=job.callback_url,
            payload=payload,
        )
        .on_conflict_do_nothing(index_elements=["job_id"])
    )


@dataclass(frozen=True)
class Due:
    """A delivery a worker claimed to send: its attempt number is the claim token."""

    id: UUID
    job_id: UUID
    url: str
    secret: str = field(repr=False)  # the job's, which signs it: kept out of logs
    payload: dict[str, Any]
    attempt: int
    created_at: datetime
    claimed_at: datetime  # the database's clock


def _rows(count: int) -> BindParameter[int]:
    """A LIMIT written into the SQL (as sql_constant): as a parameter, a generic plan of the
    claim takes it for a tenth of the table, and read every delivery (over 60 s at 100,000)."""
    return literal(count, Integer, literal_execute=True)


def _pending(deliveries: type[CallbackDelivery]) -> ColumnElement[bool]:
    # Written into the SQL: the owner's index is partial (sql_constant).
    return deliveries.status == sql_constant(CallbackStatus.PENDING)


def _due(deliveries: type[CallbackDelivery]) -> tuple[ColumnElement[bool], ...]:
    return _pending(deliveries), deliveries.next_attempt_at <= func.now()


async def claim_due(sessions: Sessions, limit: int, lease_s: float) -> list[Due]:
    """Take up to `limit` pending deliveries that are due, each for `lease_s` (no other worker
    takes it meanwhile; a worker that dies with it leaves it due again after the lease: the
    delivery is at least once, and receivers dedupe by delivery id).

    The keys take turns: each owner's oldest due delivery comes before anyone's second, so a
    key with a backlog (say, of receivers that never answer, each attempt the whole timeout)
    cannot hold up the deliveries of others until it is through.

    A claim reads no backlog whole (numbered whole, 100,000 due took 0.7-1.8 s a claim): one entry
    per key with a pending delivery, its soonest, then the first `limit` due of the keys whose
    first turns are the `limit` oldest, as only those keys can be in the batch (with `limit`
    keys due or more, the batch is their first turns)."""
    async with sessions.begin() as session:
        rows = await session.execute(_claim(limit), {"lease": timedelta(seconds=lease_s)})
        return [Due(*row) for row in rows]


@functools.cache
def _claim(limit: int) -> Executable:
    """The claim of `limit` deliveries, the lease its parameter: made once, as making it cost a
    claim more CPU than Postgres spent on it."""
    # Each key's soonest pending delivery, a key after another along the owner's index.
    first, later = aliased(CallbackDelivery), aliased(CallbackDelivery)
    soonest = (
        select(first.owner_key_id, first.next_attempt_at)
        .where(_pending(first))
        .order_by(first.owner_key_id, first.next_attempt_at)
        .limit(_rows(1))
        .cte("soonest", recursive=True)
    )
    next_key = (
        select(later.owner_key_id, later.next_attempt_at)
        .where(_pending(later), later.owner_key_id > soonest.c.owner_key_id)
        .order_by(later.owner_key_id, later.next_attempt_at)
        .limit(_rows(1))
        .lateral()
    )
    soonest = soonest.union_all(select(next_key).select_from(soonest.join(next_key, true())))
    first_turns = (
        select(soonest.c.owner_key_id)
        .where(soonest.c.next_attempt_at <= func.now())
        .order_by(soonest.c.next_attempt_at)
        .limit(_rows(limit))
        .subquery()
    )
    own = aliased(CallbackDelivery)
    turns_of_key = (
        select(
            own.id, own.next_attempt_at, func.row_number().over(order_by=own.next_attempt_at).label("turn")
        )
        .where(own.owner_key_id == first_turns.c.owner_key_id, *_due(own))
        .order_by(own.next_attempt_at)
        .limit(_rows(limit))
        .lateral()
    )
    # In the batch's order: each is read again and locked only once the batch comes to it.
    turns = (
        select(turns_of_key)
        .select_from(first_turns.join(turns_of_key, true()))
        .order_by(turns_of_key.c.turn, turns_of_key.c.next_attempt_at)
        .subquery()
    )
    # One at a time by its id (joined as a set, the planner may read every due row to join),
    # and due again on the row as locked: another worker may have claimed it meanwhile.
    taken = aliased(CallbackDelivery)
    locked = (
        select(taken.id)
        .where(taken.id == turns.c.id, *_due(taken))
        .with_for_update(skip_locked=True)
        .lateral()
    )
    due = (
        select(locked.c.id)
        .select_from(turns.join(locked, true()))
        .order_by(turns.c.turn, turns.c.next_attempt_at)
        .limit(_rows(limit))
    )
    return (
        update(CallbackDelivery)
        .where(CallbackDelivery.id.in_(due), Job.id == CallbackDelivery.job_id)
        .values(
            attempts=CallbackDelivery.attempts + 1,
            next_attempt_at=func.now() + bindparam("lease", type_=Interval()),
        )
        .returning(
            CallbackDelivery.id,
            CallbackDelivery.job_id,
            CallbackDelivery.url,
            Job.callback_secret,
            CallbackDelivery.payload,
            CallbackDelivery.attempts,
            CallbackDelivery.created_at,
            func.now(),
        )
    )


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    attempted_at: datetime
    duration_ms: float
    status_code: int | None = None
    error: str | None = None  # None: delivered
    response_snippet: str | None = None


async def record_attempt(
    sessions: Sessions, due: Due, outcome: Outcome, status: CallbackStatus, retry_in_s: float | None
) -> bool:
    """Log the attempt and move the delivery on: to `status`, due again in `retry_in_s` if it
    stays pending; once it does not, the job's callback secret is erased (nothing will be
    signed with it again). False (nothing written) if the claim is no longer this one's: its
    lease ran out and another worker took the delivery."""
    async with sessions.begin() as session:
        moved = await session.execute(
            update(CallbackDelivery)
            .where(
                CallbackDelivery.id == due.id,
                CallbackDelivery.attempts == due.attempt,
                CallbackDelivery.status == CallbackStatus.PENDING,
            )
            .values(
                status=status,
                next_attempt_at=func.now() + timedelta(seconds=retry_in_s or 0),
                finished_at=None if status == CallbackStatus.PENDING else func.now(),
            )
            .returning(CallbackDelivery.id)
        )
        if moved.first() is None:
            return False
        if status != CallbackStatus.PENDING:
            await session.execute(update(Job).where(Job.id == due.job_id).values(callback_secret=None))
        session.add(
            CallbackAttempt(
                delivery_id=due.id,
                number=due.attempt,
                attempted_at=outcome.attempted_at,
                duration_ms=outcome.duration_ms,
                status_code=outcome.status_code,
                # Kept as the receiver sent them: a NUL would fail the insert, and the
                # delivery would be sent again at every lease.
                error=replace_unstorable(outcome.error),
                response_snippet=replace_unstorable(outcome.response_snippet),
            )
        )
        return True


async def deliveries_of(
    session: AsyncSession, job_id: UUID
) -> list[tuple[CallbackDelivery, list[CallbackAttempt]]]:
    """The job's deliveries, each with its attempts in order."""
    deliveries = list(
        await session.scalars(
            select(CallbackDelivery)
            .where(CallbackDelivery.job_id == job_id)
            .order_by(CallbackDelivery.created_at)
        )
    )
    attempts: dict[UUID, list[CallbackAttempt]] = {delivery.id: [] for delivery in deliveries}
    if deliveries:
        rows = await session.scalars(
            select(CallbackAttempt)
            .where(CallbackAttempt.delivery_id.in_(attempts))
            .order_by(CallbackAttempt.delivery_id, CallbackAttempt.number)
        )
        for attempt in rows:
            attempts[attempt.delivery_id].append(attempt)
    return [(delivery, attempts[delivery.id]) for delivery in deliveries]
