"""Model evaluation jobs: benchmark prompts answered by models under test, each answer
judged for safety and for refusal; and the counts a report is made of, in SQL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import orjson
from sqlalchemy import Text, cast, func, select
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.ports import Stage
from app.deliberation.results import JudgedAnswer
from app.errors import NotFound
from app.plan import ModelEvaluationPlan
from app.store import jobs
from app.store.db import Sessions, copy_rows
from app.store.endings import Ending
from app.store.items import Claim, complete_with
from app.store.models import Item, ItemStatus, Job, ModelAnswer
from app.threads import in_thread


@dataclass(frozen=True)
class NewCase:
    """A benchmark prompt, asked of every target."""

    benchmark: str
    category: str
    expected: str  # refuse | comply
    prompt: str
    metadata: dict[str, Any]


async def create(
    session: AsyncSession,
    request: jobs.JobRequest,
    *,
    policy_set_id: UUID,
    prompt_set_id: UUID,
    plan: ModelEvaluationPlan,
    cases: Sequence[NewCase],
) -> tuple[Job, list[UUID]]:
    """The job, an item per (case, target) and its answer row, in the caller's transaction.
    Returns (job, new item ids: empty for a replay).

    An item per (prompt, target) rather than per prompt: each claim asks one model, so an
    outage of one target's endpoint delays only its own items, a resumed item replays one
    target's turns, and every turn key stays (stage, 0, 0). Items are numbered prompt by
    prompt, the targets of one prompt side by side, so a job cut short has asked every
    target the same prompts."""
    targets = len(plan.targets)
    job, created = await jobs.create(
        session,
        request,
        policy_set_id=policy_set_id,
        prompt_set_id=prompt_set_id,
        plan=plan,
        item_count=len(cases) * targets,
        idempotency_scope="model_evaluation",
    )
    if not created:
        return job, []
    asked = [(case, target) for case in cases for target in range(targets)]
    new_items = [jobs.NewItem(n, case.prompt, case.metadata) for n, (case, _) in enumerate(asked)]
    ids = await jobs.copy_items(session, job.id, new_items, stage=Stage.RESPOND.value)
    # In a worker thread: 10,000 rows' ids held the event loop for 20 ms.
    answers = await in_thread(
        lambda: [
            (
                uuid4(),
                item_id,
                job.id,
                request.owner_key_id,
                target,
                case.benchmark,
                case.category,
                case.expected,
            )
            for item_id, (case, target) in zip(ids, asked, strict=True)
        ]
    )
    columns = ["id", "item_id", "job_id", "owner_key_id", "target", "benchmark", "category", "expected"]
    await copy_rows(session, ModelAnswer.__tablename__, columns, answers)
    return job, ids


def plan_of(job: Job) -> ModelEvaluationPlan:
    """The model evaluation's plan; NotFound if the job is not one."""
    if not isinstance(job.plan, ModelEvaluationPlan):
        raise NotFound(f"model evaluation {job.id} not found")
    return job.plan


async def target_of(sessions: Sessions, claim: Claim) -> int:
    """The number of the target the claimed item asks."""
    async with sessions() as session:
        target = await session.scalar(select(ModelAnswer.target).where(ModelAnswer.item_id == claim.item_id))
    assert target is not None  # written with the item
    return target


async def complete(sessions: Sessions, claim: Claim, evaluated: JudgedAnswer) -> Ending | None:
    """Store the verdicts on the item's answer and mark it completed, in one transaction;
    COMPLETED, or None if the item is not ours (nothing written)."""
    verdicts = {
        "finish_reason": evaluated.finish_reason,
        "unsafe": evaluated.safety.unsafe,
        "refused": evaluated.refusal.refused,
        "judged_at": func.now(),
    }
    return await complete_with(sessions, claim, ModelAnswer, verdicts)


@dataclass(frozen=True)
class Tally:
    """One (target, benchmark, category, expected) cell of a model evaluation."""

    target: int
    benchmark: str
    category: str
    expected: str
    items: int
    completed: int
    failed: int
    safety_judged: int  # completed with a readable safety verdict
    safe: int
    refusal_judged: int  # completed with a readable refusal verdict
    refused: int
    truncated: int  # answers the server cut at max_tokens


async def tally_rows(session: AsyncSession, job: Job) -> str:
    """The job's answers counted per (target, benchmark, category, expected), in that order,
    as the JSON text of a list of rows for tallies_of (a row per category and target:
    thousands, made into tallies off the event loop; read as rows on it, 10,000 of them held
    it for 10-20 ms of CPU). Reads the owner's rows only (the job is the owner's: `job` was
    read for its key)."""
    completed = Item.status == ItemStatus.COMPLETED
    done = ModelAnswer.judged_at.is_not(None) & completed
    count = func.count()
    cell = (ModelAnswer.target, ModelAnswer.benchmark, ModelAnswer.category, ModelAnswer.expected)
    counted = (
        select(
            *cell,
            count.label("items"),
            count.filter(completed).label("completed"),
            count.filter(Item.status == ItemStatus.FAILED).label("failed"),
            count.filter(done & ModelAnswer.unsafe.is_not(None)).label("safety_judged"),
            count.filter(done & ModelAnswer.unsafe.is_(False)).label("safe"),
            count.filter(done & ModelAnswer.refused.is_not(None)).label("refusal_judged"),
            count.filter(done & ModelAnswer.refused.is_(True)).label("refused"),
            count.filter(done & (ModelAnswer.finish_reason == "length")).label("truncated"),
        )
        .join(Item, Item.id == ModelAnswer.item_id)
        .where(ModelAnswer.job_id == job.id, ModelAnswer.owner_key_id == job.owner_key_id)
        .group_by(*cell)
        .subquery()
    )
    in_order = aggregate_order_by(func.row_to_json(counted.table_valued()), *(counted.c[c.key] for c in cell))
    listed = await session.scalar(select(cast(func.json_agg(in_order), Text)).select_from(counted))
    return listed or "[]"


def tallies_of(rows: str) -> list[Tally]:
    """tally_rows' rows as tallies."""
    return [Tally(**row) for row in orjson.loads(rows)]
