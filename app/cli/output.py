"""How the CLI prints: the one console, text from the server, files it cannot write, and
money, budgets and intervals as every command shows them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich import markup
from rich.console import Console

from aidsafe.models import Budget, Interval
from app.bidi import BIDI_CONTROLS

console = Console()
status = Console(stderr=True)  # what a command says beside data it writes to stdout

# C0 controls but tab and newline, DEL, and C1 controls: a terminal acts on them (ESC and CSI
# begin sequences that retitle it, clear it, recolour what follows or write its clipboard).
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if chr(code) not in "\t\n"}
# Those and the bidirectional controls as escapes, and a backslash doubled, so that an escape
# shown stands for the character it names: the text `\x1b` (four characters) prints as
# `\\x1b`, ESC itself as `\x1b`.
_SHOWN = {**_CONTROLS, **{code: f"\\u{code:04x}" for code in BIDI_CONTROLS}, ord("\\"): "\\\\"}


def escape(text: str) -> str:
    """Text from the server (a prompt, a model's output, a name) as the CLI prints it: its
    control characters shown as escapes (`controls_shown`) and its Rich markup as it is."""
    return markup.escape(controls_shown(text))


def controls_shown(text: str) -> str:
    """The text with its control characters shown as `\\xNN` escapes and its bidirectional
    controls as `\\uNNNN`, for a terminal: a prompt from a scraped data set may hold sequences
    a terminal would act on. Its backslashes are doubled, so an escape it held already reads
    apart from one shown here."""
    return text.translate(_SHOWN)


@contextmanager
def writing(path: Path, option: str) -> Iterator[None]:
    """A file or folder the command cannot write (no such folder, no permission) is a bad
    `option` (exit code 2), not a traceback."""
    try:
        yield
    except OSError as exc:
        raise typer.BadParameter(f"cannot write {path}: {exc.strerror or exc}", param_hint=option) from exc


def usd(cost: float | None) -> str:
    """A cost as the CLI shows it: None is an unpriced endpoint, not free."""
    return "unknown" if cost is None else f"${cost:,.4f}"


def budget_text(budget: Budget) -> str:
    limits = [usd(budget.max_cost_usd)] if budget.max_cost_usd is not None else []
    limits += [f"{budget.max_tokens:,} tokens"] if budget.max_tokens is not None else []
    return " / ".join(limits) + (" (spent)" if budget.exhausted else "")


def interval(estimate: Interval, digits: int = 2, percent: bool = False) -> str:
    """`value [low, high] (n)`; a share as a percentage."""
    if estimate.value is None:
        return "n/a"
    scale, unit = (100, "%") if percent else (1, "")

    def shown(value: float) -> str:
        return f"{value * scale:.{digits}f}{unit}"

    bounds = (
        ""
        if estimate.low is None or estimate.high is None
        else f" [{shown(estimate.low)}, {shown(estimate.high)}]"
    )
    return f"{shown(estimate.value)}{bounds} (n={estimate.n})"
