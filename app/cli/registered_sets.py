"""What policy sets and prompt sets share on the command line: the YAML file a set is
registered from and shown as, and the listing of registered versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aidsafe.models import PolicySet, PromptSet
from app.cli.output import console


def print_as_yaml(row: PolicySet | PromptSet, contents: str, values: Any) -> None:
    """One version as the YAML file `create` reads (its `contents`: policies or templates),
    under a comment naming it."""
    document = {"name": row.name, "description": row.description, contents: values}
    # soft_wrap: a long name folded onto a second line would leave it outside the comment
    console.print(f"# {row.name}@{row.version} ({row.id})", highlight=False, soft_wrap=True)
    print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")


def print_registered(rows: list[PolicySet] | list[PromptSet]) -> None:
    """Registered sets, one a line: id, name@version, built-in or own, created."""
    for row in rows:
        origin = "built-in" if row.builtin else "own"
        console.print(
            f"{row.id}  {row.name}@{row.version}  {origin}  {row.created_at:%Y-%m-%d}", soft_wrap=True
        )


class SetFileError(ValueError):
    """A policy or prompt set the CLI cannot read from its file or folder."""


def read_set_file(path: Path, fields: str) -> dict[str, Any]:
    """The YAML mapping in `path` (of `fields`, as the error names them)."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SetFileError(f"{path}: not YAML ({exc})") from exc
    if not isinstance(document, dict):
        raise SetFileError(f"{path}: expected a mapping with {fields}")
    return document
