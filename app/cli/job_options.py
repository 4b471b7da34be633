"""What the commands that make or change a job read from their options: the job's config,
its budget and its policy and prompt sets (the API validates each)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

PolicySetOpt = Annotated[
    str, typer.Option(help="Policy set name (`aidsafe policy-sets list`) whose policies the requests show.")
]
PolicyVersionOpt = Annotated[
    str | None,
    typer.Option(help="Pin a version of the policy set (of the built-in set without --policy-set)."),
]
PromptSetOpt = Annotated[
    str | None,
    typer.Option(
        help="Prompt set name (`aidsafe prompt-sets list`) wording the requests. Default: the built-in set."
    ),
]
PromptSetVersionOpt = Annotated[
    str | None,
    typer.Option(help="Pin a version of the prompt set (of the built-in set without --prompt-set)."),
]


Threshold = Annotated[
    list[str] | None,
    typer.Option(
        "--threshold",
        help="METRIC=SCORE (repeatable): the quality gate's lowest accepted score; turns grading on. "
        "Metrics left out are not gated; without any, every metric is gated at 3.",
    ),
]


def job_config(
    *,
    agents: int | None,
    max_rounds: int | None,
    max_tokens: int | None,
    mode: str | None,
    grading: bool,
    thresholds: list[str],
    pairs: bool,
    pair_max_tries: int | None,
    pair_min_gap: float | None,
    pair_baseline: bool = False,
    delivery: str | None = None,
    batch_unanswered: str | None = None,
) -> dict[str, Any]:
    """The `config` of a job request from the command line's options (the API validates it).
    Only the options given: the rest are a preset's, or the server's defaults."""
    config: dict[str, Any] = {"mode": mode} if mode else {}
    counts = {"agents": agents, "max_rounds": max_rounds, "max_tokens": max_tokens}
    config.update({k: v for k, v in counts.items() if v is not None})  # 0 rounds is a choice
    if grading or thresholds:
        config["grading"] = {"thresholds": _thresholds(thresholds)} if thresholds else {}
    if pairs:
        tries_and_gap = {"max_tries": pair_max_tries, "min_gap": pair_min_gap}
        config["pairs"] = {k: v for k, v in tries_and_gap.items() if v is not None}
        if pair_baseline:
            config["pairs"]["baseline"] = True
    if delivery:
        config["delivery"] = delivery
    if batch_unanswered:
        config["batch"] = {"unanswered": batch_unanswered}
    return config


def _thresholds(pairs: list[str]) -> dict[str, float]:
    thresholds = {}
    for pair in pairs:
        metric, _, score = pair.partition("=")
        try:
            thresholds[metric.strip()] = float(score)
        except ValueError:
            raise typer.BadParameter(f"{pair!r}: expected METRIC=SCORE", param_hint="--threshold") from None
    return thresholds


def requested_budget(usd: float | None, tokens: int | None) -> dict[str, Any] | None:
    """A job's budget from the command line (the API says what is wrong with it)."""
    given = {"max_cost_usd": usd, "max_tokens": tokens}
    return {name: value for name, value in given.items() if value is not None} or None
