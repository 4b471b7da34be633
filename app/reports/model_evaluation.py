"""A model evaluation's report: the store's tallies as rates with Wilson 95 % intervals, one
row per benchmark, category and metric, one column per model under test (the shape of the
paper's Table 2, base model beside fine-tuned)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from app.plan import ModelEvaluationPlan
from app.stats import proportion
from app.store.model_evaluations import Tally

# metric -> (the prompts it counts, (count, n) of a tally)
METRICS: dict[str, tuple[str, Callable[[Tally], tuple[int, int]]]] = {
    "safe_response_rate": ("refuse", lambda t: (t.safe, t.safety_judged)),
    "refusal_rate": ("refuse", lambda t: (t.refused, t.refusal_judged)),
    "compliance_rate": ("comply", lambda t: (t.refusal_judged - t.refused, t.refusal_judged)),
    "over_refusal_rate": ("comply", lambda t: (t.refused, t.refusal_judged)),
}


def table(plan: ModelEvaluationPlan, tallies: Sequence[Tally]) -> list[dict[str, Any]]:
    """Rows by benchmark name: its categories together (category None) first, then each
    category alone, by name; a row for each metric of the prompts there."""
    cells: dict[tuple[str, str | None, str], list[Tally]] = {}
    for tally in tallies:
        for category in (None, tally.category):
            cells.setdefault((tally.benchmark, category, tally.expected), []).append(tally)
    rows = []
    for benchmark, category in dict.fromkeys((b, c) for b, c, _ in sorted(cells, key=_row_order)):
        for metric, (expected, share) in METRICS.items():
            counted = cells.get((benchmark, category, expected))
            if counted is None:
                continue
            rows.append(
                {
                    "benchmark": benchmark,
                    "category": category,
                    "expected": expected,
                    "metric": metric,
                    "models": {
                        target.name: _rate([t for t in counted if t.target == number], share)
                        for number, target in enumerate(plan.targets)
                    },
                }
            )
    return rows


def _row_order(cell: tuple[str, str | None, str]) -> tuple[str, bool, str]:
    benchmark, category, _ = cell
    return benchmark, category is not None, category or ""


def _rate(tallies: list[Tally], share: Callable[[Tally], tuple[int, int]]) -> dict[str, Any]:
    count = sum(share(t)[0] for t in tallies)
    n = sum(share(t)[1] for t in tallies)
    estimate = asdict(proportion(count, n))
    return {
        "value": estimate["value"],
        "low": estimate["low"],
        "high": estimate["high"],
        "count": count,
        "n": n,
    }


def by_target(plan: ModelEvaluationPlan, tallies: Sequence[Tally]) -> dict[str, dict[str, int]]:
    """Per target name: its items, how they ended, and the answers a judge could not read."""
    counts = {}
    for number, target in enumerate(plan.targets):
        own = [t for t in tallies if t.target == number]
        completed = sum(t.completed for t in own)
        counts[target.name] = {
            "items": sum(t.items for t in own),
            "completed": completed,
            "failed": sum(t.failed for t in own),
            "safety_unreadable": completed - sum(t.safety_judged for t in own),
            "refusal_unreadable": completed - sum(t.refusal_judged for t in own),
            "truncated": sum(t.truncated for t in own),
        }
    return counts
