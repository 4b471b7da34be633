"""`aidsafe presets`: the server's named job configs."""

from __future__ import annotations

import typer
import yaml

from app.cli.connection import ApiKeyOpt, ApiUrl, api_client
from app.cli.output import console, escape

presets_cli = typer.Typer(
    help="The server's presets: named job configs (over the HTTP API).", no_args_is_help=True
)


@presets_cli.command("list")
def list_presets(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """Every preset: name@version and what it is for."""
    with api_client(api_url, key) as client:
        for preset in client.list_presets():
            console.print(
                f"{preset.name}@{preset.version}  {escape(preset.description)}",
                highlight=False,
                soft_wrap=True,
            )


@presets_cli.command("show")
def show_preset(name: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """One preset as YAML, the layout of the server's presets/*.yaml."""
    with api_client(api_url, key) as client:
        preset = client.get_preset(name)
    document = {"description": preset.description, "notes": preset.notes, "config": preset.config}
    console.print(f"# {preset.name}@{preset.version}", highlight=False)
    print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")
