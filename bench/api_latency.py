"""API latency: POST /v1/jobs with 10,000 prompts, and GET /v1/jobs/{id} under open-loop load.

    .venv/bin/python -m bench.api_latency --prompts 10000 --posts 3 --rate 500 --duration 10

Stands up a fresh database and the API alone (`aidsafe-api`, one process, as the
README runs it; no worker, so the enqueued arq jobs just wait and are deleted at the end).

1. POST /v1/jobs with --prompts prompts of about --prompt-chars characters, --posts times
   (a new job each time); the figure is the median latency. The body is serialised once
   beforehand, so the client's JSON encoding is not timed.
2. GET /v1/jobs/{id} of the first of those jobs: a short closed-loop baseline (one request
   at a time), then an open-loop load of --rate requests/s for --duration s: request i is
   due at start + i/rate and its latency runs from that moment to the last byte of the
   answer, so a slow server cannot slow the load down and hide its queueing (no
   coordinated omission). Requests still unanswered --drain-s after the last is due count
   as unfinished. The client (bench/loadgen.py: --connections keep-alive connections over
   asyncio streams, on uvloop; `--client httpx` for httpx instead) shares the machine with
   the API, so its CPU use and how late requests got a connection are reported too.

--in-pairs gives each prompt twice (a duplicates report of some 20,000 values for 10,000
prompts), and --get polls another route of the job instead, e.g. `--get '/items?limit=1'`;
`api_cpu_ms_per_request` is the API's CPU over the open-loop load per answer.

With --profile DIR the API runs under py-spy during each phase and hotspots are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.hotspots import Profiler, print_summary, summarize
from bench.loadgen import LoadResult, open_loop_get
from bench.machine import cpu_seconds, cpu_seconds_of_named, describe, machine_cpu_jiffies
from bench.prompts import make_prompts
from bench.stack import ServiceStack, publish, run_bounded

POST_TARGET_S = 1.0
GET_P99_TARGET_MS = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=10_000)
    p.add_argument("--prompt-chars", type=int, default=200)
    p.add_argument("--posts", type=int, default=3)
    p.add_argument(
        "--in-pairs",
        action="store_true",
        help="each prompt twice: 10,000 prompts make a duplicates report of some 20,000 values",
    )
    p.add_argument(
        "--get", default="", help="what follows /v1/jobs/{id} in the GETs' path, e.g. /items?limit=1"
    )
    p.add_argument("--rate", type=float, default=500.0, help="GET requests per second, open loop")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of open-loop load")
    p.add_argument("--baseline", type=int, default=200, help="closed-loop GETs before the load")
    p.add_argument("--connections", type=int, default=64, help="client connections (keep-alive)")
    p.add_argument(
        "--client", choices=("raw", "httpx"), default="raw", help="open-loop client; see loadgen.py"
    )
    p.add_argument("--drain-s", type=float, default=20.0)
    p.add_argument("--time-limit", type=float, default=280.0)
    p.add_argument("--profile", type=Path, default=None, help="py-spy the API; raw files to this dir")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p.parse_args(argv)


def percentiles(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values_s)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"n": len(ordered), "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": at(1.0)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    async with ServiceStack("api_latency") as stack:
        api_url, key = await stack.api_alone()
        api_pid = stack.pid("api")
        pg_started = await stack.postgres_started_at()
        headers = {"Authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60, limits=limits) as client:
            posts = await _posts(client, args, api_pid)
            job_id = posts.pop("first_job_id")
            gets = await _gets(client, args, api_pid, f"/v1/jobs/{job_id}{args.get}")
        pg_restarted = await stack.postgres_started_at() != pg_started
        summary: dict[str, Any] = {
            "benchmark": "api_latency",
            "postgres_restarted_during_run": pg_restarted,
            "machine": describe(),
            "command": " ".join([Path(sys.executable).name, "-m", "bench.api_latency", *sys.argv[1:]]),
            "settings": {
                "api": "aidsafe-api, 1 process (default options: uvloop, httptools, access log)",
                "client": f"{args.client} (bench/loadgen.py) on uvloop, same machine, "
                f"{args.connections} keep-alive connections; httpx for the POSTs",
                "prompts_per_post": args.prompts,
                "prompt_chars": args.prompt_chars,
                "in_pairs": args.in_pairs,
                "get_path": f"/v1/jobs/{{id}}{args.get}",
                "rate_per_s": args.rate,
                "duration_s": args.duration,
                "profiled": bool(args.profile),
            },
            "post": posts,
            "get": gets,
            "logs": str(stack.log_dir),
        }
    summary["targets"] = {
        "post_median_s": {"target": POST_TARGET_S, "met": posts["median_s"] <= POST_TARGET_S},
        "get_p99_ms": {
            "target": GET_P99_TARGET_MS,
            "met": gets["open_loop"]["p99_ms"] is not None
            and gets["open_loop"]["p99_ms"] <= GET_P99_TARGET_MS
            and gets["open_loop"]["errors"] == {},
        },
    }
    if args.profile:
        for phase in ("post", "get"):
            print_summary(f"API hotspots during {phase} (py-spy)", summary[phase]["profile"])
    return summary


async def _posts(client: httpx.AsyncClient, args: argparse.Namespace, api_pid: int) -> dict[str, Any]:
    profiler = _profile(args, "api-post", api_pid)
    latencies, api_cpu, job_ids = [], [], []
    for number in range(1, args.posts + 1):
        prompts = make_prompts(args.prompts, chars=args.prompt_chars, seed=number)
        if args.in_pairs:
            prompts = [prompts[n // 2] for n in range(len(prompts))]
        body = json.dumps({"prompts": prompts}).encode()
        cpu_before = cpu_seconds(api_pid)
        started = time.monotonic()
        answer = await client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        latencies.append(time.monotonic() - started)
        api_cpu.append(cpu_seconds(api_pid) - cpu_before)
        if answer.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs: {answer.status_code} {answer.text[:500]}")
        job_ids.append(answer.json()["id"])
    result: dict[str, Any] = {
        "body_bytes": len(body),
        "latencies_s": [round(x, 3) for x in latencies],
        "median_s": round(statistics.median(latencies), 3),
        "api_cpu_s": [round(x, 2) for x in api_cpu],
        "first_job_id": job_ids[0],
    }
    if profiler:
        profiler.stop()
        result["profile"] = summarize(profiler.files)
    return result


async def _gets(
    client: httpx.AsyncClient, args: argparse.Namespace, api_pid: int, path: str
) -> dict[str, Any]:
    closed = []
    for _ in range(args.baseline):
        started = time.monotonic()
        (await client.get(path)).raise_for_status()
        closed.append(time.monotonic() - started)
    profiler = _profile(args, "api-get", api_pid)
    open_loop = await _open_loop(client, path, args, api_pid)
    if profiler:
        profiler.stop()
    result: dict[str, Any] = {"closed_loop_one_at_a_time": percentiles(closed), "open_loop": open_loop}
    if profiler:
        result["profile"] = summarize(profiler.files)
    return result


async def _open_loop(
    client: httpx.AsyncClient, path: str, args: argparse.Namespace, api_pid: int
) -> dict[str, Any]:
    cpu_before = {
        "client": time.process_time(),
        "api": cpu_seconds(api_pid),
        "postgres": cpu_seconds_of_named("postgres"),
    }
    machine_before = machine_cpu_jiffies()
    url = f"{client.base_url}".rstrip("/") + path
    headers = {"Authorization": client.headers["Authorization"]}
    if args.client == "raw":
        load = await open_loop_get(url, headers, args.rate, args.duration, args.connections, args.drain_s)
    else:
        load = await _open_loop_httpx(client, path, args)
    elapsed = load.elapsed_s
    busy, total = (a - b for a, b in zip(machine_cpu_jiffies(), machine_before, strict=True))
    return {
        **percentiles(load.latencies_s),
        "requests": load.requests,
        "errors": dict(load.errors),
        "achieved_per_s": round(len(load.latencies_s) / elapsed, 1),
        "client": args.client,
        "client_connections": args.connections,
        "client_send_lag_p99_ms": percentiles(load.send_lag_s)["p99_ms"],
        "api_cpu_cores": round((cpu_seconds(api_pid) - cpu_before["api"]) / elapsed, 3),
        "api_cpu_ms_per_request": round(
            (cpu_seconds(api_pid) - cpu_before["api"]) * 1000 / max(1, len(load.latencies_s)), 2
        ),
        "client_cpu_cores": round((time.process_time() - cpu_before["client"]) / elapsed, 3),
        "postgres_cpu_cores_all_backends": round(
            (cpu_seconds_of_named("postgres") - cpu_before["postgres"]) / elapsed, 3
        ),
        "machine_cpu_busy": round(busy / total, 3) if total else None,
    }


async def _open_loop_httpx(client: httpx.AsyncClient, path: str, args: argparse.Namespace) -> LoadResult:
    """The same schedule through httpx, one task per request (for comparison)."""
    result = LoadResult(requests=int(args.rate * args.duration))

    async def one(due: float) -> None:
        result.send_lag_s.append(time.monotonic() - due)
        try:
            answer = await client.get(path)
        except httpx.HTTPError as exc:
            result.errors[type(exc).__name__] += 1
            return
        if answer.status_code != 200:
            result.errors[f"HTTP {answer.status_code}"] += 1
            return
        result.latencies_s.append(time.monotonic() - due)

    tasks = []
    start = time.monotonic() + 0.05
    for i in range(result.requests):
        due = start + i / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    last_due = start + (result.requests - 1) / args.rate
    _, pending = await asyncio.wait(tasks, timeout=max(0.1, last_due + args.drain_s - time.monotonic()))
    for task in pending:
        task.cancel()
    if pending:
        result.errors["unfinished"] += len(pending)
    result.elapsed_s = time.monotonic() - start
    return result


def _profile(args: argparse.Namespace, name: str, pid: int) -> Profiler | None:
    if not args.profile:
        return None
    profiler = Profiler(args.profile / name)
    profiler.start({name: pid})
    time.sleep(1.0)  # py-spy attaches before anything is timed
    return profiler


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = run_bounded(lambda: measure(args), args.time_limit, use_uvloop=True)
    publish(summary, args.json)


if __name__ == "__main__":
    main()
