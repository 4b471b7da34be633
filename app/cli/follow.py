"""`aidsafe follow`: a job's progress until it ends, the view every command that waits for a
job shows."""

from __future__ import annotations

from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import aidsafe
from aidsafe.models import BatchProgress, Budget, JobProgress
from app.cli.connection import ApiKeyOpt, ApiUrl, api_client
from app.cli.output import budget_text, console, escape, usd
from app.store.models import ItemStatus


def follow_command(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Show a job's progress until it ends."""
    with api_client(api_url, key) as client:
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
    try:
        # Without a terminal the view prints lines; the bar would add its last frame, cut to width.
        with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
            view = ProgressView(progress, progress.add_task("items", total=None, detail=""))
            final = client.wait(
                job_id,
                poll_s=poll_s,
                on_event=view.event,
                on_polling=lambda exc: console.print(
                    f"[dim]Progress events unavailable ({escape(str(exc))}); polling instead.[/]"
                ),
            )
    # Neither Ctrl-C nor losing the API stops the job: say so, and how to go on or to stop it.
    except KeyboardInterrupt:
        console.print(f"[yellow]Stopped following; {_goes_on(job_id)}[/]", highlight=False)
        raise typer.Exit(130) from None
    except aidsafe.AidsafeError as exc:
        if exc.status is not None:  # the API's refusal: the caller says it
            raise
        said = escape(exc.message)  # a proxy's or the API's words: no markup of ours
        console.print(f"[red]No answer from the API ({said}); {_goes_on(job_id)}[/]", highlight=False)
        raise typer.Exit(1) from exc
    if final.refusals:
        console.print(f"Refusals by stage and model: {refusals_text(final)}", highlight=False)
    if final.waiting_for_budget:
        console.print(
            f"[yellow]The job's budget is spent: its items wait. Raise it to resume, e.g. "
            f"`aidsafe jobs budget {job_id} {_raised(final.budget)}` (or --none), or stop it: "
            f"`aidsafe jobs cancel {job_id}`.[/]",
            highlight=False,
        )
    return final


def _raised(budget: Budget | None) -> str:
    """The `jobs budget` option for the limit the job reached: a budget of tokens alone is
    raised in tokens (a job on an unpriced endpoint can have no cost limit)."""
    if budget is None or budget.max_tokens is None:
        return "--usd <more>"
    if budget.max_cost_usd is None or budget.spent_tokens >= budget.max_tokens:
        return "--tokens <more>"
    return "--usd <more>"


def _goes_on(job_id: Any) -> str:
    return (
        f"job {job_id} goes on. `aidsafe follow {job_id}` follows it again, "
        f"`aidsafe jobs cancel {job_id}` stops it."
    )


def refusals_text(progress: JobProgress) -> str:
    """e.g. "seed: gpt-4o-mini 1, smollm2 3; grade: smollm2 1"."""
    return "; ".join(
        f"{stage}: " + ", ".join(f"{escape(model)} {n}" for model, n in by_model.items())
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
        # Queued items carry the stage they run next, yet wait; those awaiting a batch's answers
        # are at work, as the job's status counts them.
        at_work = (ItemStatus.RUNNING, ItemStatus.AWAITING_BATCH)
        active = {
            stage: n
            for stage, statuses in counts.by_stage.items()
            if (n := sum(statuses.get(status, 0) for status in at_work)) and stage != "done"
        }
        stages = " ".join(f"{stage}:{n}" for stage, n in active.items()) or "-"
        detail = (
            f"{summary.status} | queued {by_status.get(ItemStatus.QUEUED, 0)} | in progress {stages} | "
            f"failed {by_status.get(ItemStatus.FAILED, 0)} | "
            f"{usage.llm_calls} calls, {usage.prompt_tokens + usage.completion_tokens} tokens, "
            f"cost {usd(usage.cost_usd)}"
            + (f" | {wave_text(summary.batch)}" if summary.batch else "")
            + (f" | refused {summary.refusals}" if summary.refusals else "")
            + (f" | budget {budget_text(summary.budget)}" if summary.budget else "")
        )
        self.progress.update(self.task, total=counts.total, completed=self.done_in_snapshot, detail=detail)
        line = f"{self.done_in_snapshot}/{counts.total} items | {detail}"
        if not console.is_terminal and line != self.last_line:  # a log gets lines, not a bar
            console.print(line, soft_wrap=True)  # one a line, not folded at 80 columns
            self.last_line = line


def wave_text(batch: BatchProgress) -> str:
    """A batch job's current wave, e.g. "wave 3 · batch in_progress 120/200 · saved $0.0123":
    its batches' provider statuses, their requests answered of all, and the saving so far."""
    if batch.batches:
        statuses = escape("/".join(sorted({b.provider_status or b.status for b in batch.batches})))
        answered = sum((b.request_counts or {}).get("completed", 0) for b in batch.batches)
        wave = f"wave {batch.wave} · batch {statuses} {answered}/{sum(b.requests for b in batch.batches)}"
    else:
        wave = f"wave {batch.wave} · {batch.requests.get('pending', 0)} calls waiting for a wave"
    return wave + (f" · saved {usd(batch.saving.saving_usd)}" if batch.saving else "")
