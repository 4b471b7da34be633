"""What a comparison's verdicts and scores say, with how sure each figure is: per judge the
candidate's wins, ties and losses as shares with Wilson intervals; the judges' agreement
beyond chance; per metric each side's mean and the paired difference with t intervals."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from app.deliberation.results import SCORE_SCALE
from app.stats import cohen_kappa, counted_mean, fleiss_kappa, proportion


def counted_results(counts: Counter[str | None]) -> dict[str, Any]:
    """One judge's verdicts from the candidate's side, from their count by what they are ("a"
    the baseline, "b" the candidate, "tie", None unreadable): counts, and the shares of the
    readable ones (wins + ties + losses) with their intervals."""
    wins, ties, losses = counts["b"], counts["tie"], counts["a"]
    readable = wins + ties + losses
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "unreadable": counts[None],
        "win_rate": asdict(proportion(wins, readable)),
        "tie_rate": asdict(proportion(ties, readable)),
        "loss_rate": asdict(proportion(losses, readable)),
    }


def agreement(judges: int, patterns: Mapping[tuple[str, ...], int]) -> dict[str, Any] | None:
    """How far two or more judges agree, over the items every one of them gave a readable
    verdict, from how many of those items got each pattern of verdicts (the judges' in a
    fixed order): the share they all gave the same one, and Cohen's kappa (two judges) or
    Fleiss' kappa (more). None for a single judge."""
    if judges < 2:
        return None
    ratings = [pattern for pattern, count in patterns.items() for _ in range(count)]
    unanimous = sum(count for pattern, count in patterns.items() if len(set(pattern)) == 1)
    two = judges == 2
    return {
        "judges": judges,
        "items": len(ratings),
        "unanimous": asdict(proportion(unanimous, len(ratings))),
        "kappa": cohen_kappa([(a, b) for a, b in ratings])
        if two
        else fleiss_kappa([Counter(rating) for rating in ratings]),
        "kappa_kind": "cohen" if two else "fleiss",
    }


def metrics(paired: Mapping[str, Mapping[tuple[int | None, int | None], int]]) -> dict[str, Any]:
    """metric_comparison of each metric some sample was graded on."""
    return {
        metric: metric_comparison(pairs)
        for metric, pairs in sorted(paired.items())
        if any(score is not None for pair in pairs for score in pair)
    }


def metric_comparison(pairs: Mapping[tuple[int | None, int | None], int]) -> dict[str, Any]:
    """One metric over the compared prompts, from how many prompts got each pair of scores
    (baseline, candidate; None: that side was not graded): each side's mean, and the mean of
    the candidate's lead over the prompts both sides have a score for, with t intervals."""
    baseline: Counter[int] = Counter()
    candidate: Counter[int] = Counter()
    leads: Counter[int] = Counter()
    for (b, c), count in pairs.items():
        if b is not None:
            baseline[b] += count
        if c is not None:
            candidate[c] += count
        if b is not None and c is not None:
            leads[c - b] += count
    lowest, highest = SCORE_SCALE
    return {
        "baseline": asdict(counted_mean(baseline, within=SCORE_SCALE)),
        "candidate": asdict(counted_mean(candidate, within=SCORE_SCALE)),
        "delta": asdict(counted_mean(leads, within=(lowest - highest, highest - lowest))),
    }
