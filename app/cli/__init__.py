"""`aidsafe`: manage API keys (straight in Postgres) and the delivery spool's dead list
(straight in Redis), and submit/follow/read jobs (over HTTP, through the Python client
`aidsafe.Client`: the one HTTP layer).

The root command and its tree, in the order `aidsafe --help` lists them; each command lives
in the module of its name or group."""

from __future__ import annotations

import typer

from app.cli import (
    compare,
    deliveries,
    evaluate,
    follow,
    jobs,
    keys,
    policy_sets,
    presets,
    prompt_sets,
    reproduce,
    results,
    reviews,
    submit,
    webhooks,
)

cli = typer.Typer(help="AIDSAFE data service: policy-embedded CoT generation.", no_args_is_help=True)
cli.command()(submit.submit)
cli.command()(reproduce.reproduce)
cli.command("follow")(follow.follow_command)
cli.command()(results.show)
cli.command()(results.export)
cli.command()(compare.compare)
cli.add_typer(keys.keys_cli, name="keys")
cli.add_typer(jobs.jobs_cli, name="jobs")
cli.add_typer(policy_sets.policy_sets_cli, name="policy-sets")
cli.add_typer(prompt_sets.prompt_sets_cli, name="prompt-sets")
cli.add_typer(presets.presets_cli, name="presets")
cli.add_typer(webhooks.webhooks_cli, name="webhooks", no_args_is_help=True)
cli.add_typer(evaluate.evaluate_cli, name="evaluate")
cli.add_typer(reviews.reviews_cli, name="reviews", no_args_is_help=True)
cli.add_typer(deliveries.deliveries_cli, name="deliveries")


def main() -> None:
    cli()
