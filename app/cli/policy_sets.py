"""`aidsafe policy-sets`: list, show and register policy sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.connection import ApiKeyOpt, ApiUrl, api_client
from app.cli.output import console
from app.cli.registered_sets import SetFileError, print_as_yaml, print_registered, read_set_file

policy_sets_cli = typer.Typer(help="Policy sets (over the HTTP API).", no_args_is_help=True)


@policy_sets_cli.command("list")
def list_policy_sets(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Built-in sets and yours, every version: id, name@version, built-in or own, created."""
    with api_client(api_url, key) as client:
        print_registered(client.list_policy_sets())


@policy_sets_cli.command("show")
def show_policy_set(
    policy_set_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = ""
) -> None:
    """One version with its policies, as YAML (the format `create` reads)."""
    with api_client(api_url, key) as client:
        row = client.get_policy_set(policy_set_id)
    print_as_yaml(row, "policies", row.policies)


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
    with api_client(api_url, key) as client:
        row = client.register_policy_set(document)
    state = "registered" if row.created else "already registered"
    console.print(f"{row.name}@{row.version} {state} (id {row.id}, {len(row.policies)} policies).")
