"""Export throughput and memory: GET /v1/jobs/{id}/export over 100,000 stored CoTs.

    .venv/bin/python -m bench.export --rows 100000 --small 25000 --formats jsonl,parquet,trl_sft

Stands up a fresh database and the API alone (`aidsafe-api`, one process), makes a
key with the CLI, and inserts two finished jobs directly (bulk INSERTs, not the LLM
pipeline): --small and --rows completed items with CoTs of realistic size (--thoughts refined
thoughts of about 160 characters, a 600-character response, graded). Then, per format, it
exports the small job once to warm up, then each job once, reading the stream to the end
and throwing it away, and reports:

- `rows_per_s`: rows / seconds from sending the request to the last byte (target 20,000);
- `database_rows_per_s`: the same SQL the export runs, read through a plain asyncpg cursor
  by this process and thrown away (no parsing, no formatting): what Postgres alone
  delivers, since turning stored JSON into text is most of its work. `share_of_database`
  = rows_per_s / database_rows_per_s, a ratio that survives a busy machine;
- `machine_cpu_busy`: how busy the whole machine was during the export (others' work
  included: this machine is shared);
- `peak_rss_growth_mib`: the API process's peak RSS during the export minus its RSS just
  before it (the kernel's high-water mark, reset before each export through
  /proc/PID/clear_refs), and `peak_rss_mib`. Flat memory: the 100,000-row peak is no
  higher than the 25,000-row one (`peak_rss_large_minus_small_mib` near 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
from sqlalchemy import insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import get_settings
from app.deliberation.results import METRICS
from app.exports.formats import FORMATS
from app.plan import JobConfigIn, resolve
from app.store import exports
from app.store.db import make_sessions
from app.store.export_rows import ExportFilter
from app.store.models import ApiKey, Cot, Item, Job, PolicySetRow
from bench.machine import describe, machine_cpu_jiffies
from bench.stack import ServiceStack, publish, run_bounded

TARGET_ROWS_PER_S = 20_000
INSERT_BATCH = 2_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="CoTs in the large job")
    p.add_argument("--small", type=int, default=25_000, help="CoTs in the small job")
    p.add_argument("--thoughts", type=int, default=5, help="refined thoughts per CoT")
    p.add_argument("--formats", default="jsonl,parquet,trl_sft", help="comma-separated export formats")
    p.add_argument("--time-limit", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p.parse_args(argv)


def cot_values(
    item_id: UUID, job_id: UUID, position: int, policy_set: PolicySetRow, thoughts: int
) -> dict[str, Any]:
    """A completed CoT of realistic size, graded and accepted."""
    thought = f"Policy 3 applies to request {position}: explain the safe alternative and why. " * 2
    return {
        "item_id": item_id,
        "job_id": job_id,
        "position": position,
        "policy_set_id": policy_set.id,
        "policy_set_name": policy_set.name,
        "policy_set_version": policy_set.version,
        "intents": {"explicit_intents": ["Get instructions"], "implicit_intents": ["Stay safe"]},
        "thoughts": [
            {"id": n, "text": thought, "stage": "seed", "round": 0, "agent": 0}
            for n in range(1, thoughts + 2)
        ],
        "refined_thoughts": [{"text": thought, "sources": [n]} for n in range(1, thoughts + 1)],
        "dropped_thoughts": [
            {"id": thoughts + 1, "text": thought, "reason": "redundant", "explanation": "Same."}
        ],
        "unaccounted_thought_ids": [],
        "response": "Here is how to do that safely, and what to avoid. " * 12,
        "rounds_used": 2,
        "agreed": True,
        "agreed_by": {"round": 2, "agent": 1},
        "scores": {m: {"score": 4, "rationale": "Follows the policy."} for m in METRICS},
        "accepted": True,
        "gate_reasons": [],
    }


async def insert_finished_job(
    session: AsyncSession, owner_key_id: UUID, count: int, thoughts: int = 5
) -> UUID:
    """A job of `count` completed items, each with its CoT, written with bulk INSERTs in the
    caller's transaction (no worker, no LLM). Returns the job's id."""
    policy_set = PolicySetRow(
        owner_key_id=owner_key_id, name=f"bulk-{uuid4().hex[:8]}", version="v1", policies=[]
    )
    session.add(policy_set)
    await session.flush()
    job_id = uuid4()
    session.add(
        Job(
            id=job_id,
            owner_key_id=owner_key_id,
            policy_set_id=policy_set.id,
            plan=resolve(JobConfigIn(), get_settings()),  # the server's defaults
            request_hash="bulk",
            item_count=count,
        )
    )
    await session.flush()
    for start in range(0, count, INSERT_BATCH):
        positions = range(start, min(start + INSERT_BATCH, count))
        item_ids = {n: uuid4() for n in positions}
        items = [
            {
                "id": item_ids[n],
                "job_id": job_id,
                "position": n,
                "prompt": f"Prompt {n}: how do I do this risky thing at home, step by step? " * 3,
                "item_metadata": {"source": "bench", "n": n},
                "status": "completed",
                "stage": "refine",
            }
            for n in positions
        ]
        await session.execute(insert(Item), items)
        await session.execute(
            insert(Cot), [cot_values(item_ids[n], job_id, n, policy_set, thoughts) for n in positions]
        )
    return job_id


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


async def database_rate(dsn: str, job_id: UUID, format: str, rows: int) -> int:
    """Rows per second of the export's own SQL through a bare asyncpg cursor."""
    query = exports.rows_query(job_id, FORMATS[format].source, ExportFilter())
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy leaves it unannotated
    sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        async with conn.transaction():
            cursor = await conn.cursor(sql)
            while await cursor.fetch(exports.BATCH_ROWS):
                pass
        return round(rows / (time.perf_counter() - started))
    finally:
        await conn.close()


async def one_export(client: httpx.AsyncClient, api_pid: int, job_id: UUID, format: str) -> dict[str, Any]:
    reset_peak_rss(api_pid)
    before = rss_kib(api_pid, "VmRSS")
    size, newlines = 0, 0
    busy_before, total_before = machine_cpu_jiffies()
    started = time.perf_counter()
    async with client.stream("GET", f"/v1/jobs/{job_id}/export", params={"format": format}) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            size += len(chunk)
            newlines += chunk.count(b"\n")
    seconds = time.perf_counter() - started
    peak = rss_kib(api_pid, "VmHWM")
    busy, total = machine_cpu_jiffies()
    return {
        "seconds": round(seconds, 2),
        "bytes": size,
        "jsonl_lines": newlines if format != "parquet" else None,
        "machine_cpu_busy": round((busy - busy_before) / max(total - total_before, 1), 2),
        "rss_before_mib": round(before / 1024, 1),
        "peak_rss_growth_mib": round((peak - before) / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    formats = args.formats.split(",")
    async with ServiceStack("export") as stack:
        url, secret = await stack.api_alone()
        engine = stack.engine()
        try:
            async with make_sessions(engine).begin() as session:
                owner = await session.scalar(select(ApiKey.id).where(ApiKey.name == "bench"))
                assert owner is not None
                started = time.perf_counter()
                jobs = {
                    "small": (
                        args.small,
                        await insert_finished_job(session, owner, args.small, args.thoughts),
                    ),
                    "large": (args.rows, await insert_finished_job(session, owner, args.rows, args.thoughts)),
                }
                insert_s = time.perf_counter() - started
        finally:
            await engine.dispose()
        await stack.sql("VACUUM ANALYZE")
        api_pid = stack.pid("api")
        dsn = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
        results: dict[str, Any] = {}
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
            for format in formats:
                await one_export(client, api_pid, jobs["small"][1], format)  # warm-up
                runs = {}
                for size, (rows, job_id) in jobs.items():
                    run = await one_export(client, api_pid, job_id, format)
                    if run["jsonl_lines"] is not None and run["jsonl_lines"] != rows:
                        raise RuntimeError(f"{format}: {run['jsonl_lines']} lines for {rows} rows")
                    run["rows"] = rows
                    run["rows_per_s"] = round(rows / run["seconds"])
                    run["database_rows_per_s"] = await database_rate(dsn, job_id, format, rows)
                    run["share_of_database"] = round(run["rows_per_s"] / run["database_rows_per_s"], 2)
                    runs[size] = run
                results[format] = {
                    **runs,
                    "peak_rss_large_minus_small_mib": round(
                        runs["large"]["peak_rss_mib"] - runs["small"]["peak_rss_mib"], 1
                    ),
                    "meets_target": runs["large"]["rows_per_s"] >= TARGET_ROWS_PER_S,
                }
        return {
            "benchmark": "export",
            "machine": describe(),
            "rows": {"small": args.small, "large": args.rows},
            "insert_s": round(insert_s, 1),
            "target_rows_per_s": TARGET_ROWS_PER_S,
            "formats": results,
            "logs": str(stack.log_dir),
        }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = run_bounded(lambda: measure(args), args.time_limit)
    publish(summary, args.json)


if __name__ == "__main__":
    main()
