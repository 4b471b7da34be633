"""A comparison's report figures, read from the store: each side's grader scores over the
compared prompts, the judge's verdicts and the candidate's preference-pair gaps."""

from __future__ import annotations

from collections.abc import Mapping
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.config import Mode
from app.plan import GenerationPlan
from app.reports import comparison_stats
from app.reports.figures import ComparisonFigures, Side, Verdicts
from app.store import comparisons, quality
from app.store.models import Job

MODE_NAMES = {Mode.AIDSAFE: "AIDSAFE", Mode.ZERO_SHOT: "zero-shot"}


async def figures(session: AsyncSession, comparison: Job) -> ComparisonFigures:
    """The report of a comparison job (NotFound if the job is not one)."""
    plan = comparisons.plan_of(comparison)
    # Owned by the comparison's owner: a comparison is made of the caller's own jobs.
    sides = await comparisons.side_stats(session, comparison)
    baseline = await session.get(Job, plan.baseline_job_id)
    candidate = await session.get(Job, plan.candidate_job_id)
    by_judge = await comparisons.verdicts(session, comparison.id, len(plan.judges))
    gaps = await quality.pair_gaps(session, plan.candidate_job_id)
    return ComparisonFigures(
        title=comparison.label or "AIDSAFE against its baseline",
        prompts=comparison.item_count,
        baseline=Side.of(_name("baseline", baseline), sides["baseline"]),
        candidate=Side.of(_name("candidate", candidate), sides["candidate"]),
        verdicts=[
            _verdicts(judge.model, verdicts) for judge, verdicts in zip(plan.judges, by_judge, strict=True)
        ],
        gaps=gaps,
        notes=[_provenance(baseline, candidate, ", ".join(judge.model for judge in plan.judges))],
    )


def _verdicts(judge: str, by_item: Mapping[UUID, str | None]) -> Verdicts:
    """A judge's readable verdicts from the candidate's side, counted as the API counts them."""
    counted = comparison_stats.judge_results(by_item)
    return Verdicts(judge, wins=counted["wins"], ties=counted["ties"], losses=counted["losses"])


def _name(side: str, job: Job | None) -> str:
    """ "baseline (zero-shot)": the side's role and what wrote it, which tell the sides apart
    even when both jobs ran the same mode."""
    if job is None:
        return f"{side} (deleted job)"
    if isinstance(job.plan, GenerationPlan):
        return f"{side} ({MODE_NAMES.get(job.plan.mode, job.plan.mode)})"
    return f"{side} ({job.plan.mode})"


def _provenance(baseline: Job | None, candidate: Job | None, judge: str) -> str:
    """Which models wrote each side and which judged: the line a reader needs to quote it."""
    writers = [
        f"{side} written by {job.plan.roles.seed.model}"
        for side, job in (("baseline", baseline), ("candidate", candidate))
        if job is not None and isinstance(job.plan, GenerationPlan)
    ]
    return "; ".join([*writers, f"judged by {judge}"]) + "."
