"""What a comparison report shows, computed once from the stored counts: per metric each
side's mean with its interval, the judges' verdicts as shares with intervals, and the
preference-pair gaps by method. The renderers (Markdown, CSV, PNG) only lay these out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app import stats
from app.deliberation.results import GAP_SCALE, METRICS, SCORE_SCALE

SCORES = tuple(range(SCORE_SCALE[0], SCORE_SCALE[1] + 1))


@dataclass(frozen=True)
class Side:
    """One job's grader scores over the compared prompts: {metric: {score: count}}."""

    name: str
    distributions: Mapping[str, Mapping[int, int]]

    @classmethod
    def of(cls, name: str, metric_stats: Mapping[str, Mapping[str, Any]]) -> Side:
        """A side from the store's metric stats ({metric: {"distribution": {"1": count, ...}}})."""
        return cls(
            name,
            {
                metric: {int(score): count for score, count in stats["distribution"].items()}
                for metric, stats in metric_stats.items()
            },
        )

    def mean(self, metric: str) -> stats.Estimate:
        return stats.counted_mean(self.distributions.get(metric, {}), within=SCORE_SCALE)


@dataclass(frozen=True)
class Verdicts:
    """One judge's verdicts from the candidate's side."""

    judge: str
    wins: int
    ties: int
    losses: int

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    def share(self, outcome: str) -> stats.Estimate:
        return stats.proportion(getattr(self, outcome), self.judged)


@dataclass(frozen=True)
class ComparisonFigures:
    title: str
    prompts: int
    baseline: Side
    candidate: Side
    verdicts: Sequence[Verdicts]
    # Preference-pair gaps (chosen minus rejected policy faithfulness) counted by how the
    # rejected side was made, e.g. {"whisper": {gap: candidates}, "standard": {...}}; empty
    # without pairs.
    gaps: Mapping[str, Mapping[float, int]] = field(default_factory=dict)
    notes: Sequence[str] = ()

    def gap_mean(self, method: str) -> stats.Estimate:
        return stats.counted_mean(self.gaps[method], within=GAP_SCALE)

    def metrics(self) -> list[str]:
        return graded_metrics((self.baseline, self.candidate))


def graded_metrics(sides: Iterable[Side]) -> list[str]:
    """The metrics any of the sides has scores for, in the grader's order."""
    graded = {metric for side in sides for metric in side.distributions}
    return [metric for metric in METRICS if metric in graded]
