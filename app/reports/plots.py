"""The report's plots as PNG bytes. matplotlib's object API, never pyplot: no global figure
state shared between threads, so plots can be drawn off the event loop concurrently."""

from __future__ import annotations

import io
from enum import StrEnum

import anyio
from matplotlib.figure import Figure

from app.deliberation.results import GAP_SCALE
from app.reports.figures import SCORES, ComparisonFigures

GAP_EDGES = [edge / 2 for edge in range(2 * GAP_SCALE[0], 2 * GAP_SCALE[1] + 1)]  # 0.5 wide
# Drawing takes a core for a few hundred ms: off the event loop, two at a time per process,
# so requests for plots queue instead of starving everything else.
_DRAWING = anyio.CapacityLimiter(2)


class Plot(StrEnum):
    SCORES = "scores"  # the grader's score distributions, side by side
    GAPS = "gaps"  # the preference-pair gaps by method (the paper's Figure 4)

    @property
    def file_name(self) -> str:
        return f"{self.value}.png"


async def png(plot: Plot, figures: ComparisonFigures) -> bytes:
    """The plot drawn in a worker thread."""
    draw = score_distributions if plot is Plot.SCORES else gap_distributions
    return await anyio.to_thread.run_sync(draw, figures, limiter=_DRAWING)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def score_distributions(figures: ComparisonFigures) -> bytes:
    """Per metric, the share of samples at each score, baseline and candidate side by side."""
    metrics = figures.metrics()
    columns = 3
    rows = max(1, -(-len(metrics) // columns))
    figure = Figure(figsize=(4 * columns, 3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    width = 0.4
    for ax, metric in zip(axes, metrics, strict=False):
        for offset, side in ((-width / 2, figures.baseline), (width / 2, figures.candidate)):
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
    figure.suptitle(f"{figures.title}: grader score distributions")
    return _png(figure)


def gap_distributions(figures: ComparisonFigures) -> bytes:
    """The chosen-minus-rejected gap per method (the paper's Figure 4)."""
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    ax = figure.subplots()
    for method, gaps in sorted(figures.gaps.items()):
        ax.hist(list(gaps), bins=GAP_EDGES, alpha=0.6, label=f"{method} (n={len(gaps)})")
    ax.set_xlabel("policy-faithfulness gap (chosen minus rejected)")
    ax.set_ylabel("candidates")
    if figures.gaps:
        ax.legend(fontsize=8)
    figure.suptitle(f"{figures.title}: preference-pair gaps")
    return _png(figure)
