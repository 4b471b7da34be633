"""What policy sets and prompt sets share on the command line: the YAML file a set is
registered from, and the listing of registered versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aidsafe.models import PolicySet, PromptSet
from app.cli.output import console


def print_registered(rows: list[PolicySet] | list[PromptSet]) -> None:
    """Registered sets, one a line: id, name@version, built-in or own, created."""
    for row in rows:
        origin = "built-in" if row.builtin else "own"
        console.print(f"{row.id}  {row.name}@{row.version}  {origin}  {row.created_at:%Y-%m-%d}")


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
