"""A comparison's figures from its verdicts and scores, against hand-computed values."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
import scipy.stats

from app.reports.comparison_stats import agreement, counted_results, metrics


def test_a_judges_shares_are_of_its_readable_verdicts() -> None:
    results = counted_results(Counter(["b", "b", "a", None]))

    assert [results[k] for k in ("wins", "ties", "losses", "unreadable")] == [2, 0, 1, 1]
    assert results["win_rate"]["value"] == pytest.approx(2 / 3) and results["win_rate"]["n"] == 3
    assert results["tie_rate"]["value"] == 0.0 and results["tie_rate"]["low"] == 0.0


def test_two_judges_agree_by_cohens_kappa() -> None:
    # Three items, agreeing on two.
    found = agreement(2, Counter({("b", "b"): 1, ("a", "a"): 1, ("tie", "b"): 1}))

    assert found is not None
    assert (found["judges"], found["items"], found["kappa_kind"]) == (2, 3, "cohen")
    assert found["unanimous"]["value"] == pytest.approx(2 / 3)
    # Firsts b, a, tie; seconds b, a, b: chance (1*2 + 1*1 + 1*0) / 9 = 1/3; kappa (2/3 - 1/3) / (2/3).
    assert found["kappa"] == pytest.approx(0.5)


def test_three_judges_agree_by_fleiss_kappa() -> None:
    # The hand-computed case of tests/test_stats.py: kappa 1/22; unanimous on one item of four.
    found = agreement(
        3, Counter({("a", "a", "a"): 1, ("a", "a", "b"): 1, ("b", "b", "tie"): 1, ("tie", "b", "a"): 1})
    )

    assert found is not None
    assert (found["judges"], found["items"], found["kappa_kind"]) == (3, 4, "fleiss")
    assert found["kappa"] == pytest.approx(1 / 22)
    assert found["unanimous"]["value"] == 0.25


def test_one_judge_has_no_agreement() -> None:
    assert agreement(1, Counter({("a",): 1, ("b",): 1})) is None


def test_metrics_pair_each_prompts_scores_and_leave_out_metrics_nobody_was_graded_on() -> None:
    found = metrics(
        {
            "relevance": Counter({(3, 4): 1, (None, 5): 1, (4, None): 1, (2, 5): 1}),
            "coherence": Counter({(None, None): 1}),
        }
    )

    assert list(found) == ["relevance"]
    relevance = found["relevance"]
    assert (relevance["baseline"]["value"], relevance["baseline"]["n"]) == (3.0, 3)
    assert (relevance["candidate"]["value"], relevance["candidate"]["n"]) == (pytest.approx(14 / 3), 3)
    # Paired over the two prompts graded on both sides: leads 1 and 3.
    assert (relevance["delta"]["value"], relevance["delta"]["n"]) == (2.0, 2)


def wilson(count: int, n: int) -> dict[str, object]:
    interval = scipy.stats.binomtest(count, n).proportion_ci(0.95, method="wilson")
    return {
        "value": count / n,
        "low": pytest.approx(interval.low),
        "high": pytest.approx(interval.high),
        "n": n,
    }


def test_a_judges_wins_ties_and_losses_are_each_a_share_of_its_readable_verdicts() -> None:
    results = counted_results(Counter({"b": 5, "tie": 3, "a": 2, None: 4}))

    assert results == {
        "wins": 5,
        "ties": 3,
        "losses": 2,
        "unreadable": 4,
        "win_rate": wilson(5, 10),
        "tie_rate": wilson(3, 10),
        "loss_rate": wilson(2, 10),
    }


Scores = dict[tuple[int | None, int | None], int]  # prompts by (baseline's score, candidate's)


def scores(values: dict[float, int], scale: tuple[float, float]) -> dict[str, object]:
    """The mean of the values given as {value: how many}, with scipy's Student t 95 % interval
    cut to the scale."""
    expanded = [value for value, count in values.items() for _ in range(count)]
    centre = statistics.fmean(expanded)
    low, high = scipy.stats.t.interval(0.95, len(expanded) - 1, loc=centre, scale=scipy.stats.sem(expanded))
    return {
        "value": pytest.approx(centre),
        "low": pytest.approx(max(low, scale[0])),
        "high": pytest.approx(min(high, scale[1])),
        "n": len(expanded),
    }


def test_a_metrics_means_add_up_every_prompt_and_keep_their_intervals_inside_the_scale() -> None:
    # Most baselines a 5 and candidates a 1 (or the other way round): each side's t interval
    # passes its end of the 1-5 scale and the leads' passes -4 (or 4), and is cut there.
    # A score comes from prompts of different pairs: (5, 1) and (5, 2) are both a baseline 5.
    worse: Scores = {(5, 1): 3, (4, 1): 1, (5, 2): 1, (None, 1): 1}
    better: Scores = {(1, 5): 3, (1, 4): 1, (2, 5): 1, (1, None): 1}

    found = metrics({"helpfulness": worse, "harmlessness": better})

    assert found == {
        "harmlessness": {
            "baseline": scores({1: 5, 2: 1}, (1, 5)),
            "candidate": scores({5: 4, 4: 1}, (1, 5)),
            "delta": scores({4: 3, 3: 2}, (-4, 4)),
        },
        "helpfulness": {
            "baseline": scores({5: 4, 4: 1}, (1, 5)),
            "candidate": scores({1: 5, 2: 1}, (1, 5)),
            "delta": scores({-4: 3, -3: 2}, (-4, 4)),
        },
    }
    # The cuts are made: each interval ends at the scale's end it passed.
    assert found["helpfulness"]["baseline"]["high"] == 5
    assert found["helpfulness"]["candidate"]["low"] == 1
    assert found["helpfulness"]["delta"]["low"] == -4
    assert found["harmlessness"]["delta"]["high"] == 4
