"""The floor: the least CPU per LLM call a Python service of this shape spends, as a peer for
`bench.efficiency` (issue 12 target 4 asks the service for 1 ms of machine CPU per call).

    .venv/bin/python -m bench.floor --prompts 3000 --latency-ms 200 --concurrency 256 --workers 2

A bare worker does what any service that stores every turn must do, and nothing else, on our
libraries (uvloop, aiohttp, asyncpg, redis-py with hiredis), against the same simulator, with a
PostgreSQL cluster and a redis-server of the run's own (as `bench.efficiency
--private-services`). Items are popped from a Redis list, many per round trip. Each item makes
the four calls of a 2-agent job whose agents agree at once (its stages' schema names, the default
policies as the system message, the prompt as the user's), one after another. Each turn is a
row of a table made `LIKE turns` (its columns, indexes and compression; no foreign keys), written
by group commit; each item's end is one row's update, grouped too. What it leaves out is what the
service's guarantees and features cost: leases and claims, replay and request hashes, the shared
limiter (here a semaphore per process, its share of the cap), budgets, progress events, retries,
hedging, arq, metrics, logs. So `service / floor`, measured in one window, is their price, and
the floor's own figure is what no change within this stack (Python on these libraries, a
Postgres row per turn) could remove.

It prints a JSON summary with the keys `bench.efficiency` uses for the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import orjson
import uvloop
from redis.asyncio import Redis

from app.deliberation.policies import render_policies
from app.store.policy_sets import DEFAULT_FILE, load_file
from bench.efficiency import cpu_snapshot, service_counters
from bench.machine import describe
from bench.prompts import make_prompts
from bench.services import private_services
from bench.stack import ServiceStack, publish, run_bounded

# (the schema a request names, which tells the simulator what to answer; the turn's stage)
STAGES = (
    ("intent_decomposition", "intents"),
    ("seed_cot", "seed"),
    ("deliberation_turn", "deliberation"),
    ("refined_cot", "refinement"),
)
_QUEUE, _GO = "floor:items", "floor:go"

_SCHEMA = (
    "CREATE TABLE floor_turns (LIKE turns INCLUDING ALL)",
    "CREATE TABLE floor_items (id uuid PRIMARY KEY, prompt text NOT NULL, finished_at timestamptz)",
)
_TURN_COLUMNS = (
    "item_id uuid, job_id uuid, stage text, round int, agent int, attempt int, role text,"
    " endpoint text, model text, request_hash text, raw_output text, parsed jsonb, outcome text,"
    " agreed bool, prompt_tokens int, completion_tokens int, latency_ms float8"
)
_WRITE_TURNS = (
    f"INSERT INTO floor_turns ({', '.join(c.split()[0] for c in _TURN_COLUMNS.split(','))})"
    f" SELECT * FROM jsonb_to_recordset($1::jsonb) AS t({_TURN_COLUMNS}) ON CONFLICT DO NOTHING"
)
_END_ITEMS = (
    "UPDATE floor_items SET finished_at = clock_timestamp()"
    " FROM jsonb_array_elements_text($1::jsonb) AS ended(id) WHERE floor_items.id = ended.id::uuid"
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=3000)
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--jitter-ms", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=256, help="the simulator's cap, shared by the workers")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=280.0, help="the run stops itself after this")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p


# --- the bare worker -------------------------------------------------------------------------


class _Grouped:
    """Group commit: values written while a statement is in flight go together in the next,
    on a connection of its own (a pool's release would add a reset statement to each)."""

    def __init__(self, connection: asyncpg.Connection, statement: str) -> None:
        self._connection, self._statement = connection, statement
        self._waiting: list[tuple[Any, asyncio.Future[None]]] = []
        self._writing: asyncio.Task[None] | None = None

    async def write(self, value: Any) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((value, done))
        if self._writing is None:
            self._writing = asyncio.create_task(self._drain())
        await done

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await self._connection.execute(
                        self._statement, orjson.dumps([v for v, _ in batch]).decode()
                    )
                except Exception as error:
                    for _, done in batch:
                        done.set_exception(error)
                    continue
                for _, done in batch:
                    done.set_result(None)
        finally:
            self._writing = None


async def _serve(args: argparse.Namespace) -> None:
    system = render_policies(load_file(DEFAULT_FILE)["policies"])
    redis = Redis.from_url(args.redis)
    turns = _Grouped(await asyncpg.connect(args.dsn), _WRITE_TURNS)
    ends = _Grouped(await asyncpg.connect(args.dsn), _END_ITEMS)
    slots = args.slots
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def call(item_id: str, prompt: str, schema: str, stage: str) -> None:
            body = {
                "model": "sim-llm",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"User query:\n<<<\n{prompt}\n>>>"},
                ],
                "response_format": {"type": "json_schema", "json_schema": {"name": schema, "schema": {}}},
                "max_tokens": 512,
            }
            started = time.monotonic()
            async with http.post(
                args.llm, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
            ) as r:
                reply = orjson.loads(await r.read())
            content = reply["choices"][0]["message"]["content"]
            parsed = orjson.loads(content)
            await turns.write(
                {
                    "item_id": item_id, "job_id": item_id, "stage": stage, "role": stage,
                    "round": 0, "agent": 0, "attempt": 0,
                    "endpoint": "default", "model": "sim-llm", "request_hash": "",
                    "raw_output": content, "parsed": parsed, "outcome": "ok", "agreed": parsed.get("agree"),
                    "prompt_tokens": reply["usage"]["prompt_tokens"],
                    "completion_tokens": reply["usage"]["completion_tokens"],
                    "latency_ms": (time.monotonic() - started) * 1000,
                }
            )  # fmt: skip

        taken: list[bytes] = []
        lock = asyncio.Lock()

        async def next_item() -> bytes | None:
            async with lock:  # one LPOP for many slots
                if not taken:
                    taken.extend(await redis.lpop(_QUEUE, slots) or [])
                return taken.pop() if taken else None

        async def slot() -> None:
            while entry := await next_item():
                item_id, prompt = entry.decode().split("\t", 1)
                for schema, stage in STAGES:
                    await call(item_id, prompt, schema, stage)
                await ends.write(item_id)

        print("ready", flush=True)
        await redis.blpop([_GO], timeout=0)
        await asyncio.gather(*(slot() for _ in range(slots)))
        print("done", flush=True)
        await asyncio.Event().wait()  # alive until the run has read its CPU time


# --- the run ---------------------------------------------------------------------------------


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with private_services(Path(tempfile.mkdtemp(prefix="aidsafe-bench-floor-services-"))) as servers:
        async with ServiceStack("floor", servers[0].dsn, servers[1].url) as stack:
            await stack.create_database()
            for statement in _SCHEMA:
                await stack.sql(statement)
            sim_url = await stack.start_sim_llm(
                "--latency-ms", str(args.latency_ms), "--jitter-ms", str(args.jitter_ms),
                "--max-concurrency", str(args.concurrency), "--seed", "1",
            )  # fmt: skip
            prompts = make_prompts(args.prompts)
            rows = await stack.sql(
                "INSERT INTO floor_items (id, prompt)"
                " SELECT gen_random_uuid(), p FROM unnest($1::text[]) AS p RETURNING id::text, prompt",
                prompts,
            )
            redis = Redis.from_url(servers[1].url)
            try:
                await redis.rpush(_QUEUE, *(f"{row['id']}\t{row['prompt']}" for row in rows))
                names = [f"floor{i}" for i in range(1, args.workers + 1)]
                dsn = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
                share, extra = divmod(args.concurrency, args.workers)
                for n, name in enumerate(names):
                    argv = [
                        sys.executable, "-m", "bench.floor", "--serve", "--dsn", dsn,
                        "--redis", servers[1].url, "--llm", f"{sim_url}/chat/completions",
                        "--slots", str(share + (n < extra)),
                    ]  # fmt: skip
                    stack.start(name, argv)
                for name in names:
                    await stack.wait_log(name, "ready")
                pids = {"workers": [stack.pid(name) for name in names], "sim_llm": [stack.pid("sim_llm")]}
                sim_root = sim_url.removesuffix("/v1")
                async with httpx.AsyncClient(timeout=30) as client:
                    await client.post(f"{sim_root}/stats/reset")
                    cpu_before = cpu_snapshot(pids, servers)
                    counters_before = await service_counters(stack)
                    started_wall = time.time()
                    await redis.rpush(_GO, *names)
                    for name in names:
                        await stack.wait_log(name, "done", timeout_s=args.time_limit)
                    cpu_after = cpu_snapshot(pids, servers)
                    counters_after = await service_counters(stack)
                    sim = (await client.get(f"{sim_root}/stats")).json()
            finally:
                await redis.aclose()
            row = (
                await stack.sql(
                    "SELECT extract(epoch FROM max(finished_at))::float8 AS last_finished,"
                    " count(*) FILTER (WHERE finished_at IS NULL) AS unfinished FROM floor_items"
                )
            )[0]
            stored = (await stack.sql("SELECT count(*) AS n FROM floor_turns"))[0]["n"]
    calls: int = sim["answered"]
    actual_s = row["last_finished"] - started_wall
    ideal_s = calls * sim["simulated_latency_ms_mean"] / 1000 / args.concurrency
    cpu = {name: cpu_after[name] - cpu_before[name] for name in ("workers", "postgres", "redis", "sim_llm")}
    service = {name: cpu[name] for name in ("workers", "postgres", "redis")}
    service["total"] = sum(service.values())
    busy, total = (a - b for a, b in zip(cpu_after["machine"], cpu_before["machine"], strict=True))

    def per_call(seconds: float) -> float:
        return round(seconds / calls * 1000, 3)

    return {
        "benchmark": "floor",
        "machine": describe(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.floor", *sys.argv[1:]]),
        "settings": {
            "prompts": args.prompts,
            "latency_ms": args.latency_ms,
            "concurrency": args.concurrency,
            "workers": args.workers,
            "calls_per_prompt": len(STAGES),
        },  # fmt: skip
        "items": {"unfinished": row["unfinished"], "turns_stored": stored},
        "llm": {
            "calls_answered": calls,
            "cap_violations": sim["cap_violations"],
            "max_in_flight": sim["max_in_flight"],
        },
        "timing": {"ideal_s": round(ideal_s, 3), "actual_s": round(actual_s, 3)},
        "efficiency": round(ideal_s / actual_s, 4),
        "pg_transactions_per_call": round(
            (counters_after["pg_transactions"] - counters_before["pg_transactions"]) / calls, 2
        ),
        "redis_commands_per_call_all_clients": round(
            (counters_after["redis_commands"] - counters_before["redis_commands"]) / calls, 2
        ),
        "machine_cpu_ms_per_call": {name: per_call(value) for name, value in service.items()},
        "sim_cpu_ms_per_call": per_call(cpu["sim_llm"]),
        "total_per_ms_of_sim_cpu": round(service["total"] / cpu["sim_llm"], 2),
        "machine_cpu_busy": round(busy / total, 3) if total else None,
        "logs": str(stack.log_dir),
    }


def main(argv: list[str] | None = None) -> None:
    if argv is None and "--serve" in sys.argv:
        serve = argparse.ArgumentParser()
        for flag in ("--dsn", "--redis", "--llm"):
            serve.add_argument(flag, required=True)
        serve.add_argument("--slots", type=int, required=True)
        serve.add_argument("--serve", action="store_true")
        uvloop.run(_serve(serve.parse_args()))
        return
    args = parser().parse_args(argv)
    publish(run_bounded(lambda: measure(args), args.time_limit), args.json)


if __name__ == "__main__":
    main()
