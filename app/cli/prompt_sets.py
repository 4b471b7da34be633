"""`aidsafe prompt-sets`: list, show and register prompt sets (YAML, or a folder of
templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.connection import ApiKeyOpt, ApiUrl, api_client
from app.cli.output import console, writing
from app.cli.registered_sets import SetFileError, print_as_yaml, print_registered, read_set_file

prompt_sets_cli = typer.Typer(help="Prompt sets: the templates that word requests.", no_args_is_help=True)


@prompt_sets_cli.command("list")
def list_prompt_sets(api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """The built-in set and yours, every version: id, name@version, built-in or own, created."""
    with api_client(api_url, key) as client:
        print_registered(client.list_prompt_sets())


@prompt_sets_cli.command("show")
def show_prompt_set(
    prompt_set_id: str,
    to_folder: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="Write each template to <name>.txt here (what `create` reads)."),
    ] = None,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """One version with its templates: as YAML, or as a folder of .txt files to edit."""
    with api_client(api_url, key) as client:
        row = client.get_prompt_set(prompt_set_id)
    if to_folder is None:
        print_as_yaml(row, "templates", row.templates)
        return
    with writing(to_folder, "--to-folder"):
        to_folder.mkdir(parents=True, exist_ok=True)
        for name, text in row.templates.items():
            (to_folder / f"{name}.txt").write_text(text, encoding="utf-8")
    console.print(f"{len(row.templates)} templates of {row.name}@{row.version} in {to_folder}")


def read_prompt_set(path: Path, name: str | None, description: str) -> dict[str, Any]:
    """The document to register from `path`: a YAML file (name, description, templates), or a
    folder of <template>.txt files (named after the folder); `name` and `description`, if
    given, replace theirs. Raises SetFileError."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise SetFileError(f"{path}: no <template>.txt files")
        try:
            templates = {f.name.removesuffix(".txt"): f.read_text(encoding="utf-8") for f in files}
        except UnicodeDecodeError as exc:
            raise SetFileError(f"{path}: a template is not UTF-8 text ({exc.reason})") from exc
        document: dict[str, Any] = {"name": path.name, "templates": templates}
    else:
        document = read_set_file(path, "name, description, templates")
    given = {"name": name, "description": description}
    return {**document, **{field: value for field, value in given.items() if value}}


@prompt_sets_cli.command("create")
def create_prompt_set(
    path: Annotated[
        Path,
        typer.Argument(
            exists=True, help="A folder of <template>.txt files, or YAML: name, description, templates."
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="The set's name (default: the folder's or the YAML's).")
    ] = None,
    description: Annotated[str, typer.Option(help="What the set changes, for its readers.")] = "",
    base: Annotated[
        str | None,
        typer.Option(
            help="NAME or NAME@VERSION of a set (e.g. aidsafe-default) whose templates fill in those "
            "the folder or file does not give."
        ),
    ] = None,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    key: ApiKeyOpt = "",
) -> None:
    """Register a prompt set version: every template the stages use, or with --base those changed.

    Start from `show --to-folder` of the built-in set. The same templates again are the same
    version."""
    try:
        document = read_prompt_set(path, name, description)
    except SetFileError as exc:
        console.print(f"[red]{exc}[/] (nothing was registered)")
        raise typer.Exit(2) from exc
    if base is not None:
        base_name, _, base_version = base.partition("@")
        document["base"] = {"name": base_name, "version": base_version or None}
    with api_client(api_url, key) as client:
        row = client.register_prompt_set(document)
    state = "registered" if row.created else "already registered"
    inherited = f", {len(row.inherited)} from {row.base.name}@{row.base.version}" if row.base else ""
    console.print(
        f"{row.name}@{row.version} {state} (id {row.id}, {len(row.templates)} templates{inherited}).",
        highlight=False,
    )
