"""How the CLI prints: the one console, text from the server, files it cannot write, and
money, budgets and intervals as every command shows them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich import markup
from rich.console import Console

from aidsafe.models import Budget, Interval
from app.bidi import BIDI_CONTROLS

# No emoji: `:skull:` in a prompt is text, as the rest of it is.
console = Console(emoji=False)
status = Console(stderr=True, emoji=False)  # what a command says beside data it writes to stdout

# C0 controls but tab and newline, DEL, and C1 controls: a terminal acts on them (ESC and CSI
# begin sequences that retitle it, clear it, recolour what follows or write its clipboard). And
# the bidirectional controls, which show the text after them reordered (Trojan Source).
_SHOWN = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if chr(code) not in "\t\n"},
    **{code: f"\\u{code:04x}" for code in BIDI_CONTROLS},
}
_CONTROL = re.compile("([" + re.escape("".join(map(chr, sorted(_SHOWN)))) + "])")


def escape(text: str) -> str:
    """Text from the server (a prompt, a model's output, a name) as Rich markup that prints it
    as it is, square brackets and backslashes included, but for its control characters: each
    shown as its escape (`\\x1b`, `\\u202e`) in reverse video, so that on a terminal it reads
    apart from the same characters written in the text (a regex in a message, say)."""
    pieces = _CONTROL.split(text)  # text, a control, text, ..., text
    shown = [
        _before_a_tag(piece) + f"[reverse]{_SHOWN[ord(control)]}[/]"
        for piece, control in zip(pieces[:-1:2], pieces[1::2], strict=True)
    ]
    return "".join(shown) + markup.escape(pieces[-1])


def _before_a_tag(text: str) -> str:
    """Text as markup that a tag follows: Rich reads 2k backslashes before a tag as k."""
    plain = text.rstrip("\\")
    return markup.escape(plain) + "\\" * 2 * (len(text) - len(plain))


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
