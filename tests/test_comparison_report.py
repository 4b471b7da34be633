"""A comparison's figures from its verdicts and scores, against hand-computed values."""

from __future__ import annotations

from collections import Counter

import pytest

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
