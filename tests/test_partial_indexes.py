"""The queries that need a partial index use it under a generic plan too.

asyncpg prepares every statement, and after five runs Postgres may plan it once for any
parameter values (a generic plan). A partial index (`WHERE status = 'running'`) is then usable
only if its predicate is written in the SQL: with `status = $1` the summary's refusal count
read every turn of the job instead of the index of refusals. Each query below is captured as
the service sends it, prepared with `plan_cache_mode = force_generic_plan`, and explained
(sequential scans off, and the table's other indexes dropped in a transaction rolled back
after: the partial index is then in the plan exactly when its predicate is provable. Left
beside it, another index whose predicate also holds could win on cost, and the costs on these
near-empty tables follow whatever statistics earlier tests left: TRUNCATE keeps them)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from sqlalchemy import event

from app.config import Settings
from app.events import finished_since
from app.store import callbacks, items, key_limits, quality
from app.store.db import Sessions


async def sent_statements(sessions: Sessions, call: Callable[[], Awaitable[Any]]) -> list[str]:
    """The SQL of every statement `call` sends through the ORM, as sent."""
    sent: list[str] = []

    def capture(*args: Any) -> None:
        sent.append(args[2])  # (connection, cursor, statement, parameters, context, executemany)

    engine = sessions.kw["bind"].sync_engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        await call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return sent


async def generic_plan_indexes(settings: Settings, sql: str, table: str, index: str) -> set[str]:
    """The indexes in the generic plan of `sql`, `table`'s other indexes (but its primary and
    unique keys) dropped for the while."""
    dsn = settings.database_url.replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    dropped = connection.transaction()
    await dropped.start()
    try:
        await connection.execute(
            "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off"
        )
        others = await connection.fetch(
            "SELECT indexrelid::regclass::text AS name FROM pg_index"
            " WHERE indrelid = $1::regclass AND NOT indisprimary AND NOT indisunique"
            " AND indexrelid::regclass::text <> $2",
            table,
            index,
        )
        for other in others:
            await connection.execute(f'DROP INDEX "{other["name"]}"')
        await connection.execute(f"PREPARE under_test AS {sql}")
        parameters = max((int(n) for n in re.findall(r"\$(\d+)", sql)), default=0)
        # A generic plan does not depend on the values: NULLs will do.
        arguments = f"({', '.join(['NULL'] * parameters)})" if parameters else ""
        plan = await connection.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE under_test{arguments}")
    finally:
        await dropped.rollback()
        await connection.close()
    return set(re.findall(r'"Index Name": "([^"]+)"', json.dumps(json.loads(plan))))


def the_one(statements: list[str], table: str) -> str:
    reading = [s for s in statements if f"FROM {table}" in s]
    assert len(reading) == 1, statements
    return reading[0]


@pytest.mark.parametrize(
    ("query", "table", "index"),
    [
        ("refusals", "turns", "ix_turns_job_refusals"),
        ("running_holders", "items", "ix_items_running_lease"),
        ("expired_leases", "items", "ix_items_running_lease"),
        ("queued_unclaimed", "items", "ix_items_queued_since"),
        ("due_callbacks", "callback_deliveries", "ix_callback_deliveries_owner_due"),
        ("finished_since", "items", "ix_items_job_finished"),
        ("open_jobs", "items", "ix_items_unfinished_job"),
    ],
)
async def test_a_query_that_needs_a_partial_index_uses_it_under_a_generic_plan(
    sessions: Sessions, settings: Settings, query: str, table: str, index: str
) -> None:
    async def refusals() -> None:
        async with sessions() as session:
            await quality.refusals_by_stage(session, uuid4())

    async def open_jobs() -> None:
        async with sessions() as session:
            rows = key_limits.open_jobs(uuid4())
            await key_limits.refuse_at_cap(session, key_limits.OPEN_JOBS, 100, rows)

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "refusals": refusals,
        "running_holders": lambda: items.running_holders(sessions),
        "expired_leases": lambda: items.take_lost_claims(sessions),
        "queued_unclaimed": lambda: items.queued_unclaimed(sessions, grace_s=60),
        "due_callbacks": lambda: callbacks.claim_due(sessions, limit=10, lease_s=30),
        "finished_since": lambda: finished_since(sessions, uuid4(), since_ms=0),
        "open_jobs": open_jobs,
    }
    sql = the_one(await sent_statements(sessions, calls[query]), table)

    assert index in await generic_plan_indexes(settings, sql, table, index)


async def test_the_callback_claims_limits_are_written_into_its_sql(sessions: Sessions) -> None:
    """Sent as parameters, the generic plan took each LIMIT of the claim for a tenth of the
    table: it hashed every delivery and job, over 60 s behind 100,000 due deliveries
    (bench/callback_claims.py), where the plan for the values read 20 of them."""
    sql = the_one(
        await sent_statements(sessions, lambda: callbacks.claim_due(sessions, 20, 30)), "callback_deliveries"
    )

    assert re.findall(r"LIMIT (\S+)", sql) == ["1)", "1)", "20)", "20)", "20)"]
