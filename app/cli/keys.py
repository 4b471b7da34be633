"""`aidsafe keys`: API keys, written straight to the database (no API key is needed to make
the first one)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from uuid import UUID

import typer
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cli.connection import service_settings, unusable
from app.cli.output import console, escape
from app.store import jobs, keys
from app.store.db import make_engine, make_sessions
from app.store.models import ApiKey

# Postgres's SQLSTATE for a table that is not there: a database made but not migrated.
_UNDEFINED_TABLE = "42P01"

keys_cli = typer.Typer(help="API keys (written straight to the database).", no_args_is_help=True)


async def _with_session(engine: AsyncEngine, work: Any) -> Any:
    try:
        async with make_sessions(engine).begin() as session:
            return await work(session)
    finally:
        await engine.dispose()


def _in_database(work: Any) -> Any:
    """`work(session)` in one transaction; a database it cannot use (a URL the settings refuse,
    down, not there, wrong credentials) ends the command saying which and why, not with a
    traceback."""
    settings = service_settings()
    engine = make_engine(settings.database_url, settings.database_timeout_s, connections=1)
    try:
        return asyncio.run(_with_session(engine, work))
    except (OSError, DBAPIError) as exc:  # OSError: refused, unreachable, timed out
        where = engine.url.render_as_string(hide_password=True)
        reason: object = exc.orig if isinstance(exc, DBAPIError) else exc
        if getattr(reason, "sqlstate", None) == _UNDEFINED_TABLE:  # reached, but never migrated
            reason = f"{reason}: its schema is not there yet; run `alembic upgrade head` against it"
        raise unusable(f"the database {where}", reason, "AIDSAFE_DATABASE_URL") from exc


@keys_cli.command("create")
def create_key(
    name: str,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Grant a scope (repeatable). Known: {', '.join(sorted(keys.SCOPES))}. "
            f"{keys.HAZARDOUS_READ} reads whispered beliefs, rejected CoTs and guard rationales."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the secret.")] = False,
) -> None:
    """Create a key; its secret is shown once and stored only as a hash."""
    try:
        key, secret = _in_database(lambda s: keys.create_key(s, name, scope or []))
    except keys.UnknownScope as exc:
        raise typer.BadParameter(str(exc), param_hint="--scope") from exc
    if quiet:
        print(secret)
    else:
        scopes = f", scopes {', '.join(key.scopes)}" if key.scopes else ""
        console.print(f"Created key [bold]{escape(key.name)}[/] ({key.prefix}…, id {key.id}{scopes}).")
        console.print("Secret, shown once:")
        print(secret)


@keys_cli.command("list")
def list_keys() -> None:
    """Every key: id, prefix, name, created, active or revoked, scopes."""

    async def rows(session: Any) -> list[ApiKey]:
        return list(await session.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    for key in _in_database(rows):
        revoked = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        scopes = ",".join(key.scopes) or "-"
        console.print(
            f"{key.id}  {key.prefix}…  {escape(key.name)}  {key.created_at:%Y-%m-%d}  {revoked}  {scopes}",
            soft_wrap=True,
        )


@keys_cli.command("revoke")
def revoke_key(
    key_id: UUID,  # checked here: SQL would answer a malformed id with a traceback
    cancel_jobs: Annotated[
        bool,
        typer.Option(
            help="Also cancel the key's unfinished jobs: once it is revoked no key can read their "
            "results, so they would only go on spending the shared LLM endpoints."
        ),
    ] = False,
) -> None:
    """Revoke a key by id; its jobs and data stay (its unfinished jobs run on unless --cancel-jobs)."""

    async def revoke(session: Any) -> tuple[int, int]:
        result = await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
        revoked = int(result.rowcount)
        cancelled = await jobs.cancel_unfinished(session, key_id) if revoked and cancel_jobs else 0
        return revoked, cancelled

    revoked, cancelled = _in_database(revoke)
    if not revoked:
        raise typer.BadParameter(f"no active key with id {key_id}")
    console.print(f"Revoked {key_id}" + (f"; cancelled {cancelled} unfinished job(s)" if cancel_jobs else ""))
