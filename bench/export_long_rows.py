"""Exports of long CoTs: peak Python memory and time, in-process.

    .venv/bin/python -m bench.export_long_rows --cots 208,832 --formats jsonl,aidsafe_csv,trl_sft

A fresh database (bench.stack), one finished job per --cots count whose CoTs each carry a
prompt and a response of --chars characters (80 KB a CoT by default, as `long_cots_job` in
tests/test_exports.py), then each format's whole file through app.exports.streaming.encoded
in this process, read to the end and thrown away: `peak_mib` is the peak of the bytes Python
allocated meanwhile (tracemalloc), `seconds` the time to the last chunk (with tracemalloc on,
which slows Python several times over: compare runs with each other, not with bench.export).
A batch holds at most BATCH_BYTES of rows (app/store/exports.py), so the peak should not grow
with the job.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path
from typing import Any
from uuid import UUID

from sqlalchemy import update

from app.exports.formats import FORMATS
from app.exports.options import ExportOptions
from app.exports.streaming import encoded
from app.store.db import Sessions, make_sessions
from app.store.export_rows import ExportFilter
from app.store.keys import create_key
from app.store.models import Cot, Item
from bench.export import insert_finished_job
from bench.machine import describe
from bench.stack import ServiceStack, publish, run_bounded


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cots", default="208,832", help="comma-separated CoT counts, a job each")
    p.add_argument("--chars", type=int, default=40_000, help="characters of each prompt and response")
    p.add_argument("--formats", default="jsonl,aidsafe_csv,trl_sft", help="comma-separated export formats")
    p.add_argument("--time-limit", type=float, default=900.0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p.parse_args(argv)


async def long_cots_job(sessions: Sessions, owner: UUID, count: int, chars: int) -> UUID:
    async with sessions.begin() as session:
        job_id = await insert_finished_job(session, owner, count)
        await session.execute(update(Item).where(Item.job_id == job_id).values(prompt="p" * chars))
        await session.execute(update(Cot).where(Cot.job_id == job_id).values(response="r " * (chars // 2)))
    return job_id


async def one_export(sessions: Sessions, job_id: UUID, format: str) -> dict[str, Any]:
    size = 0
    tracemalloc.start()
    started = time.perf_counter()
    async for chunk in encoded(sessions, job_id, FORMATS[format], ExportOptions(), ExportFilter()):
        size += len(chunk)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"bytes": size, "seconds": round(seconds, 2), "peak_mib": round(peak / 2**20, 1)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(n) for n in args.cots.split(",")]
    async with ServiceStack("export-long") as stack:
        await stack.create_database()
        engine = stack.engine()
        try:
            sessions = make_sessions(engine)
            async with sessions.begin() as session:
                owner = (await create_key(session, "bench"))[0].id
            jobs = {count: await long_cots_job(sessions, owner, count, args.chars) for count in counts}
            await stack.sql("VACUUM ANALYZE")
            results: dict[str, dict[str, Any]] = {}
            for format in args.formats.split(","):
                results[format] = {str(n): await one_export(sessions, job, format) for n, job in jobs.items()}
        finally:
            await engine.dispose()
    return {"benchmark": "export_long_rows", "machine": describe(), "chars": args.chars, "formats": results}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = run_bounded(lambda: measure(args), args.time_limit)
    publish(summary, args.json)


if __name__ == "__main__":
    main()
