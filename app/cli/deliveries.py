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
from rich.markup import escape

from app.cli.connection import unusable, url_of
from app.cli.output import console
from app.config import get_settings
from app.labeling import deliveries

deliveries_cli = typer.Typer(
    help="Spooled Label Studio deliveries a worker could not read (straight in Redis).", no_args_is_help=True
)
T = TypeVar("T")
SHOWN_BYTES = 300  # of each entry: its head and the start of its body


def _in_redis(work: Callable[[Redis, str], Awaitable[T]]) -> T:
    """`work(redis, key_prefix)`; a Redis it cannot use ends the command saying which and why,
    not with a traceback."""
    settings = get_settings()
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


@deliveries_cli.command("dead")
def list_dead(
    limit: Annotated[int, typer.Option(min=0, help="How many, newest first (0: all).")] = 10,
) -> None:
    """How many spooled deliveries could not be read; the newest, with when, why and their start."""

    async def read(
        redis: Redis, prefix: str
    ) -> tuple[int, list[deliveries.DeadDelivery | deliveries.ForeignDead]]:
        count = await deliveries.dead_count(redis, prefix)
        return count, await deliveries.dead_deliveries(redis, prefix, limit)

    count, newest = _in_redis(read)
    console.print(f"{count} dead deliveries" + (f"; the newest {len(newest)}:" if newest else "."))
    for dead in newest:
        if isinstance(dead, deliveries.ForeignDead):
            _show("(no time)", f"not a dead delivery: {dead.reason}", dead.kept)
        else:
            _show(f"{datetime.fromtimestamp(dead.dead_at, UTC):%Y-%m-%dT%H:%M:%S}", dead.reason, dead.entry)
    if count:
        console.print(
            f"`aidsafe deliveries drop-dead {count}` drops these {count}, not one that comes after.",
            highlight=False,
        )


def _show(when: str, why: str, kept: bytes) -> None:
    """One dead delivery: when and why, then the start of its bytes on one line."""
    shown = repr(kept[:SHOWN_BYTES].decode("utf-8", errors="replace"))  # one line
    cut = f" ... ({len(kept)} bytes in all)" if len(kept) > SHOWN_BYTES else ""
    console.print(f"{when}  {escape(why)}\n  {escape(shown)}{cut}", highlight=False, soft_wrap=True)


@deliveries_cli.command("drop-dead")
def drop_dead(
    count: Annotated[
        int, typer.Argument(min=0, help="How many, oldest first: the count `aidsafe deliveries dead` said.")
    ],
) -> None:
    """Delete the COUNT oldest dead deliveries, for good: those `aidsafe deliveries dead` showed,
    not one that came after."""
    dropped = _in_redis(lambda redis, prefix: deliveries.drop_dead(redis, prefix, count))
    console.print(f"Dropped {dropped} dead deliveries.")


@deliveries_cli.command("requeue-dead")
def requeue_dead() -> None:
    """Put the dead deliveries back in the spool, for the workers' next pass to read again (once
    every worker runs the release that wrote them); one still unreadable goes dead again."""
    limits = deliveries.SpoolLimits.of(get_settings())
    done = _in_redis(lambda redis, prefix: deliveries.requeue_dead(redis, prefix, limits))
    console.print(f"Requeued {done.requeued} dead deliveries.")
    if done.no_room:
        console.print(
            f"{done.no_room} left dead: the spool, or their API key's share of it, is full "
            "(run again once the workers have replayed it)."
        )
    if done.foreign:
        console.print(f"{done.foreign} left dead: no dead delivery (see `aidsafe deliveries dead`).")
