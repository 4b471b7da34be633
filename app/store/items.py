"""Items as workers see them: claim with a lease, renew it, and end the claim exactly once.

The claim token is the item's attempt counter: every write after the claim is conditional on
it (`claim_holds`), so a worker that lost its lease (paused, partitioned, presumed dead)
cannot overwrite the work of the worker that took the item over. How a claim can end, and
what each ending writes, is app.store.endings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
from sqlalchemy import (
    ColumnElement,
    DateTime,
    Interval,
    Result,
    Update,
    Uuid,
    and_,
    bindparam,
    case,
    exists,
    func,
    or_,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.costs import Budget
from app.deliberation.results import Completed, Evaluated, Judged, PairOutcome, PairTry, Sample, Thought
from app.plan import JobPlan, read_plan
from app.store import callbacks, policy_sets, prompt_sets
from app.store.db import Sessions, driver_connection, driver_of
from app.store.driver_statements import DriverStatement, insert_from, insert_rows_from
from app.store.endings import (
    CANCELLED,
    COMPLETED,
    WORKER_LOST,
    WORKER_SILENT,
    Ending,
    after_outage,
    ending_values,
    failed,
)
from app.store.models import (
    Cot,
    ImportedSample,
    Item,
    ItemStatus,
    Job,
    Judgement,
    PairCandidate,
    PolicySetRow,
    PreferencePair,
    PromptSetRow,
    SampleEvaluation,
    TurnRow,
    sql_constant,
)


@dataclass(frozen=True)
class Claim:
    item_id: UUID
    job_id: UUID
    attempt: int
    position: int
    prompt: str
    plan: JobPlan
    policy_set: PolicySetRow
    prompt_set: PromptSetRow
    notifies: bool  # the job names a callback: the ending that finishes it writes its delivery
    budget: Budget | None  # the job's when claimed (later changes reach the item by its turns)


class ClaimLost(Exception):
    """The lease is gone: it expired and another worker may hold the item now."""


class JobCancelled(ClaimLost):
    """The item's job was cancelled while the item ran."""


def claim_holds(item_id: Any, attempt: Any) -> ColumnElement[bool]:
    """SQL condition: the item is still held under the claim with this attempt counter (values,
    or bindparam()s in a driver statement). Every write under a claim is conditional on it."""
    return and_(Item.id == item_id, Item.attempts == attempt, Item.status == ItemStatus.RUNNING)


@dataclass(frozen=True)
class Limits:
    """When an item stops being retried."""

    lease_s: int
    max_claims: int  # claims, less those handed back while the LLM was down (bounded by time)
    max_failures: int  # claims lost to a dead worker or an unexpected error


# A claim's fields, by name, as both claim statements return them (the sets are read by id).
_CLAIMED = (
    Item.attempts.label("attempt"),
    Item.position,
    Item.prompt,
    Job.id.label("job_id"),
    Job.plan,
    Job.policy_set_id,
    Job.prompt_set_id,
    Job.callback_url.is_not(None).label("notifies"),
    Job.budget_max_cost_usd,
    Job.budget_max_tokens,
)


def _claim_update(*conditions: ColumnElement[bool], values: dict[str, Any]) -> Update:
    """UPDATE the item where `conditions` hold (its job joined), returning the claim's fields."""
    return update(Item).where(*conditions, Job.id == Item.job_id).values(values).returning(*_CLAIMED)


def _claiming_values(lease: Any, holder: Any) -> dict[str, Any]:
    """What a claim writes on the item row; `lease`: a timedelta, or a bindparam() of one;
    `holder`: the claiming worker's id (or its bindparam())."""
    return {
        "status": ItemStatus.RUNNING,
        "attempts": Item.attempts + 1,
        "lease_until": func.now() + lease,
        "claimed_by": holder,
        "updated_at": func.now(),
    }


def _claim(
    item_id: UUID, row: Mapping[Any, Any], plan: JobPlan, sets: tuple[PolicySetRow, PromptSetRow]
) -> Claim:
    """The claim from a row of _CLAIMED (its plan and its job's sets read by the caller)."""
    return Claim(
        item_id,
        row["job_id"],
        row["attempt"],
        row["position"],
        row["prompt"],
        plan,
        *sets,
        row["notifies"],
        Budget.of(row["budget_max_cost_usd"], row["budget_max_tokens"]),
    )


async def claim(
    sessions: Sessions, item_id: UUID, limits: Limits, holder: UUID | None = None
) -> Claim | None:
    """Take the item if it is queued or its lease expired; None if there is nothing to do.
    `holder`: the claiming worker, whose heartbeat keeps the item (None: its lease alone)."""
    async with driver_connection(sessions) as connection:
        row = await _CLAIM_QUEUED.fetchrow(
            connection,
            item_id=item_id,
            lease=timedelta(seconds=limits.lease_s),
            holder=holder,
            max_claims=limits.max_claims,
            max_failures=limits.max_failures,
        )
    if row is not None:
        # The driver returns the plan's JSON, decoded: the ORM's column type is not applied.
        plan = read_plan(row["plan"])
        async with sessions.begin() as session:  # a job older than prompt sets may write the built-in one
            sets = await _sets_of(session, row["policy_set_id"], row["prompt_set_id"])
        return _claim(item_id, row, plan, sets)
    return await _claim_or_settle(sessions, item_id, limits, holder)


# The usual case in one round trip: a queued item of a live job, with tries left. Anything
# else (an expired lease, a cancelled job, no tries left) takes _claim_or_settle.
_CLAIM_QUEUED = DriverStatement(
    _claim_update(
        Item.id == bindparam("item_id"),
        Item.status == ItemStatus.QUEUED,
        Item.attempts - Item.outage_claims < bindparam("max_claims"),
        Item.failures < bindparam("max_failures"),
        Job.cancelled_at.is_(None),
        values=_claiming_values(bindparam("lease", type_=Interval), bindparam("holder", type_=Uuid)),
    )
)


async def _sets_of(
    session: AsyncSession, policy_set_id: UUID, prompt_set_id: UUID | None
) -> tuple[PolicySetRow, PromptSetRow]:
    """The policy set and the prompt set a job pinned."""
    return await policy_sets.by_id(session, policy_set_id), await prompt_sets.of_job(session, prompt_set_id)


async def _claim_or_settle(
    sessions: Sessions, item_id: UUID, limits: Limits, holder: UUID | None
) -> Claim | None:
    """The general claim: also takes over an expired lease, and ends an item whose job was
    cancelled or whose tries are spent instead of running it."""
    async with sessions.begin() as session:
        row = (
            await session.execute(
                select(Item, Job)
                .join(Job, Job.id == Item.job_id)
                .where(Item.id == item_id)
                .with_for_update(of=Item)
            )
        ).one_or_none()
        if row is None:
            return None
        item, job = row
        lease_expired = (
            item.status == ItemStatus.RUNNING
            and item.lease_until is not None
            and item.lease_until < (await session.execute(select(func.now()))).scalar_one()
        )
        if item.status != ItemStatus.QUEUED and not lease_expired:
            return None
        # An expired lease: its worker died before the sweeper noticed.
        handed_back = ending_values(WORKER_LOST) if lease_expired else {}
        ending = _no_claim_left(job, item, lease_expired, limits)
        if ending is not None:
            await session.execute(
                update(Item).where(Item.id == item_id).values(handed_back | ending_values(ending)),
                execution_options={"synchronize_session": False},
            )
            if job.callback_url is not None:
                await callbacks.record_if_finished(session, job.id)
            return None
        claimed = await session.execute(
            _claim_update(
                Item.id == item_id,
                values=handed_back | _claiming_values(timedelta(seconds=limits.lease_s), holder),
            ),
            execution_options={"synchronize_session": False},
        )
        sets = await _sets_of(session, job.policy_set_id, job.prompt_set_id)  # no second connection
        return _claim(item_id, claimed.one()._mapping, job.plan, sets)


def _no_claim_left(job: Job, item: Item, lease_expired: bool, limits: Limits) -> Ending | None:
    """How the item ends instead of being claimed, if it does: its job was cancelled, or its
    tries are spent. An expired lease is a failure, and then the last one."""
    if job.cancelled_at is not None:
        return CANCELLED
    if lease_expired:
        failures, last, detail = item.failures + 1, WORKER_LOST.message, WORKER_LOST.detail
    else:
        failures, last, detail = item.failures, item.error_message or "unknown", item.operator_error
    if failures >= limits.max_failures:
        return failed("too_many_failures", f"{failures} failed attempts; last: {last}", detail)
    if (claims := item.attempts - item.outage_claims) >= limits.max_claims:
        return failed("too_many_attempts", f"gave up after {claims} attempts; last: {last}", detail)
    return None


async def renew(sessions: Sessions, claim: Claim, lease_s: int) -> None:
    """Extend the lease; raises ClaimLost if the item is no longer ours or was cancelled."""
    async with sessions.begin() as session:
        cancelled = await session.scalar(select(Job.cancelled_at).where(Job.id == claim.job_id))
        if cancelled is not None:
            raise JobCancelled(f"job {claim.job_id} was cancelled")
        renewed = await session.execute(
            update(Item)
            .where(claim_holds(claim.item_id, claim.attempt))
            .values(lease_until=func.now() + timedelta(seconds=lease_s))
            .returning(Item.id)
        )
        if renewed.first() is None:
            raise ClaimLost(f"lease on item {claim.item_id} lost")


async def end(sessions: Sessions, claim: Claim, ending: Ending) -> Ending | None:
    """End the claim without a result: failed, cancelled, or handed back to the queue. The
    ending written (CANCELLED if the job was: write_ending), or None if the item is no longer
    held under this claim (another worker has it now) and nothing was written."""
    async with sessions.begin() as session:
        return await write_ending(session, claim, ending)


def _outage_start(max_counted_wait: timedelta) -> ColumnElement[Any]:
    """When the LLM became unavailable to the item, as an outage's hand-back writes it, for
    now() less it to be how long the LLM was seen unavailable to it: now, if this starts a
    run of outages or the item got an answer since the run began. Else the run's start, moved
    later by any wait in the queue since the last outage beyond `max_counted_wait`: an item
    held up by a backlog waited for a worker, not for the LLM, and one blip on its next claim
    must not fail it. The claim's own time counts: it was trying the LLM."""
    last_seen = type_coerce(
        # The later of the two: an item an older release put back has no last_seen (GREATEST
        # skips a NULL), and one left from an earlier run of outages precedes this run.
        func.greatest(Item.llm_unavailable_seen_at, Item.llm_unavailable_since),
        DateTime(timezone=True),
    )
    # updated_at: this claim's start (a claim writes it, and nothing else while it holds).
    waited_too_long = func.greatest(Item.updated_at - last_seen - max_counted_wait, timedelta(0))
    return case(
        (
            or_(
                Item.llm_unavailable_since.is_(None),
                exists().where(TurnRow.item_id == Item.id, TurnRow.created_at > Item.llm_unavailable_since),
            ),
            func.now(),
        ),
        else_=Item.llm_unavailable_since + waited_too_long,
    )


async def end_in_outage(
    sessions: Sessions,
    claim: Claim,
    summary: str,
    detail: str,
    max_outage: timedelta,
    max_counted_wait: timedelta,
) -> Ending | None:
    """End the claim after the LLM stayed unavailable to it (`summary`, `detail`: the fault's):
    back to the queue, or failed once the LLM has been seen unavailable to the item for longer
    than `max_outage` (endings.after_outage; `max_counted_wait`: see _outage_start); cancelled
    if its job was (write_ending). The ending written, or None if the item is no longer held
    under this claim and nothing was."""
    async with sessions.begin() as session:
        unavailable_for = await session.scalar(
            update(Item)
            .where(claim_holds(claim.item_id, claim.attempt))
            .values(llm_unavailable_since=_outage_start(max_counted_wait), llm_unavailable_seen_at=func.now())
            .returning(type_coerce(func.now() - Item.llm_unavailable_since, Interval))
        )
        if unavailable_for is None:
            return None
        return await write_ending(session, claim, after_outage(summary, detail, unavailable_for, max_outage))


async def write_ending(session: AsyncSession, claim: Claim, ending: Ending) -> Ending | None:
    """In the caller's transaction: write the ending on the item if the claim holds (and the
    job's delivery, if that finished a job that names a callback); the ending written, or None
    if the claim no longer holds and nothing was.

    A cancelled job's item ends cancelled, whatever fault ended its claim: as its next claim
    would end it had the claim been handed back (_no_claim_left puts the cancel before spent
    tries). Only a completion stands, its results kept."""
    if ending.status == ItemStatus.COMPLETED:
        written = await _written(session, claim, ending)
    else:
        written = await _written(session, claim, ending, Job.id == Item.job_id, Job.cancelled_at.is_(None))
        if written is None:  # its job was cancelled, or the claim no longer holds
            written = await _written(session, claim, CANCELLED)
    if written is not None and written.finished and claim.notifies:
        await callbacks.record_if_finished(session, claim.job_id)
    return written


async def _written(
    session: AsyncSession, claim: Claim, ending: Ending, *conditions: ColumnElement[bool]
) -> Ending | None:
    """`ending`, if it was written on the item: the claim holds, and `conditions` too."""
    ended = await session.execute(
        update(Item)
        .where(claim_holds(claim.item_id, claim.attempt), *conditions)
        .values(ending_values(ending))
        .returning(Item.id)
    )
    return ending if ended.first() is not None else None


async def complete(sessions: Sessions, claim: Claim, result: Completed) -> Ending | None:
    """Store the CoT (with its grade and gate) and the preference pair attempt, and mark the
    item completed, in one statement. COMPLETED, or None if the item is not ours (nothing
    written). A replay writes nothing."""
    rows: dict[str, Any] = {"cots": _cot_row(claim, result)}
    statement = _COMPLETE
    if result.pair is not None:
        rows["preference_pairs"] = _pair_row(
            claim, result.pair, result.grade.scores if result.grade else None
        )
        rows["pair_candidates"] = [_candidate_row(c) for c in result.pair.candidates()]
        statement = _COMPLETE_WITH_PAIR
    async with _completing(sessions, claim) as connection:
        done = await statement.fetchval(connection, item_id=claim.item_id, attempt=claim.attempt, **rows)
    return COMPLETED if done else None


@asynccontextmanager
async def _completing(sessions: Sessions, claim: Claim) -> AsyncIterator[asyncpg.Connection]:
    """The connection to complete the claimed item on: in autocommit; or, for a job that
    names a callback, in a transaction that then writes the job's delivery if this item
    finished the job."""
    if not claim.notifies:
        async with driver_connection(sessions) as connection:
            yield connection
        return
    async with sessions.begin() as session:
        connection = await session.connection()
        # SQLAlchemy begins its transaction at its first statement: a statement sent on the
        # driver's connection before that would run outside it.
        await connection.exec_driver_sql("SELECT 1")
        async with driver_of(connection) as driver:
            yield driver
        await callbacks.record_if_finished(session, claim.job_id)


def _completion(*tables: Any, row_sets: Sequence[Any] = ()) -> DriverStatement:
    """The ORM path took a transaction, an UPDATE and one INSERT per table, and was a fifth
    of a worker's CPU; this is one round trip. The item is marked completed only while the
    claim holds, and the rows of `tables` (each with a unique item_id) and of `row_sets` (any
    number an item, unique on their primary key; their item and job filled in) exist only if
    it was."""
    done = (
        update(Item)
        .where(claim_holds(bindparam("item_id"), bindparam("attempt")))
        .values(ending_values(COMPLETED))
        .returning(Item.id, Item.job_id)
        .cte("done")
    )
    writes = [
        insert_from(table.__table__, done, item_id=done.c.id)
        .on_conflict_do_nothing(index_elements=["item_id"])
        .cte(f"{table.__tablename__}_written")
        for table in tables
    ]
    writes += [
        insert_rows_from(table.__table__, done, item_id=done.c.id, job_id=done.c.job_id)
        .on_conflict_do_nothing(index_elements=[c.name for c in table.__table__.primary_key])
        .cte(f"{table.__tablename__}_written")
        for table in row_sets
    ]
    return DriverStatement(select(exists().select_from(done)).add_cte(*writes))


_COMPLETE = _completion(Cot)
_COMPLETE_WITH_PAIR = _completion(Cot, PreferencePair, row_sets=[PairCandidate])


def _new_row_of(claim: Claim) -> dict[str, Any]:
    """The columns a result row shares with its item (the item's job and position)."""
    return {"id": uuid4(), "job_id": claim.job_id, "position": claim.position}


_THOUGHT_FIELDS = tuple(f.name for f in fields(Thought))


def _cot_row(claim: Claim, result: Completed) -> dict[str, Any]:
    grade, gate = result.grade, result.gate
    return {
        **_new_row_of(claim),
        "policy_set_id": claim.policy_set.id,
        "policy_set_name": claim.policy_set.name,
        "policy_set_version": claim.policy_set.version,
        "prompt_set_id": claim.prompt_set.id,
        "prompt_set_name": claim.prompt_set.name,
        "prompt_set_version": claim.prompt_set.version,
        "intents": result.intents,
        # Not asdict (a deep copy, 1 % of a worker's CPU): a thought's fields are flat.
        "thoughts": [{name: getattr(t, name) for name in _THOUGHT_FIELDS} for t in result.thoughts],
        "refined_thoughts": result.refined_thoughts,
        "dropped_thoughts": result.dropped,
        "unaccounted_thought_ids": result.unaccounted,
        "response": result.response,
        "rounds_used": result.rounds_used,
        "agreed": result.agreed,
        "agreed_by": result.agreed_by,
        "scores": grade.scores if grade else None,
        "grade_error": grade.error if grade else None,
        "accepted": gate.accepted if gate else None,
        "gate_reasons": gate.reasons if gate else None,
        "fallbacks": result.fallbacks,
    }


def _pair_row(claim: Claim, pair: PairOutcome, chosen_scores: dict[str, Any] | None) -> dict[str, Any]:
    rejected, grade = pair.rejected, pair.rejected_grade
    return {
        **_new_row_of(claim),
        "paired": pair.made,
        "reason": pair.reason,
        "gap": pair.gap,
        "chosen_scores": chosen_scores,
        "rejected_scores": grade.scores if grade else None,
        "rejected_grade_error": grade.error if grade else None,
        "belief": rejected.belief if rejected else None,
        "rejected_thoughts": rejected.rejected.thoughts if rejected and rejected.rejected else None,
        "rejected_response": rejected.rejected.response if rejected and rejected.rejected else None,
        "guard": asdict(rejected.guard) if rejected and rejected.guard else None,
        "tries": [_try_json(t) for t in (*pair.tries, *pair.baseline)],
    }


def _try_json(pair_try: PairTry) -> dict[str, Any]:
    """A try as stored with its pair: its grade is the candidate's (rationales in the turns)."""
    return {k: v for k, v in asdict(pair_try).items() if k != "grade"}


def _candidate_row(candidate: PairTry) -> dict[str, Any]:
    scores = candidate.grade.scores if candidate.grade else None
    return {
        "method": candidate.method,
        "number": candidate.number,
        "flagged": candidate.guard.unsafe if candidate.guard else None,
        "rejected_scores": {m: s["score"] for m, s in scores.items()} if scores else None,
        "gap": candidate.gap,
    }


async def complete_judged(sessions: Sessions, claim: Claim, judgements: list[Judged]) -> Ending | None:
    """Store a comparison item's judgements, one per judge in the plan's order, and mark it
    completed in one transaction. COMPLETED, or None if the item is not ours (nothing written)."""
    async with sessions.begin() as session:
        if not await write_ending(session, claim, COMPLETED):
            return None
        a_item_id, b_item_id = _linked(Item.baseline_item_id, claim), _linked(Item.candidate_item_id, claim)
        await session.execute(
            insert(Judgement)
            .values(
                [
                    {
                        "item_id": claim.item_id,
                        "judge": judge,
                        "job_id": claim.job_id,
                        "position": claim.position,
                        "a_item_id": a_item_id,
                        "b_item_id": b_item_id,
                        "winner": judged.winner,
                        "votes": [asdict(v) for v in judged.votes],
                    }
                    for judge, judged in enumerate(judgements)
                ]
            )
            .on_conflict_do_nothing(index_elements=["item_id", "judge"])
        )
        return COMPLETED


async def complete_with(
    sessions: Sessions, claim: Claim, table: Any, values: dict[str, Any]
) -> Ending | None:
    """Mark the claimed item completed and set `values` on its row of `table` (a model with a
    unique item_id, written with the item), in one transaction. COMPLETED, or None if the
    item is not ours (nothing written)."""
    async with sessions.begin() as session:
        if not await write_ending(session, claim, COMPLETED):
            return None
        await session.execute(update(table).where(table.item_id == claim.item_id).values(values))
        return COMPLETED


def _linked(link: Any, claim: Claim) -> Any:
    """The claimed item's `link` (a comparison item's sample item), as a scalar subquery."""
    return select(link).where(Item.id == claim.item_id).scalar_subquery()


async def compared_samples(sessions: Sessions, claim: Claim) -> tuple[Sample, Sample]:
    """The two samples a comparison item judges: its baseline and candidate items' CoTs
    (which exist: a comparison is made of items with a CoT, and CoTs are never deleted)."""
    baseline, candidate = aliased(Cot), aliased(Cot)
    async with sessions() as session:
        pair = await session.execute(
            select(baseline, candidate)
            .select_from(Item)
            .join(baseline, baseline.item_id == Item.baseline_item_id)
            .join(candidate, candidate.item_id == Item.candidate_item_id)
            .where(Item.id == claim.item_id)
        )
        baseline_cot, candidate_cot = pair.one()
    return _sample(baseline_cot), _sample(candidate_cot)


def _sample(cot: Cot) -> Sample:
    return Sample([t["text"] for t in cot.refined_thoughts], cot.response)


async def evaluated_samples(sessions: Sessions, claim: Claim) -> tuple[Sample, Sample | None]:
    """The imported sample a sample-evaluation item evaluates, and the other set's sample of
    its prompt that the judge compares it with (None: none matched): an imported sample, or
    a generation job's CoT. Both exist: they were matched at import, and neither is deleted
    while this item points at it."""
    other = aliased(ImportedSample)
    async with sessions() as session:
        own, other_sample, other_cot = (
            await session.execute(
                select(ImportedSample, other, Cot)
                .select_from(Item)
                .join(ImportedSample, ImportedSample.item_id == Item.id)
                .outerjoin(other, other.item_id == Item.baseline_item_id)
                .outerjoin(Cot, Cot.item_id == Item.baseline_item_id)
                .where(Item.id == claim.item_id)
            )
        ).one()
    against = None
    if other_sample is not None:
        against = Sample(other_sample.thoughts, other_sample.response)
    elif other_cot is not None:
        against = _sample(other_cot)
    return Sample(own.thoughts, own.response), against


async def complete_evaluated(sessions: Sessions, claim: Claim, evaluated: Evaluated) -> Ending | None:
    """Store a sample-evaluation item's result and mark it completed in one transaction.
    COMPLETED, or None if the item is not ours (nothing written)."""
    grade, verdict, judged = evaluated.grade, evaluated.guard, evaluated.judged
    async with sessions.begin() as session:
        if not await write_ending(session, claim, COMPLETED):
            return None
        await session.execute(
            insert(SampleEvaluation)
            .values(
                item_id=claim.item_id,
                job_id=claim.job_id,
                position=claim.position,
                scores=grade.scores if grade else None,
                grade_error=grade.error if grade else None,
                guard=asdict(verdict) if verdict else None,
                winner=judged.winner if judged else None,
                votes=[asdict(v) for v in judged.votes] if judged else None,
            )
            .on_conflict_do_nothing(index_elements=["item_id"])
        )
        return COMPLETED


async def running_holders(sessions: Sessions) -> list[UUID]:
    """The workers holding running items (by their claims), for the sweeper to check their
    heartbeats."""
    async with sessions() as session:
        rows = await session.scalars(
            select(Item.claimed_by).where(Item.status == sql_constant(ItemStatus.RUNNING)).distinct()
        )
        return [holder for holder in rows if holder is not None]  # None: a claim without one


async def take_lost_claims(
    sessions: Sessions, dead_holders: Sequence[UUID] = (), limit: int = 1000
) -> list[tuple[UUID, int]]:
    """Running items whose worker is gone: its heartbeat stopped (`dead_holders`), or it
    stopped renewing the lease. Back to queued, the lost claim counted as a failure, and a new
    enqueue counter for a fresh arq id."""
    async with sessions.begin() as session:
        taken = []
        if dead_holders:
            taken += await _take_running(session, Item.claimed_by.in_(dead_holders), WORKER_SILENT, limit)
        taken += await _take_running(session, Item.lease_until < func.now(), WORKER_LOST, limit)
        return taken


async def _take_running(
    session: AsyncSession, condition: ColumnElement[bool], ending: Ending, limit: int
) -> list[tuple[UUID, int]]:
    stale = (
        select(Item.id)
        .where(Item.status == sql_constant(ItemStatus.RUNNING), condition)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = await session.execute(
        update(Item)
        .where(Item.id.in_(stale))
        .values(ending_values(ending) | {"enqueues": Item.enqueues + 1})
        .returning(Item.id, Item.enqueues)
    )
    return [(row.id, row.enqueues) for row in rows]


async def queued_unclaimed(sessions: Sessions, grace_s: int, limit: int = 2000) -> list[tuple[UUID, int]]:
    """Queued items older than the grace period, oldest first (their arq job may be lost)."""
    async with sessions() as session:
        rows = await session.execute(
            # Items of cancelled jobs too: a claim is what ends them as cancelled.
            select(Item.id, Item.enqueues)
            .where(
                Item.status == sql_constant(ItemStatus.QUEUED),
                Item.updated_at < func.now() - timedelta(seconds=grace_s),
            )
            .order_by(Item.updated_at)
            .limit(limit)
        )
        return [(row.id, row.enqueues) for row in rows]


async def take_back_unclaimed(sessions: Sessions, jobs: Sequence[tuple[UUID, int]]) -> list[tuple[UUID, int]]:
    """Queued items still waiting on these arq jobs ((item id, enqueue counter) pairs), taken
    by a worker that died before claiming them: a new enqueue counter for a fresh arq id. Not
    a failure: no claim was lost."""
    if not jobs:
        return []
    async with sessions.begin() as session:
        rows = await session.execute(
            update(Item)
            .where(tuple_(Item.id, Item.enqueues).in_(jobs), Item.status == ItemStatus.QUEUED)
            .values(enqueues=Item.enqueues + 1, updated_at=func.now())
            .returning(Item.id, Item.enqueues)
        )
        return [(row.id, row.enqueues) for row in rows]


# Items to enqueue by their job's owner key (each key's share in line: app/queue.py).
ByOwner = dict[UUID | None, list[tuple[UUID, int]]]


def by_owner(rows: Result[UUID, int, UUID]) -> ByOwner:
    """(item id, enqueue counter) pairs grouped by owner key, from rows of (id, enqueues,
    owner_key_id)."""
    grouped: ByOwner = {}
    for row in rows:
        grouped.setdefault(row.owner_key_id, []).append((row.id, row.enqueues))
    return grouped


async def touch(sessions: Sessions, item_ids: list[UUID]) -> None:
    """Mark queued items as checked now."""
    if item_ids:
        async with sessions.begin() as session:
            await session.execute(
                update(Item)
                .where(Item.id.in_(item_ids), Item.status == ItemStatus.QUEUED)
                .values(updated_at=func.now())
            )


async def renumber(sessions: Sessions, item_ids: list[UUID]) -> ByOwner:
    """Give queued items a new arq job id (their old one is lost) and mark them checked now."""
    if not item_ids:
        return {}
    async with sessions.begin() as session:
        rows = await session.execute(
            update(Item)
            .where(Item.job_id == Job.id, Item.id.in_(item_ids), Item.status == ItemStatus.QUEUED)
            .values(updated_at=func.now(), enqueues=Item.enqueues + 1)
            .returning(Item.id, Item.enqueues, Job.owner_key_id)
        )
        return by_owner(rows)
