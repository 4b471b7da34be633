"""How a command reaches the API (the --api-url and --key options, and the client whose
refusals end the command), and how one that reaches Redis or the database straight ends when
it cannot use them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

import aidsafe
from aidsafe.client import KEY_ENV, URL_ENV
from app.cli.output import console, escape
from app.config import Settings, get_settings, refusals

ApiUrl = Annotated[str, typer.Option(envvar=URL_ENV, help="Base URL of the API.")]


ApiKeyOpt = Annotated[str, typer.Option("--key", envvar=KEY_ENV, help="API key.")]

# A command's own way out of a refusal, by the refusal's code. The API's words name its fields,
# headers and routes (`allow_mismatch`, POST /v1/jobs/{id}/cancel), which a CLI user never writes.
Advice = Mapping[str, Callable[[aidsafe.AidsafeError], str]]
# What frees room under a per-key limit (409 limit_reached, by its `limit`), for any command
# that creates: the CLI's words for the API's routes.
_LIMIT_ADVICE = {
    "open_jobs": "`aidsafe jobs list --status queued --status running --status budget_exhausted` shows "
    "the open ones; `aidsafe jobs cancel ID` ends one you no longer want",
    "webhooks": "`aidsafe webhooks list` shows them; `aidsafe webhooks revoke ID` frees a place",
}


@contextmanager
def api_client(api_url: str, key: str, advice: Advice | None = None) -> Iterator[aidsafe.Client]:
    """The API's client; what it refuses ends the command (exit code 1), saying why, and how
    to go on with this command when `advice` knows."""
    try:
        with aidsafe.Client(api_url, key) as client:
            yield client
    except aidsafe.AidsafeError as exc:
        said = "The API answered " + str(exc.status) if exc.status else "No answer from the API"
        hint = ""
        if exc.status == 401 and not key:  # the API's words name the HTTP header
            hint = f"give --key or set {KEY_ENV}; `aidsafe keys create NAME` makes one"
        elif exc.code == "connection_failed":  # the client's words name neither the URL nor another way
            hint = f"is the API running at {api_url}? Start `aidsafe-api`, or give --api-url or set {URL_ENV}"
        elif advice and exc.code in advice:
            hint = "with the CLI: " + advice[exc.code](exc)
        elif exc.code == "limit_reached" and (freeing := _freeing(exc.details)):
            hint = "with the CLI: " + freeing
        hint = f" ({escape(hint)})" if hint else ""
        console.print(f"[red]{said}: {exc.code}: {escape(exc.message)}{hint}[/]")
        raise typer.Exit(1) from exc


def _freeing(details: object) -> str | None:
    """The CLI's way to free room under the limit a limit_reached names, if it has one."""
    return _LIMIT_ADVICE.get(str(details.get("limit"))) if isinstance(details, dict) else None


def unusable(what: str, reason: object, setting: str) -> typer.Exit:
    """The end (exit code 1) of a command that cannot use what it reaches straight (Redis, the
    database): which, why, and the setting that names it, on one line; raise it."""
    console.print(f"[red]Cannot use {escape(what)}: {escape(str(reason))}[/] (see {setting})", soft_wrap=True)
    return typer.Exit(1)


def service_settings() -> Settings:
    """The service's settings (AIDSAFE_*), as a command that reaches Redis or the database
    straight reads them: a refused one (a database URL of another driver, an option asyncpg
    cannot honour) ends the command through `unusable`, naming the first such setting and why
    (never its value), not with a traceback."""
    try:
        return get_settings()
    except (ValidationError, SettingsError) as exc:
        [(setting, reason), *_] = refusals(exc)
        raise unusable("the settings", reason, setting) from exc


@contextmanager
def url_of(setting: str, what: str) -> Iterator[None]:
    """Around making a client from the URL `setting` holds (no connection yet): one it refuses
    (another scheme, no URL at all) ends the command through `unusable`, not with a traceback."""
    try:
        yield
    # redis-py: ValueError, TypeError (an option in the query it does not take: `?timeout=3`).
    # (The database URL is refused, if it is, as the settings load: service_settings.)
    except (ValueError, TypeError) as exc:
        raise unusable(what, exc, setting) from exc
