"""End-to-end efficiency of the real service against a latency-simulating LLM.

    .venv/bin/python -m bench.efficiency --prompts 1000 --latency-ms 200 --concurrency 64 \
        --workers 2 --max-jobs 40

Stands up a fresh database (migrated), the simulated LLM, the API (uvicorn, one process)
and N arq workers, makes an API key with `aidsafe keys create`, POSTs the prompts as one
job (agents=2, default round budget; the simulator agrees at once, so 4 LLM calls per
prompt), polls GET /v1/jobs/{id} until the job completes, and prints a JSON summary:

    efficiency = ideal wall time / actual wall time
    ideal      = LLM calls x mean simulated latency / allowed concurrency
    actual     = from just before the POST to the last item's finished_at (Postgres clock,
                 same machine), so the poll interval does not blur it

With --private-services the run has a PostgreSQL cluster and a redis-server of its own
(bench/services.py), so their CPU is the run's alone; `machine_cpu_ms_per_call` is then the
service's whole CPU per LLM call (workers, API, Postgres, Redis; not the simulator nor this
script). Without it they are the machine's shared servers, others' work included.

Everything it started is torn down at the end, on error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from bench.api_latency import percentiles
from bench.hotspots import Profiler, print_summary, summarize
from bench.loadgen import open_loop_get
from bench.machine import (
    cpu_seconds,
    cpu_seconds_of,
    cpu_seconds_of_named,
    cpu_seconds_with_children,
    cpu_user_system,
    describe,
    machine_cpu_jiffies,
)
from bench.prompts import make_prompts
from bench.services import PrivatePostgres, PrivateRedis, private_services
from bench.stack import ServiceStack, publish, run_bounded

TARGET = 0.95


def parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--jitter-ms", type=float, default=20.0)
    p.add_argument(
        "--concurrency", type=int, default=64, help="AIDSAFE_LLM_MAX_CONCURRENCY and the sim's cap"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-jobs", type=int, default=40, help="AIDSAFE_WORKER_MAX_JOBS")
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--agree-after", type=int, default=1, help="the sim agrees on this deliberation turn")
    p.add_argument("--poll-s", type=float, default=0.2, help="GET /v1/jobs/{id} interval")
    p.add_argument(
        "--probe-rate", type=float, default=0.0, help="open-loop GETs of the job per second while it runs"
    )
    p.add_argument("--idle-s", type=float, default=2.0, help="idle time to measure the workers' idle CPU")
    p.add_argument("--time-limit", type=float, default=280.0, help="the run stops itself after this")
    p.add_argument(
        "--private-services", action="store_true", help="a PostgreSQL and a Redis of the run's own"
    )
    p.add_argument("--profile", type=Path, default=None, help="py-spy the workers; raw files to this dir")
    p.add_argument(
        "--statements",
        type=int,
        default=0,
        metavar="N",
        help="with --private-services: the N statements Postgres spent most time on (pg_stat_statements)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p


Servers = tuple[PrivatePostgres, PrivateRedis]


async def measure(args: argparse.Namespace, kind: str = "efficiency") -> dict[str, Any]:
    if not args.private_services:
        if args.statements:
            raise SystemExit("--statements needs --private-services (a Postgres with pg_stat_statements)")
        async with ServiceStack(kind) as stack:
            return await _measure(stack, args, kind, None)
    log_dir = Path(tempfile.mkdtemp(prefix=f"aidsafe-bench-{kind}-services-"))
    with private_services(log_dir, statement_stats=bool(args.statements)) as servers:
        async with ServiceStack(kind, servers[0].dsn, servers[1].url) as stack:
            return await _measure(stack, args, kind, servers)


async def _measure(
    stack: ServiceStack, args: argparse.Namespace, kind: str, servers: Servers | None
) -> dict[str, Any]:
    await stack.create_database()
    sim_url = await stack.start_sim_llm(
        "--latency-ms", str(args.latency_ms), "--jitter-ms", str(args.jitter_ms),
        "--max-concurrency", str(args.concurrency), "--agree-after", str(args.agree_after), "--seed", "1",
    )  # fmt: skip
    stack.serve_simulator(sim_url, args.concurrency, args.max_jobs)
    api_url = await stack.start_api()
    worker_pids = await stack.start_workers(args.workers)
    key = await stack.create_key()
    prompts = make_prompts(args.prompts)
    sim_root = sim_url.removesuffix("/v1")
    pids = {"workers": worker_pids, "api": [stack.pid("api")], "sim_llm": [stack.pid("sim_llm")]}

    async with httpx.AsyncClient(
        base_url=api_url, timeout=120, headers={"Authorization": f"Bearer {key}"}
    ) as api:
        # The workers' CPU while idle (arq polls the queue), to tell it from the work.
        await asyncio.sleep(0.5)
        idle_before = cpu_seconds_of(worker_pids)
        await asyncio.sleep(args.idle_s)
        idle_rate = (cpu_seconds_of(worker_pids) - idle_before) / args.idle_s

        profiler = None
        if args.profile:
            profiler = Profiler(args.profile)
            profiler.start({f"worker{i}": pid for i, pid in enumerate(worker_pids, 1)})
            await asyncio.sleep(1.0)  # py-spy attaches
        await api.post(f"{sim_root}/stats/reset")
        if servers and servers[0].statement_stats:
            await stack.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await stack.sql("SELECT pg_stat_statements_reset()")
        pg_started = await stack.postgres_started_at()
        db_bytes_before = (await stack.sql("SELECT pg_database_size(current_database()) AS n"))[0]["n"]
        cpu_before = cpu_snapshot(pids, servers)
        counters_before = await service_counters(stack)
        own_before = time.process_time()
        started_wall, started = time.time(), time.monotonic()
        answer = await api.post("/v1/jobs", json={"prompts": prompts, "config": {"agents": args.agents}})
        post_s = time.monotonic() - started
        if answer.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs: {answer.status_code} {answer.text[:500]}")
        job_id = answer.json()["id"]
        job = answer.json()
        probe_done = asyncio.Event()
        probe = _probe(api, f"/v1/jobs/{job_id}", args, probe_done) if args.probe_rate else None
        polls, poll_errors = 0, Counter[str]()
        while job["status"] not in ("completed", "cancelled"):
            await asyncio.sleep(args.poll_s)
            polls += 1
            try:  # the service is meant to ride out a Postgres or Redis restart: so is this
                answer = await api.get(f"/v1/jobs/{job_id}")
            except httpx.HTTPError as exc:
                poll_errors[type(exc).__name__] += 1
                continue
            if answer.status_code != 200:
                poll_errors[f"HTTP {answer.status_code}"] += 1
                continue
            job = answer.json()
        polled_wall_s = time.monotonic() - started
        probe_done.set()
        probed = await probe if probe else None
        cpu_after = cpu_snapshot(pids, servers)
        counters_after = await service_counters(stack)
        own_cpu_s = time.process_time() - own_before
        if profiler:
            profiler.stop()
        sim = (await api.get(f"{sim_root}/stats")).json()
        counting = servers is not None and servers[0].statement_stats
        statements = await _statements(stack, args.statements) if counting else None

    pg_restarted = await stack.postgres_started_at() != pg_started
    row = (
        await stack.sql(
            "SELECT extract(epoch FROM max(finished_at))::float8 AS last_finished,"
            " count(*) FILTER (WHERE status = 'completed') AS completed,"
            " count(*) FILTER (WHERE status <> 'completed') AS not_completed FROM items"
        )
    )[0]
    turns = (await stack.sql("SELECT count(*) AS n, avg(latency_ms)::float8 AS latency FROM turns"))[0]
    storage = await _storage(stack, turns["n"], db_bytes_before)
    actual_s = row["last_finished"] - started_wall
    calls = sim["answered"]
    mean_latency_s = sim["simulated_latency_ms_mean"] / 1000
    ideal_s = calls * mean_latency_s / args.concurrency
    cpu = {name: cpu_after[name] - cpu_before[name] for name in pids}
    postgres_redis = {name: cpu_after[name] - cpu_before[name] for name in ("postgres", "redis")}
    busy, total = (a - b for a, b in zip(cpu_after["machine"], cpu_before["machine"], strict=True))
    worker_system_s = cpu_after["workers_system"] - cpu_before["workers_system"]
    counters = {name: counters_after[name] - counters_before.get(name, 0) for name in counters_after}
    everything_s = sum(cpu.values()) + own_cpu_s + sum(postgres_redis.values())
    # The service's own: neither the simulator nor this script.
    service_s = {"workers": cpu["workers"], "api": cpu["api"], **postgres_redis}
    service_s["total"] = sum(service_s.values())
    # Calls/s this machine could sustain if its CPUs did nothing but this run, against the
    # rate the ideal needs: an upper bound on the efficiency a CPU-bound run can reach.
    needed_per_s = args.concurrency / mean_latency_s if mean_latency_s else None
    sustainable_per_s = (os.cpu_count() or 1) * calls / everything_s if everything_s else None
    worker_work_s = max(0.0, cpu["workers"] - idle_rate * actual_s)
    summary: dict[str, Any] = {
        "benchmark": kind,
        "machine": describe(),
        "command": " ".join([Path(sys.executable).name, "-m", f"bench.{kind}", *sys.argv[1:]]),
        "settings": {
            "prompts": args.prompts,
            "agents": args.agents,
            "latency_ms": args.latency_ms,
            "jitter_ms": args.jitter_ms,
            "concurrency": args.concurrency,
            "workers": args.workers,
            "max_jobs_per_worker": args.max_jobs,
            "api": "aidsafe-api, 1 process",
            "profiled": bool(args.profile),
            "postgres_and_redis": "private to this run" if servers else "the machine's, shared",
        },
        "postgres_restarted_during_run": pg_restarted,
        "items": {"completed": row["completed"], "not_completed": row["not_completed"]},
        "llm": {
            "calls_answered": calls,
            "requests": sim["requests"],
            "calls_per_prompt": round(calls / args.prompts, 3),
            "turns_stored": turns["n"],
            "cap_violations": sim["cap_violations"],
            "max_in_flight": sim["max_in_flight"],
            "mean_in_flight_while_busy": round(sim["mean_in_flight_while_busy"], 2),
            "simulated_latency_ms_mean": round(sim["simulated_latency_ms_mean"], 2),
            "client_seen_latency_ms_mean": round(turns["latency"] or 0.0, 2),
            "busy_s": round(sim["busy_s"], 3),
            "mean_in_flight_by_half_second": sim["mean_in_flight_by_half_second"],
        },
        "timing": {
            "post_s": round(post_s, 3),
            "ideal_s": round(ideal_s, 3),
            "actual_s": round(actual_s, 3),
            "polled_s": round(polled_wall_s, 3),
            "polls": polls,
            "poll_errors": dict(poll_errors),
        },
        "efficiency": round(ideal_s / actual_s, 4) if actual_s > 0 and ideal_s > 0 else None,
        "llm_utilisation_while_busy": round(sim["mean_in_flight_while_busy"] / args.concurrency, 4),
        "cpu_s": {name: round(value, 2) for name, value in cpu.items()}
        | {"bench_client": round(own_cpu_s, 2)},
        "worker_idle_cpu_per_s": round(idle_rate, 4),
        "worker_cpu_ms_per_call": round(cpu["workers"] / calls * 1000, 3) if calls else None,
        "worker_cpu_ms_per_call_minus_idle": round(worker_work_s / calls * 1000, 3) if calls else None,
        "worker_cpu_system_share": round(worker_system_s / cpu["workers"], 3) if cpu["workers"] else None,
        # Postgres: transactions of our database; Redis: every client's commands (others' too)
        "pg_transactions_per_call": round(counters["pg_transactions"] / calls, 2) if calls else None,
        # Connections the services opened to our database during the run: each is a new Postgres
        # process that prepares its statements again, and a pool should open few.
        "pg_connections_opened": counters["pg_connections"],
        "redis_commands_per_call_all_clients": round(counters["redis_commands"] / calls, 2)
        if calls
        else None,
        # With the run's own Redis: its commands only.
        "redis_commands_per_call_by_command": {
            name.removeprefix("redis:"): round(n / calls, 2)
            for name, n in sorted(counters.items(), key=lambda kv: -kv[1])
            if name.startswith("redis:") and n >= calls / 100
        }
        if calls
        else None,
        # Per process and in all; with shared servers their share counts others' work too.
        "machine_cpu_ms_per_call": {name: round(value / calls * 1000, 3) for name, value in service_s.items()}
        if calls
        else None,
        "all_cpu_ms_per_call_on_this_machine": round(everything_s / calls * 1000, 3) if calls else None,
        "cpu_bound_efficiency_ceiling": round(min(1.0, sustainable_per_s / needed_per_s), 4)
        if sustainable_per_s and needed_per_s
        else None,
        "api_cpu_ms_per_call": round(cpu["api"] / calls * 1000, 3) if calls else None,
        "sim_cpu_ms_per_call": round(cpu["sim_llm"] / calls * 1000, 3) if calls else None,
        "cpu_busy_cores_ours": round(sum(cpu.values()) / actual_s, 2) if actual_s > 0 else None,
        # the run's own servers, or every postgres/redis-server process on the machine
        "cpu_s_postgres_redis": {name: round(value, 2) for name, value in postgres_redis.items()},
        "machine_cpu_busy": round(busy / total, 3) if total else None,
        "get_job_while_running": probed,
        "storage": storage,
        "logs": str(stack.log_dir),
    }
    if statements is not None:
        summary["postgres_statements"] = [
            {**each, "us_per_llm_call": round(each["total_ms"] * 1000 / calls, 1) if calls else None}
            for each in statements
        ]
    if profiler:
        summary["profile"] = summarize(profiler.files)
        summary["profile"]["dir"] = str(args.profile)
    return summary


def _probe(
    api: httpx.AsyncClient, path: str, args: argparse.Namespace, done: asyncio.Event
) -> asyncio.Task[dict[str, Any]]:
    """GET `path` open loop at --probe-rate per second until `done` (bench/loadgen.py, so a
    slow answer delays no later request and its wait is counted), beside the job's polls."""

    async def run() -> dict[str, Any]:
        url = f"{api.base_url}".rstrip("/") + path
        headers = {"Authorization": api.headers["Authorization"]}
        load = await open_loop_get(url, headers, args.probe_rate, args.time_limit, 8, 10.0, done)
        return {
            **percentiles(load.latencies_s),
            "rate_per_s": args.probe_rate,
            "requests": load.requests,
            "errors": dict(load.errors),
            "client_send_lag_p99_ms": percentiles(load.send_lag_s)["p99_ms"],
        }

    return asyncio.create_task(run())


async def _statements(stack: ServiceStack, top: int) -> list[dict[str, Any]]:
    """The `top` statements by Postgres's time in them since the job's POST (the foreign keys'
    checks included): where the database's share of a call goes."""
    rows = await stack.sql(
        "SELECT calls, total_exec_time AS total_ms, rows,"
        " left(regexp_replace(query, '\\s+', ' ', 'g'), 300) AS query"
        " FROM pg_stat_statements"
        " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " ORDER BY total_exec_time DESC LIMIT $1",
        top,
    )
    return [
        {
            "calls": row["calls"],
            "total_ms": round(row["total_ms"], 1),
            "us_per_statement": round(row["total_ms"] * 1000 / row["calls"], 1) if row["calls"] else None,
            "rows": row["rows"],
            "query": row["query"],
        }
        for row in rows
    ]


async def _storage(stack: ServiceStack, turns: int, db_bytes_before: int) -> dict[str, Any]:
    """Bytes on disk per stored turn: the turns table with its indexes and TOAST, and the
    whole database (items, jobs and the rest with it; the empty, migrated one subtracted)."""
    row = (
        await stack.sql(
            "SELECT pg_table_size('turns') AS turns_table, pg_indexes_size('turns') AS turns_indexes,"
            " pg_database_size(current_database()) AS db"
        )
    )[0]

    def per_turn(n: int) -> int | None:
        return round(n / turns) if turns else None

    return {
        "turns": turns,
        "turns_table_and_toast_bytes_per_turn": per_turn(row["turns_table"]),
        "turns_indexes_bytes_per_turn": per_turn(row["turns_indexes"]),
        "turns_total_bytes_per_turn": per_turn(row["turns_table"] + row["turns_indexes"]),
        "database_growth_bytes_per_turn": per_turn(row["db"] - db_bytes_before),
        "database_mb": round(row["db"] / 1024 / 1024, 1),
        "database_mb_before_the_job": round(db_bytes_before / 1024 / 1024, 1),
    }


async def service_counters(stack: ServiceStack) -> dict[str, int]:
    row = (
        await stack.sql(
            "SELECT xact_commit + xact_rollback AS n, sessions FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
    )[0]
    redis = Redis.from_url(stack.redis_url)
    try:
        info = await redis.info("stats")
        by_command = await redis.info("commandstats")
    finally:
        await redis.aclose()
    counters = {
        "pg_transactions": int(row["n"]),
        "pg_connections": int(row["sessions"]),
        "redis_commands": int(info["total_commands_processed"]),
    }
    # Lua scripts' own commands are counted under their names as well as under evalsha.
    return counters | {
        f"redis:{name.removeprefix('cmdstat_')}": int(stat["calls"]) for name, stat in by_command.items()
    }


def cpu_snapshot(pids: dict[str, list[int]], servers: Servers | None) -> dict[str, Any]:
    snapshot: dict[str, Any] = {name: cpu_seconds_of(p) for name, p in pids.items()}
    snapshot["workers_system"] = sum(cpu_user_system(pid)[1] for pid in pids["workers"])
    if servers:
        snapshot["postgres"] = cpu_seconds_with_children(servers[0].postmaster_pid())
        snapshot["redis"] = cpu_seconds(servers[1].pid())
    else:
        snapshot["postgres"] = cpu_seconds_of_named("postgres")
        snapshot["redis"] = cpu_seconds_of_named("redis-server")
    snapshot["machine"] = machine_cpu_jiffies()
    return snapshot


def report(
    summary: dict[str, Any], target_key: str, target: float, higher_is_better: bool, json_path: Path | None
) -> None:
    value = summary[target_key]
    met = value is not None and (value >= target if higher_is_better else value <= target)
    summary["target"] = {"metric": target_key, "target": target, "met": met}
    if "profile" in summary:
        print_summary("worker hotspots (py-spy)", summary["profile"])
    publish(summary, json_path)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    summary = run_bounded(lambda: measure(args), args.time_limit)
    report(summary, "efficiency", TARGET, higher_is_better=True, json_path=args.json)


if __name__ == "__main__":
    main()
