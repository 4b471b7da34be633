"""Comparison jobs: judge models compare, prompt by prompt, the samples two jobs wrote
(a baseline and a candidate), as in the paper's LLM_ZS vs AIDSAFE evaluation."""

from __future__ import annotations

from collections import Counter
from typing import Any
from uuid import UUID

from sqlalchemy import Integer, Uuid, cast, func, insert, literal, select
from sqlalchemy.dialects.postgresql import aggregate_order_by, array, distinct_on
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.deliberation.results import METRICS
from app.errors import NoCommonPrompts, NotFound
from app.plan import ComparisonPlan
from app.store import jobs, quality
from app.store.models import Cot, Item, Job, Judgement


async def create(
    session: AsyncSession,
    request: jobs.JobRequest,
    *,
    baseline: Job,
    candidate: Job,
    plan: ComparisonPlan,
) -> tuple[Job, list[UUID]]:
    """A comparison job whose items are the prompts both jobs have a CoT for (matched by
    exact text; the first by position among duplicates), in the baseline's order, written in
    the caller's transaction. Returns (job, new item ids: empty for a replay); raises
    NoCommonPrompts if no prompt matches. The judge reads the candidate's policy set, in the
    words of its prompt set."""
    job, created = await jobs.create(
        session,
        request,
        policy_set_id=candidate.policy_set_id,
        prompt_set_id=candidate.prompt_set_id,
        plan=plan,
        item_count=0,  # known once the matching rows are in
        idempotency_scope="comparisons",
    )
    if not created:
        return job, []
    a, b = _first_cot_per_prompt(baseline.id), _first_cot_per_prompt(candidate.id)
    item = {
        "id": func.gen_random_uuid(),
        "job_id": literal(job.id, Uuid),
        "position": func.row_number().over(order_by=a.c.position) - 1,
        "prompt": a.c.prompt,
        "metadata": func.jsonb_build_object(),  # the user's, and the user gave none
        "baseline_item_id": a.c.item_id,
        "candidate_item_id": b.c.item_id,
        "stage": literal("judge"),
    }
    matched = select(*item.values()).select_from(a).join(b, b.c.prompt == a.c.prompt)
    ids = list(await session.scalars(insert(Item).from_select(list(item), matched).returning(Item.id)))
    if not ids:
        raise NoCommonPrompts(
            f"jobs {baseline.id} and {candidate.id} have no completed prompt in common (exact text)"
        )
    job.item_count = len(ids)
    await session.flush()
    return job, ids


async def longest_prompt(session: AsyncSession, job_id: UUID) -> str:
    """The job's longest prompt in bytes (what the token estimate counts); "" if it has none."""
    query = select(Item.prompt).where(Item.job_id == job_id).order_by(func.octet_length(Item.prompt).desc())
    return await session.scalar(query.limit(1)) or ""


def _first_cot_per_prompt(job_id: UUID) -> Any:
    return (
        select(Item.prompt, Cot.item_id, Cot.position)
        .join(Item, Item.id == Cot.item_id)
        .where(Cot.job_id == job_id)
        .ext(distinct_on(Item.prompt))
        .order_by(Item.prompt, Cot.position)
        .subquery()
    )


def plan_of(job: Job) -> ComparisonPlan:
    """The comparison's plan; NotFound if the job is not a comparison."""
    if not isinstance(job.plan, ComparisonPlan):
        raise NotFound(f"comparison {job.id} not found")
    return job.plan


async def side_stats(session: AsyncSession, comparison: Job) -> dict[str, dict[str, dict[str, Any]]]:
    """{"baseline"|"candidate": quality.metric_stats} over each side's matched prompts."""
    sides = {}
    for side, link in (("baseline", Item.baseline_item_id), ("candidate", Item.candidate_item_id)):
        matched = select(link).where(Item.job_id == comparison.id)
        sides[side] = await quality.metric_stats(session, Cot.item_id.in_(matched))
    return sides


async def paired_score_counts(
    session: AsyncSession, comparison_id: UUID
) -> dict[str, Counter[tuple[int | None, int | None]]]:
    """Per metric, how many compared prompts got each pair of grader scores (baseline,
    candidate), counted in SQL: at most 36 rows a metric where reading a row per prompt held
    the event loop for 40 ms at 10,000 prompts. None for a side whose CoT is ungraded (its job
    ran without grading, or the grader failed)."""
    sides = aliased(Cot), aliased(Cot)
    metric = func.unnest(array(METRICS)).table_valued("metric").render_derived("metrics")
    baseline, candidate = (cast(cot.scores[metric.c.metric]["score"].astext, Integer) for cot in sides)
    rows = await session.execute(
        select(metric.c.metric, baseline, candidate, func.count())
        .select_from(Item)
        .join(sides[0], sides[0].item_id == Item.baseline_item_id)
        .join(sides[1], sides[1].item_id == Item.candidate_item_id)
        .join(metric, literal(True))
        .where(Item.job_id == comparison_id)
        .group_by(metric.c.metric, baseline, candidate)
    )
    counts: dict[str, Counter[tuple[int | None, int | None]]] = {name: Counter() for name in METRICS}
    for name, baseline_score, candidate_score, count in rows:
        counts[name][baseline_score, candidate_score] = count
    return counts


async def verdict_patterns(
    session: AsyncSession, comparison_id: UUID, judges: int
) -> Counter[tuple[str, ...]]:
    """Over the items every judge gave a readable verdict: how many items got each pattern of
    verdicts (the judges' in the plan's order, as `verdict_counts` names them), counted in SQL.
    All the judges' agreement needs, in at most 3**judges rows where reading a row per prompt
    and judge (50,000 at 10,000 prompts and 5 judges) held the event loop."""
    by_item = (
        select(func.array_agg(aggregate_order_by(Judgement.winner, Judgement.judge)).label("verdicts"))
        .where(Judgement.job_id == comparison_id)
        .group_by(Judgement.item_id)
        .having(func.count(Judgement.winner) == judges)  # a row per judge (unique), none unreadable
        .subquery()
    )
    rows = await session.execute(select(by_item.c.verdicts, func.count()).group_by(by_item.c.verdicts))
    return Counter({tuple(verdicts): count for verdicts, count in rows})


async def verdict_counts(
    session: AsyncSession, comparison_id: UUID, judges: int
) -> list[Counter[str | None]]:
    """Each judge's verdicts (in the plan's order) counted by what they are: "a" (the
    baseline), "b" (the candidate), "tie", or None (no readable verdict in both orders), in
    SQL: all a report needs, without reading a row per prompt and judge on the event loop."""
    rows = await session.execute(
        select(Judgement.judge, Judgement.winner, func.count())
        .where(Judgement.job_id == comparison_id)
        .group_by(Judgement.judge, Judgement.winner)
    )
    by_judge: list[Counter[str | None]] = [Counter() for _ in range(judges)]
    for judge, winner, count in rows:
        by_judge[judge][winner] = count
    return by_judge
