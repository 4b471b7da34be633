"""One worker's claim of due callback deliveries (`claim_due`) behind a large due backlog.

    .venv/bin/python -m bench.callback_claims --due 1000,10000,100000 --owners 1,10,1000

For each backlog size and number of keys, fills a fresh database (`aidsafe_bench_<run id>`,
dropped at the end) with that many jobs, each ended with its delivery pending and due (due
times spread over the last hour, the jobs shared evenly by the keys), then times `--claims`
calls of the store's `claim_due` with the workers' batch (`app.callbacks.BATCH`) and reports
the median, and the EXPLAIN (ANALYZE, BUFFERS) of one more claim, rolled back. Each claim
takes its batch out of the backlog (leased), which is 20 of the rows: the backlog stays.

What bounds a real backlog: one delivery per job (a unique job id), pending until delivered
or given up after `callback_retry_for_s` (24 h) of retries; due when its back-off has passed
and no worker took it yet. Open jobs per key are capped (100) but ended ones are not, and
nothing else limits how many jobs a key ends, so a key whose receiver never answers piles up
whatever it ends faster than the workers time out on it (a batch of 20 at 10 s a worker).
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection

from app.callbacks import BATCH
from app.store import callbacks
from app.store.db import Sessions, driver_connection, make_sessions
from app.store.models import CallbackDelivery
from bench.machine import describe
from bench.stack import ServiceStack, publish, run_bounded

LEASE_S = 40.0  # the workers' default: callback_timeout_s + 30


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--due", default="1000,10000,100000", help="backlog sizes (default 1000,10000,100000)")
    p.add_argument("--owners", default="1,10,1000", help="numbers of keys sharing it (default 1,10,1000)")
    p.add_argument("--claims", type=int, default=7, help="timed claims per backlog (default 7)")
    p.add_argument("--time-limit", type=float, default=600.0, help="stop after this many s (default 600)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    return p


async def _fill(sessions: Sessions, due: int, owners: int) -> None:
    """`due` jobs of `owners` keys, each with its delivery pending and due. The job's owner
    goes on the delivery too where the schema has it there."""
    owner = ", owner_key_id" if "owner_key_id" in CallbackDelivery.__table__.c else ""
    statements = [
        "TRUNCATE callback_attempts, callback_deliveries, jobs, policy_sets, api_keys CASCADE",
        "INSERT INTO api_keys (id, name, prefix, key_hash) "
        "SELECT gen_random_uuid(), 'bench' || n, 'p' || n, md5(n::text) FROM generate_series(1, :owners) n",
        "INSERT INTO policy_sets (id, name, version, description, policies) "
        "VALUES (gen_random_uuid(), 'bench', '1', '', '[]')",
        "INSERT INTO jobs (id, owner_key_id, policy_set_id, plan, request_hash, item_count, callback_url, "
        "callback_secret) SELECT gen_random_uuid(), k.id, (SELECT id FROM policy_sets), "
        """'{"mode": "aidsafe"}', 'h', 1, 'http://127.0.0.1:9/hooks', 's' """
        "FROM generate_series(1, :due) n "
        "JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM api_keys) k ON k.k = n % :owners",
        f"INSERT INTO callback_deliveries (id, job_id{owner}, url, payload, status, attempts, "
        f"next_attempt_at) SELECT gen_random_uuid(), id{owner}, callback_url, "
        """'{"event": "job.finished"}', 'pending', 0, now() - random() * interval '1 hour' FROM jobs""",
    ]
    async with sessions.begin() as session:
        for statement in statements:
            await session.execute(text(statement), {"due": due, "owners": owners})
    async with driver_connection(sessions) as driver:
        await driver.execute("VACUUM ANALYZE api_keys, jobs, callback_deliveries")


async def explain_claim(sessions: Sessions, limit: int, *, generic: bool = False) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of a claim of `limit`, its statement as `claim_due` sends it,
    in a transaction rolled back (the claim itself is made too: its batch is leased). `generic`:
    planned for any values of its parameters, as Postgres may plan a statement asyncpg
    prepared once it ran five times."""
    sent: list[tuple[str, Any]] = []

    def keep(_conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    engine = sessions.kw["bind"].sync_engine
    event.listen(engine, "before_cursor_execute", keep)
    try:
        await callbacks.claim_due(sessions, limit, lease_s=LEASE_S)
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    ((statement, parameters),) = [(sql, args) for sql, args in sent if "FOR UPDATE" in sql]
    async with driver_connection(sessions) as driver:
        transaction = driver.transaction()
        await transaction.start()
        prepared = False
        try:
            await driver.execute(f"SET LOCAL plan_cache_mode = {'force_generic_plan' if generic else 'auto'}")
            await driver.execute(f"PREPARE explained_claim AS {statement}")
            prepared = True
            values = ", ".join(_literal(value) for value in parameters)
            rows = await driver.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE explained_claim({values})")
        finally:
            await transaction.rollback()
            if prepared:  # a PREPARE outlives its transaction's rollback
                await driver.execute("DEALLOCATE explained_claim")
    return [row[0] for row in rows]


def _literal(value: int | timedelta) -> str:
    """A parameter of the claim written into SQL: a count, or the lease."""
    if isinstance(value, timedelta):
        return f"interval '{value.total_seconds()} seconds'"
    return str(int(value))


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    async with ServiceStack("callback_claims") as stack:
        await stack.create_database()
        engine = stack.engine()
        sessions = make_sessions(engine)
        try:
            for due in (int(n) for n in args.due.split(",")):
                for owners in (int(n) for n in args.owners.split(",")):
                    await _fill(sessions, due, owners)
                    await callbacks.claim_due(sessions, BATCH, lease_s=LEASE_S)  # warm the caches
                    times_ms = []
                    for _ in range(args.claims):
                        started = time.perf_counter()
                        claimed = await callbacks.claim_due(sessions, BATCH, lease_s=LEASE_S)
                        times_ms.append((time.perf_counter() - started) * 1000)
                        assert len(claimed) == BATCH, len(claimed)
                    plan = await explain_claim(sessions, BATCH)
                    generic_plan = await explain_claim(sessions, BATCH, generic=True)
                    runs.append(
                        {
                            "due": due,
                            "owners": owners,
                            "claim_ms_median": round(statistics.median(times_ms), 2),
                            "claim_ms": [round(t, 2) for t in times_ms],
                            "explain_execution": plan[-1],
                            "generic_plan_execution": generic_plan[-1],
                            "explain": plan,
                            "generic_plan": generic_plan,
                        }
                    )
                    print(f"[bench] {due} due, {owners} keys: {runs[-1]['claim_ms_median']} ms", flush=True)
        finally:
            await engine.dispose()
    return {"benchmark": "callback_claims", "machine": describe(), "batch": BATCH, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    publish(run_bounded(lambda: _measure(args), args.time_limit), args.json)


if __name__ == "__main__":
    main()
