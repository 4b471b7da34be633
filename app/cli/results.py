"""A job's results: `aidsafe show` prints its CoTs, `aidsafe export` downloads them as a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.panel import Panel

import aidsafe
from aidsafe.models import Cot, Item
from app.cli.connection import ApiKeyOpt, ApiUrl, api_client
from app.cli.output import console, escape, status, writing
from app.deliberation.config import Mode
from app.deliberation.parsing import labelled_intents


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


def show(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Print a job's items with their refined CoTs."""
    with api_client(api_url, key) as client:
        # An evaluation or a comparison makes no CoTs: each item would print "No CoT: completed".
        if (mode := client.get_job(job_id).config.get("mode")) not in set(Mode):
            elsewhere = " (its report: `aidsafe evaluate show`)" if mode == "model_evaluation" else ""
            console.print(f"[red]Job {job_id} is a {mode}: it makes no CoTs to show{elsewhere}.[/]")
            raise typer.Exit(1)
        print_cots(client, job_id)


def export(
    job_id: str,
    format: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="trl_sft, trl_dpo, aidsafe_csv, jsonl, parquet, label_studio or argilla."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="File to write.")],
    cot: Annotated[
        str | None, typer.Option(help="How chat formats carry the CoT: think, none or reasoning_content.")
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system message to put first in chat formats.")] = None,
    accepted_only: Annotated[bool, typer.Option(help="Only CoTs the quality gate accepted.")] = False,
    min_score: Annotated[
        list[str] | None, typer.Option(help="METRIC:SCORE (repeatable): only CoTs graded at least this.")
    ] = None,
    human_approved: Annotated[
        bool, typer.Option(help="Only CoTs a reviewer accepted and none currently rejects.")
    ] = False,
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
    with api_client(api_url, key) as client, writing(output, "--output"):
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
    size = f"{output.stat().st_size:,} bytes, " if output.is_file() else ""  # /dev/null, a pipe: none
    status.print(f"Wrote {output} ({size}{format}).")  # -o /dev/stdout: not into the export
