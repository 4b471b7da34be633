"""`aidsafe webhooks`: the webhooks labeling tools deliver reviews to."""

from __future__ import annotations

from typing import Annotated

import typer

from aidsafe.models import Rejection
from app.cli.connection import Advice, ApiKeyOpt, ApiUrl, api_client
from app.cli.output import console, escape

webhooks_cli = typer.Typer(help="Webhooks labeling tools deliver reviews to (over the HTTP API).")


@webhooks_cli.command("create")
def create_webhook(
    name: Annotated[str, typer.Argument(help="Which tool instance or project it is for.")],
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """A Label Studio webhook of your key's: its URL, and its secret (shown once)."""
    with api_client(api_url, key) as client:
        row = client.create_webhook(name)
    # The name is the client's text, not markup: "[/x]" raised before the secret was printed.
    console.print(f"Created webhook [bold]{escape(row.name)}[/] (id {row.id}). In Label Studio set:")
    console.print(f"  URL:    {row.url}", highlight=False, soft_wrap=True)  # to be copied whole
    if row.secret is None:  # the answer that showed it was lost; a retry answered the webhook
        console.print(f"  header: {row.secret_header}: <its secret was lost: revoke it and create another>")
        raise typer.Exit(1)
    console.print(f"  header: {row.secret_header}: <the secret below, shown once>", highlight=False)
    print(row.secret)


@webhooks_cli.command("list")
def list_webhooks(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Your webhooks, oldest first: id, name, URL, created, revoked."""
    with api_client(api_url, key) as client:
        for row in client.iter_webhooks(limit=500):
            revoked = f"  revoked {row.revoked_at:%Y-%m-%dT%H:%M:%S}" if row.revoked_at else ""
            console.print(
                f"{row.id}  {escape(row.name)}  {row.url}  {row.created_at:%Y-%m-%d}{revoked}",
                highlight=False,
                soft_wrap=True,
            )


@webhooks_cli.command("revoke")
def revoke_webhook(webhook_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Refuse the webhook's deliveries from now on."""
    with api_client(api_url, key) as client:
        row = client.revoke_webhook(webhook_id)
    console.print(f"Revoked webhook {escape(row.name)} ({row.id}).")


@webhooks_cli.command("delete")
def delete_webhook(webhook_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Delete a revoked webhook and the deliveries it refused (revoke it first)."""
    advice: Advice = {"webhook_not_revoked": lambda _: f"`aidsafe webhooks revoke {webhook_id}` first"}
    with api_client(api_url, key, advice) as client:
        client.delete_webhook(webhook_id)
    console.print(f"Deleted webhook {escape(webhook_id)}.", highlight=False)


@webhooks_cli.command("rejections")
def webhook_rejections(
    webhook_id: str,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Deliveries the webhook refused, newest first, with why."""
    with api_client(api_url, key) as client:
        rows: list[Rejection] = []
        while len(rows) < limit:  # a page stops short where its bodies are large
            before_id = rows[-1].id if rows else None
            page = client.webhook_rejections(webhook_id, limit=limit - len(rows), before_id=before_id)
            if not page:
                break
            rows += page
    if not rows:  # said, not left blank: this is where one checks that a delivery arrived
        console.print("No refused deliveries.")
    for row in rows:
        kept = "body kept" if row.body is not None else "no body (not authenticated)"
        when = f"{row.received_at:%Y-%m-%dT%H:%M:%S}"
        console.print(f"{when}  {row.code}  {escape(row.message)}  ({kept})", highlight=False)
