"""`aidsafe`: manage API keys (straight in Postgres) and submit/follow/read jobs (over HTTP,
through the Python client `aidsafe.Client`: the one HTTP layer)."""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import func, select, update

import aidsafe
from aidsafe.client import KEY_ENV, URL_ENV
from aidsafe.models import (
    BatchProgress,
    Budget,
    Comparison,
    Cot,
    Estimate,
    Interval,
    Item,
    JobProgress,
    ModelEvaluation,
    PolicySet,
    PromptSet,
    Rate,
    SampleEvaluation,
)
from app.config import get_settings
from app.deliberation.parsing import labelled_intents
from app.store import keys
from app.store.db import make_engine, make_sessions
from app.store.models import ApiKey, ItemStatus

cli = typer.Typer(help="AIDSAFE data service: policy-embedded CoT generation.", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys (written straight to the database).", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
console = Console()

ApiUrl = Annotated[str, typer.Option(envvar=URL_ENV, help="Base URL of the API.")]
ApiKeyOpt = Annotated[str, typer.Option("--key", envvar=KEY_ENV, help="API key.")]
PromptSetOpt = Annotated[
    str | None,
    typer.Option(
        help="Prompt set name (`aidsafe prompt-sets list`) wording the requests. Default: the built-in set."
    ),
]


async def _with_session(work: Any) -> Any:
    engine = make_engine(get_settings().database_url, pool_size=1)
    try:
        async with make_sessions(engine).begin() as session:
            return await work(session)
    finally:
        await engine.dispose()


@keys_cli.command("create")
def create_key(
    name: str,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Grant a scope (repeatable). Known: {', '.join(sorted(keys.SCOPES))}. "
            f"{keys.HAZARDOUS_READ} reads whispered beliefs, rejected CoTs and guard rationales."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the secret.")] = False,
) -> None:
    """Create a key; its secret is shown once and stored only as a hash."""
    try:
        key, secret = asyncio.run(_with_session(lambda s: keys.create_key(s, name, scope or [])))
    except keys.UnknownScope as exc:
        raise typer.BadParameter(str(exc), param_hint="--scope") from exc
    if quiet:
        print(secret)
    else:
        scopes = f", scopes {', '.join(key.scopes)}" if key.scopes else ""
        console.print(f"Created key [bold]{key.name}[/] ({key.prefix}…, id {key.id}{scopes}).")
        console.print("Secret, shown once:")
        print(secret)


@keys_cli.command("list")
def list_keys() -> None:
    """Every key: id, name, prefix, created, revoked, scopes."""

    async def rows(session: Any) -> list[ApiKey]:
        return list(await session.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    for key in asyncio.run(_with_session(rows)):
        revoked = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        scopes = ",".join(key.scopes) or "-"
        console.print(f"{key.id}  {key.prefix}…  {key.name}  {key.created_at:%Y-%m-%d}  {revoked}  {scopes}")


@keys_cli.command("revoke")
def revoke_key(key_id: str) -> None:
    """Revoke a key by id; its jobs and data stay."""

    async def revoke(session: Any) -> int:
        result = await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
        return result.rowcount

    if not asyncio.run(_with_session(revoke)):
        raise typer.BadParameter(f"no active key with id {key_id}")
    console.print(f"Revoked {key_id}")


class PromptFileError(ValueError):
    pass


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Items from a JSONL ({"prompt", "metadata"?} per line) or CSV (a `prompt` column,
    other columns become metadata). Any bad line fails the whole file, naming the line."""
    try:
        return _read_prompt_file(path)
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise PromptFileError(f"{path}: not a readable CSV ({exc})") from exc


def _read_prompt_file(path: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "prompt" not in (reader.fieldnames or []):
                raise PromptFileError(f"{path}: the CSV needs a 'prompt' column")
            for line, row in enumerate(reader, start=2):
                prompt = (row.pop("prompt") or "").strip()
                if not prompt:
                    raise PromptFileError(f"{path}:{line}: empty prompt")
                items.append({"prompt": prompt, "metadata": {k: v for k, v in row.items() if k}})
    else:
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{path}:{line}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise PromptFileError(f"{path}:{line}: expected an object with a string 'prompt'")
            if not record["prompt"].strip():
                raise PromptFileError(f"{path}:{line}: empty prompt")
            if not isinstance(record.get("metadata") or {}, dict):
                raise PromptFileError(f"{path}:{line}: 'metadata' must be an object")
            items.append({"prompt": record["prompt"], "metadata": record.get("metadata") or {}})
    if not items:
        raise PromptFileError(f"{path}: no prompts")
    return items


@contextmanager
def _client(api_url: str, key: str) -> Iterator[aidsafe.Client]:
    """The API's client; what it refuses ends the command (exit code 1), saying why."""
    try:
        with aidsafe.Client(api_url, key) as client:
            yield client
    except aidsafe.AidsafeError as exc:
        said = "The API answered " + str(exc.status) if exc.status else "No answer from the API"
        console.print(f"[red]{said}: {exc.code}: {escape(exc.message)}[/]")
        raise typer.Exit(1) from exc


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
    config.update(
        {k: v for k, v in {"agents": agents, "max_rounds": max_rounds, "max_tokens": max_tokens}.items() if v}
    )
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


@cli.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL or CSV of prompts.")],
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
    agents: Annotated[int | None, typer.Option(help="Deliberating agents.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Deliberation round budget.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max tokens per LLM call.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="aidsafe (multi-agent deliberation, the default) or zero_shot (one-call baseline)."
        ),
    ] = None,
    grading: Annotated[bool, typer.Option(help="Grade every CoT and gate it.")] = False,
    threshold: Threshold = None,
    pairs: Annotated[bool, typer.Option(help="Ear-whisperer preference pairs (turns grading on).")] = False,
    pair_max_tries: Annotated[int | None, typer.Option(help="Beliefs tried per item for a pair.")] = None,
    pair_min_gap: Annotated[
        float | None, typer.Option(help="Lowest policy-faithfulness gap for a kept pair.")
    ] = None,
    pair_baseline: Annotated[
        bool, typer.Option(help="Also sample rejected sides without the whisperer (the gap's baseline).")
    ] = False,
    delivery: Annotated[
        str | None,
        typer.Option(
            help="online (the default) or batch: the providers' batch APIs, at their price, in waves."
        ),
    ] = None,
    batch_unanswered: Annotated[
        str | None,
        typer.Option(
            help="With --delivery batch, what a batch leaves unanswered goes to: next_wave or online."
        ),
    ] = None,
    policy_set: Annotated[str, typer.Option(help="Policy set name.")] = "aidsafe-default",
    policy_version: Annotated[str | None, typer.Option(help="Pin a policy set version.")] = None,
    prompt_set: PromptSetOpt = None,
    prompt_set_version: Annotated[str | None, typer.Option(help="Pin a prompt set version.")] = None,
    preset: Annotated[
        str | None, typer.Option(help="A preset to start from (`aidsafe presets list`); options override it.")
    ] = None,
    preset_version: Annotated[str | None, typer.Option(help="Pin the preset's version.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Makes a retried submit safe.")] = None,
    label: Annotated[str | None, typer.Option(help="A name of yours for the job.")] = None,
    metadata: Annotated[
        str | None, typer.Option(help='The job\'s metadata, a JSON object: {"source": "wildchat"}.')
    ] = None,
    budget_usd: Annotated[
        float | None, typer.Option(help="Budget in USD: no new LLM call starts once it is spent.")
    ] = None,
    budget_tokens: Annotated[
        int | None, typer.Option(help="Budget in tokens (prompt + completion, all calls).")
    ] = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate", help="Print what the job would use (calls, tokens, cost); submit nothing."
        ),
    ] = False,
    follow: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = True,
    show: Annotated[bool, typer.Option(help="Print the refined CoTs at the end.")] = True,
) -> None:
    """Submit a file of prompts as one job; optionally follow it and print its CoTs."""
    try:
        items = read_prompt_file(file)
    except PromptFileError as exc:
        console.print(f"[red]{exc}[/] (nothing was submitted)")
        raise typer.Exit(2) from exc
    config = job_config(
        agents=agents,
        max_rounds=max_rounds,
        max_tokens=max_tokens,
        mode=mode,
        grading=grading,
        thresholds=threshold or [],
        pairs=pairs,
        pair_max_tries=pair_max_tries,
        pair_min_gap=pair_min_gap,
        pair_baseline=pair_baseline,
        delivery=delivery,
        batch_unanswered=batch_unanswered,
    )
    budget = _budget(budget_usd, budget_tokens)
    # What the estimate and the submission both read: the estimate answers for this very job.
    job_body: dict[str, Any] = dict(
        config=config,
        policy_set=policy_set,
        policy_version=policy_version,
        prompt_set=prompt_set,
        prompt_set_version=prompt_set_version,
        preset=preset,
        preset_version=preset_version,
        budget=budget,
    )
    with _client(api_url, key) as client:
        if estimate:
            print_estimate(client.estimate(items, **job_body))
            return
        job = client.submit(
            items,
            **job_body,
            label=label,
            metadata=_metadata(metadata),
            idempotency_key=idempotency_key or None,
        )
        console.print(
            f"Job [bold]{job.id}[/]: {len(items)} prompts, policy set "
            f"{job.policy_set.name}@{job.policy_set.version}"
            + (f", budget {_budget_text(job.budget)}" if job.budget else "")
        )
        if follow:
            follow_job(client, job.id)
        if show:
            print_cots(client, job.id)


def _role_of(endpoint: str | None, model: str | None) -> dict[str, str]:
    """A role of the options given (the rest: the job's or the server's defaults)."""
    return {name: value for name, value in (("endpoint", endpoint), ("model", model)) if value}


@cli.command()
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
    label: Annotated[
        str, typer.Option(help="The report's title and the jobs' label.")
    ] = "AIDSAFE vs zero-shot",
) -> None:
    """The paper's procedure on your endpoint: the AIDSAFE job and the zero-shot baseline on
    the same prompts, both graded by one judge model, compared pairwise by it, and the report
    written to OUT (Markdown, CSV, PNG plots)."""
    try:
        items = read_prompt_file(file)
    except PromptFileError as exc:
        console.print(f"[red]{exc}[/] (nothing was submitted)")
        raise typer.Exit(2) from exc
    writers, judge = _role_of(endpoint, model), _role_of(judge_endpoint, judge_model)
    config: dict[str, Any] = {"defaults": writers, "grading": {"grader": judge}}
    config.update({k: v for k, v in {"agents": agents, "max_rounds": max_rounds}.items() if v is not None})
    with _client(api_url, key) as client:
        candidate = client.submit(items, config={**config, **({"pairs": {}} if pairs else {})}, label=label)
        baseline = client.submit(items, config={**config, "mode": "zero_shot"}, label=label)
        for name, job in (("AIDSAFE", candidate), ("zero-shot", baseline)):
            console.print(f"{name} job [bold]{job.id}[/]")
            if not follow_job(client, job.id).finished:
                raise typer.Exit(1)  # waiting for a budget: the message says how to go on
        judges = [judge] if judge else None
        comparison = client.create_comparison(baseline.id, candidate.id, judges=judges, label=label)
        console.print(f"Comparison [bold]{comparison.id}[/]")
        follow_job(client, comparison.id)
        out.mkdir(parents=True, exist_ok=True)
        report = client.get_comparison_report(comparison.id)
        (out / "report.md").write_text(report, encoding="utf-8")
        (out / "report.csv").write_text(client.get_comparison_report(comparison.id, format="csv"), "utf-8")
        for plot in ("scores", "gaps") if pairs else ("scores",):
            (out / f"{plot}.png").write_bytes(client.get_comparison_plot(comparison.id, plot))
    console.print(report, markup=False, highlight=False)
    console.print(f"Written to {out}/ (report.md, report.csv, plots)")


def _budget(usd: float | None, tokens: int | None) -> dict[str, Any] | None:
    """A job's budget from the command line (the API says what is wrong with it)."""
    given = {"max_cost_usd": usd, "max_tokens": tokens}
    return {name: value for name, value in given.items() if value is not None} or None


def usd(cost: float | None) -> str:
    """A cost as the CLI shows it: None is an unpriced endpoint, not free."""
    return "unknown" if cost is None else f"${cost:,.4f}"


def _budget_text(budget: Budget) -> str:
    limits = [usd(budget.max_cost_usd)] if budget.max_cost_usd is not None else []
    limits += [f"{budget.max_tokens:,} tokens"] if budget.max_tokens is not None else []
    return " / ".join(limits) + (" (spent)" if budget.exhausted else "")


def print_estimate(estimate: Estimate) -> None:
    cost = estimate.cost_usd
    console.print(
        f"{estimate.items} items: {estimate.calls.min:,}-{estimate.calls.max:,} LLM calls, "
        f"{estimate.prompt_tokens.min:,}-{estimate.prompt_tokens.max:,} prompt tokens, "
        f"{estimate.completion_tokens.min:,}-{estimate.completion_tokens.max:,} completion tokens, cost "
        + (
            f"{usd(cost.min)}-{usd(cost.max)}"
            if cost
            else f"unknown (unpriced: {', '.join(estimate.unpriced_endpoints)})"
        ),
        highlight=False,
    )
    console.print("[dim]High estimates (prompts at three bytes a token, every reply at max_tokens).[/]")


def _metadata(metadata: str | None) -> Any:
    """The --metadata option's JSON (the API says whether it is an object it takes)."""
    try:
        return None if metadata is None else json.loads(metadata)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON ({exc.msg})", param_hint="--metadata") from None


@cli.command("follow")
def follow_command(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Show a job's progress until it ends."""
    with _client(api_url, key) as client:
        follow_job(client, job_id)


def follow_job(client: aidsafe.Client, job_id: Any, poll_s: float = 2.0) -> JobProgress:
    """Show items done, per-stage counts, tokens and the time left until the job ends; driven
    by the job's progress events, or by polling when the event stream is unavailable.
    Returns the job's final progress."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=console) as progress:
        view = ProgressView(progress, progress.add_task("items", total=None, detail=""))
        final = client.wait(
            job_id,
            poll_s=poll_s,
            on_event=view.event,
            on_polling=lambda exc: console.print(
                f"[dim]Progress events unavailable ({exc}); polling instead.[/]"
            ),
        )
    if final.refusals:
        console.print(f"Refusals by stage and model: {_refusals_text(final)}", highlight=False)
    if final.waiting_for_budget:
        console.print(
            f"[yellow]The job's budget is spent: its items wait. Raise it to resume, e.g. "
            f"`aidsafe jobs budget {job_id} --usd <more>` (or --tokens), or cancel the job.[/]",
            highlight=False,
        )
    return final


def _refusals_text(progress: JobProgress) -> str:
    """e.g. "seed: gpt-4o-mini 1, smollm2 3; grade: smollm2 1"."""
    return "; ".join(
        f"{stage}: " + ", ".join(f"{model} {n}" for model, n in by_model.items())
        for stage, by_model in progress.refusals_by_stage.items()
    )


class ProgressView:
    """The progress bar: items done out of the total, what is in which stage, failures, tokens.
    Item events move the bar at once; snapshots correct it."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task
        self.finished: set[str] = set()
        self.done_in_snapshot = 0
        self.last_line = ""

    def event(self, event: aidsafe.Event) -> None:
        if isinstance(event.data, JobProgress):
            self.show(event.data)
        else:
            self.finished.add(str(event.data.item_id))
            self.progress.update(self.task, completed=max(self.done_in_snapshot, len(self.finished)))

    def show(self, summary: JobProgress) -> None:
        counts, by_status, usage = summary.counts, summary.counts.by_status, summary.usage
        self.done_in_snapshot = counts.finished
        at_work = (ItemStatus.RUNNING, ItemStatus.QUEUED, ItemStatus.AWAITING_BATCH)
        active = {
            stage: n
            for stage, statuses in counts.by_stage.items()
            if (n := sum(statuses.get(status, 0) for status in at_work)) and stage != "done"
        }
        stages = " ".join(f"{stage}:{n}" for stage, n in active.items()) or "-"
        detail = (
            f"{summary.status} | in progress {stages} | failed {by_status.get(ItemStatus.FAILED, 0)} | "
            f"{usage.llm_calls} calls, {usage.prompt_tokens + usage.completion_tokens} tokens, "
            f"cost {usd(usage.cost_usd)}"
            + (f" | {wave_text(summary.batch)}" if summary.batch else "")
            + (f" | refused {summary.refusals}" if summary.refusals else "")
            + (f" | budget {_budget_text(summary.budget)}" if summary.budget else "")
        )
        self.progress.update(self.task, total=counts.total, completed=self.done_in_snapshot, detail=detail)
        line = f"{self.done_in_snapshot}/{counts.total} items | {detail}"
        if not console.is_terminal and line != self.last_line:  # a log gets lines, not a bar
            console.print(line)
            self.last_line = line


def wave_text(batch: BatchProgress) -> str:
    """A batch job's current wave, e.g. "wave 3 · batch in_progress 120/200 · saved $0.0123":
    its batches' provider statuses, their requests answered of all, and the saving so far."""
    if batch.batches:
        statuses = "/".join(sorted({b.provider_status or b.status for b in batch.batches}))
        answered = sum((b.request_counts or {}).get("completed", 0) for b in batch.batches)
        wave = f"wave {batch.wave} · batch {statuses} {answered}/{sum(b.requests for b in batch.batches)}"
    else:
        wave = f"wave {batch.wave} · {batch.requests.get('pending', 0)} calls waiting for a wave"
    return wave + (f" · saved {usd(batch.saving.saving_usd)}" if batch.saving else "")


def print_cots(client: aidsafe.Client, job_id: Any) -> None:
    """Every item of the job in order: its refined CoT, or why it has none."""
    cots = {cot.position: cot for cot in client.iter_cots(job_id, limit=500)}
    for item in client.iter_items(job_id, limit=500):
        _print_item(item, cots.get(item.position))


def _print_item(item: Item, cot: Cot | None) -> None:
    title = f"#{item.position} {item.status}"
    # Every text from the data is escaped: rich would read "[benign]" or "[/]" in a prompt,
    # a thought or a response as markup (and fail on a closing tag it did not open).
    lines = [f"[bold]Prompt:[/] {escape(item.prompt)}"]
    if cot is None:
        lines.append(f"[red]No CoT: {item.error_code or item.status}: {escape(item.error_message or '')}[/]")
    else:
        intents = cot.intents
        intents_text = "; ".join(labelled_intents(intents) + intents["implicit_intents"])
        lines.append(f"[bold]Intents:[/] {escape(intents_text)}")
        lines.append("[bold]Refined thoughts:[/]")
        for n, thought in enumerate(cot.refined_thoughts, 1):
            sources = ", ".join(f"T{source}" for source in thought.sources) or "no source"
            lines.append(f"  {n}. {escape(thought.text)}  [dim](from {sources})[/]")
        for dropped in cot.dropped_thoughts:
            lines.append(f"  [dim]dropped T{dropped.id} ({dropped.reason}): {escape(dropped.text)}[/]")
        agreement = (
            f"agreed in round {cot.agreed_by['round']}"
            if cot.agreed and cot.agreed_by
            else "round budget spent"
        )
        lines.append(f"[bold]Response:[/] {escape(cot.response)}")
        lines.append(
            f"[dim]{cot.rounds_used} round(s), {agreement}; policy set "
            f"{escape(cot.policy_set.name)}@{cot.policy_set.version}[/]"
        )
    console.print(Panel("\n".join(lines), title=title, title_align="left"))


@cli.command()
def show(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Print a job's items with their refined CoTs."""
    with _client(api_url, key) as client:
        print_cots(client, job_id)


@cli.command()
def export(
    job_id: str,
    format: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="trl_sft, trl_dpo, aidsafe_csv, jsonl, parquet, label_studio or argilla."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="File to write.")],
    cot: Annotated[str | None, typer.Option(help="How chat formats carry the CoT.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message to put first in chat formats.")] = None,
    accepted_only: Annotated[bool, typer.Option(help="Only CoTs the quality gate accepted.")] = False,
    min_score: Annotated[
        list[str] | None, typer.Option(help="METRIC:SCORE (repeatable): only CoTs graded at least this.")
    ] = None,
    human_approved: Annotated[bool, typer.Option(help="Only CoTs a reviewer approved.")] = False,
    exclude_human_rejected: Annotated[
        bool, typer.Option(help="Leave out CoTs a reviewer rejects (unreviewed ones stay).")
    ] = False,
    human_edits: Annotated[
        bool, typer.Option(help="Reviewers' latest edited responses in place of the model's, named per row.")
    ] = False,
    min_gap: Annotated[
        float | None,
        typer.Option(help="trl_dpo: only pairs with at least this gap (default: the job's pairs.min_gap)."),
    ] = None,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Download an export of the job, streamed to disk. The file appears only when complete."""
    with _client(api_url, key) as client:
        client.export(
            job_id,
            output,
            format=format,
            cot=cot,
            system=system,
            accepted_only=accepted_only,
            min_score=min_score,  # METRIC:SCORE as given: the API reads them
            human_approved=human_approved,
            exclude_human_rejected=exclude_human_rejected,
            human_edits=human_edits,
            min_gap=min_gap,
        )
    console.print(f"Wrote {output} ({output.stat().st_size:,} bytes, {format}).")


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


@cli.command()
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
    """Judge two finished jobs' samples of the prompts both completed (e.g. the zero-shot
    baseline against AIDSAFE) and print each judge's results and the metric means."""
    judges = [judge_role(spec) for spec in judge] if judge else None
    with _client(api_url, key) as client:
        comparison = client.create_comparison(
            baseline_job_id, candidate_job_id, judges=judges, allow_mismatch=allow_mismatch, label=label
        )
        console.print(f"Comparison [bold]{comparison.id}[/]: {comparison.prompts} prompts in common")
        if follow:
            follow_job(client, comparison.id)
            print_comparison(client.get_comparison(comparison.id))


def _interval(estimate: Interval, digits: int = 2, percent: bool = False) -> str:
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


def print_comparison(comparison: Comparison) -> None:
    """Each judge's wins, ties and losses of the candidate with 95 % intervals, the judges'
    agreement, and per metric each side's mean and the candidate's paired lead."""
    if comparison.mismatches:
        console.print(f"[yellow]Compared though they differ in: {', '.join(comparison.mismatches)}[/]")
    for results in comparison.judges:
        role, wins = results.judge, _interval(results.win_rate, 1, True)
        console.print(
            f"Judge {role['model']}@{role['endpoint']}: candidate wins {wins}, "
            f"ties {_interval(results.tie_rate, 1, True)}, loses {_interval(results.loss_rate, 1, True)}"
            + (f"; {results.unreadable} unreadable" if results.unreadable else ""),
            highlight=False,
        )
    if (agreement := comparison.agreement) is not None:
        kappa = "n/a" if agreement.kappa is None else f"{agreement.kappa:.2f}"
        console.print(
            f"Agreement of {agreement.judges} judges: unanimous {_interval(agreement.unanimous, 1, True)}, "
            f"{agreement.kappa_kind.capitalize()}'s kappa {kappa}",
            highlight=False,
        )
    for metric, figures in comparison.metrics.items():
        console.print(
            f"{metric}: baseline {_interval(figures.baseline)}, candidate {_interval(figures.candidate)}, "
            f"lead {_interval(figures.delta)}",
            highlight=False,
        )


jobs_cli = typer.Typer(help="Your jobs (over the HTTP API).", no_args_is_help=True)
cli.add_typer(jobs_cli, name="jobs")


@jobs_cli.command("list")
def list_jobs(
    status: Annotated[
        list[str] | None,
        typer.Option(
            help="queued, running, budget_exhausted, completed, cancelling or cancelled "
            "(repeatable: any of them)."
        ),
    ] = None,
    kind: Annotated[
        list[str] | None, typer.Option(help="aidsafe, zero_shot or comparison (repeatable: any of them).")
    ] = None,
    created_after: Annotated[
        str | None, typer.Option(help="ISO 8601 with a UTC offset: 2026-01-01T00:00:00Z.")
    ] = None,
    created_before: Annotated[str | None, typer.Option(help="ISO 8601 with a UTC offset.")] = None,
    label: Annotated[str | None, typer.Option(help="Only jobs with exactly this label.")] = None,
    metadata: Annotated[
        str | None,
        typer.Option(help='A JSON object the job\'s metadata must contain: {"source": "wildchat"}.'),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="How many, newest first (0: every one).")] = 50,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Your jobs, comparisons included, newest first: id, created, kind, status, items
    finished of total, label."""
    with _client(api_url, key) as client:
        listed = client.iter_jobs(
            status=status,
            kind=kind,
            created_after=created_after,
            created_before=created_before,
            label=label,
            metadata=metadata,  # JSON text as given: the API says what is wrong with it
            limit=min(limit, 500) if limit else 500,
        )
        for job in islice(listed, limit or None):
            console.print(
                f"{job.id}  {job.created_at:%Y-%m-%dT%H:%M:%S}  {job.kind}  {job.status}  "
                f"{job.counts.finished}/{job.counts.total}  {usd(job.cost_usd)}  {job.label or '-'}",
                highlight=False,
            )


policy_sets_cli = typer.Typer(help="Policy sets (over the HTTP API).", no_args_is_help=True)
cli.add_typer(policy_sets_cli, name="policy-sets")


def _print_registered(rows: list[PolicySet] | list[PromptSet]) -> None:
    """Registered sets, one a line: id, name@version, built-in or own, created."""
    for row in rows:
        origin = "built-in" if row.builtin else "own"
        console.print(f"{row.id}  {row.name}@{row.version}  {origin}  {row.created_at:%Y-%m-%d}")


@policy_sets_cli.command("list")
def list_policy_sets(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Built-in sets and yours, every version: id, name@version, built-in or own, created."""
    with _client(api_url, key) as client:
        _print_registered(client.list_policy_sets())


@policy_sets_cli.command("show")
def show_policy_set(
    policy_set_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = ""
) -> None:
    """One version with its policies, as YAML (the format `create` reads)."""
    with _client(api_url, key) as client:
        row = client.get_policy_set(policy_set_id)
    document = {"name": row.name, "description": row.description, "policies": row.policies}
    console.print(f"# {row.name}@{row.version} ({row.id})", highlight=False)
    print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")


@policy_sets_cli.command("create")
def create_policy_set(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="YAML: name, description, policies.")
    ],
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Register a policy set version from a YAML file (the layout of policies/default.yaml).
    The same content again is the same version."""
    try:
        document = read_set_file(file, "name, description, policies")
    except SetFileError as exc:
        console.print(f"[red]{exc}[/] (nothing was registered)")
        raise typer.Exit(2) from exc
    with _client(api_url, key) as client:
        row = client.register_policy_set(document)
    state = "registered" if row.created else "already registered"
    console.print(f"{row.name}@{row.version} {state} (id {row.id}, {len(row.policies)} policies).")


prompt_sets_cli = typer.Typer(help="Prompt sets: the templates that word requests.", no_args_is_help=True)
cli.add_typer(prompt_sets_cli, name="prompt-sets")


@prompt_sets_cli.command("list")
def list_prompt_sets(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """The built-in set and yours, every version: id, name@version, built-in or own, created."""
    with _client(api_url, key) as client:
        _print_registered(client.list_prompt_sets())


@prompt_sets_cli.command("show")
def show_prompt_set(
    prompt_set_id: str,
    to_folder: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="Write each template to <name>.txt here (what `create` reads)."),
    ] = None,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """One version with its templates: as YAML, or as a folder of .txt files to edit."""
    with _client(api_url, key) as client:
        row = client.get_prompt_set(prompt_set_id)
    if to_folder is None:
        document = {"name": row.name, "description": row.description, "templates": row.templates}
        console.print(f"# {row.name}@{row.version} ({row.id})", highlight=False)
        print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")
        return
    to_folder.mkdir(parents=True, exist_ok=True)
    for name, text in row.templates.items():
        (to_folder / f"{name}.txt").write_text(text, encoding="utf-8")
    console.print(f"{len(row.templates)} templates of {row.name}@{row.version} in {to_folder}")


class SetFileError(ValueError):
    """A policy or prompt set the CLI cannot read from its file or folder."""


def read_set_file(path: Path, fields: str) -> dict[str, Any]:
    """The YAML mapping in `path` (of `fields`, as the error names them)."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SetFileError(f"{path}: not YAML ({exc})") from exc
    if not isinstance(document, dict):
        raise SetFileError(f"{path}: expected a mapping with {fields}")
    return document


def read_prompt_set(path: Path, name: str | None, description: str) -> dict[str, Any]:
    """The document to register from `path`: a YAML file (name, description, templates), or a
    folder of <template>.txt files (named after the folder); `name` and `description`, if
    given, replace theirs. Raises SetFileError."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise SetFileError(f"{path}: no <template>.txt files")
        try:
            templates = {f.name.removesuffix(".txt"): f.read_text(encoding="utf-8") for f in files}
        except UnicodeDecodeError as exc:
            raise SetFileError(f"{path}: a template is not UTF-8 text ({exc.reason})") from exc
        document: dict[str, Any] = {"name": path.name, "templates": templates}
    else:
        document = read_set_file(path, "name, description, templates")
    given = {"name": name, "description": description}
    return {**document, **{field: value for field, value in given.items() if value}}


@prompt_sets_cli.command("create")
def create_prompt_set(
    path: Annotated[
        Path,
        typer.Argument(
            exists=True, help="A folder of <template>.txt files, or YAML: name, description, templates."
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="The set's name (default: the folder's or the YAML's).")
    ] = None,
    description: Annotated[str, typer.Option(help="What the set changes, for its readers.")] = "",
    base: Annotated[
        str | None,
        typer.Option(
            help="NAME or NAME@VERSION of a set (e.g. aidsafe-default) whose templates fill in those "
            "the folder or file does not give."
        ),
    ] = None,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Register a prompt set version: every template the stages use (start from `show
    --to-folder` of the built-in set), or with --base only the ones you change. The same
    templates again are the same version."""
    try:
        document = read_prompt_set(path, name, description)
    except SetFileError as exc:
        console.print(f"[red]{exc}[/] (nothing was registered)")
        raise typer.Exit(2) from exc
    if base is not None:
        base_name, _, base_version = base.partition("@")
        document["base"] = {"name": base_name, "version": base_version or None}
    with _client(api_url, key) as client:
        row = client.register_prompt_set(document)
    state = "registered" if row.created else "already registered"
    inherited = f", {len(row.inherited)} from {row.base.name}@{row.base.version}" if row.base else ""
    console.print(
        f"{row.name}@{row.version} {state} (id {row.id}, {len(row.templates)} templates{inherited}).",
        highlight=False,
    )


@jobs_cli.command("budget")
def set_budget(
    job_id: str,
    usd_: Annotated[float | None, typer.Option("--usd", help="The new budget in USD.")] = None,
    tokens: Annotated[int | None, typer.Option(help="The new budget in tokens.")] = None,
    none: Annotated[bool, typer.Option("--none", help="Remove the budget.")] = False,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Replace a job's budget (PATCH); items waiting for budget resume if it is no longer spent."""
    budget = _budget(usd_, tokens)
    if (budget is None) != none:
        raise typer.BadParameter("give --usd and/or --tokens, or --none")
    with _client(api_url, key) as client:
        job = client.update_job(job_id, budget=budget)
    console.print(
        f"Job {job.id}: {job.status}, cost {usd(job.usage.cost_usd)}, "
        + (f"budget {_budget_text(job.budget)}" if job.budget else "no budget"),
        highlight=False,
    )


presets_cli = typer.Typer(
    help="The server's presets: named job configs (over the HTTP API).", no_args_is_help=True
)
cli.add_typer(presets_cli, name="presets")


@presets_cli.command("list")
def list_presets(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Every preset: name@version and what it is for."""
    with _client(api_url, key) as client:
        for preset in client.list_presets():
            console.print(
                f"{preset.name}@{preset.version}  {escape(preset.description)}",
                highlight=False,
                soft_wrap=True,
            )


@presets_cli.command("show")
def show_preset(name: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """One preset as YAML, the layout of the server's presets/*.yaml."""
    with _client(api_url, key) as client:
        preset = client.get_preset(name)
    document = {"description": preset.description, "notes": preset.notes, "config": preset.config}
    console.print(f"# {preset.name}@{preset.version}", highlight=False)
    print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")


@jobs_cli.command("delete")
def delete_job(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Delete a finished job (or comparison) and everything derived from it."""
    with _client(api_url, key) as client:
        deletion = client.delete_job(job_id)
    rows = ", ".join(f"{table} {count}" for table, count in deletion.row_counts.items() if count)
    console.print(f"Deleted job {deletion.job_id}: {rows}.", highlight=False)


webhooks_cli = typer.Typer(help="Webhooks labeling tools deliver reviews to (over the HTTP API).")
cli.add_typer(webhooks_cli, name="webhooks", no_args_is_help=True)


@webhooks_cli.command("create")
def create_webhook(
    name: Annotated[str, typer.Argument(help="Which tool instance or project it is for.")],
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """A Label Studio webhook of your key's: its URL, and its secret (shown once)."""
    with _client(api_url, key) as client:
        row = client.create_webhook(name)
    console.print(f"Created webhook [bold]{row.name}[/] (id {row.id}). In Label Studio set:")
    console.print(f"  URL:    {row.url}", highlight=False)
    console.print(f"  header: {row.secret_header}: <the secret below, shown once>", highlight=False)
    print(row.secret)


@webhooks_cli.command("list")
def list_webhooks(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Your webhooks: id, name, URL, created, revoked."""
    with _client(api_url, key) as client:
        for row in client.list_webhooks():
            revoked = f"  revoked {row.revoked_at:%Y-%m-%dT%H:%M:%S}" if row.revoked_at else ""
            console.print(
                f"{row.id}  {row.name}  {row.url}  {row.created_at:%Y-%m-%d}{revoked}", highlight=False
            )


@webhooks_cli.command("revoke")
def revoke_webhook(webhook_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Refuse the webhook's deliveries from now on."""
    with _client(api_url, key) as client:
        row = client.revoke_webhook(webhook_id)
    console.print(f"Revoked webhook {row.name} ({row.id}).")


@webhooks_cli.command("rejections")
def webhook_rejections(
    webhook_id: str,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Deliveries the webhook refused, newest first, with why."""
    with _client(api_url, key) as client:
        rows = client.webhook_rejections(webhook_id, limit=limit)
    for row in rows:
        kept = "body kept" if row.body is not None else "no body (not authenticated)"
        console.print(
            f"{row.received_at:%Y-%m-%dT%H:%M:%S}  {row.code}  {row.message}  ({kept})", highlight=False
        )


evaluate_cli = typer.Typer(help="Evaluate data and models.", no_args_is_help=True)
cli.add_typer(evaluate_cli, name="evaluate")


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
    policy_set: Annotated[str, typer.Option(help="Policy set name.")] = "aidsafe-default",
    prompt_set: PromptSetOpt = None,
    label: Annotated[str | None, typer.Option(help="A name of yours for the job.")] = None,
    follow: Annotated[bool, typer.Option(help="Show progress until the job ends, then the report.")] = True,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Grade, guard and/or judge samples written elsewhere; print the report."""
    with _client(api_url, key) as client:
        job = client.upload_samples(
            file,
            format=format,
            columns=_mapping(map or []),
            grade={} if grade else None,
            guard={} if guard else None,
            judge_against=against,
            policy_set=policy_set,
            prompt_set=prompt_set,
            label=label,
        )
        console.print(f"Sample evaluation [bold]{job.id}[/]: {job.samples} samples")
        if follow:
            follow_job(client, job.id)
            print_sample_report(client.get_sample_evaluation(job.id))


def print_sample_report(report: SampleEvaluation) -> None:
    """Means and rates with their 95 % intervals, and the score counts."""
    if report.grades is not None:
        table = Table("metric", "mean [95 % CI]", *(str(score) for score in range(1, 6)))
        for metric, figures in report.grades.metrics.items():
            table.add_row(metric, _interval(figures.mean), *(str(n) for n in figures.distribution.values()))
        console.print(table)
    if report.guard is not None:
        console.print(f"Guard unsafe rate: {_interval(report.guard.unsafe_rate, 1, percent=True)}")
        for name, rate in report.guard.by_label.items():
            console.print(f"  label {escape(name)}: {_interval(rate.unsafe_rate, 1, percent=True)}")
    if (pairwise := report.pairwise) is not None:
        rates = ", ".join(
            f"{name} {_interval(rate, 1, percent=True)}"
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


reviews_cli = typer.Typer(help="Reviewers' verdicts from Label Studio and Argilla (over the HTTP API).")
cli.add_typer(reviews_cli, name="reviews", no_args_is_help=True)


def _kappa(kappa: float | None, method: str | None = None) -> str:
    shown = "n/a" if kappa is None else f"{kappa:.2f}"
    return f"{shown} ({method})" if method else shown


@reviews_cli.command("summary")
def review_summary(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """What the job's reviews add up to: counts, agreement with the grader's gate and between
    reviewers (shares with their Wilson 95 % intervals)."""
    with _client(api_url, key) as client:
        summary = client.get_review_summary(job_id)
    reviews, items, grader, between = (
        summary.reviews,
        summary.items,
        summary.grader,
        summary.between_reviewers,
    )
    console.print(
        f"Reviews: {reviews.total} by {summary.reviewers} reviewers: {reviews.accepted} accept, "
        f"{reviews.rejected} reject, {reviews.no_verdict} no verdict; {reviews.edited} edited the response.",
        highlight=False,
    )
    console.print(
        f"Items: {items.reviewed} of {items.completed} reviewed: {items.approved} approved, "
        f"{items.rejected} rejected, {items.edited} with an edit.",
        highlight=False,
    )
    console.print(
        f"With the grader's gate: {_interval(grader.agreement, 1, percent=True)} agree, "
        f"kappa {_kappa(grader.kappa)} "
        f"(both accept {grader.both_accept}, both reject {grader.both_reject}, "
        f"human accepts/gate rejects {grader.human_accepts_grader_rejects}, "
        f"human rejects/gate accepts {grader.human_rejects_grader_accepts}).",
        highlight=False,
    )
    console.print(
        f"Between reviewers: {_interval(between.agreement, 1, percent=True)} unanimous, "
        f"kappa {_kappa(between.kappa, between.kappa_method)}.",
        highlight=False,
    )


@reviews_cli.command("item")
def item_reviews(item_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """An item's reviews as they count now, oldest first, and its decision."""
    with _client(api_url, key) as client:
        reviewed = client.get_item_reviews(item_id)
    console.print(f"Item {reviewed.item_id}: {reviewed.decision or 'no verdict yet'}.", highlight=False)
    for review in reviewed.reviews:
        rating = f", rated {review.policy_faithfulness}" if review.policy_faithfulness else ""
        flagged = f", flags thoughts {review.flagged_thoughts}" if review.flagged_thoughts else ""
        console.print(
            f"{review.reviewed_at:%Y-%m-%dT%H:%M:%S}  {review.source}:{review.reviewer}  "
            f"{review.verdict or 'no verdict'}{rating}{flagged}",
            highlight=False,
        )
        if review.edited_response is not None:
            console.print(f"  edited response: {escape(review.edited_response)}", highlight=False)
        if review.comment:
            console.print(f"  comment: {escape(review.comment)}", highlight=False)


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
        str | None, typer.Option(help="The safety judge's style: json or llama_guard.")
    ] = None,
    refusal_judge: Annotated[str | None, typer.Option(help="ENDPOINT:MODEL of the refusal judge.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max tokens per LLM call.")] = None,
    policy_set: Annotated[str, typer.Option(help="The policies the judges are shown.")] = "aidsafe-default",
    prompt_set: PromptSetOpt = None,
    label: Annotated[str | None, typer.Option(help="A name of yours for the evaluation.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Makes a retried submit safe.")] = None,
    follow: Annotated[bool, typer.Option(help="Show progress, then the report, when it ends.")] = True,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Ask each target every prompt of the benchmarks; a safety judge and a refusal judge
    classify each answer; print the models side by side with 95 % intervals."""
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
    with _client(api_url, key) as client:
        evaluation = client.evaluate_model(
            files,
            targets,
            safety_judge=judge,
            refusal_judge=_role(refusal_judge),
            policy_set=policy_set,
            prompt_set=prompt_set,
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
    with _client(api_url, key) as client:
        print_model_report(client.get_model_evaluation(evaluation_id))


def _rate(rate: Rate) -> str:
    if rate.value is None or rate.low is None or rate.high is None:
        return "-"
    return f"{rate.value:.1%} [{rate.low:.1%}, {rate.high:.1%}] ({rate.count}/{rate.n})"


def print_model_report(evaluation: ModelEvaluation) -> None:
    """The table: a row per benchmark, category and metric; a column per target."""
    names = list(evaluation.by_target)
    table = Table(
        "benchmark", "category", "metric", *names, title=f"{evaluation.status}: rates with 95 % intervals"
    )
    for row in evaluation.table:
        table.add_row(
            row.benchmark, row.category or "(all)", row.metric, *(_rate(row.models[name]) for name in names)
        )
    console.print(table)
    for name, counts in evaluation.by_target.items():
        console.print(
            f"{name}: {counts.completed}/{counts.items} answered, {counts.failed} failed, "
            f"unreadable verdicts: safety {counts.safety_unreadable}, refusal {counts.refusal_unreadable}, "
            f"truncated answers {counts.truncated}",
            highlight=False,
        )


def main() -> None:
    cli()
