"""The report's plots as PNG bytes. matplotlib's object API, never pyplot: no global figure
state shared between threads, so plots can be drawn off the event loop concurrently."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING

from app.deliberation.results import GAP_SCALE
from app.reports.figures import SCORES, ComparisonFigures, Side, graded_metrics
from app.threads import in_thread

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GAP_EDGES = [edge / 2 for edge in range(2 * GAP_SCALE[0], 2 * GAP_SCALE[1] + 1)]  # 0.5 wide


class Plot(StrEnum):
    SCORES = "scores"  # the grader's score distributions, side by side
    GAPS = "gaps"  # the preference-pair gaps by method (the paper's Figure 4)

    @property
    def file_name(self) -> str:
        return f"{self.value}.png"


async def png(plot: Plot, figures: ComparisonFigures) -> bytes:
    """A comparison's plot: both sides' scores, or the candidate's pair gaps."""
    if plot is Plot.SCORES:
        return await scores_png(figures.title, (figures.baseline, figures.candidate))
    return await gaps_png(figures.title, figures.gaps)


# Drawing takes a core for a few hundred ms: in a worker thread (in_thread), in the caller's
# turn for threads, so an API key's burst of plots draws a few at a time (its share of threads)
# and other keys' requests take the threads left.


async def scores_png(title: str, sides: Sequence[Side]) -> bytes:
    """score_distributions drawn in a worker thread."""
    return await in_thread(score_distributions, title, sides)


async def gaps_png(title: str, gaps: Mapping[str, Mapping[float, int]]) -> bytes:
    """gap_distributions drawn in a worker thread."""
    return await in_thread(gap_distributions, title, gaps)


def _figure(width: float, height: float) -> Figure:
    """A new figure. matplotlib is imported here, in the drawing thread at the first plot: as the
    API's module loaded, it took 0.4 s of every API process's start, most never to draw."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _title(figure: Figure, text: str) -> None:
    """The figure's title, as written: it holds the client's label, whose `$...$` matplotlib
    would otherwise parse as math (an unknown command in it raised ValueError)."""
    figure.suptitle(text, parse_math=False)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def score_distributions(title: str, sides: Sequence[Side]) -> bytes:
    """Per metric, the share of samples at each score, the sides' bars next to each other."""
    metrics = graded_metrics(sides)
    columns = 3
    rows = max(1, -(-len(metrics) // columns))
    figure = _figure(4 * columns, 3 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    width = 0.8 / max(1, len(sides))
    for ax, metric in zip(axes, metrics, strict=False):
        for number, side in enumerate(sides):
            offset = (number - (len(sides) - 1) / 2) * width
            counts = [side.distributions.get(metric, {}).get(score, 0) for score in SCORES]
            total = sum(counts) or 1
            ax.bar([s + offset for s in SCORES], [c / total for c in counts], width, label=side.name)
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.set_xticks(SCORES)
        ax.set_ylim(0, 1)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    if metrics:
        axes[0].legend(fontsize=8)
    _title(figure, f"{title}: grader score distributions")
    return _png(figure)


def gap_distributions(title: str, gaps: Mapping[str, Mapping[float, int]]) -> bytes:
    """The chosen-minus-rejected gap per sampling method (the paper's Figure 4), from how many
    candidates had each gap."""
    figure = _figure(6, 3.5)
    ax = figure.subplots()
    for method, counts in sorted(gaps.items()):
        label = f"{method} (n={sum(counts.values())})"
        ax.hist(list(counts), weights=list(counts.values()), bins=GAP_EDGES, alpha=0.6, label=label)
    ax.set_xlabel("policy-faithfulness gap (chosen minus rejected)")
    ax.set_ylabel("candidates")
    if gaps:
        ax.legend(fontsize=8)
    _title(figure, f"{title}: preference-pair gaps")
    return _png(figure)
