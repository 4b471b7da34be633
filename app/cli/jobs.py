"""`aidsafe jobs`: list your jobs, change a job's budget, cancel or delete a job."""

from __future__ import annotations

from itertools import islice
from typing import Annotated

import typer

from app.cli.connection import Advice, ApiKeyOpt, ApiUrl, api_client
from app.cli.job_options import requested_budget
from app.cli.output import budget_text, console, escape, usd

jobs_cli = typer.Typer(help="Your jobs (over the HTTP API).", no_args_is_help=True)


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
        list[str] | None,
        typer.Option(
            help="aidsafe, zero_shot, comparison, sample_evaluation or model_evaluation "
            "(repeatable: any of them)."
        ),
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
    """Your jobs, comparisons and evaluations included, newest first.

    Each with its id, created, kind, status, items finished of total, cost and label."""
    with api_client(api_url, key) as client:
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
                f"{job.counts.finished}/{job.counts.total}  {usd(job.cost_usd)}  {escape(job.label or '-')}",
                highlight=False,
                soft_wrap=True,  # a job a line, however narrow the terminal: for grep and cut
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
    budget = requested_budget(usd_, tokens)
    if (budget is None) != none:
        raise typer.BadParameter("give --usd and/or --tokens, or --none")
    with api_client(api_url, key) as client:
        job = client.update_job(job_id, budget=budget)
    console.print(
        f"Job {job.id}: {job.status}, cost {usd(job.usage.cost_usd)}, "
        + (f"budget {budget_text(job.budget)}" if job.budget else "no budget"),
        highlight=False,
    )


@jobs_cli.command("cancel")
def cancel_job(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Cancel a job (or comparison); what is done stays. Cancelling twice is harmless.

    Its queued items stop at once, its running ones within a lease."""
    with api_client(api_url, key) as client:
        job = client.cancel_job(job_id)
    console.print(
        f"Job {job.id}: {job.status}, {job.counts.finished}/{job.counts.total} items finished.",
        highlight=False,
    )


@jobs_cli.command("delete")
def delete_job(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Delete a finished job (or comparison) and everything derived from it."""
    advice: Advice = {
        "job_running": lambda _: f"`aidsafe jobs cancel {job_id}`",
        "job_in_comparison": lambda refusal: (
            "`aidsafe jobs delete ID` for each of " + ", ".join(refusal.details["comparison_ids"])
        ),
    }
    with api_client(api_url, key, advice) as client:
        deletion = client.delete_job(job_id)
    rows = ", ".join(f"{table} {count}" for table, count in deletion.row_counts.items() if count)
    console.print(f"Deleted job {deletion.job_id}: {rows}.", highlight=False)
