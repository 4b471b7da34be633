"""`aidsafe`: manage API keys (straight in Postgres) and submit/follow/read jobs (over HTTP)."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import func, select, update

from app.config import get_settings
from app.store import keys
from app.store.db import make_engine, make_sessions
from app.store.models import ApiKey

cli = typer.Typer(help="AIDSAFE data service: policy-embedded CoT generation.", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys (written straight to the database).", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
console = Console()

ApiUrl = Annotated[str, typer.Option(envvar="AIDSAFE_API_URL", help="Base URL of the API.")]
ApiKeyOpt = Annotated[str, typer.Option("--key", envvar="AIDSAFE_API_KEY", help="API key.")]
FINISHED = ("completed", "cancelled")


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
            items.append({"prompt": record["prompt"], "metadata": record.get("metadata") or {}})
    if not items:
        raise PromptFileError(f"{path}: no prompts")
    return items


def _client(api_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        console.print(f"[red]The API answered {response.status_code}: {message}[/]")
        raise typer.Exit(1)
    return response.json()


@cli.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL or CSV of prompts.")],
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
    agents: Annotated[int | None, typer.Option(help="Deliberating agents.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Deliberation round budget.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max tokens per LLM call.")] = None,
    policy_set: Annotated[str, typer.Option(help="Policy set name.")] = "aidsafe-default",
    idempotency_key: Annotated[str | None, typer.Option(help="Makes a retried submit safe.")] = None,
    follow: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = True,
    show: Annotated[bool, typer.Option(help="Print the refined CoTs at the end.")] = True,
) -> None:
    """Submit a file of prompts as one job; optionally follow it and print its CoTs."""
    try:
        items = read_prompt_file(file)
    except PromptFileError as exc:
        console.print(f"[red]{exc}[/] (nothing was submitted)")
        raise typer.Exit(2) from exc
    config = {
        k: v for k, v in {"agents": agents, "max_rounds": max_rounds, "max_tokens": max_tokens}.items() if v
    }
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _client(api_url, key) as client:
        body = {"items": items, "policy_set": {"name": policy_set}, "config": config}
        job = _check(client.post("/v1/jobs", json=body, headers=headers))
        console.print(
            f"Job [bold]{job['id']}[/]: {len(items)} prompts, policy set "
            f"{job['policy_set']['name']}@{job['policy_set']['version']}"
        )
        if follow:
            job = follow_job(client, job["id"])
        if show:
            print_cots(client, job["id"])


def follow_job(client: httpx.Client, job_id: str, poll_s: float = 2.0) -> dict[str, Any]:
    """Poll the job, showing items done, per-stage counts and tokens, until it ends."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    last_detail = ""
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("items", total=None, detail="")
        while True:
            job = _check(client.get(f"/v1/jobs/{job_id}"))
            counts = job["counts"]
            done = sum(counts["by_status"].get(s, 0) for s in ("completed", "failed", "cancelled"))
            active = {
                stage: n
                for stage, statuses in counts["by_stage"].items()
                if (n := statuses.get("running", 0) + statuses.get("queued", 0)) and stage != "done"
            }
            stages = " ".join(f"{stage}:{n}" for stage, n in active.items()) or "-"
            usage = job["usage"]
            detail = (
                f"{job['status']} | in progress {stages} | failed {counts['by_status'].get('failed', 0)} | "
                f"{usage['llm_calls']} calls, {usage['prompt_tokens'] + usage['completion_tokens']} tokens"
            )
            progress.update(task, total=counts["total"], completed=done, detail=detail)
            if not console.is_terminal and detail != last_detail:  # a log gets lines, not a bar
                console.print(f"{done}/{counts['total']} items | {detail}")
                last_detail = detail
            if job["status"] in FINISHED:
                return job
            time.sleep(poll_s)


def print_cots(client: httpx.Client, job_id: str) -> None:
    """Every item of the job in order: its refined CoT, or why it has none."""
    cots: dict[int, dict[str, Any]] = {}
    cursor = None
    while True:
        page = _check(client.get(f"/v1/jobs/{job_id}/cots", params={"cursor": cursor} if cursor else {}))
        cots.update({c["position"]: c for c in page["data"]})
        if not (cursor := page["next_cursor"]):
            break
    cursor = None
    while True:
        params = {"cursor": cursor} if cursor else {}
        page = _check(client.get(f"/v1/jobs/{job_id}/items", params=params))
        for item in page["data"]:
            _print_item(item, cots.get(item["position"]))
        if not (cursor := page["next_cursor"]):
            break


def _print_item(item: dict[str, Any], cot: dict[str, Any] | None) -> None:
    title = f"#{item['position']} {item['status']}"
    lines = [f"[bold]Prompt:[/] {item['prompt']}"]
    if cot is None:
        lines.append(f"[red]No CoT: {item['error_code'] or item['status']}: {item['error_message'] or ''}[/]")
    else:
        intents = cot["intents"]
        lines.append(
            f"[bold]Intents:[/] {'; '.join(intents['explicit_intents'] + intents['implicit_intents'])}"
        )
        lines.append("[bold]Refined thoughts:[/]")
        for n, thought in enumerate(cot["refined_thoughts"], 1):
            sources = ", ".join(f"T{source}" for source in thought["sources"]) or "no source"
            lines.append(f"  {n}. {thought['text']}  [dim](from {sources})[/]")
        for dropped in cot["dropped_thoughts"]:
            lines.append(f"  [dim]dropped T{dropped['id']} ({dropped['reason']}): {dropped['text']}[/]")
        agreement = f"agreed in round {cot['agreed_by']['round']}" if cot["agreed"] else "round budget spent"
        lines.append(f"[bold]Response:[/] {cot['response']}")
        lines.append(
            f"[dim]{cot['rounds_used']} round(s), {agreement}; policy set {cot['policy_set']['name']}@"
            f"{cot['policy_set']['version']}[/]"
        )
    console.print(Panel("\n".join(lines), title=title, title_align="left"))


@cli.command()
def show(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Print a job's items with their refined CoTs."""
    with _client(api_url, key) as client:
        print_cots(client, job_id)


def main() -> None:
    cli()
