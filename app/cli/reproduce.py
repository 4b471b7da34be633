"""`aidsafe reproduce`: the paper's procedure, an AIDSAFE job and its zero-shot baseline
compared by one judge, written out as a report."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.connection import ApiKeyOpt, ApiUrl, api_client
from app.cli.follow import follow_job
from app.cli.job_options import PolicySetOpt, PolicyVersionOpt, PromptSetOpt, PromptSetVersionOpt
from app.cli.output import console, escape, writing
from app.cli.prompt_files import PromptFileError, read_prompt_file


def _role_of(endpoint: str | None, model: str | None) -> dict[str, str]:
    """A role of the options given (the rest: the job's or the server's defaults)."""
    return {name: value for name, value in (("endpoint", endpoint), ("model", model)) if value}


def reproduce(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL or CSV of prompts.")],
    out: Annotated[Path, typer.Option(help="Folder for report.md, report.csv and the plots.")] = Path(
        "aidsafe-report"
    ),
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
    endpoint: Annotated[str | None, typer.Option(help="Endpoint of every writing role.")] = None,
    model: Annotated[str | None, typer.Option(help="Model of every writing role.")] = None,
    judge_endpoint: Annotated[str | None, typer.Option(help="Endpoint of the grader and judge.")] = None,
    judge_model: Annotated[str | None, typer.Option(help="Model of the grader and the judge.")] = None,
    agents: Annotated[int | None, typer.Option(help="Deliberating agents.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Deliberation round budget.")] = None,
    pairs: Annotated[bool, typer.Option(help="Also make ear-whisperer pairs (adds the gap plot).")] = False,
    policy_set: PolicySetOpt = "aidsafe-default",
    policy_version: PolicyVersionOpt = None,
    prompt_set: PromptSetOpt = None,
    prompt_set_version: PromptSetVersionOpt = None,
    label: Annotated[
        str, typer.Option(help="The report's title and the jobs' label.")
    ] = "AIDSAFE vs zero-shot",
) -> None:
    """The paper's procedure on your endpoint: AIDSAFE against the zero-shot baseline, reported.

    The AIDSAFE job and the zero-shot baseline on the same prompts, both under one policy set,
    worded by one prompt set and graded by one judge model, compared pairwise by it, and the
    report written to OUT (Markdown, CSV, PNG plots)."""
    try:
        items = read_prompt_file(file)
    except PromptFileError as exc:
        console.print(f"[red]{exc}[/] (nothing was submitted)")
        raise typer.Exit(2) from exc
    with writing(out, "--out"):  # before the jobs, which cost what a report lost at the end would
        out.mkdir(parents=True, exist_ok=True)
    writers, judge = _role_of(endpoint, model), _role_of(judge_endpoint, judge_model)
    config: dict[str, Any] = {"defaults": writers, "grading": {"grader": judge}}
    config.update({k: v for k, v in {"agents": agents, "max_rounds": max_rounds}.items() if v is not None})
    with api_client(api_url, key) as client:
        # One policy set and one prompt set for both jobs, and for the comparison's judge, which
        # takes the candidate's (a comparison refuses jobs of different policy sets).
        submit = partial(
            client.submit,
            items,
            label=label,
            policy_set=policy_set,
            policy_version=policy_version,
            prompt_set=prompt_set,
            prompt_set_version=prompt_set_version,
        )
        candidate = submit(config={**config, **({"pairs": {}} if pairs else {})})
        baseline = submit(config={**config, "mode": "zero_shot"})
        console.print(f"AIDSAFE job [bold]{candidate.id}[/], zero-shot job [bold]{baseline.id}[/]")
        for job in (candidate, baseline):  # both named first: a Ctrl-C in the first leaves both running
            if not follow_job(client, job.id).finished:
                raise typer.Exit(1)  # waiting for a budget: the message says how to go on
        judges = [judge] if judge else None
        comparison = client.create_comparison(baseline.id, candidate.id, judges=judges, label=label)
        console.print(f"Comparison [bold]{comparison.id}[/]")
        follow_job(client, comparison.id)
        report = client.get_comparison_report(comparison.id)
        (out / "report.md").write_text(report, encoding="utf-8")
        (out / "report.csv").write_text(client.get_comparison_report(comparison.id, format="csv"), "utf-8")
        for plot in ("scores", "gaps") if pairs else ("scores",):
            (out / f"{plot}.png").write_bytes(client.get_comparison_plot(comparison.id, plot))
    console.print(escape(report), highlight=False)
    console.print(f"Written to {out}/ (report.md, report.csv, plots)")
