"""`aidsafe submit`: a file of prompts as one job, with the job's options (or only its
estimate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from aidsafe.models import Estimate
from app.cli.connection import ApiKeyOpt, ApiUrl, api_client
from app.cli.follow import follow_job
from app.cli.job_options import (
    PolicySetOpt,
    PolicyVersionOpt,
    PromptSetOpt,
    PromptSetVersionOpt,
    Threshold,
    job_config,
    requested_budget,
)
from app.cli.output import budget_text, console, usd
from app.cli.prompt_files import PromptFileError, read_prompt_file
from app.cli.results import print_cots


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
    policy_set: PolicySetOpt = "aidsafe-default",
    policy_version: PolicyVersionOpt = None,
    prompt_set: PromptSetOpt = None,
    prompt_set_version: PromptSetVersionOpt = None,
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
    show: Annotated[bool, typer.Option(help="Print the refined CoTs once the followed job ends.")] = True,
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
    budget = requested_budget(budget_usd, budget_tokens)
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
    with api_client(api_url, key) as client:
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
            + (f", budget {budget_text(job.budget)}" if job.budget else "")
        )
        # Unfollowed, the job has only just been queued: its CoTs are not written yet.
        if follow:
            follow_job(client, job.id)
            if show:
                print_cots(client, job.id)


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


def _metadata(metadata: str | None) -> dict[str, Any] | None:
    """The --metadata option's JSON object (the API says whether it takes its values)."""
    try:
        value = None if metadata is None else json.loads(metadata)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON ({exc.msg})", param_hint="--metadata") from None
    if value is not None and not isinstance(value, dict):  # the client reads it as a mapping
        raise typer.BadParameter(f"{metadata}: not a JSON object", param_hint="--metadata")
    return value
