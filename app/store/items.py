"""Items as workers see them: claim with a lease, renew it, and finish exactly once.

The claim token is the item's attempt counter: every write after the claim is
conditional on it, so a worker that lost its lease (paused, partitioned, presumed dead)
cannot overwrite the work of the worker that took the item over.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import orjson
from sqlalchemy import and_, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.results import Completed, Judged, PairOutcome, Sample
from app.store import policy_sets
from app.store.comparisons import BASELINE_ITEM, CANDIDATE_ITEM
from app.store.db import Sessions, driver_connection
from app.store.models import Cot, Item, Job, Judgement, PolicySetRow


@dataclass(frozen=True)
class Claim:
    item_id: UUID
    job_id: UUID
    attempt: int
    position: int
    prompt: str
    metadata: dict[str, Any]
    config: dict[str, Any]
    policy_set: PolicySetRow


class ClaimLost(Exception):
    """The lease is gone: it expired and another worker may hold the item now."""


class JobCancelled(ClaimLost):
    """The item's job was cancelled while the item ran."""


def _lease(seconds: int) -> Any:
    return func.now() + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Limits:
    """When an item stops being retried."""

    lease_s: int
    max_claims: int  # all claims, including those handed back while the LLM was down
    max_failures: int  # claims lost to a dead worker or an unexpected error


async def claim(sessions: Sessions, item_id: UUID, limits: Limits) -> Claim | None:
    """Take the item if it is queued or its lease expired; None if there is nothing to do."""
    async with driver_connection(sessions) as connection:
        row = await connection.fetchrow(
            _CLAIM_QUEUED, item_id, limits.lease_s, limits.max_claims, limits.max_failures
        )
    if row is not None:
        attempt, position, prompt, metadata, job_id, config, policy_set_id = row
        policy_set = await _policy_set(sessions, policy_set_id)
        return Claim(item_id, job_id, attempt, position, prompt, metadata, config, policy_set)
    return await _claim_or_settle(sessions, item_id, limits)


# The usual case in one round trip: a queued item of a live job, with tries left. Anything
# else (an expired lease, a cancelled job, no tries left) takes _claim_or_settle.
_CLAIM_QUEUED = """
UPDATE items
SET status = 'running', attempts = items.attempts + 1,
    lease_until = now() + make_interval(secs => $2), updated_at = now()
FROM jobs
WHERE items.id = $1 AND items.status = 'queued' AND items.attempts < $3 AND items.failures < $4
  AND jobs.id = items.job_id AND jobs.cancelled_at IS NULL
RETURNING items.attempts, items.position, items.prompt, items.metadata,
          jobs.id, jobs.config, jobs.policy_set_id
"""


async def _policy_set(sessions: Sessions, policy_set_id: UUID) -> PolicySetRow:
    async with sessions() as session:
        return await policy_sets.by_id(session, policy_set_id)


async def _claim_or_settle(sessions: Sessions, item_id: UUID, limits: Limits) -> Claim | None:
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
            item.status == "running"
            and item.lease_until is not None
            and item.lease_until < await session.scalar(select(func.now()))
        )
        if item.status != "queued" and not lease_expired:
            return None
        if lease_expired:  # its worker died before the sweeper noticed
            item.failures += 1
            item.error_message, item.operator_error = "worker lost (lease expired)", None
        if job.cancelled_at is not None:
            _finish(item, "cancelled")
            return None
        last = item.error_message or "unknown"
        if item.failures >= limits.max_failures:
            _finish(item, "failed", "too_many_failures", f"{item.failures} failed attempts; last: {last}")
            return None
        if item.attempts >= limits.max_claims:
            _finish(
                item, "failed", "too_many_attempts", f"gave up after {item.attempts} attempts; last: {last}"
            )
            return None
        item.status, item.attempts = "running", item.attempts + 1
        item.lease_until, item.updated_at = _lease(limits.lease_s), func.now()
        policy_set = await policy_sets.by_id(session, job.policy_set_id)  # no second connection
        return Claim(
            item.id,
            job.id,
            item.attempts,
            item.position,
            item.prompt,
            item.item_metadata,
            job.config,
            policy_set,
        )


def _finish(item: Item, status: str, code: str | None = None, message: str | None = None) -> None:
    item.status, item.lease_until = status, None
    item.error_code, item.error_message = code, message
    item.finished_at = item.updated_at = func.now()


def claimed(claim: Claim) -> Any:
    """SQL condition: the item is still held under this claim (turn_log._RECORD spells
    the same condition out in SQL)."""
    return and_(Item.id == claim.item_id, Item.attempts == claim.attempt, Item.status == "running")


async def renew(sessions: Sessions, claim: Claim, lease_s: int) -> None:
    """Extend the lease; raises ClaimLost if the item is no longer ours or was cancelled."""
    async with sessions.begin() as session:
        cancelled = await session.scalar(select(Job.cancelled_at).where(Job.id == claim.job_id))
        if cancelled is not None:
            raise JobCancelled(f"job {claim.job_id} was cancelled")
        renewed = await session.execute(
            update(Item).where(claimed(claim)).values(lease_until=_lease(lease_s)).returning(Item.id)
        )
        if renewed.first() is None:
            raise ClaimLost(f"lease on item {claim.item_id} lost")


async def release(
    sessions: Sessions, claim: Claim, reason: str, *, failed: bool, detail: str | None = None
) -> None:
    """Hand the item back to the queue; its turns stay. `failed` counts the attempt against
    max_failures (an unexpected error); an LLM outage or a shutdown does not. `reason` is
    shown to the tenant; `detail` (an upstream's answer, an exception) only to operators."""
    values: dict[str, Any] = {
        "status": "queued",
        "lease_until": None,
        "error_message": reason,
        "operator_error": detail,
    }
    if failed:
        values["failures"] = Item.failures + 1
    async with sessions.begin() as session:
        await session.execute(update(Item).where(claimed(claim)).values(**values, updated_at=func.now()))


async def end(
    sessions: Sessions,
    claim: Claim,
    status: str,
    code: str | None,
    message: str | None,
    detail: str | None = None,
) -> bool:
    """Finish without a CoT: failed with a recorded reason, or cancelled. False if the item
    is no longer held under this claim (another worker has it now). `message` is shown to
    the tenant; `detail` only to operators."""
    async with sessions.begin() as session:
        ended = await session.execute(
            update(Item)
            .where(claimed(claim))
            .values(
                status=status,
                lease_until=None,
                error_code=code,
                error_message=message,
                operator_error=detail,
                finished_at=func.now(),
                updated_at=func.now(),
            )
            .returning(Item.id)
        )
        return ended.first() is not None


async def complete(sessions: Sessions, claim: Claim, result: Completed) -> bool:
    """Store the CoT (with its grade and gate) and the preference pair attempt, and mark the
    item completed, in one statement; False if the item is not ours. A replay writes nothing."""
    grade, gate, pair = result.grade, result.gate, result.pair
    pair_row = _pair_row(pair, grade.scores if grade else None) if pair else {}
    async with driver_connection(sessions) as connection:
        return await connection.fetchval(
            _COMPLETE,
            claim.item_id,
            claim.attempt,
            uuid4(),
            claim.job_id,
            claim.position,
            claim.policy_set.id,
            claim.policy_set.name,
            claim.policy_set.version,
            _json(result.intents),
            _json([asdict(t) for t in result.thoughts]),
            _json(result.refined_thoughts),
            _json(result.dropped),
            _json(result.unaccounted),
            result.response,
            result.rounds_used,
            result.agreed,
            orjson.dumps(result.agreed_by).decode(),  # JSON null when no one agreed, as before
            _json(grade.scores if grade else None),
            grade.error if grade else None,
            gate.accepted if gate else None,
            _json(gate.reasons if gate else None),
            pair is not None,
            uuid4(),
            *(_json(v) if k in _PAIR_JSON else v for k, v in ((k, pair_row.get(k)) for k in _PAIR_COLUMNS)),
        )


def _json(value: Any) -> str | None:
    """A jsonb parameter as JSON text; None stays SQL NULL."""
    return None if value is None else orjson.dumps(value).decode()


_PAIR_COLUMNS = (
    "kept",
    "reason",
    "gap",
    "chosen_scores",
    "rejected_scores",
    "rejected_grade_error",
    "belief",
    "rejected_thoughts",
    "rejected_response",
    "guard",
    "tries",
)
_PAIR_JSON = frozenset({"chosen_scores", "rejected_scores", "rejected_thoughts", "guard", "tries"})

# The ORM path took a transaction, an UPDATE and one INSERT per table, and was a fifth of a
# worker's CPU; this is one round trip. The item is marked done only while the claim holds
# (the same condition as `claimed`), and the CoT and pair rows exist only if it was.
# Spelled out like turn_log._RECORD: a column added to cots or preference_pairs belongs here.
_COMPLETE = """
WITH done AS (
    UPDATE items SET status = 'completed', stage = 'done', lease_until = NULL, error_code = NULL,
                     error_message = NULL, operator_error = NULL, finished_at = now(), updated_at = now()
    WHERE id = $1 AND attempts = $2 AND status = 'running'
    RETURNING id
), cot AS (
    INSERT INTO cots (id, item_id, job_id, position, policy_set_id, policy_set_name, policy_set_version,
                      intents, thoughts, refined_thoughts, dropped_thoughts, unaccounted_thought_ids,
                      response, rounds_used, agreed, agreed_by, scores, grade_error, accepted, gate_reasons)
    SELECT $3, id, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11::jsonb, $12::jsonb, $13::jsonb,
           $14, $15, $16, $17::jsonb, $18::jsonb, $19, $20, $21::jsonb
    FROM done
    ON CONFLICT (item_id) DO NOTHING
), pair AS (
    INSERT INTO preference_pairs (id, item_id, job_id, position, kept, reason, gap, chosen_scores,
                                  rejected_scores, rejected_grade_error, belief, rejected_thoughts,
                                  rejected_response, guard, tries)
    SELECT $23, id, $4, $5, $24, $25, $26, $27::jsonb, $28::jsonb, $29, $30, $31::jsonb, $32, $33::jsonb,
           $34::jsonb
    FROM done WHERE $22
    ON CONFLICT (item_id) DO NOTHING
)
SELECT EXISTS (SELECT FROM done)
"""


def _pair_row(pair: PairOutcome, chosen_scores: dict[str, Any] | None) -> dict[str, Any]:
    rejected, grade = pair.rejected, pair.rejected_grade
    return {
        "kept": pair.kept,
        "reason": pair.reason,
        "gap": pair.gap,
        "chosen_scores": chosen_scores,
        "rejected_scores": grade.scores if grade else None,
        "rejected_grade_error": grade.error if grade else None,
        "belief": rejected.belief if rejected else None,
        "rejected_thoughts": rejected.rejected.thoughts if rejected and rejected.rejected else None,
        "rejected_response": rejected.rejected.response if rejected and rejected.rejected else None,
        "guard": asdict(rejected.guard) if rejected and rejected.guard else None,
        "tries": [asdict(t) for t in pair.tries],
    }


async def complete_judged(sessions: Sessions, claim: Claim, judged: Judged) -> bool:
    """Store a comparison item's judgement and mark it completed in one transaction; False
    if the item is not ours."""
    async with sessions.begin() as session:
        position = await _mark_completed(session, claim)
        if position is None:
            return False
        await session.execute(
            insert(Judgement)
            .values(
                item_id=claim.item_id,
                job_id=claim.job_id,
                position=position,
                a_item_id=UUID(claim.metadata[BASELINE_ITEM]),
                b_item_id=UUID(claim.metadata[CANDIDATE_ITEM]),
                winner=judged.winner,
                votes=[asdict(v) for v in judged.votes],
            )
            .on_conflict_do_nothing(index_elements=["item_id"])
        )
        return True


async def _mark_completed(session: AsyncSession, claim: Claim) -> int | None:
    """The item's position, or None if it is no longer held under this claim."""
    mine = await session.execute(
        update(Item)
        .where(claimed(claim))
        .values(
            status="completed",
            stage="done",
            lease_until=None,
            error_code=None,
            error_message=None,
            operator_error=None,
            finished_at=func.now(),
            updated_at=func.now(),
        )
        .returning(Item.position)
    )
    return mine.scalar_one_or_none()


async def compared_samples(sessions: Sessions, claim: Claim) -> tuple[Sample, Sample]:
    """The two samples a comparison item judges: its baseline and candidate items' CoTs
    (which exist: a comparison is made of items with a CoT, and CoTs are never deleted)."""
    ids = [UUID(claim.metadata[BASELINE_ITEM]), UUID(claim.metadata[CANDIDATE_ITEM])]
    async with sessions() as session:
        cots = {cot.item_id: cot for cot in await session.scalars(select(Cot).where(Cot.item_id.in_(ids)))}
    baseline, candidate = (cots[item_id] for item_id in ids)
    return _sample(baseline), _sample(candidate)


def _sample(cot: Cot) -> Sample:
    return Sample([t["text"] for t in cot.refined_thoughts], cot.response)


async def take_expired_leases(sessions: Sessions, limit: int = 1000) -> list[tuple[UUID, int]]:
    """Items whose worker stopped renewing: back to queued, the lost claim counted as a
    failure, and a new enqueue counter for a fresh arq id."""
    async with sessions.begin() as session:
        stale = (
            select(Item.id)
            .where(Item.status == "running", Item.lease_until < func.now())
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = await session.execute(
            update(Item)
            .where(Item.id.in_(stale))
            .values(
                status="queued",
                lease_until=None,
                failures=Item.failures + 1,
                error_message="worker lost (lease expired)",
                operator_error=None,
                enqueues=Item.enqueues + 1,
                updated_at=func.now(),
            )
            .returning(Item.id, Item.enqueues)
        )
        return [(row.id, row.enqueues) for row in rows]


async def queued_unclaimed(sessions: Sessions, grace_s: int, limit: int = 2000) -> list[tuple[UUID, int]]:
    """Queued items older than the grace period, oldest first (their arq job may be lost)."""
    async with sessions() as session:
        rows = await session.execute(
            # Items of cancelled jobs too: a claim is what ends them as cancelled.
            select(Item.id, Item.enqueues)
            .where(Item.status == "queued", Item.updated_at < func.now() - timedelta(seconds=grace_s))
            .order_by(Item.updated_at)
            .limit(limit)
        )
        return [(row.id, row.enqueues) for row in rows]


async def touch(sessions: Sessions, item_ids: list[UUID], *, bump_enqueues: bool) -> list[tuple[UUID, int]]:
    """Mark queued items as checked now (and optionally give them a new arq id)."""
    if not item_ids:
        return []
    values: dict[str, Any] = {"updated_at": func.now()}
    if bump_enqueues:
        values["enqueues"] = Item.enqueues + 1
    async with sessions.begin() as session:
        rows = await session.execute(
            update(Item)
            .where(Item.id.in_(item_ids), Item.status == "queued")
            .values(**values)
            .returning(Item.id, Item.enqueues)
        )
        return [(row.id, row.enqueues) for row in rows]
