"""A comparison's report figures, read from the store: each side's grader scores over the
compared prompts, the judge's verdicts and the candidate's preference-pair gaps."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.config import Mode
from app.plan import ComparisonPlan, GenerationPlan
from app.reports import comparison_stats
from app.reports.figures import ComparisonFigures, Side, Verdicts
from app.store import comparisons, quality
from app.store.models import Job
from app.threads import in_thread

MODE_NAMES = {Mode.AIDSAFE: "AIDSAFE", Mode.ZERO_SHOT: "zero-shot"}


@dataclass(frozen=True)
class _Stored:
    """What a comparison's report is computed from, as the store gives it."""

    comparison: Job
    plan: ComparisonPlan
    sides: dict[str, dict[str, dict[str, Any]]]
    baseline: Job | None
    candidate: Job | None
    by_judge: list[Counter[str | None]]
    gaps: dict[str, Counter[float]]


async def report[T](session: AsyncSession, comparison: Job, lay_out: Callable[[ComparisonFigures], T]) -> T:
    """The report of a comparison job laid out by `lay_out` (a renderer; NotFound if the job
    is not a comparison). The queries run on the event loop, and count in SQL rather than read a
    row per prompt or pair candidate; the figures and their layout in a worker thread: some
    milliseconds of intervals, and a page's or a plot's layout. The session's connection is
    given back before: waiting for a thread of the shared pool, behind other requests' work, a
    request held it in an open transaction (a caller reads no more with it after)."""
    computed = await read(session, comparison)
    await session.close()
    return await in_thread(lambda: lay_out(computed()))


async def figures(session: AsyncSession, comparison: Job) -> ComparisonFigures:
    """The report of a comparison job, for a caller that lays it out itself (NotFound if the
    job is not one); its session closed, as `report` closes it."""
    return await report(session, comparison, lambda computed: computed)


async def read(session: AsyncSession, comparison: Job) -> Callable[[], ComparisonFigures]:
    """The report's figures of a comparison job, read now (NotFound if the job is not one), to
    be computed by the callable with no more reads: some milliseconds of intervals, for a
    worker thread."""
    return partial(_figures, await _read(session, comparison))


async def _read(session: AsyncSession, comparison: Job) -> _Stored:
    plan = comparisons.plan_of(comparison)
    # Owned by the comparison's owner: a comparison is made of the caller's own jobs.
    return _Stored(
        comparison,
        plan,
        sides=await comparisons.side_stats(session, comparison),
        baseline=await session.get(Job, plan.baseline_job_id),
        candidate=await session.get(Job, plan.candidate_job_id),
        by_judge=await comparisons.verdict_counts(session, comparison.id, len(plan.judges)),
        gaps=await quality.pair_gap_counts(session, plan.candidate_job_id),
    )


def _figures(stored: _Stored) -> ComparisonFigures:
    baseline, candidate, judges = stored.baseline, stored.candidate, stored.plan.judges
    return ComparisonFigures(
        title=stored.comparison.label or "AIDSAFE against its baseline",
        prompts=stored.comparison.item_count,
        baseline=Side.of(_name("baseline", baseline), stored.sides["baseline"]),
        candidate=Side.of(_name("candidate", candidate), stored.sides["candidate"]),
        verdicts=[
            _verdicts(judge.model, verdicts) for judge, verdicts in zip(judges, stored.by_judge, strict=True)
        ],
        gaps=stored.gaps,
        notes=[_provenance(baseline, candidate, ", ".join(judge.model for judge in judges))],
    )


def _verdicts(judge: str, counts: Counter[str | None]) -> Verdicts:
    """A judge's readable verdicts from the candidate's side, counted as the API counts them."""
    counted = comparison_stats.counted_results(counts)
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
