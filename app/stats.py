"""How sure a share or a mean measured on a sample is (the intervals every report gives), and
how far raters agree beyond chance."""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from math import fsum, isqrt, sqrt
from statistics import NormalDist, fmean, stdev
from types import ModuleType
from typing import TypeVar

CONFIDENCE = 0.95
Category = TypeVar("Category", bound=Hashable)  # what a rater can answer: any one kind of value


def _scipy_stats() -> ModuleType:
    """scipy.stats, imported at first use: importing it takes 0.7 s, and every worker, API
    and CLI process imports this module, most never to report on anything. A worker restarted
    after a crash spent a third of its start here, with its items waiting for it."""
    return importlib.import_module("scipy.stats")


def load_scipy() -> None:
    """Import scipy.stats now, for a server to call as it starts (app/main.py)."""
    _scipy_stats()


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
    # Newcombe's (1998) formulas, as scipy's binomtest(...).proportion_ci(method="wilson")
    # computes them: that call took some 250 µs, and a report makes one per category and
    # label (10,000 labels were 2.5 s of a worker thread's CPU, contending with the event loop).
    z = _two_sided_z(confidence)
    p = successes / n
    denominator = 2 * (n + z**2)
    centre = (2 * n * p + z**2) / denominator
    spread = z / denominator * sqrt(4 * n * p * (1 - p) + z**2)
    low = 0.0 if successes == 0 else centre - spread
    high = 1.0 if successes == n else centre + spread
    return Estimate(p, low, high, n)


@cache
def _two_sided_z(confidence: float) -> float:
    """The standard normal's quantile leaving (1 - confidence) / 2 above it: 1.96 for 0.95."""
    return NormalDist().inv_cdf(0.5 + 0.5 * confidence)


def mean(
    values: Sequence[float], confidence: float = CONFIDENCE, within: tuple[float, float] | None = None
) -> Estimate:
    """The mean with its Student t interval (scores are bounded and few, so not normal-z),
    cut to `within`, the scale's ends, where the true mean must lie."""
    n = len(values)
    if n == 0:
        return NOTHING_MEASURED
    if n == 1:
        return Estimate(fmean(values), None, None, 1)  # one value says nothing about the spread
    return _t_interval(fmean(values), stdev(values), n, confidence, within)


def counted_mean(
    counts: Mapping[int, int] | Mapping[float, int],
    confidence: float = CONFIDENCE,
    within: tuple[float, float] | None = None,
) -> Estimate:
    """`mean` of the values given as {value: how many}, from the exact sums of the values and
    of their squares: microseconds where expanding 10,000 scores for `statistics` took
    milliseconds. Equal to `mean` to the last bit when the values' sum is a float exactly, as
    it is for scores, their differences and pair gaps (halves)."""
    n = sum(counts.values())
    if n == 0:
        return NOTHING_MEASURED
    total = sum((Fraction(value) * count for value, count in counts.items()), Fraction())
    centre = float(total / n)
    if n == 1:
        return Estimate(centre, None, None, 1)
    squares = sum((Fraction(value) ** 2 * count for value, count in counts.items()), Fraction())
    variance = (n * squares - total * total) / (n * (n - 1))
    spread = _sqrt_of_ratio(variance.numerator, variance.denominator)
    return _t_interval(centre, spread, n, confidence, within)


def _sqrt_of_ratio(numerator: int, denominator: int) -> float:
    """sqrt(numerator / denominator) correctly rounded, as `statistics.stdev` rounds it (the
    float sqrt of the rounded ratio is a bit off for one score count in eight): an integer
    root of 55 bits or more, its last bit set if inexact (round to odd), rounds once,
    correctly, to a float's 53."""
    shift = max(0, 112 - numerator.bit_length() + denominator.bit_length()) // 2
    scaled = numerator << 2 * shift
    root = isqrt(scaled // denominator)
    return (root | (root * root * denominator != scaled)) / (1 << shift)


def _t_interval(
    centre: float, spread: float, n: int, confidence: float, within: tuple[float, float] | None
) -> Estimate:
    """The Student t interval of a mean of n >= 2 values with sample standard deviation `spread`."""
    error = spread / sqrt(n)
    if error == 0:
        return Estimate(centre, centre, centre, n)
    low, high = _scipy_stats().t.interval(confidence, n - 1, loc=centre, scale=error)
    if within is not None:
        low, high = max(low, within[0]), min(high, within[1])
    return Estimate(centre, float(low), float(high), n)


def cohen_kappa(pairs: Sequence[tuple[Hashable, Hashable]]) -> float | None:
    """Cohen's kappa of two raters, one (first rater's, second rater's) category per item:
    their agreement beyond what their own category shares would give by chance. None when
    chance alone agrees always (both gave one and the same category), where it is undefined."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(first == second for first, second in pairs) / n
    firsts, seconds = Counter(first for first, _ in pairs), Counter(second for _, second in pairs)
    chance = sum(firsts[category] * seconds[category] for category in firsts) / (n * n)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def fleiss_kappa(items: Sequence[Mapping[Category, int]]) -> float | None:
    """Fleiss' kappa: raters' agreement beyond chance, from each item's count of ratings per
    category. Raters need not be the same from item to item, and items may have different
    numbers of ratings (the usual generalisation of Fleiss 1971, equal to it when all have as
    many); an item with fewer than two ratings says nothing and is left out. None when no
    item is left or every rating is one category."""
    rated = [counts for counts in items if sum(counts.values()) >= 2]
    if not rated:
        return None
    agreements = []
    totals: Counter[Hashable] = Counter()
    for counts in rated:
        n = sum(counts.values())
        agreements.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
        totals.update(counts)
    # Summed exactly: the same items in any order (a query's rows come in none) give one kappa.
    observed = fsum(agreements) / len(rated)
    ratings = sum(totals.values())
    chance = sum((count / ratings) ** 2 for count in totals.values())
    return None if chance == 1 else (observed - chance) / (1 - chance)
