"""Postgres's CPU to store a turn-sized row, compressed with pglz against lz4.

A row over about 2 KB has its long values compressed before it is stored. A turn's raw
output and parsed reply are each kilobytes of prose and JSON with real providers, so every
turn pays that. This inserts the same rows into two tables of one database, alternating
batches, one with pglz and one with lz4 (migration 0024's choice), and reads the CPU time of
the Postgres backend doing the work from /proc: a ratio measured in one run.

The rows are English prose cut from the repository's documents (what a model writes is
English prose), a raw output of `--chars` characters and a parsed reply holding the same
text as JSON, as the engine stores a reply it could read.

    .venv/bin/python -m bench.toast --rows 10000 --chars 3000
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench.machine import cpu_user_system, describe
from bench.stack import PG_ADMIN_DSN, _admin, publish, run_bounded

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("pglz", "lz4")


def _prose() -> list[str]:
    texts = [path.read_text() for path in sorted(ROOT.glob("*.md")) + sorted((ROOT / "bench").glob("*.md"))]
    return " ".join(texts).split()


def _rows(count: int, chars: int, seed: int) -> list[tuple[str, str]]:
    words, rng = _prose(), random.Random(seed)
    rows = []
    for _ in range(count):
        start = rng.randrange(len(words) - chars)
        text = " ".join(words[start : start + chars // 5])[:chars]
        thoughts = [text[i : i + 400] for i in range(0, len(text), 400)]
        rows.append((text, orjson.dumps({"thoughts": thoughts, "agreed": False}).decode()))
    return rows


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows = _rows(args.rows, args.chars, args.seed)
    database = f"aidsafe_bench_toast_{uuid.uuid4().hex[:8]}"
    await _admin(PG_ADMIN_DSN, f'CREATE DATABASE "{database}"')
    try:
        connection = await asyncpg.connect(PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + database)
        try:
            backend = await connection.fetchval("SELECT pg_backend_pid()")
            for method in METHODS:
                await connection.execute(
                    f"CREATE TABLE turns_{method} (id bigserial PRIMARY KEY, "
                    f"raw_output text COMPRESSION {method}, parsed jsonb COMPRESSION {method})"
                )
            cpu = dict.fromkeys(METHODS, 0.0)
            wall = dict.fromkeys(METHODS, 0.0)
            insert = {
                m: f"INSERT INTO turns_{m} (raw_output, parsed) VALUES ($1, $2::jsonb)" for m in METHODS
            }
            for start in range(0, len(rows), args.batch):
                batch = rows[start : start + args.batch]
                # Alternate which goes first, so neither always runs on a warmer cache.
                for method in METHODS if start // args.batch % 2 == 0 else reversed(METHODS):
                    before, began = sum(cpu_user_system(backend)), time.perf_counter()
                    await connection.executemany(insert[method], batch)
                    wall[method] += time.perf_counter() - began
                    cpu[method] += sum(cpu_user_system(backend)) - before
            stored = {
                method: await connection.fetchrow(
                    f"SELECT pg_total_relation_size('turns_{method}') AS bytes, "
                    f"count(*) FILTER (WHERE pg_column_compression(raw_output) IS NOT NULL) AS compressed "
                    f"FROM turns_{method}"
                )
                for method in METHODS
            }
        finally:
            await connection.close()
    finally:
        await _admin(PG_ADMIN_DSN, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    per_row = {
        m: {
            "backend_cpu_us": round(cpu[m] / len(rows) * 1e6, 1),
            "wall_us": round(wall[m] / len(rows) * 1e6, 1),
            "bytes": round(stored[m]["bytes"] / len(rows)),
            "rows_compressed": stored[m]["compressed"],
        }
        for m in METHODS
    }
    return {
        "benchmark": "toast",
        "machine": describe(),
        "settings": {"rows": args.rows, "chars": args.chars, "batch": args.batch, "seed": args.seed},
        "per_row": per_row,
        "lz4_over_pglz": {
            "backend_cpu": round(cpu["lz4"] / cpu["pglz"], 3) if cpu["pglz"] else None,
            "wall": round(wall["lz4"] / wall["pglz"], 3),
            "bytes": round(stored["lz4"]["bytes"] / stored["pglz"]["bytes"], 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument(
        "--chars", type=int, default=3000, help="characters of a raw output (and of its parsed copy)"
    )
    # /proc counts CPU in 10 ms ticks: a batch must take many of them.
    parser.add_argument("--batch", type=int, default=1000, help="rows per executemany")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=280.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    publish(run_bounded(lambda: measure(args), args.time_limit), args.json)


if __name__ == "__main__":
    main()
