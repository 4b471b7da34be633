"""The options an export takes from its request: how chat records carry the chain of
thought, a system message, reviewers' edits, and the score filter as the request spells it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from app.deliberation.results import METRICS
from app.errors import InvalidFilter


class CotStyle(StrEnum):
    """How a chat record carries the chain of thought."""

    THINK = "think"  # assistant content = "<think>\n...\n</think>\n\n" + response (DeepSeek-R1, Qwen3)
    NONE = "none"  # the response alone
    REASONING_CONTENT = "reasoning_content"  # a separate message field, as vLLM and Qwen3 templates use


@dataclass(frozen=True)
class ExportOptions:
    cot: CotStyle = CotStyle.THINK
    system: str | None = None  # a system message to put first in chat records
    # The latest reviewer's edited response replaces the model's, and each record names the
    # edit it carries (`human_edit`, null: the model's own response).
    human_edits: bool = False


def parse_min_scores(values: list[str]) -> dict[str, float]:
    """`metric:value` strings (e.g. `cot_policy_faithfulness:4`) to {metric: value}, the
    highest value of a metric named twice. Raises InvalidFilter for an unknown metric
    (its details list the metrics) or a value that is not a number 1-5."""
    wanted: dict[str, float] = {}
    for text in values:
        parts = text.split(":")
        if len(parts) != 2 or parts[0] not in METRICS:
            raise InvalidFilter(
                f"min_score {text!r}: expected <metric>:<score>, the metric one of details.metrics",
                {"metrics": list(METRICS)},
            )
        metric, value = parts
        try:
            score = float(value)
        except ValueError:
            score = math.nan  # refused below
        if not 1 <= score <= 5:
            raise InvalidFilter(f"min_score {text!r}: the score must be a number from 1 to 5")
        wanted[metric] = max(score, wanted.get(metric, score))
    return wanted
