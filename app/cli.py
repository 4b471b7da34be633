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
from sqlalchemy import func, select, update

import aidsafe
from aidsafe.client import KEY_ENV, URL_ENV
from aidsafe.models import Budget, Cot, Estimate, Item, JobProgress
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
    policy_set: Annotated[str, typer.Option(help="Policy set name.")] = "aidsafe-default",
    policy_version: Annotated[str | None, typer.Option(help="Pin a policy set version.")] = None,
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
    )
    budget = _budget(budget_usd, budget_tokens)
    # What the estimate and the submission both read: the estimate answers for this very job.
    job_body: dict[str, Any] = dict(
        config=config,
        policy_set=policy_set,
        policy_version=policy_version,
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
        active = {
            stage: n
            for stage, statuses in counts.by_stage.items()
            if (n := statuses.get(ItemStatus.RUNNING, 0) + statuses.get(ItemStatus.QUEUED, 0))
            and stage != "done"
        }
        stages = " ".join(f"{stage}:{n}" for stage, n in active.items()) or "-"
        detail = (
            f"{summary.status} | in progress {stages} | failed {by_status.get(ItemStatus.FAILED, 0)} | "
            f"{usage.llm_calls} calls, {usage.prompt_tokens + usage.completion_tokens} tokens, "
            f"cost {usd(usage.cost_usd)}"
            + (f" | refused {summary.refusals}" if summary.refusals else "")
            + (f" | budget {_budget_text(summary.budget)}" if summary.budget else "")
        )
        self.progress.update(self.task, total=counts.total, completed=self.done_in_snapshot, detail=detail)
        line = f"{self.done_in_snapshot}/{counts.total} items | {detail}"
        if not console.is_terminal and line != self.last_line:  # a log gets lines, not a bar
            console.print(line)
            self.last_line = line


def print_cots(client: aidsafe.Client, job_id: Any) -> None:
    """Every item of the job in order: its refined CoT, or why it has none."""
    cots = {cot.position: cot for cot in client.iter_cots(job_id, limit=500)}
    for item in client.iter_items(job_id, limit=500):
        _print_item(item, cots.get(item.position))


def _print_item(item: Item, cot: Cot | None) -> None:
    title = f"#{item.position} {item.status}"
    lines = [f"[bold]Prompt:[/] {item.prompt}"]
    if cot is None:
        lines.append(f"[red]No CoT: {item.error_code or item.status}: {item.error_message or ''}[/]")
    else:
        intents = cot.intents
        # Escaped: rich would read an intent's "[benign]" as markup.
        intents_text = "; ".join(labelled_intents(intents) + intents["implicit_intents"])
        lines.append(f"[bold]Intents:[/] {escape(intents_text)}")
        lines.append("[bold]Refined thoughts:[/]")
        for n, thought in enumerate(cot.refined_thoughts, 1):
            sources = ", ".join(f"T{source}" for source in thought.sources) or "no source"
            lines.append(f"  {n}. {thought.text}  [dim](from {sources})[/]")
        for dropped in cot.dropped_thoughts:
            lines.append(f"  [dim]dropped T{dropped.id} ({dropped.reason}): {dropped.text}[/]")
        agreement = (
            f"agreed in round {cot.agreed_by['round']}"
            if cot.agreed and cot.agreed_by
            else "round budget spent"
        )
        lines.append(f"[bold]Response:[/] {cot.response}")
        lines.append(
            f"[dim]{cot.rounds_used} round(s), {agreement}; policy set {cot.policy_set.name}@"
            f"{cot.policy_set.version}[/]"
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
        )
    console.print(f"Wrote {output} ({output.stat().st_size:,} bytes, {format}).")


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


@policy_sets_cli.command("list")
def list_policy_sets(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Built-in sets and yours, every version: id, name@version, built-in or own, created."""
    with _client(api_url, key) as client:
        for row in client.list_policy_sets():
            origin = "built-in" if row.builtin else "own"
            console.print(f"{row.id}  {row.name}@{row.version}  {origin}  {row.created_at:%Y-%m-%d}")


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
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        console.print(f"[red]{file}: not YAML ({exc})[/] (nothing was registered)")
        raise typer.Exit(2) from exc
    if not isinstance(document, dict):
        console.print(f"[red]{file}: expected a mapping with name, description, policies[/]")
        raise typer.Exit(2)
    with _client(api_url, key) as client:
        row = client.register_policy_set(document)
    state = "registered" if row.created else "already registered"
    console.print(f"{row.name}@{row.version} {state} (id {row.id}, {len(row.policies)} policies).")


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


def main() -> None:
    cli()
