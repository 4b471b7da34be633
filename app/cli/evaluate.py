"""`aidsafe evaluate`: grade samples written elsewhere, or put models under test to a
benchmark, and print the reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import aidsafe
from aidsafe.models import ModelEvaluation, Rate, SampleEvaluation
from app.cli.connection import Advice, ApiKeyOpt, ApiUrl, api_client
from app.cli.follow import follow_job
from app.cli.job_options import PolicySetOpt, PolicyVersionOpt, PromptSetOpt, PromptSetVersionOpt
from app.cli.output import console, escape, interval

evaluate_cli = typer.Typer(help="Evaluate data and models.", no_args_is_help=True)


def _mapping(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise typer.BadParameter(f"{pair!r}: expected FIELD=COLUMN", param_hint="--map")
        mapping[field] = column
    return mapping


@evaluate_cli.command("samples")
def evaluate_samples(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL, CSV or Parquet samples.")],
    format: Annotated[
        str, typer.Option(help="Column shape: generic, cot, safety, over_refusal, jailbreak.")
    ] = "generic",
    map: Annotated[
        list[str] | None,
        typer.Option(help="FIELD=COLUMN over the shape's: prompt, thoughts, response, label, metadata.NAME."),
    ] = None,
    grade: Annotated[bool, typer.Option(help="Score every sample on the six metrics.")] = False,
    guard: Annotated[bool, typer.Option(help="The guard's verdict on every sample.")] = False,
    against: Annotated[
        str | None, typer.Option(help="Judge each sample against this job's sample of the same prompt.")
    ] = None,
    policy_set: PolicySetOpt = "aidsafe-default",
    policy_version: PolicyVersionOpt = None,
    prompt_set: PromptSetOpt = None,
    prompt_set_version: PromptSetVersionOpt = None,
    label: Annotated[str | None, typer.Option(help="A name of yours for the job.")] = None,
    follow: Annotated[bool, typer.Option(help="Show progress until the job ends, then the report.")] = True,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Grade, guard and/or judge samples written elsewhere; print the report."""
    # The API's words name its `columns` field; the CLI maps a column with --map.
    advice: Advice = {"missing_column": lambda _: "--map FIELD=COLUMN reads a field from another column"}
    with api_client(api_url, key, advice) as client:
        job = client.upload_samples(
            file,
            format=format,
            columns=_mapping(map or []),
            grade={} if grade else None,
            guard={} if guard else None,
            judge_against=against,
            policy_set=policy_set,
            policy_version=policy_version,
            prompt_set=prompt_set,
            prompt_set_version=prompt_set_version,
            label=label,
        )
        console.print(f"Sample evaluation [bold]{job.id}[/]: {job.samples} samples")
        if follow:
            follow_job(client, job.id)
            print_sample_report(client.get_sample_evaluation(job.id))


def print_sample_report(report: SampleEvaluation) -> None:
    """Means and rates with their 95 % intervals, and the score counts."""
    if (grades := report.grades) is not None:
        table = Table("metric", "mean [95 % CI]", *(str(score) for score in range(1, 6)))
        for metric, figures in grades.metrics.items():
            table.add_row(metric, interval(figures.mean), *(str(n) for n in figures.distribution.values()))
        console.print(table)
        # the table counts graded samples only: with none graded it is empty, and says nothing why
        failed = f"; {grades.grade_failed} could not be graded" if grades.grade_failed else ""
        console.print(f"Graded {grades.graded} of {report.samples} samples{failed}.", highlight=False)
    if report.guard is not None:
        console.print(f"Guard unsafe rate: {interval(report.guard.unsafe_rate, 1, percent=True)}")
        for name, rate in report.guard.by_label.items():
            console.print(f"  label {escape(name)}: {interval(rate.unsafe_rate, 1, percent=True)}")
    if (pairwise := report.pairwise) is not None:
        rates = ", ".join(
            f"{name} {interval(rate, 1, percent=True)}"
            for name, rate in (
                ("win", pairwise.win_rate),
                ("tie", pairwise.tie_rate),
                ("loss", pairwise.loss_rate),
            )
        )
        console.print(
            f"Against {pairwise.against_job_id}: {rates}; "
            f"{pairwise.unmatched} unmatched, {pairwise.unreadable} unreadable"
        )


def parse_target(spec: str) -> dict[str, Any]:
    """[NAME=]ENDPOINT:MODEL as a target; the model may hold colons (llama3.1:8b)."""
    name, equals, where = spec.partition("=")
    if not equals or ":" in name:  # no NAME=: the = is the model's
        name, where = "", spec
    endpoint, colon, model = where.partition(":")
    if not (endpoint and colon and model):
        raise typer.BadParameter(f"'{spec}' is not [NAME=]ENDPOINT:MODEL")
    return {"endpoint": endpoint, "model": model, **({"name": name} if name else {})}


def _role(spec: str | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    target = parse_target(spec)
    return {"endpoint": target["endpoint"], "model": target["model"]}


@evaluate_cli.command("model")
def evaluate_model(
    benchmarks: Annotated[
        list[Path],
        typer.Argument(
            exists=True, dir_okay=False, help="Benchmark files (.jsonl or .csv); each is named by its stem."
        ),
    ],
    target: Annotated[
        list[str],
        typer.Option(help="[NAME=]ENDPOINT:MODEL of a model under test (repeatable): the report's columns."),
    ],
    system_prompt: Annotated[
        str | None, typer.Option(help="Sent to every target as its system prompt.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="The targets' temperature (default 0).")] = None,
    safety_judge: Annotated[str | None, typer.Option(help="ENDPOINT:MODEL of the safety judge.")] = None,
    guard_style: Annotated[
        str | None, typer.Option(help="The safety judge's style: json, llama_guard or shieldgemma.")
    ] = None,
    refusal_judge: Annotated[str | None, typer.Option(help="ENDPOINT:MODEL of the refusal judge.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max tokens per LLM call.")] = None,
    policy_set: PolicySetOpt = "aidsafe-default",
    policy_version: PolicyVersionOpt = None,
    prompt_set: PromptSetOpt = None,
    prompt_set_version: PromptSetVersionOpt = None,
    label: Annotated[str | None, typer.Option(help="A name of yours for the evaluation.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Makes a retried submit safe.")] = None,
    follow: Annotated[bool, typer.Option(help="Show progress, then the report, when it ends.")] = True,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Benchmark models under test; print them side by side with 95 % intervals.

    Each target is asked every prompt of the benchmarks; a safety judge and a refusal judge
    classify each answer."""
    try:
        files = [aidsafe.benchmark_file(path) for path in benchmarks]
    except ValueError as exc:
        console.print(f"[red]{exc}[/] (nothing was submitted)")
        raise typer.Exit(2) from exc
    extra = {"system_prompt": system_prompt, "temperature": temperature}
    targets = [parse_target(spec) | {k: v for k, v in extra.items() if v is not None} for spec in target]
    judge = _role(safety_judge)
    if guard_style is not None:
        judge = (judge or {}) | {"style": guard_style}
    with api_client(api_url, key) as client:
        evaluation = client.evaluate_model(
            files,
            targets,
            safety_judge=judge,
            refusal_judge=_role(refusal_judge),
            policy_set=policy_set,
            policy_version=policy_version,
            prompt_set=prompt_set,
            prompt_set_version=prompt_set_version,
            max_tokens=max_tokens,
            label=label,
            idempotency_key=idempotency_key or None,
        )
        judged_by = f"{evaluation.policy_set.name}@{evaluation.policy_set.version}"
        console.print(
            f"Model evaluation [bold]{evaluation.id}[/]: {evaluation.counts.total} answers "
            f"({len(targets)} targets), judged against {judged_by}"
        )
        if follow:
            follow_job(client, evaluation.id)
            print_model_report(client.get_model_evaluation(evaluation.id))


@evaluate_cli.command("show")
def show_model_evaluation(
    evaluation_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = ""
) -> None:
    """Print a model evaluation's report as it stands."""
    with api_client(api_url, key) as client:
        print_model_report(client.get_model_evaluation(evaluation_id))


def _rate(rate: Rate) -> str:
    if rate.value is None or rate.low is None or rate.high is None:
        return "-"
    return f"{rate.value:.1%} [{rate.low:.1%}, {rate.high:.1%}] ({rate.count}/{rate.n})"


def print_model_report(evaluation: ModelEvaluation) -> None:
    """The table: a row per benchmark, category and metric; a column per target."""
    names = list(evaluation.by_target)
    # Names and categories are the client's text, not markup (a cell's string is read as markup).
    table = Table(
        "benchmark",
        "category",
        "metric",
        *map(escape, names),
        title=f"{evaluation.status}: rates with 95 % intervals",
    )
    for row in evaluation.table:
        table.add_row(
            escape(row.benchmark),
            escape(row.category or "(all)"),
            row.metric,
            *(_rate(row.models[name]) for name in names),
        )
    console.print(table)
    for name, counts in evaluation.by_target.items():
        console.print(
            f"{escape(name)}: {counts.completed}/{counts.items} answered, {counts.failed} failed, "
            f"unreadable verdicts: safety {counts.safety_unreadable}, refusal {counts.refusal_unreadable}, "
            f"truncated answers {counts.truncated}",
            highlight=False,
        )
