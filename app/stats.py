"""How sure a share or a mean measured on a sample is: the intervals every report gives."""

from __future__ import annotations

from collections.abc import Sequence
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


def mean(
    values: Sequence[float], confidence: float = CONFIDENCE, within: tuple[float, float] | None = None
) -> Estimate:
    """The mean with its Student t interval (scores are bounded and few, so not normal-z),
    cut to `within`, the scale's ends, where the true mean must lie."""
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
    if within is not None:
        low, high = max(low, within[0]), min(high, within[1])
    return Estimate(centre, float(low), float(high), n)
