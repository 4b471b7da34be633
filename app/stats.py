"""How sure a share or a mean measured on a sample is: the intervals every report gives;
and how far several raters (judges) agree beyond chance."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from math import sqrt
from statistics import fmean, stdev

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A measured value with its interval; all None when nothing was measured (n == 0)."""

    value: float | None
    low: float | None
    high: float | None
    n: int


NOTHING_MEASURED = Estimate(None, None, None, 0)


def proportion(successes: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """The share `successes / n` with its Wilson score interval, which stays honest at small
    n and near 0 or 1, where the normal approximation gives intervals outside [0, 1]."""
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    if n == 0:
        return NOTHING_MEASURED
    interval = stats.binomtest(successes, n).proportion_ci(confidence, method="wilson")
    return Estimate(successes / n, float(interval.low), float(interval.high), n)


def mean(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """The mean with its Student t interval (scores are bounded and few, so not normal-z)."""
    n = len(values)
    if n == 0:
        return NOTHING_MEASURED
    centre = fmean(values)
    if n == 1:
        return Estimate(centre, None, None, 1)  # one value says nothing about the spread
    error = stdev(values) / sqrt(n)
    if error == 0:
        return Estimate(centre, centre, centre, n)
    low, high = stats.t.interval(confidence, n - 1, loc=centre, scale=error)
    return Estimate(centre, float(low), float(high), n)


def cohen_kappa(pairs: Sequence[tuple[Hashable, Hashable]]) -> float | None:
    """Cohen's kappa of two raters, from their ratings of the same items, (first, second) per
    item: (observed - chance agreement) / (1 - chance agreement), chance from each rater's own
    shares. None when nothing was rated, or when chance agreement is certain (both raters
    gave one and the same rating throughout), where kappa is undefined."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(first == second for first, second in pairs) / n
    firsts, seconds = Counter(first for first, _ in pairs), Counter(second for _, second in pairs)
    chance = sum(firsts[rating] * seconds[rating] for rating in firsts) / n**2
    return None if chance == 1 else (observed - chance) / (1 - chance)


def fleiss_kappa(ratings: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' kappa of a fixed number (at least two) of raters: one sequence per item, that
    item's ratings (every item rated by the same number of raters, who need not be the same
    ones). None when nothing was rated, or when chance agreement is certain."""
    if not ratings:
        return None
    raters = len(ratings[0])
    if raters < 2 or any(len(item) != raters for item in ratings):
        raise ValueError("every item needs the same number of ratings, at least two")
    totals: Counter[Hashable] = Counter()
    agreement = 0.0
    for item in ratings:
        counts = Counter(item)
        totals.update(counts)
        # The share of agreeing ordered pairs of this item's raters.
        agreement += sum(c * (c - 1) for c in counts.values()) / (raters * (raters - 1))
    observed = agreement / len(ratings)
    chance = sum((count / (len(ratings) * raters)) ** 2 for count in totals.values())
    return None if chance == 1 else (observed - chance) / (1 - chance)
