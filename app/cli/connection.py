"""How a command reaches the API: the --api-url and --key options, and the client whose
refusals end the command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.markup import escape

import aidsafe
from aidsafe.client import KEY_ENV, URL_ENV
from app.cli.output import console

ApiUrl = Annotated[str, typer.Option(envvar=URL_ENV, help="Base URL of the API.")]


ApiKeyOpt = Annotated[str, typer.Option("--key", envvar=KEY_ENV, help="API key.")]


@contextmanager
def api_client(api_url: str, key: str) -> Iterator[aidsafe.Client]:
    """The API's client; what it refuses ends the command (exit code 1), saying why."""
    try:
        with aidsafe.Client(api_url, key) as client:
            yield client
    except aidsafe.AidsafeError as exc:
        said = "The API answered " + str(exc.status) if exc.status else "No answer from the API"
        # the API's words name the HTTP header, which a CLI user never writes
        hint = (
            f" (give --key or set {KEY_ENV}; `aidsafe keys create NAME` makes one)"
            if exc.status == 401 and not key
            else ""
        )
        console.print(f"[red]{said}: {exc.code}: {escape(exc.message)}{hint}[/]")
        raise typer.Exit(1) from exc
