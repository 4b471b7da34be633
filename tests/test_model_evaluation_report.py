"""app.reports.model_evaluation: a model evaluation's table and per-target counts from tallies
made up here, each rate's interval checked against scipy's Wilson interval (the API's report
over stored answers is in tests/test_model_evaluation_api.py)."""

from __future__ import annotations

from typing import Any

import pytest
import scipy.stats

from app.deliberation.config import GuardStyle, RoleConfig
from app.plan import GuardPlan, ModelEvaluationPlan, TargetPlan
from app.reports.model_evaluation import by_target, table
from app.store.model_evaluations import Tally

PLAN = ModelEvaluationPlan(
    targets=(
        TargetPlan(name="base", endpoint="default", model="m", temperature=0.0),
        TargetPlan(name="tuned", endpoint="default", model="m-ft", temperature=0.0),
    ),
    safety_judge=GuardPlan(endpoint="default", model="guard", temperature=0.0, style=GuardStyle.JSON),
    refusal_judge=RoleConfig("default", "judge", 0.0),
    max_tokens=100,
    max_reasks=1,
)
BASE, TUNED = 0, 1

#  target, benchmark, category, expected, items, completed, failed, safety_judged, safe,
#  refusal_judged, refused, truncated; given out of order, as a query's rows may come.
TALLIES = [
    Tally(TUNED, "harmbench", "weapons", "refuse", 10, 10, 0, 9, 8, 10, 8, 1),
    Tally(BASE, "harmbench", "fraud", "comply", 6, 6, 0, 6, 6, 6, 2, 2),
    Tally(BASE, "harmbench", "weapons", "refuse", 10, 9, 1, 7, 6, 9, 5, 1),
    Tally(TUNED, "harmbench", "fraud", "refuse", 5, 4, 1, 3, 3, 4, 4, 0),
    Tally(BASE, "advbench", "cyber", "refuse", 2, 2, 0, 2, 1, 2, 2, 0),
    Tally(BASE, "advbench", "benign", "comply", 3, 3, 0, 3, 3, 3, 1, 0),
    Tally(BASE, "harmbench", "fraud", "refuse", 5, 5, 0, 5, 4, 4, 3, 0),
    Tally(TUNED, "harmbench", "fraud", "comply", 6, 6, 0, 6, 6, 5, 1, 0),
]


def rate(count: int, n: int) -> dict[str, Any]:
    """A cell as the report should give it: count / n with scipy's Wilson 95 % interval."""
    if n == 0:
        return {"value": None, "low": None, "high": None, "count": 0, "n": 0}
    wilson = scipy.stats.binomtest(count, n).proportion_ci(0.95, method="wilson")
    return {"value": count / n, "low": wilson.low, "high": wilson.high, "count": count, "n": n}


def rows(
    benchmark: str, category: str | None, metrics: dict[str, tuple[tuple[int, int], tuple[int, int]]]
) -> list[tuple[str, str | None, str, str, dict[str, dict[str, Any]]]]:
    expected = {"safe_response_rate": "refuse", "refusal_rate": "refuse"}
    return [
        (
            benchmark,
            category,
            expected.get(metric, "comply"),
            metric,
            {"base": rate(*base), "tuned": rate(*tuned)},
        )
        for metric, (base, tuned) in metrics.items()
    ]


def test_a_benchmark_has_a_row_per_metric_of_its_categories_together_then_each_by_name() -> None:
    # (count, n) by hand from TALLIES; a category's metrics are those of its prompts: weapons
    # and cyber have only harmful prompts (refuse), benign only benign ones (comply).
    # Together, base refuse: safe 6 + 4 of 7 + 5 judged, refused 5 + 3 of 9 + 4; tuned: safe
    # 8 + 3 of 9 + 3, refused 8 + 4 of 10 + 4. Comply: complied = judged - refused.
    expected = [
        *rows(
            "advbench",
            None,
            {
                "safe_response_rate": ((1, 2), (0, 0)),
                "refusal_rate": ((2, 2), (0, 0)),
                "compliance_rate": ((2, 3), (0, 0)),
                "over_refusal_rate": ((1, 3), (0, 0)),
            },
        ),
        *rows(
            "advbench", "benign", {"compliance_rate": ((2, 3), (0, 0)), "over_refusal_rate": ((1, 3), (0, 0))}
        ),
        *rows(
            "advbench", "cyber", {"safe_response_rate": ((1, 2), (0, 0)), "refusal_rate": ((2, 2), (0, 0))}
        ),
        *rows(
            "harmbench",
            None,
            {
                "safe_response_rate": ((10, 12), (11, 12)),
                "refusal_rate": ((8, 13), (12, 14)),
                "compliance_rate": ((4, 6), (4, 5)),
                "over_refusal_rate": ((2, 6), (1, 5)),
            },
        ),
        *rows(
            "harmbench",
            "fraud",
            {
                "safe_response_rate": ((4, 5), (3, 3)),
                "refusal_rate": ((3, 4), (4, 4)),
                "compliance_rate": ((4, 6), (4, 5)),
                "over_refusal_rate": ((2, 6), (1, 5)),
            },
        ),
        *rows(
            "harmbench",
            "weapons",
            {"safe_response_rate": ((6, 7), (8, 9)), "refusal_rate": ((5, 9), (8, 10))},
        ),
    ]

    found = table(PLAN, TALLIES)

    shown = [(r["benchmark"], r["category"], r["expected"], r["metric"], r["models"]) for r in found]
    assert [row[:4] for row in shown] == [row[:4] for row in expected]
    for got, want in zip(shown, expected, strict=True):
        assert list(got[4]) == ["base", "tuned"]  # the plan's targets, in its order
        # scipy solves the same formula: the same ends to a few ulps.
        assert got[4] == {name: pytest.approx(cell, rel=1e-12) for name, cell in want[4].items()}, got[:4]


def test_a_target_without_answers_has_no_rate() -> None:
    found = table(PLAN, [Tally(BASE, "advbench", "cyber", "refuse", 1, 1, 0, 1, 1, 1, 0, 0)])

    assert found[0]["models"]["tuned"] == rate(0, 0)
    assert found[0]["models"]["base"]["value"] == 1.0


def test_each_targets_items_end_and_unreadable_verdicts_are_counted_apart() -> None:
    # Base: items 2 + 3 + 6 + 10 + 5, completed 2 + 3 + 6 + 9 + 5 = 25, safety verdicts read
    # 2 + 3 + 6 + 7 + 5 = 23, refusal verdicts 2 + 3 + 6 + 9 + 4 = 24. Tuned: completed 10 + 4 + 6 = 20,
    # safety 9 + 3 + 6 = 18, refusal 10 + 4 + 5 = 19.
    assert by_target(PLAN, TALLIES) == {
        "base": {
            "items": 26,
            "completed": 25,
            "failed": 1,
            "safety_unreadable": 2,
            "refusal_unreadable": 1,
            "truncated": 3,
        },
        "tuned": {
            "items": 21,
            "completed": 20,
            "failed": 1,
            "safety_unreadable": 2,
            "refusal_unreadable": 1,
            "truncated": 1,
        },
    }
