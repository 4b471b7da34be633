"""Sample evaluations: samples written elsewhere, imported as a job's items (the prompt and
metadata on the item, the rest in `samples`), then graded, guarded and/or judged against the
other set's sample of each prompt. The report's figures are counted in SQL."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import orjson
from sqlalchemy import Subquery, Text, bindparam, case, cast, column, exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, distinct_on
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.ports import Stage
from app.deliberation.quality import sample_text_bytes
from app.errors import InvalidConfig, NoCommonPrompts, NotFound
from app.plan import ComparisonPlan, SampleEvaluationPlan
from app.sample_files import Sample
from app.store import jobs, quality
from app.store.db import copy_rows
from app.store.models import Cot, ImportedSample, Item, Job, SampleEvaluation
from app.threads import in_thread


def _first_stage(plan: SampleEvaluationPlan) -> str:
    """The stage a sample's item runs first: what its progress shows until then (the items
    column's default, the intent stage, is one a sample evaluation never runs)."""
    return (Stage.GRADE if plan.grader else Stage.GUARD if plan.guard else Stage.JUDGE).value


@dataclass(frozen=True)
class OtherSample:
    """The other job's sample a judge reads with a prompt: its item, and its UTF-8 bytes as
    the judge is shown it (`sample_text` of what items.evaluated_samples reads)."""

    item_id: UUID
    shown_bytes: int


async def submit(
    session: AsyncSession,
    request: jobs.JobRequest,
    *,
    policy_set_id: UUID,
    prompt_set_id: UUID,
    plan: SampleEvaluationPlan,
    samples: Sequence[Sample],
    against: Sequence[OtherSample | None],
) -> tuple[Job, list[UUID]]:
    """Write the job, an item and a sample row per sample, and (with a judge) each item's
    link to the other set's sample of its prompt, `against` (other_samples, per sample), all
    in the caller's transaction: nothing is stored unless everything is. Returns (job, new
    item ids: empty for a replay); raises NoCommonPrompts if the judge's other set has none
    of the prompts."""
    if plan.against_job_id is not None:
        # A deletion of it waits, then refuses. Held before the key (jobs.create), as a
        # deletion holds them: the other way round, each waited for the other.
        await jobs.hold(session, plan.against_job_id)
    job, created = await jobs.create(
        session,
        request,
        policy_set_id=policy_set_id,
        prompt_set_id=prompt_set_id,
        plan=plan,
        item_count=len(samples),
        idempotency_scope="samples",
    )
    if not created:
        return job, []
    new_items = [jobs.NewItem(position, s.prompt, s.metadata) for position, s in enumerate(samples)]
    ids = await jobs.copy_items(session, job.id, new_items, stage=_first_stage(plan))
    # In a worker thread: 10,000 rows' ids and thoughts held the event loop for 25 ms.
    rows = await in_thread(
        lambda: [
            (uuid4(), item_id, job.id, position, json.dumps(s.thoughts), s.response, s.label)
            for position, (item_id, s) in enumerate(zip(ids, samples, strict=True))
        ]
    )
    columns = ["id", "item_id", "job_id", "position", "thoughts", "response", "label"]
    await copy_rows(session, ImportedSample.__tablename__, columns, rows)
    if plan.against_job_id is not None and not await _link_other_set(session, ids, against):
        none = f"job {plan.against_job_id} has a sample of none of these prompts (exact text)"
        raise NoCommonPrompts(none)
    return job, ids


async def other_set(session: AsyncSession, job_id: UUID, owner_key_id: UUID) -> Job:
    """The job whose samples the judge compares with: this key's sample evaluation or
    generation job (NotFound for another key's); InvalidConfig for a comparison."""
    job = await jobs.get_owned(session, job_id, owner_key_id)
    if isinstance(job.plan, ComparisonPlan):
        raise InvalidConfig(f"job {job_id} is a comparison: it has no samples to judge against")
    return job


async def _link_other_set(
    session: AsyncSession, item_ids: Sequence[UUID], against: Sequence[OtherSample | None]
) -> int:
    """Point each item at the other job's sample the submission checked for it, not at the one
    _judged_against would find now: a CoT the other job finished since would be judged
    unchecked (one too long failing its item at run time). How many have one."""
    links = [
        (item, other.item_id) for item, other in zip(item_ids, against, strict=True) if other is not None
    ]
    if not links:
        return 0
    uuids = ARRAY(PG_UUID(as_uuid=True))
    linked = (
        func.unnest(
            bindparam("item_ids", [item for item, _ in links], type_=uuids),
            bindparam("other_ids", [other for _, other in links], type_=uuids),
        )
        .table_valued("item_id", "other_id")
        .render_derived("linked")
    )
    await session.execute(
        update(Item)
        .where(Item.id == linked.c.item_id)
        .values(baseline_item_id=linked.c.other_id)
        .execution_options(synchronize_session=False)
    )
    return len(links)


def _judged_against(other_job_id: UUID) -> Subquery:
    """(prompt, item id): the other job's item a judge reads for each prompt, matched by
    exact text: the first by position among its items with a sample."""
    has_sample = or_(
        exists().where(ImportedSample.item_id == Item.id), exists().where(Cot.item_id == Item.id)
    )
    return (
        select(Item.prompt, Item.id)
        .where(Item.job_id == other_job_id, has_sample)
        .ext(distinct_on(Item.prompt))
        .order_by(Item.prompt, Item.position)
        .subquery()
    )


async def other_samples(
    session: AsyncSession, other_job_id: UUID, prompts: Sequence[str]
) -> list[OtherSample | None]:
    """Per prompt, the other job's sample a judge reads with it (_judged_against); None where
    it has none. The sizes are counted in SQL: the other job's samples may be many and long,
    and none is read."""
    asked = (
        func.unnest(bindparam("prompts", list(prompts), type_=ARRAY(Text)))
        .table_valued("prompt", with_ordinality="position")
        .render_derived("asked")
    )
    first = _judged_against(other_job_id)
    imported = ImportedSample.id.is_not(None)  # preferred to a CoT, as evaluated_samples does
    imported_thoughts = func.jsonb_array_elements_text(ImportedSample.thoughts).table_valued("value")
    cot_thoughts = func.jsonb_array_elements(Cot.refined_thoughts).table_valued(column("value", JSONB))
    thought_bytes = case(
        (imported, select(func.sum(func.octet_length(imported_thoughts.c.value))).scalar_subquery()),
        else_=select(func.sum(func.octet_length(cot_thoughts.c.value["text"].astext))).scalar_subquery(),
    )
    thoughts = case(
        (imported, func.jsonb_array_length(ImportedSample.thoughts)),
        else_=func.jsonb_array_length(Cot.refined_thoughts),
    )
    response_bytes = func.octet_length(case((imported, ImportedSample.response), else_=Cot.response))
    rows = (
        await session.execute(
            select(asked.c.position, first.c.id, thoughts, func.coalesce(thought_bytes, 0) + response_bytes)
            .select_from(asked)
            .join(first, first.c.prompt == asked.c.prompt)
            .outerjoin(ImportedSample, ImportedSample.item_id == first.c.id)
            .outerjoin(Cot, Cot.item_id == first.c.id)
        )
    ).all()

    def shown() -> list[OtherSample | None]:
        found: list[OtherSample | None] = [None] * len(prompts)
        for position, item_id, count, text_bytes in rows:
            found[position - 1] = OtherSample(item_id, sample_text_bytes(count, text_bytes))
        return found

    return await in_thread(shown)


def plan_of(job: Job) -> SampleEvaluationPlan:
    """The sample evaluation's plan; NotFound if the job is not one."""
    if not isinstance(job.plan, SampleEvaluationPlan):
        raise NotFound(f"sample evaluation {job.id} not found")
    return job.plan


async def result_of(
    session: AsyncSession, job: Job, item_id: UUID
) -> tuple[Item, ImportedSample, SampleEvaluation | None]:
    """One of the job's samples with its result (None until it completes); NotFound if the
    item is not one of the job's."""
    row = (
        await session.execute(
            select(Item, ImportedSample, SampleEvaluation)
            .join(ImportedSample, ImportedSample.item_id == Item.id)
            .outerjoin(SampleEvaluation, SampleEvaluation.item_id == Item.id)
            .where(Item.id == item_id, Item.job_id == job.id)
        )
    ).one_or_none()
    if row is None:
        raise NotFound(f"sample {item_id} of evaluation {job.id} not found")
    return row[0], row[1], row[2]


async def grades(session: AsyncSession, job_id: UUID) -> dict[str, Any]:
    """Samples graded and ungraded (the grader failed), and per metric the score counts."""
    graded, failed = (
        await session.execute(
            select(func.count(SampleEvaluation.scores), func.count(SampleEvaluation.grade_error)).where(
                SampleEvaluation.job_id == job_id
            )
        )
    ).one()
    metrics = await quality.metric_stats(session, SampleEvaluation.job_id == job_id, SampleEvaluation)
    return {"graded": graded, "grade_failed": failed, "metrics": metrics}


async def guard_verdicts(session: AsyncSession, job_id: UUID) -> str:
    """The guard's verdicts counted per sample label, as one JSON text for guard_counts."""
    unsafe = SampleEvaluation.guard["unsafe"].as_boolean()
    per_label = (
        select(
            ImportedSample.label,
            func.count().filter(unsafe.is_(True)),
            func.count().filter(unsafe.is_(False)),
            func.count().filter(unsafe.is_(None)),
        )
        .join(ImportedSample, ImportedSample.item_id == SampleEvaluation.item_id)
        .where(SampleEvaluation.job_id == job_id, SampleEvaluation.guard.is_not(None))
        .group_by(ImportedSample.label)
        .subquery()
    )
    listed = await session.scalar(
        select(cast(func.json_agg(func.json_build_array(*per_label.c)), Text)).select_from(per_label)
    )
    return listed or "[]"


def guard_counts(verdicts: str) -> dict[str | None, dict[str, int]]:
    """Per sample label (None: unlabelled), the guard's verdicts (guard_verdicts' text):
    unsafe, safe, unreadable. CPU for a worker thread, its session given back first: the
    labels are the client's, and 10,000 rows of them, read and made into dicts on the event
    loop, held it for 15-30 ms."""
    return {label: {"unsafe": u, "safe": s, "unreadable": n} for label, u, s, n in orjson.loads(verdicts)}


async def pairwise_counts(session: AsyncSession, job_id: UUID) -> dict[str, int]:
    """The judge's verdicts from this set's side (it is `b`): wins, ties, losses, unreadable;
    and the samples whose prompt the other set lacks (unmatched)."""
    rows = await session.execute(
        select(SampleEvaluation.winner, func.count())
        .where(SampleEvaluation.job_id == job_id, SampleEvaluation.votes.is_not(None))
        .group_by(SampleEvaluation.winner)
    )
    by_winner = {winner: count for winner, count in rows}
    unmatched = await session.scalar(
        select(func.count()).where(Item.job_id == job_id, Item.baseline_item_id.is_(None))
    )
    return {
        "wins": by_winner.get("b", 0),
        "ties": by_winner.get("tie", 0),
        "losses": by_winner.get("a", 0),
        "unreadable": by_winner.get(None, 0),
        "unmatched": unmatched or 0,
    }
