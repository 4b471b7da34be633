"""`aidsafe compare`: two finished jobs' samples judged pairwise, and the comparison's figures."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from aidsafe.models import Comparison
from app.cli.connection import Advice, ApiKeyOpt, ApiUrl, api_client
from app.cli.follow import follow_job
from app.cli.output import console, escape, interval


def judge_role(spec: str) -> dict[str, Any]:
    """A judge from `--judge MODEL`, `MODEL@ENDPOINT` or `@ENDPOINT` (the endpoint's default
    model); the API fills what is left out."""
    model, _, endpoint = spec.partition("@")
    role = {"model": model.strip(), "endpoint": endpoint.strip()}
    if not any(role.values()):
        raise typer.BadParameter(
            f"{spec!r}: expected MODEL, MODEL@ENDPOINT or @ENDPOINT", param_hint="--judge"
        )
    return {name: value for name, value in role.items() if value}


def compare(
    baseline_job_id: str,
    candidate_job_id: str,
    judge: Annotated[
        list[str] | None,
        typer.Option(
            help="MODEL, MODEL@ENDPOINT or @ENDPOINT (repeatable: several judges, each judging every "
            "prompt). Default: one judge of the server's default model."
        ),
    ] = None,
    allow_mismatch: Annotated[
        bool, typer.Option(help="Compare jobs that differ in their policy set or grader anyway.")
    ] = False,
    label: Annotated[str | None, typer.Option(help="A name of yours for the comparison.")] = None,
    follow: Annotated[bool, typer.Option(help="Show progress until it ends, then the report.")] = True,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Judge two finished jobs' samples of the prompts both completed; print the results.

    Such as the zero-shot baseline against AIDSAFE: each judge's results and the metric means."""
    judges = [judge_role(spec) for spec in judge] if judge else None
    advice: Advice = {"comparison_mismatch": lambda _: "--allow-mismatch"}
    with api_client(api_url, key, advice) as client:
        comparison = client.create_comparison(
            baseline_job_id, candidate_job_id, judges=judges, allow_mismatch=allow_mismatch, label=label
        )
        console.print(f"Comparison [bold]{comparison.id}[/]: {comparison.prompts} prompts in common")
        if follow:
            follow_job(client, comparison.id)
            print_comparison(client.get_comparison(comparison.id))


def print_comparison(comparison: Comparison) -> None:
    """Each judge's wins, ties and losses of the candidate with 95 % intervals, the judges'
    agreement, and per metric each side's mean and the candidate's paired lead."""
    if comparison.mismatches:
        console.print(f"[yellow]Compared though they differ in: {', '.join(comparison.mismatches)}[/]")
    for results in comparison.judges:
        role, wins = results.judge, interval(results.win_rate, 1, True)
        console.print(
            f"Judge {escape(role['model'])}@{escape(role['endpoint'])}: candidate wins {wins}, "
            f"ties {interval(results.tie_rate, 1, True)}, loses {interval(results.loss_rate, 1, True)}"
            + (f"; {results.unreadable} unreadable" if results.unreadable else ""),
            highlight=False,
        )
    if (agreement := comparison.agreement) is not None:
        kappa = "n/a" if agreement.kappa is None else f"{agreement.kappa:.2f}"
        console.print(
            f"Agreement of {agreement.judges} judges: unanimous {interval(agreement.unanimous, 1, True)}, "
            f"{agreement.kappa_kind.capitalize()}'s kappa {kappa}",
            highlight=False,
        )
    for metric, figures in comparison.metrics.items():
        console.print(
            f"{metric}: baseline {interval(figures.baseline)}, candidate {interval(figures.candidate)}, "
            f"lead {interval(figures.delta)}",
            highlight=False,
        )
