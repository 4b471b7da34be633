"""Quality figures of a job, aggregated in SQL: grader scores, the quality gate, preference
pairs, their candidates' gaps and LLM usage by stage. Nothing here loads per-item rows into
Python (the gaps come counted per value)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any
from uuid import UUID

from sqlalchemy import ColumnElement, Integer, Numeric, String, and_, case, cast, column, func, select, true
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.ports import TurnOutcome
from app.deliberation.results import GAP_SCALE
from app.stats import mean, proportion
from app.store.models import Cot, PairCandidate, PreferencePair, SampleEvaluation, TurnRow, sql_constant

SCORES = range(1, 6)
Graded = type[Cot] | type[SampleEvaluation]  # the tables with the grader's scores


def _score_entries(graded: Graded = Cot) -> Any:
    """(metric, value) rows of the `graded` table's scores, joined laterally to each row."""
    return (
        func.jsonb_each(graded.scores).table_valued(column("key", String), column("value", JSONB)).lateral()
    )


async def metric_stats(session: AsyncSession, cots: Any, graded: Graded = Cot) -> dict[str, dict[str, Any]]:
    """{metric: {"mean", "distribution": {"1".."5": count}}} over the graded rows of `graded`
    (CoTs, or imported samples' evaluations) that match the SQL condition `cots`."""
    entry = _score_entries(graded)
    score = cast(entry.c.value["score"].astext, Integer)
    rows = await session.execute(
        select(entry.c.key, score, func.count())
        .select_from(graded)
        .join(entry, true())
        .where(cots)
        .group_by(entry.c.key, score)
    )
    counts: dict[str, dict[int, int]] = {}
    for metric, value, count in rows:
        counts.setdefault(metric, {})[value] = count
    return {
        metric: {
            "mean": sum(value * n for value, n in by_score.items()) / sum(by_score.values()),
            "distribution": {str(value): by_score.get(value, 0) for value in SCORES},
        }
        for metric, by_score in sorted(counts.items())
    }


async def grading(session: AsyncSession, job_id: UUID) -> dict[str, Any]:
    """Graded, ungraded (grader failed), accepted and rejected CoTs, and per-metric stats."""
    row = (
        await session.execute(
            select(
                func.count(Cot.scores),
                func.count(Cot.grade_error),
                func.count().filter(Cot.accepted.is_(True)),
                func.count().filter(Cot.accepted.is_(False)),
            ).where(Cot.job_id == job_id)
        )
    ).one()
    return {
        "graded": row[0],
        "grade_failed": row[1],
        "accepted": row[2],
        "rejected": row[3],
        "metrics": await metric_stats(session, Cot.job_id == job_id),
    }


async def below_threshold(
    session: AsyncSession, job_id: UUID, thresholds: Mapping[str, float]
) -> dict[str, int]:
    """Why CoTs were rejected: per gated metric (a key of `thresholds`, the job's gate), how
    many scored under its threshold."""
    if not thresholds:
        return {}
    entry = _score_entries()
    threshold = case(thresholds, value=entry.c.key)  # NULL for a metric not gated: no row
    rows = await session.execute(
        select(entry.c.key, func.count())
        .select_from(Cot)
        .join(entry, true())
        .where(Cot.job_id == job_id, cast(entry.c.value["score"].astext, Numeric) < threshold)
        .group_by(entry.c.key)
        .order_by(entry.c.key)
    )
    return {metric: count for metric, count in rows}


# Why a made pair is not kept at a reader's min_gap (the engine records every gap).
GAP_BELOW_THRESHOLD = "gap_below_threshold"


def kept_at(min_gap: float | None) -> ColumnElement[bool]:
    """SQL: the pair was made and its gap is at least `min_gap` (None: any made pair)."""
    if min_gap is None:
        return PreferencePair.paired.is_(True)
    return and_(PreferencePair.paired.is_(True), PreferencePair.gap >= min_gap)


async def pairs(session: AsyncSession, job_id: UUID, min_gap: float) -> dict[str, Any]:
    """Pair attempts, pairs kept at `min_gap`, attempts not kept by reason, and the mean gap
    of the kept pairs."""
    kept = kept_at(min_gap)
    rows = await session.execute(
        select(kept, PreferencePair.reason, func.count(), func.avg(PreferencePair.gap))
        .where(PreferencePair.job_id == job_id)
        .group_by(kept, PreferencePair.reason)
    )
    summary: dict[str, Any] = {"attempted": 0, "kept": 0, "not_kept": {}, "mean_gap": None}
    for is_kept, reason, count, mean_gap in rows:
        summary["attempted"] += count
        if is_kept:
            summary["kept"], summary["mean_gap"] = count, mean_gap
        else:
            summary["not_kept"][reason or GAP_BELOW_THRESHOLD] = count
    return summary | {"min_gap": min_gap}


# Every gap integer scores 1-5 can give (a difference of two means of two scores): -4 to 4
# by 0.5. The report counts candidates per gap, each a bin 0.5 wide.
GAP_BINS = tuple(half / 2 for half in range(2 * GAP_SCALE[0], 2 * GAP_SCALE[1] + 1))  # 0.5 wide


# (method, flagged, gap, count) of a job's pair candidates: candidate_rows' rows.
CandidateRows = list[tuple[str, bool | None, float | None, int]]


async def candidate_rows(session: AsyncSession, job_id: UUID) -> CandidateRows:
    """The job's pair candidates counted per sampling method, guard verdict and gap, for
    candidate_stats."""
    rows = await session.execute(
        select(PairCandidate.method, PairCandidate.flagged, PairCandidate.gap, func.count())
        .where(PairCandidate.job_id == job_id)
        .group_by(PairCandidate.method, PairCandidate.flagged, PairCandidate.gap)
    )
    return [(method, flagged, gap, count) for method, flagged, gap, count in rows]


def candidate_stats(rows: CandidateRows, methods: Sequence[str]) -> dict[str, Any]:
    """Per sampling method in `methods`: the rejected sides the guard was asked about, how
    many it gave a verdict on, the share it flagged, and the distribution and mean of their
    gaps (all graded ones, and the flagged ones: the rejected sides pairs are made of). CPU
    for a worker thread, its session given back first: a mean's interval reads every value."""
    stats: dict[str, Any] = {}
    for method in methods:
        counted = [(flagged, gap, n) for m, flagged, gap, n in rows if m == method]
        judged = sum(n for flagged, _, n in counted if flagged is not None)
        stats[method] = {
            "candidates": sum(n for _, _, n in counted),
            "judged": judged,
            "flagged": asdict(proportion(sum(n for flagged, _, n in counted if flagged), judged)),
            "gap": _gaps([(gap, n) for _, gap, n in counted]),
            "flagged_gap": _gaps([(gap, n) for flagged, gap, n in counted if flagged]),
        }
    return stats


def _gaps(counted: list[tuple[float | None, int]]) -> dict[str, Any]:
    """The mean gap with its interval, and the count per gap bin, over the graded ones."""
    values = [gap for gap, n in counted if gap is not None for _ in range(n)]
    bins = Counter(round(value * 2) / 2 for value in values)
    return {
        "mean": asdict(mean(values, within=GAP_SCALE)),
        "bins": {f"{b:.1f}": bins.get(b, 0) for b in GAP_BINS},
    }


async def pair_gap_counts(session: AsyncSession, job_id: UUID) -> dict[str, Counter[float]]:
    """How many graded candidates had each gap (chosen minus rejected policy faithfulness), by
    sampling method (whisper, standard): the paper's Figure 4. Counted in SQL: at most 17 gaps
    a method (GAP_BINS) where reading a row per candidate held the event loop for 20 ms at
    20,000 candidates."""
    rows = await session.execute(
        select(PairCandidate.method, PairCandidate.gap, func.count())
        .where(PairCandidate.job_id == job_id, PairCandidate.gap.is_not(None))
        .group_by(PairCandidate.method, PairCandidate.gap)
    )
    gaps: dict[str, Counter[float]] = {}
    for method, gap, count in rows:
        if gap is not None:  # the query's filter; said again for the type
            gaps.setdefault(method, Counter())[gap] = count
    return gaps


def usage_columns() -> tuple[Any, ...]:
    """Aggregates of turns: calls, prompt, cached prompt and completion tokens, and cost."""
    return (
        func.count(),
        func.coalesce(func.sum(TurnRow.prompt_tokens), 0),
        func.coalesce(func.sum(TurnRow.cached_prompt_tokens), 0),
        func.coalesce(func.sum(TurnRow.completion_tokens), 0),
        func.coalesce(func.sum(TurnRow.cost_usd), 0.0),
    )


def usage(row: Sequence[Any], priced: bool) -> dict[str, Any]:
    """A row of usage_columns as the API shows it; the cost is null unless the job's every
    endpoint is priced (then every turn has a cost)."""
    calls, prompt, cached, completion, cost = row
    return {
        "llm_calls": calls,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "completion_tokens": completion,
        "cost_usd": cost if priced else None,
    }


async def spent_usd(session: AsyncSession, job_ids: Sequence[UUID]) -> dict[UUID, float]:
    """Each job's turns' costs summed (a job without turns: 0), for a page of jobs, by the
    covering index on turns."""
    rows = await session.execute(
        select(TurnRow.job_id, func.coalesce(func.sum(TurnRow.cost_usd), 0.0))
        .where(TurnRow.job_id.in_(job_ids))
        .group_by(TurnRow.job_id)
    )
    return dict.fromkeys(job_ids, 0.0) | {job_id: float(cost or 0.0) for job_id, cost in rows}


async def usage_by_stage(session: AsyncSession, job_id: UUID, priced: bool) -> dict[str, dict[str, Any]]:
    """LLM calls, tokens and cost per stage (intent, seed, ..., grade, whisper, rejected, guard, judge)."""
    rows = await session.execute(
        select(TurnRow.stage, *usage_columns())
        .where(TurnRow.job_id == job_id)
        .group_by(TurnRow.stage)
        .order_by(TurnRow.stage)
    )
    return {row[0]: usage(row[1:], priced) for row in rows}


async def refusals_by_stage(session: AsyncSession, job_id: UUID) -> dict[str, dict[str, int]]:
    """Refused turns per stage, then per model (the stage's agent's or the fallback's), by an
    index-only scan of the partial index of refusals (a job's summary reads them)."""
    rows = await session.execute(
        select(TurnRow.stage, TurnRow.model, func.count())
        .where(TurnRow.job_id == job_id, TurnRow.outcome == sql_constant(TurnOutcome.REFUSED))
        .group_by(TurnRow.stage, TurnRow.model)
        .order_by(TurnRow.stage, TurnRow.model)
    )
    refusals: dict[str, dict[str, int]] = {}
    for stage, model, count in rows:
        refusals.setdefault(stage, {})[model] = count
    return refusals
