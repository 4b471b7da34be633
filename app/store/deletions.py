"""Deleting a job with everything derived from it, and purging old hazardous text.

A job's rows are every row of a table with a foreign key to `jobs` (or, for a table without
one, to `items`) that names the job: read from the models' metadata, so a table added later
is deleted with its job too. They go children first, in the caller's transaction, by
statements that load no row (memory stays flat whatever the job's size) and lock only the
job's own rows. A comparison that judges the job's samples points at its items: the job is
refused until the comparison is deleted, rather than the comparison losing its samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast
from uuid import UUID

from sqlalchemy import ColumnElement, CursorResult, Table, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.ports import guard_flags, is_hazardous
from app.errors import MAX_LISTED_PROBLEMS, JobInComparison, JobRunning
from app.store import jobs, keys, policy_sets
from app.store.db import Sessions
from app.store.models import (
    UNFINISHED,
    Base,
    Batch,
    BatchRequest,
    Item,
    Job,
    JobDeletion,
    PreferencePair,
    SampleEvaluation,
    TurnRow,
)

log = logging.getLogger("aidsafe.deletions")


def _of_job(table: Table, job_id: UUID) -> ColumnElement[bool] | None:
    """The condition naming the job's rows of `table`; None if the table holds none."""
    to_jobs = [fk.parent for fk in table.foreign_keys if fk.column.table is Job.__table__]
    if to_jobs:
        return or_(*(column == job_id for column in to_jobs))
    to_items = [fk.parent for fk in table.foreign_keys if fk.column.table is Item.__table__]
    if to_items:
        job_items = select(Item.id).where(Item.job_id == job_id)
        return or_(*(column.in_(job_items) for column in to_items))
    return None


# Every table holding a job's rows, children before parents; the job itself goes last.
DERIVED = [t for t in reversed(Base.metadata.sorted_tables) if t is not Job.__table__]


async def delete_job(session: AsyncSession, job_id: UUID, key_id: UUID) -> JobDeletion:
    """Delete this key's finished job and its rows in the caller's transaction, and record
    the deletion. NotFound for another key's job or none (so also when deleted already),
    JobRunning while items are queued, running or waiting or its provider batches are open
    (a cancelled job's, until the workers cancel them), JobInComparison while comparisons use it."""
    # The owner in the statement, so that another key's job is never locked: locked first and
    # checked after, it made another key's DELETE wait behind the owner's transactions holding
    # the job (telling that it exists and is in use), and the owner's writes wait behind it.
    owned_job = select(Job).where(Job.id == job_id, Job.owner_key_id == key_id).with_for_update()
    job = jobs.owned(await session.scalar(owned_job), job_id, key_id)
    unfinished = select(Item.id).where(Item.job_id == job_id, Item.status.in_(UNFINISHED)).exists()
    # A cancelled batch job's items end at once, its provider batches when the workers cancel
    # them: deleted before, their rows would be gone, and the batches run on, paid for.
    open_batches = select(Batch.id).where(Batch.job_id == job_id, Batch.finished_at.is_(None)).exists()
    if await session.scalar(select(unfinished | open_batches)):
        raise JobRunning(
            f"job {job_id} has queued, running or waiting items, or provider batches not yet ended: "
            f"cancel it (POST /v1/jobs/{job_id}/cancel) and delete it once it has ended"
        )
    if users := await comparisons_using(session, job_id):
        raise JobInComparison(
            f"comparisons use job {job_id}'s samples: delete them first ({len(users)})",
            {"comparison_ids": [str(u) for u in users[:MAX_LISTED_PROBLEMS]]},
        )
    row_counts: dict[str, int] = {}
    for table in DERIVED:
        if (condition := _of_job(table, job_id)) is not None:
            deleted = await session.execute(delete(table).where(condition))
            row_counts[table.name] = cast(CursorResult[Any], deleted).rowcount  # a DELETE's result
    await session.execute(delete(Job).where(Job.id == job_id))
    row_counts[Job.__tablename__] = 1
    deletion = JobDeletion(
        job_id=job_id,
        number=await _next_number(session, key_id),
        mode=job.plan.mode,
        deleted_by_key_id=key_id,
        row_counts=row_counts,
    )
    session.add(deletion)
    await session.flush()
    return deletion


async def _next_number(session: AsyncSession, key_id: UUID) -> int:
    """The key's next deletion number. The key's row stays locked until the caller commits, so
    that the key's deletions at the same time take one number each, in turn."""
    await keys.hold(session, key_id)
    latest = await session.scalar(
        select(func.max(JobDeletion.number)).where(JobDeletion.deleted_by_key_id == key_id)
    )
    return (latest or 0) + 1


async def comparisons_using(session: AsyncSession, job_id: UUID) -> list[UUID]:
    """The other jobs whose items point at this job's items: comparisons of it."""
    job_items = select(Item.id).where(Item.job_id == job_id)
    rows = await session.scalars(
        select(Item.job_id)
        .where(
            Item.job_id != job_id,
            or_(Item.baseline_item_id.in_(job_items), Item.candidate_item_id.in_(job_items)),
        )
        .distinct()
        .order_by(Item.job_id)
    )
    return list(rows)


async def list_deletions(
    session: AsyncSession, key_id: UUID, before_id: int | None, limit: int
) -> Sequence[JobDeletion]:
    """The key's deletions, newest first; `before_id` continues after the previous page."""
    query = select(JobDeletion).where(JobDeletion.deleted_by_key_id == key_id)
    if before_id is not None:
        query = query.where(JobDeletion.number < before_id)
    return (await session.scalars(query.order_by(JobDeletion.number.desc()).limit(limit))).all()


# --- the hazardous-text purge (the worker runs it when purge_hazardous_after_days is set) ----


# A job whose purge failed is put off this long, twice as long after each further failure.
PURGE_RETRY_FIRST = timedelta(hours=1)
PURGE_RETRY_LONGEST = timedelta(days=1)


async def purge_hazardous(
    sessions: Sessions, older_than: timedelta, *, max_jobs: int = 20, batch_items: int = 200
) -> int:
    """Blank the hazardous text of up to `max_jobs` finished jobs submitted longer than
    `older_than` ago; the number purged. Each job goes `batch_items` items per transaction
    and is marked purged in its last one, so an interrupted purge starts that job again
    (blanking blank text changes nothing) and a purged job is not visited again. A job whose
    purge fails is logged and put off (PURGE_RETRY_FIRST, doubling), and the others go on."""
    purged = 0
    while purged < max_jobs and (job := await _next_to_purge(sessions, older_than)):
        try:
            await _purge_job(sessions, job, batch_items)
        except Exception:
            retry_in = _purge_retry_in(job.hazardous_purge_failures)
            log.warning("purging job %s failed; it is tried again in %s", job.id, retry_in, exc_info=True)
            await _put_off(sessions, job.id, retry_in)
        else:
            purged += 1
    return purged


def _purge_retry_in(failures_before: int) -> timedelta:
    # Doublings bounded past the longest: a job failing for months overflows no timedelta.
    factor: int = 2 ** min(failures_before, 16)
    return min(PURGE_RETRY_LONGEST, PURGE_RETRY_FIRST * factor)


async def _next_to_purge(sessions: Sessions, older_than: timedelta) -> Job | None:
    unfinished = select(Item.id).where(Item.job_id == Job.id, Item.status.in_(UNFINISHED)).exists()
    async with sessions() as session:
        return await session.scalar(
            select(Job)
            .where(
                Job.hazardous_purged_at.is_(None),
                Job.created_at < func.now() - older_than,
                ~unfinished,
                or_(Job.hazardous_purge_retry_at.is_(None), Job.hazardous_purge_retry_at <= func.now()),
            )
            .order_by(Job.created_at)
            .limit(1)
        )


async def _put_off(sessions: Sessions, job_id: UUID, retry_in: timedelta) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                hazardous_purge_failures=Job.hazardous_purge_failures + 1,
                hazardous_purge_retry_at=func.now() + retry_in,
            )
        )


async def _purge_job(sessions: Sessions, job: Job, batch_items: int) -> None:
    async with sessions() as session:
        known = frozenset(p["id"] for p in (await policy_sets.by_id(session, job.policy_set_id)).policies)
    after = -1
    while True:
        async with sessions.begin() as session:
            batch = (
                await session.execute(
                    select(Item.id, Item.position)
                    .where(Item.job_id == job.id, Item.position > after)
                    .order_by(Item.position)
                    .limit(batch_items)
                )
            ).all()
            if batch:
                after = batch[-1].position
                await _purge_items(session, [item.id for item in batch], known)
            if len(batch) < batch_items:
                await session.execute(
                    update(Job).where(Job.id == job.id).values(hazardous_purged_at=func.now())
                )
                return


async def _purge_items(session: AsyncSession, item_ids: list[UUID], known: frozenset[str]) -> None:
    """Blank the hazardous text of these items: their hazardous turns' output, their pair
    attempt's rejected side, the guard's words on an imported sample (its flags stay), their
    operator-only error detail (which may quote it), and their batch requests' bodies,
    answers and errors (a body holds the turns before it, an answer is its turn's output; a
    finished job reads neither again)."""
    turns = await session.execute(
        select(TurnRow.id, TurnRow.stage, TurnRow.round).where(TurnRow.item_id.in_(item_ids))
    )
    hazardous = [turn.id for turn in turns if is_hazardous(turn.stage, turn.round)]
    if hazardous:
        await session.execute(
            update(TurnRow).where(TurnRow.id.in_(hazardous)).values(raw_output="", parsed=None, error=None)
        )
    await session.execute(
        update(BatchRequest)
        .where(BatchRequest.item_id.in_(item_ids))
        .values(body={}, answer=None, error=None)
    )
    with_detail = Item.id.in_(item_ids), Item.operator_error.is_not(None)
    await session.execute(update(Item).where(*with_detail).values(operator_error=None))
    guarded = SampleEvaluation.item_id.in_(item_ids), SampleEvaluation.guard.is_not(None)
    for evaluation in await session.scalars(select(SampleEvaluation).where(*guarded)):
        evaluation.guard = _purged_guard(evaluation.guard, known)
    pairs = await session.scalars(select(PreferencePair).where(PreferencePair.item_id.in_(item_ids)))
    for pair in pairs:
        pair.belief = pair.rejected_thoughts = pair.rejected_response = pair.rejected_grade_error = None
        pair.guard = _purged_guard(pair.guard, known)
        pair.rejected_scores = _without_rationales(pair.rejected_scores)
        pair.tries = [_purged_try(t, known) for t in pair.tries]


def _purged_guard(verdict: dict[str, Any] | None, known: frozenset[str]) -> dict[str, Any] | None:
    """The guard's flags: whether it found the text unsafe, how sure, its known categories."""
    return None if verdict is None else guard_flags(verdict, known)


def _without_rationales(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    if scores is None:
        return None
    return {metric: {"score": s["score"], "rationale": None} for metric, s in scores.items()}


def _purged_try(pair_try: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """A try without text: its number and method, whether the generator refused, the guard's
    flags and the gap (tries stored before methods and gaps were recorded have neither)."""
    return {
        "number": pair_try["number"],
        "method": pair_try.get("method", "whisper"),
        "belief": None,
        "rejected": None,
        "refused": pair_try.get("refused", pair_try["rejected"] is None),
        "refusal": None,
        "guard": _purged_guard(pair_try["guard"], known),
        "gap": pair_try.get("gap"),
    }
