"""The comparison report's renderers: figures computed from counts, laid out as Markdown,
CSV and PNG."""

import csv
import io
import subprocess
import sys

import numpy
import pytest
from PIL import Image

from app.reports import plots, render
from app.reports.figures import ComparisonFigures, Side, Verdicts

BASELINE = Side("zero-shot", {"relevance": {3: 2, 4: 2}, "coherence": {5: 4}})
CANDIDATE = Side("AIDSAFE", {"relevance": {4: 1, 5: 3}, "coherence": {4: 4}})


def figures(**changes: object) -> ComparisonFigures:
    values: dict[str, object] = {
        "title": "demo",
        "prompts": 4,
        "baseline": BASELINE,
        "candidate": CANDIDATE,
        "verdicts": [Verdicts("judge-a", wins=3, ties=1, losses=0)],
        "gaps": {"whisper": {2.0: 1, 1.5: 1, 3.0: 1}, "standard": {0.5: 1, -0.5: 1}},
    }
    values.update(changes)
    return ComparisonFigures(**values)  # type: ignore[arg-type]


def test_a_sides_means_are_of_its_score_counts() -> None:
    assert BASELINE.mean("relevance").value == 3.5 and BASELINE.mean("relevance").n == 4
    assert BASELINE.mean("completeness").value is None


def test_metrics_follow_the_graders_order_and_only_graded_ones() -> None:
    assert figures().metrics() == ["relevance", "coherence"]


def test_verdict_shares_have_intervals() -> None:
    verdicts = Verdicts("j", wins=3, ties=1, losses=0)
    assert verdicts.judged == 4
    wins = verdicts.share("wins")
    assert wins.value == 0.75 and wins.low is not None and wins.low < 0.75 < wins.high  # type: ignore[operator]
    assert Verdicts("j", 0, 0, 0).share("wins").value is None


def test_markdown_lays_out_every_figure() -> None:
    text = render.markdown(figures(notes=["made by a test"]), plots={"Scores": "scores.png"})
    assert "# demo" in text and "4 prompts compared" in text
    assert "| relevance | 3.50 [2.58, 4.42] | 4.75 [3.95, 5.00] | +1.25 |" in text
    assert "| coherence | 5.00 [5.00, 5.00] | 4.00 [4.00, 4.00] | -1.00 |" in text
    assert "| judge-a | 4 | 75% [30%, 95%] | 25% [5%, 70%] | 0% [0%, 49%] |" in text
    assert "| standard | 2 | 0.00 [-4.00, 4.00] |" in text
    assert "| whisper | 3 |" in text
    assert "![Scores](scores.png)" in text
    assert "> made by a test" in text


def test_markdown_leaves_out_sections_with_nothing_to_show() -> None:
    text = render.markdown(figures(verdicts=[], gaps={}))
    assert "Pairwise" not in text and "gaps" not in text


def test_csv_has_one_row_per_figure() -> None:
    rows = list(csv.DictReader(io.StringIO(render.table(figures()))))
    scores = [r for r in rows if r["section"] == "score"]
    assert [(r["name"], r["side"], r["n"]) for r in scores] == [
        ("relevance", "zero-shot", "4"),
        ("relevance", "AIDSAFE", "4"),
        ("coherence", "zero-shot", "4"),
        ("coherence", "AIDSAFE", "4"),
    ]
    assert float(scores[1]["value"]) == pytest.approx(4.75)
    wins = next(r for r in rows if r["section"] == "pairwise" and r["name"] == "wins")
    assert (wins["side"], float(wins["value"])) == ("judge-a", 0.75)
    gap_sides = [r["side"] for r in rows if r["section"] == "gap"]
    assert gap_sides == ["standard", "whisper"]


@pytest.mark.parametrize("plot", list(plots.Plot))
async def test_plots_are_pngs_that_show_the_data(plot: plots.Plot) -> None:
    image = Image.open(io.BytesIO(await plots.png(plot, figures())))
    assert image.format == "PNG" and image.width > 300 and image.height > 200
    nothing = figures(gaps={}, baseline=Side("b", {}), candidate=Side("c", {}))
    empty = Image.open(io.BytesIO(await plots.png(plot, nothing)))
    # The bars are drawn in colour; a plot of nothing has none of them.
    assert _coloured_pixels(image) > 500
    assert _coloured_pixels(empty) < 50


def test_one_sides_scores_are_a_plot_of_their_own() -> None:
    image = Image.open(io.BytesIO(plots.score_distributions("samples", [CANDIDATE])))
    assert image.format == "PNG" and _coloured_pixels(image) > 500


def test_processes_start_without_matplotlib_which_loads_in_the_thread_of_the_first_plot() -> None:
    # matplotlib took 0.4 s of the API's 2.6 s start; imported on the event loop at the first
    # plot, it would hold every request that long instead.
    script = (
        "import asyncio, sys, threading, app.main, workers.main, app.cli\n"
        "from app.reports import plots\n"
        "before = 'matplotlib' in sys.modules\n"
        "importers = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'matplotlib':\n"
        "            importers.append(threading.current_thread() is threading.main_thread())\n"
        "sys.meta_path.insert(0, Watch())\n"
        "asyncio.run(plots.gaps_png('demo', {'whisper': {1.0: 1}}))\n"
        "print(before, importers)\n"
    )
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "False [False]"  # imported once, off the main thread


def _coloured_pixels(image: Image.Image) -> int:
    rgb = numpy.asarray(image.convert("RGB"), dtype=int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())
