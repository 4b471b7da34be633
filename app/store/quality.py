"""Quality figures of a job, aggregated in SQL: grader scores, the quality gate, preference
pairs and LLM usage by stage. Nothing here loads per-item rows into Python."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import Integer, Numeric, String, case, cast, column, func, select, true
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.ports import TurnOutcome
from app.store.models import Cot, PreferencePair, TurnRow

SCORES = range(1, 6)


def _score_entries() -> Any:
    """(metric, value) rows of Cot.scores, joined laterally to each cot."""
    return func.jsonb_each(Cot.scores).table_valued(column("key", String), column("value", JSONB)).lateral()


async def metric_stats(session: AsyncSession, cots: Any) -> dict[str, dict[str, Any]]:
    """{metric: {"mean", "distribution": {"1".."5": count}}} over the graded CoTs that match
    the SQL condition `cots`."""
    entry = _score_entries()
    score = cast(entry.c.value["score"].astext, Integer)
    rows = await session.execute(
        select(entry.c.key, score, func.count())
        .select_from(Cot)
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


async def pairs(session: AsyncSession, job_id: UUID) -> dict[str, Any]:
    """Pair attempts, pairs kept, attempts not kept by reason, and the mean gap of kept pairs."""
    rows = await session.execute(
        select(PreferencePair.kept, PreferencePair.reason, func.count(), func.avg(PreferencePair.gap))
        .where(PreferencePair.job_id == job_id)
        .group_by(PreferencePair.kept, PreferencePair.reason)
    )
    summary: dict[str, Any] = {"attempted": 0, "kept": 0, "not_kept": {}, "mean_gap": None}
    for kept, reason, count, mean_gap in rows:
        summary["attempted"] += count
        if kept:
            summary["kept"], summary["mean_gap"] = count, mean_gap
        else:
            summary["not_kept"][reason] = count
    return summary


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
        .where(TurnRow.job_id == job_id, TurnRow.outcome == TurnOutcome.REFUSED.value)
        .group_by(TurnRow.stage, TurnRow.model)
        .order_by(TurnRow.stage, TurnRow.model)
    )
    refusals: dict[str, dict[str, int]] = {}
    for stage, model, count in rows:
        refusals.setdefault(stage, {})[model] = count
    return refusals
