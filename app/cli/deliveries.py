"""`aidsafe deliveries`: the Label Studio deliveries spooled while Postgres was away that a
worker could not read (the dead list), straight in Redis (app/labeling/deliveries.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import typer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.cli.connection import service_settings, unusable, url_of
from app.cli.output import console, escape
from app.labeling import deliveries

deliveries_cli = typer.Typer(
    help="Spooled Label Studio deliveries a worker could not read (straight in Redis).", no_args_is_help=True
)
T = TypeVar("T")
SHOWN_BYTES = 300  # of each entry: its head and the start of its body


def _in_redis(work: Callable[[Redis, str], Awaitable[T]]) -> T:
    """`work(redis, key_prefix)`; a Redis it cannot use ends the command saying which and why,
    not with a traceback."""
    settings = service_settings()
    timeout_s = settings.redis_timeout_s
    with url_of("AIDSAFE_REDIS_URL", "Redis"):
        redis = Redis.from_url(settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        # A connection made, not opened: an option in the URL's query that it does not take
        # fails here (TypeError), not at the first command.
        redis.connection_pool.make_connection()

    async def run() -> T:
        try:
            return await work(redis, settings.redis_key_prefix)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except RedisError as exc:
        raise unusable("Redis", exc, "AIDSAFE_REDIS_URL") from exc


def _dead(count: int) -> str:
    return f"{count} dead {'delivery' if count == 1 else 'deliveries'}"


@deliveries_cli.command("dead")
def list_dead(
    limit: Annotated[int, typer.Option(min=0, help="How many, newest first (0: all).")] = 10,
) -> None:
    """How many spooled deliveries could not be read; the newest, with when, why and their start.

    Also the fingerprint of the newest, which `drop-dead` takes."""
    listing = _in_redis(lambda redis, prefix: deliveries.dead_deliveries(redis, prefix, limit))
    shown = f"; the newest {len(listing.newest)}:" if listing.newest else "."
    console.print(_dead(listing.count) + shown)
    for dead in listing.newest:
        if isinstance(dead, deliveries.ForeignDead):
            _show("(no time)", f"not a dead delivery: {dead.reason}", dead.kept)
        else:
            _show(f"{datetime.fromtimestamp(dead.dead_at, UTC):%Y-%m-%dT%H:%M:%S}", dead.reason, dead.entry)
    if listing.newest_fingerprint:
        these = "this one" if listing.count == 1 else f"these {listing.count}, the newest and those older"
        console.print(
            f"The newest is {listing.newest_fingerprint}: `aidsafe deliveries drop-dead "
            f"{listing.newest_fingerprint}` drops {these}, not one that comes after.",
            highlight=False,
            soft_wrap=True,  # the command on one line, to copy
        )


def _show(when: str, why: str, kept: bytes) -> None:
    """One dead delivery: when and why, then the start of its bytes on one line."""
    shown = repr(kept[:SHOWN_BYTES].decode("utf-8", errors="replace"))  # one line, controls escaped
    cut = f" ... ({len(kept)} bytes in all)" if len(kept) > SHOWN_BYTES else ""
    console.print(f"{when}  {escape(why)}\n  {escape(shown)}{cut}", highlight=False, soft_wrap=True)


def _fingerprint(given: str) -> str:
    """FINGERPRINT as `drop_dead` takes it; a usage error if it is not one."""
    if not deliveries.DEAD_FINGERPRINT.fullmatch(given.lower()):
        raise typer.BadParameter(f"{given!r}: expected 16 hex digits, as `aidsafe deliveries dead` prints it")
    return given.lower()


@deliveries_cli.command("drop-dead")
def drop_dead(
    fingerprint: Annotated[
        str,
        typer.Argument(
            callback=_fingerprint,
            help="The newest to drop: the fingerprint `aidsafe deliveries dead` printed.",
        ),
    ],
) -> None:
    """Delete, for good, the dead delivery FINGERPRINT names and every older one.

    Those `aidsafe deliveries dead` counted, not one that came after. Exit code 1, nothing
    dropped, if none has it any more (dropped, requeued or trimmed since)."""
    dropped = _in_redis(lambda redis, prefix: deliveries.drop_dead(redis, prefix, fingerprint))
    if not dropped:
        console.print(
            f"No dead delivery is {fingerprint} (dropped, requeued or trimmed since): none dropped. "
            "`aidsafe deliveries dead` shows those left.",
            highlight=False,
        )
        raise typer.Exit(1)
    console.print(f"Dropped {_dead(dropped)}.")


@deliveries_cli.command("requeue-dead")
def requeue_dead() -> None:
    """Put the dead deliveries back in the spool, for the workers' next pass to read again.

    For when every worker runs the release that wrote them; one still unreadable goes dead
    again."""
    limits = deliveries.SpoolLimits.of(service_settings())
    done = _in_redis(lambda redis, prefix: deliveries.requeue_dead(redis, prefix, limits))
    console.print(f"Requeued {_dead(done.requeued)}.")
    if done.no_room:
        console.print(
            f"{done.no_room} left dead: the spool, or their API key's share of it, is full "
            "(run again once the workers have replayed it)."
        )
    if done.foreign:
        console.print(f"{done.foreign} left dead: no dead delivery (see `aidsafe deliveries dead`).")
