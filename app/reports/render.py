"""A comparison report as Markdown (for people) and CSV (for spreadsheets and notebooks)."""

from __future__ import annotations

import csv
import io
from typing import Protocol

from app import stats
from app.reports.figures import ComparisonFigures

OUTCOMES = ("wins", "ties", "losses")


class Measured(Protocol):
    """A value with its interval: a stats.Estimate, or the API's view of one (IntervalOut)."""

    @property
    def value(self) -> float | None: ...
    @property
    def low(self) -> float | None: ...
    @property
    def high(self) -> float | None: ...


def interval(estimate: Measured, digits: int = 2) -> str:
    """`value [low, high]`; the value alone without bounds (one value measured), "–" without one."""
    if estimate.value is None:
        return "–"
    if estimate.low is None or estimate.high is None:
        return f"{estimate.value:.{digits}f}"
    return f"{estimate.value:.{digits}f} [{estimate.low:.{digits}f}, {estimate.high:.{digits}f}]"


def percent(estimate: Measured) -> str:
    """A share as `value [low, high]` in percent; "–" when none was measured."""
    if estimate.value is None or estimate.low is None or estimate.high is None:
        return "–"
    return f"{estimate.value:.0%} [{estimate.low:.0%}, {estimate.high:.0%}]"


def markdown(figures: ComparisonFigures, plots: dict[str, str] | None = None) -> str:
    """The report; `plots` maps a plot's title to the file name to link beside the text."""
    base, cand = figures.baseline, figures.candidate
    lines = [
        f"# {figures.title}",
        "",
        f"{figures.prompts} prompts compared: **{base.name}** against **{cand.name}**. "
        "Means are on the grader's 1–5 scale with 95 % Student t intervals; shares "
        "have 95 % Wilson intervals.",
        "",
        "## Grader scores",
        "",
        f"| metric | {base.name} | {cand.name} | difference |",
        "|---|---|---|---|",
    ]
    for metric in figures.metrics():
        before, after = base.mean(metric), cand.mean(metric)
        delta = "–" if before.value is None or after.value is None else f"{after.value - before.value:+.2f}"
        lines.append(f"| {metric} | {interval(before)} | {interval(after)} | {delta} |")
    if figures.verdicts:
        lines += [
            "",
            "## Pairwise judgements (candidate's side)",
            "",
            "| judge | judged | wins | ties | losses |",
        ]
        lines.append("|---|---|---|---|---|")
        for verdicts in figures.verdicts:
            shares = " | ".join(percent(verdicts.share(outcome)) for outcome in OUTCOMES)
            lines.append(f"| {verdicts.judge} | {verdicts.judged} | {shares} |")
    if figures.gaps:
        lines += [
            "",
            "## Preference-pair gaps (chosen minus rejected)",
            "",
            "| method | candidates | mean gap |",
        ]
        lines.append("|---|---|---|")
        for method, gaps in sorted(figures.gaps.items()):
            lines.append(f"| {method} | {sum(gaps.values())} | {interval(figures.gap_mean(method))} |")
    for title, file_name in (plots or {}).items():
        lines += ["", f"![{title}]({file_name})"]
    lines += [f"\n> {note}" for note in figures.notes]
    return "\n".join(lines) + "\n"


def table(figures: ComparisonFigures) -> str:
    """One row per figure: what it measures, on which side, its value, interval and n."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "name", "side", "value", "low", "high", "n"])

    def row(section: str, name: str, side: str, estimate: stats.Estimate) -> None:
        writer.writerow([section, name, side, estimate.value, estimate.low, estimate.high, estimate.n])

    for metric in figures.metrics():
        for side in (figures.baseline, figures.candidate):
            row("score", metric, side.name, side.mean(metric))
    for verdicts in figures.verdicts:
        for outcome in OUTCOMES:
            row("pairwise", outcome, verdicts.judge, verdicts.share(outcome))
    for method in sorted(figures.gaps):
        row("gap", "mean", method, figures.gap_mean(method))
    return out.getvalue()
