"""A long soak: steady load with everyday provider faults and a worker killed every couple of
minutes, watching memory, stuck items and Redis for growth (issue 12, target 6).

    .venv/bin/python -m bench.soak --minutes 30 --json /tmp/soak.json

One stack (bench/stack.py: a fresh database, the simulated LLM with the everyday fault mix
of bench/bad_day.py, the API under uvicorn, --workers arq workers). For --minutes it keeps the
queue fed, POSTing a job of --prompts-per-job prompts whenever fewer than --queued-low items
are queued (so the queue never runs dry and never grows without bound), polls the active
jobs through the API as a client would, and every --kill-every-s SIGKILLs a random worker
and starts a new one in its slot (bench/chaos.py's WorkerKiller). Every --sample-s it
records the RSS of the API and of each worker process, items by status, how long each
running item has been running, the run's Redis keys (its prefix, its queue, arq's keys of
its items) and the database size. Then it stops submitting and killing, waits up to
--drain-s for the queue to drain, and audits every job (bench/audit.py).

The verdict: memory flat (last window's median RSS within max(10 MB, 10 %) of the first
window's, after a minute of warm-up; a least-squares slope in MB/hour beside it) for the API
over the soak and for each worker that lived over 5 minutes; no item running longer than
--stuck-s at any sample; the queue drained; every item completed or failed with a reason;
no turn stored twice; LLM answers bought twice no more than items running at the kills; the
run's Redis keys flat by the same rule.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.store.db import make_sessions
from bench.audit import FINISHED, JobAudit, audit_job
from bench.bad_day import EVERYDAY, add_service_args, fault_args
from bench.chaos import WorkerKiller
from bench.machine import describe, machine_cpu_jiffies, rss_mb
from bench.prompts import make_prompts
from bench.stack import ServiceStack, publish, run_bounded

MB = 1024 * 1024
WARMUP_S = 60.0  # imports, pools and caches filling: not a leak
TREND_WINDOW_S = 600.0  # first and last 10 minutes (a third of a shorter span)
LONG_LIFE_S = 300.0  # worker lifetimes judged for flatness
FLAT_MB, FLAT_SHARE = 10.0, 0.10
SUBMIT_POLL_S = 1.0
# Postgres and Redis are shared and others' fault tests restart them: a loop's round that
# fails on one of these is counted and the loop goes on.
TRANSIENT = (OSError, httpx.HTTPError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError)
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{16,}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load lasts")
    p.add_argument("--kill-every-s", type=float, default=120.0, help="a worker SIGKILLed this often")
    p.add_argument("--prompts-per-job", type=int, default=100)
    p.add_argument("--queued-low", type=int, default=256, help="a new job when fewer items are queued")
    add_service_args(p)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--stuck-s", type=float, default=300.0, help="an item running longer is stuck")
    p.add_argument("--drain-s", type=float, default=600.0, help="longest wait for the queue to drain")
    p.add_argument("--seed", type=int, default=1, help="the simulator's draws and the kills")
    p.add_argument("--time-limit", type=float, default=None, help="default: minutes + drain + 10 min")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p


@dataclass
class Kill:
    at_s: float
    victim: str
    items_running: int  # each has at most one call in progress: the re-spend bound
    sim_in_flight: int


@dataclass
class Sample:
    t_s: float
    phase: str  # "soak" or "drain"
    api_rss_mb: float | None
    workers_rss_mb: dict[str, float]
    items: dict[str, int]
    max_running_s: float  # the longest any item now running has been running (seen by us)
    redis_keys: int  # the run's keys: its prefix, its queue, arq's keys of its items
    redis_arq_keys: int
    redis_used_memory_mb: float  # the whole (shared) Redis server's
    db_size_mb: float
    jobs_submitted: int
    sim_in_flight: int
    sim_cap_violations: int  # so far: when they happened, against the kills' times


@dataclass
class Soak:
    args: argparse.Namespace
    stack: ServiceStack
    http: httpx.AsyncClient
    redis: Redis
    api_url: str
    sim_root: str
    key: str
    killer: WorkerKiller
    started: float = field(default_factory=time.monotonic)
    phase: str = "soak"
    stop_load: asyncio.Event = field(default_factory=asyncio.Event)
    jobs: list[UUID] = field(default_factory=list)
    active: set[UUID] = field(default_factory=set)
    refused_posts: Counter[int] = field(default_factory=Counter)
    kills: list[Kill] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    rss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # process -> (t, MB)
    running_since: dict[UUID, float] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)  # transient failures by loop and kind

    async def survive(self, loop: str, step: Any) -> None:
        try:
            await step()
        except TRANSIENT as exc:
            self.errors[f"{loop}: {type(exc).__name__}"] += 1

    def now(self) -> float:
        return time.monotonic() - self.started

    async def count(self, status: str) -> int:
        rows = await self.stack.sql("SELECT count(*) AS n FROM items WHERE status = $1", status)
        return int(rows[0]["n"])

    # --- the load -----------------------------------------------------------------

    async def submit(self) -> None:
        """A job whenever the queue runs low; the active jobs polled as a client would."""
        while not self.stop_load.is_set():
            await self.survive("submit", self.feed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_load.wait(), SUBMIT_POLL_S)

    async def feed(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        if await self.count("queued") < self.args.queued_low:
            answer = await self.http.post(
                f"{self.api_url}/v1/jobs",
                json={
                    "prompts": make_prompts(self.args.prompts_per_job, seed=len(self.jobs)),
                    "config": {"agents": self.args.agents, "max_rounds": self.args.max_rounds},
                },
                headers=headers,
            )
            if answer.status_code == 202:
                job = UUID(answer.json()["id"])
                self.jobs.append(job)
                self.active.add(job)
            else:
                self.refused_posts[answer.status_code] += 1
        for job in list(self.active):
            answer = await self.http.get(f"{self.api_url}/v1/jobs/{job}", headers=headers)
            if answer.status_code == 200 and answer.json().get("status") in FINISHED:
                self.active.discard(job)

    async def kill_workers(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_load.wait(), self.args.kill_every_s)
            if self.stop_load.is_set():
                return
            await self.survive("kill", self.kill_one)

    async def kill_one(self) -> None:
        sim = (await self.http.get(f"{self.sim_root}/stats")).json()
        running = await self.count("running")
        at = round(self.now(), 1)
        victim = await self.killer.kill()
        self.kills.append(Kill(at, victim, running, sim["in_flight"]))
        print(f"[soak] {self.kills[-1]}", file=sys.stderr, flush=True)

    # --- sampling -----------------------------------------------------------------

    async def sample_forever(self) -> None:
        while True:
            await self.survive("sample", self.sample)
            await asyncio.sleep(self.args.sample_s)

    async def sample(self) -> None:
        t = round(self.now(), 1)
        api = rss_mb(self.stack.pid("api"))
        if api is not None:
            self.rss.setdefault("api", []).append((t, api))
        workers = {}
        for name in self.killer.workers:
            if (mb := rss_mb(self.stack.pid(name))) is not None:
                workers[name] = mb
                self.rss.setdefault(name, []).append((t, mb))
        rows = await self.stack.sql("SELECT status, count(*) AS n FROM items GROUP BY status")
        running = await self.stack.sql("SELECT id FROM items WHERE status = 'running'")
        now_running = {r["id"] for r in running}
        self.running_since = {i: self.running_since.get(i, t) for i in now_running}
        keys, arq_keys = await self.redis_keys()
        info = await self.redis.info("memory")
        size = await self.stack.sql("SELECT pg_database_size(current_database()) AS b")
        sim = (await self.http.get(f"{self.sim_root}/stats")).json()
        self.samples.append(
            Sample(
                t_s=t,
                phase=self.phase,
                api_rss_mb=api,
                workers_rss_mb=workers,
                items={r["status"]: int(r["n"]) for r in rows},
                max_running_s=round(max((t - s for s in self.running_since.values()), default=0.0), 1),
                redis_keys=keys,
                redis_arq_keys=arq_keys,
                redis_used_memory_mb=round(info["used_memory"] / MB, 1),
                db_size_mb=round(size[0]["b"] / MB, 1),
                jobs_submitted=len(self.jobs),
                sim_in_flight=sim["in_flight"],
                sim_cap_violations=sim["cap_violations"],
            )
        )

    async def redis_keys(self) -> tuple[int, int]:
        """The run's keys: under its prefix and queue name, and arq's keys of its items
        (arq:<kind>:item:<uuid>:<n>, outside the prefix; the Redis is shared, so an item's
        key counts only if the item is in our database)."""
        ours = await self.prefix_keys()
        by_item: dict[str, int] = Counter()
        async for key in self.redis.scan_iter(match="arq:*item:*", count=5000):
            parts = key.decode(errors="replace").split(":")
            if len(parts) >= 4:
                by_item[parts[-2]] += 1
        arq = 0
        if by_item:
            rows = await self.stack.sql(
                "SELECT id::text AS id FROM items WHERE id = ANY($1::uuid[])", list(by_item)
            )
            arq = sum(by_item[r["id"]] for r in rows)
        return len(ours) + arq, arq

    async def prefix_keys(self) -> list[str]:
        keys = []
        for pattern in (f"{self.stack.key_prefix}*", f"{self.stack.queue_name}*"):
            keys += [
                k.decode(errors="replace") async for k in self.redis.scan_iter(match=pattern, count=1000)
            ]
        return sorted(set(keys))

    async def key_shapes(self) -> dict[str, dict[str, int]]:
        """The run's keys by shape (ids replaced by *), and how many have no expiry."""
        shapes: dict[str, dict[str, int]] = {}
        for key in await self.prefix_keys():
            shape = UUID_RE.sub("*", key.removeprefix(self.stack.key_prefix))
            entry = shapes.setdefault(shape, {"keys": 0, "no_ttl": 0})
            entry["keys"] += 1
            entry["no_ttl"] += int(await self.redis.ttl(key) == -1)
        return shapes

    async def drain(self) -> bool:
        """Whether every item finished within --drain-s of the end of the load."""
        deadline = time.monotonic() + self.args.drain_s
        while time.monotonic() < deadline:
            rows = await self.stack.sql(
                "SELECT count(*) AS n FROM items WHERE status <> ALL($1::text[])", list(FINISHED)
            )
            if rows[0]["n"] == 0:
                return True
            await asyncio.sleep(1.0)
        return False


def trend(points: list[tuple[float, float]]) -> dict[str, Any]:
    """First and last window's medians (after the warm-up) and a least-squares slope."""
    if not points:
        return {"samples": 0}
    kept = [p for p in points if p[0] >= points[0][0] + WARMUP_S] or points
    t0, t1 = kept[0][0], kept[-1][0]
    window = min(TREND_WINDOW_S, (t1 - t0) / 3)
    first = statistics.median(v for t, v in kept if t <= t0 + window)
    last = statistics.median(v for t, v in kept if t >= t1 - window)
    slope = 0.0
    if len(kept) > 2 and t1 > t0:
        mean_t = statistics.fmean(t for t, _ in kept)
        mean_v = statistics.fmean(v for _, v in kept)
        num = sum((t - mean_t) * (v - mean_v) for t, v in kept)
        slope = num / sum((t - mean_t) ** 2 for t, _ in kept) * 3600
    growth = last - first
    return {
        "samples": len(kept),
        "span_min": round((t1 - t0) / 60, 1),
        "window_min": round(window / 60, 1),
        "first_median": round(first, 1),
        "last_median": round(last, 1),
        "growth": round(growth, 1),
        "slope_per_hour": round(slope, 1),
        "max": round(max(v for _, v in points), 1),
        "flat": growth <= max(FLAT_MB, FLAT_SHARE * first),
    }


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    async with ServiceStack("soak") as stack:
        await stack.create_database()
        sim_url = await stack.start_sim_llm(
            "--latency-ms", str(args.latency_ms), "--jitter-ms", str(args.jitter_ms),
            "--max-concurrency", str(args.concurrency), "--stall-s", str(args.stall_s),
            "--agree-after", str(args.agents * args.max_rounds + 1), "--agree-prob", str(args.agree_prob),
            "--seed", str(args.seed), *fault_args(EVERYDAY),
        )  # fmt: skip
        stack.serve_simulator(
            sim_url,
            args.concurrency,
            args.max_jobs,
            AIDSAFE_LLM_TIMEOUT_S=str(args.llm_timeout_s),
            AIDSAFE_LOG_JSON="false",
        )
        api_url = await stack.start_api()
        await stack.start_workers(args.workers)
        key = await stack.create_key()
        redis = Redis.from_url(stack.redis_url)
        try:
            async with httpx.AsyncClient(timeout=120) as http:
                run = Soak(
                    args, stack, http, redis, api_url, sim_url.removesuffix("/v1"), key,
                    WorkerKiller(stack, args.workers, random.Random(args.seed)),
                )  # fmt: skip
                return await _soak(run)
        finally:
            await redis.aclose()


async def _soak(run: Soak) -> dict[str, Any]:
    args, stack = run.args, run.stack
    pg_started = await stack.postgres_started_at()
    busy_before = machine_cpu_jiffies()
    run.started = time.monotonic()
    tasks = [asyncio.create_task(c) for c in (run.submit(), run.kill_workers(), run.sample_forever())]
    try:
        done, _ = await asyncio.wait(tasks, timeout=args.minutes * 60, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a failed loop stops the run with its error
        run.stop_load.set()
        run.phase = "drain"
        await asyncio.gather(*tasks[:2])
        load_s = run.now()
        drained = await run.drain()
        drain_s = run.now() - load_s
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await run.sample()
    busy_after = machine_cpu_jiffies()
    shapes = await run.key_shapes()
    sim = (await run.http.get(f"{run.sim_root}/stats")).json()
    engine = stack.engine()
    try:
        sessions = make_sessions(engine)
        audits = [await audit_job(sessions, job) for job in run.jobs]
    finally:
        await engine.dispose()
    pg_restarted = await stack.postgres_started_at() != pg_started
    busy, total = (a - b for a, b in zip(busy_after, busy_before, strict=True))
    return _summary(run, audits, sim, shapes, drained, load_s, drain_s) | {
        "machine_cpu_busy": round(busy / total, 3) if total else None,
        "loadavg_1m_at_end": describe()["loadavg_1m"],
        "postgres_restarted_during_run": pg_restarted,
        "logs": str(stack.log_dir),
    }


def _summary(
    run: Soak,
    audits: list[JobAudit],
    sim: dict[str, Any],
    shapes: dict[str, dict[str, int]],
    drained: bool,
    load_s: float,
    drain_s: float,
) -> dict[str, Any]:
    args = run.args
    soak_rss = {name: [p for p in pts if p[0] <= load_s] for name, pts in run.rss.items()}
    api = trend(soak_rss.pop("api", []))
    workers = {
        name: trend(pts) | {"lived_min": round((pts[-1][0] - pts[0][0]) / 60, 1)}
        for name, pts in soak_rss.items()
        if pts
    }
    long_lived = {n: w for n, w in workers.items() if w["lived_min"] * 60 >= LONG_LIFE_S}
    loaded = [s for s in run.samples if s.phase == "soak"]
    arq_keys = trend([(s.t_s, float(s.redis_arq_keys)) for s in loaded])
    prefix_keys = trend([(s.t_s, float(s.redis_keys - s.redis_arq_keys)) for s in loaded])
    # A key per job or worker (an id in its name) without an expiry is one that only grows;
    # with one, the count is bounded by what arrives within its expiry (events: 24 h of jobs).
    undying = {shape: n["no_ttl"] for shape, n in shapes.items() if "*" in shape and n["no_ttl"]}
    audit = JobAudit(
        statuses=dict(sum((Counter(a.statuses) for a in audits), Counter())),
        failed_by_code=dict(sum((Counter(a.failed_by_code) for a in audits), Counter())),
        turns=sum(a.turns for a in audits),
        duplicate_turns=sum(a.duplicate_turns for a in audits),
    )
    bound = sum(k.items_running for k in run.kills)
    expected = len(run.jobs) * args.prompts_per_job
    max_running = max((s.max_running_s for s in run.samples), default=0.0)
    end = run.samples[-1]
    problems = audit.problems(expected, sim["answered"], bound)
    if not api["flat"]:
        problems.append(f"API RSS grew {api['growth']} MB over the soak ({api['slope_per_hour']} MB/h)")
    problems += [
        f"{name} RSS grew {w['growth']} MB over its {w['lived_min']} min ({w['slope_per_hour']} MB/h)"
        for name, w in long_lived.items()
        if not w["flat"]
    ]
    if not long_lived:
        problems.append("no worker lived 5 minutes: workers' flatness not judged")
    if max_running > args.stuck_s:
        problems.append(f"an item ran {max_running} s, over {args.stuck_s:.0f} s")
    if not drained or end.items.get("queued", 0) or end.items.get("running", 0):
        problems.append(f"the queue did not drain within {args.drain_s:.0f} s: {end.items}")
    if not arq_keys["flat"]:
        problems.append(f"arq's keys grew from {arq_keys['first_median']} to {arq_keys['last_median']}")
    if undying:
        problems.append(f"keys per job or worker without an expiry: {undying}")
    if sim["cap_violations"]:
        problems.append(f"{sim['cap_violations']} requests over the cap")
    return {
        "benchmark": "soak",
        "machine": describe(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.soak", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"fault_mix": EVERYDAY},
        "load_s": round(load_s, 1),
        "drain_s": round(drain_s, 1),
        "drained": drained,
        "headline": {
            "api_rss_mb": {
                k: api[k] for k in ("first_median", "last_median", "growth", "slope_per_hour", "flat")
            },
            "workers_over_5_min": {
                n: {
                    k: w[k]
                    for k in ("lived_min", "first_median", "last_median", "growth", "slope_per_hour", "flat")
                }
                for n, w in long_lived.items()
            },
            "max_running_item_s": max_running,
            "items": audit.statuses,
            "items_per_s": round(audit.statuses.get("completed", 0) / load_s, 1) if load_s else None,
            "failed_by_code": audit.failed_by_code,
            "turns_duplicated": audit.duplicate_turns,
            "redis_arq_keys": {
                k: arq_keys[k] for k in ("first_median", "last_median", "growth", "max", "flat")
            }
            | {"at_end": end.redis_arq_keys},
            "redis_prefix_keys": {k: prefix_keys[k] for k in ("first_median", "last_median", "growth", "max")}
            | {"at_end": end.redis_keys - end.redis_arq_keys, "per_id_without_expiry": undying},
            "db_size_mb_at_end": end.db_size_mb,
            "kills": len(run.kills),
        },
        "jobs": {"submitted": len(run.jobs), "refused_posts": dict(run.refused_posts)},
        "transient_errors": dict(run.errors),
        "api_rss_mb": api,
        "workers_rss_mb": workers,
        "redis_arq_keys": arq_keys,
        "redis_prefix_keys": prefix_keys,
        "redis_key_shapes_at_end": shapes,
        "turns": {"stored": audit.turns, "duplicates": audit.duplicate_turns},
        "llm": {
            "requests": sim["requests"],
            "answered_200": sim["answered"],
            "faults": sim["faults"],
            "rate_limited_429": sim["rate_limited"],
            "re_spent": sim["answered"] - audit.turns,
            "re_spend_bound_items_running_at_kills": bound,
            "cap": args.concurrency,
            "max_in_flight": sim["max_in_flight"],
            "cap_violations": sim["cap_violations"],
            "mean_in_flight_while_busy": round(sim["mean_in_flight_while_busy"], 1),
        },
        "kills": [asdict(k) for k in run.kills],
        "samples": [asdict(s) for s in run.samples],
        "problems": problems,
        "targets_met": not problems,
    }


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    limit = args.time_limit or args.minutes * 60 + args.drain_s + 600
    summary = run_bounded(lambda: soak(args), limit)
    publish(summary, args.json)


if __name__ == "__main__":
    main()
