"""A bad day for the service: everyday and harsh provider faults, a real rate limit, and
workers killed -9, each against a fault-free run of the same job in the same invocation.

    .venv/bin/python -m bench.bad_day --scenario all --prompts 500 --json /tmp/bad_day.json

Every run stands up its own stack (bench/stack.py: a fresh database, the simulated LLM,
the API under uvicorn, --workers arq workers) and POSTs one job of --prompts prompts
(--agents agents, --max-rounds rounds, so up to agents x rounds deliberation turns, each
agreeing with probability --agree-prob, fixed per prompt and turn: every run of the job
makes the same calls). The LLM cap (--concurrency) is also the simulator's, so exceeding it
shows as cap violations. Scenarios (issue 12, targets 1-3):

- faults: the job fault-free, then with the everyday mix (2 % 503, 2 % 429 with
  Retry-After: 1, 0.5 % stalls of --stall-s, 2 % truncated JSON), then the harsh mix (15 %,
  8 %, 3 %, 5 %). Wall time and its ratio to the fault-free run (targets 1.5x and 4x).
- ratelimit: the simulator refuses with 429 beyond --rpm-limit requests a minute (a token
  bucket, --rpm-burst-s of burst), well below what the cap would send; the request rate
  achieved against the limit and the share of requests refused.
- kills: the job fault-free, then again with --kills SIGKILLs of a random worker within the
  first --kill-window-s (each restarted at once, as bench/chaos.py does). Wall time against
  the fault-free run (target: at most +30 s), how long each killed worker's items took to
  be claimed again, and LLM answers bought twice against the calls in flight at the kills.

Each run is audited with bench/audit.py: every item completed or failed with a reason, no
turn stored twice. Wall time runs from just before the POST to the last item's finished_at.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from redis.asyncio import Redis

from app.store.db import Sessions, make_sessions
from bench.audit import FINISHED, JobAudit, audit_job
from bench.chaos import WorkerKiller, wait_for_job
from bench.machine import describe, machine_cpu_jiffies
from bench.prompts import make_prompts
from bench.sim_llm import user_query
from bench.stack import ServiceStack, publish, run_bounded

EVERYDAY = {"5xx": 0.02, "429": 0.02, "stall": 0.005, "truncated": 0.02}
HARSH = {"5xx": 0.15, "429": 0.08, "stall": 0.03, "truncated": 0.05}
RATIO_TARGETS = {"everyday": 1.5, "harsh": 4.0}
KILLS_EXTRA_S_TARGET = 30.0
RESUME_TARGET_S = 20.0
# Not from the issue, which asks for "few 429s" and convergence to the limit: our reading.
RATELIMIT_TARGETS = {"share_of_limit": 0.9, "share_429": 0.05}
POLL_S = 0.25
SCENARIOS = ("faults", "ratelimit", "kills")


def add_service_args(p: argparse.ArgumentParser) -> None:
    """The job, the service and the simulator a bad day is measured with (soak uses them too)."""
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--max-rounds", type=int, default=2, help="rounds; turns = agents x rounds")
    p.add_argument("--agree-prob", type=float, default=0.5, help="chance that a deliberation turn agrees")
    p.add_argument(
        "--concurrency", type=int, default=64, help="AIDSAFE_LLM_MAX_CONCURRENCY and the sim's cap"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-jobs", type=int, default=64, help="AIDSAFE_WORKER_MAX_JOBS")
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--jitter-ms", type=float, default=20.0)
    p.add_argument("--llm-timeout-s", type=float, default=10.0, help="AIDSAFE_LLM_TIMEOUT_S")
    p.add_argument("--stall-s", type=float, default=30.0, help="how long a stalled request stays silent")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    p.add_argument("--prompts", type=int, default=500)
    add_service_args(p)
    p.add_argument("--lease-s", type=int, default=None, help="AIDSAFE_LEASE_SECONDS (default: the service's)")
    p.add_argument(
        "--sweep-s", type=int, default=None, help="AIDSAFE_SWEEP_INTERVAL_S (default: the service's)"
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="more service settings (API and workers), e.g. a heartbeat; repeatable",
    )
    p.add_argument("--rpm-limit", type=int, default=3000, help="ratelimit: the simulator's requests a minute")
    p.add_argument("--rpm-burst-s", type=float, default=1.0, help="ratelimit: burst, in seconds of the limit")
    p.add_argument("--ratelimit-headers", action="store_true", help="ratelimit: the sim sends x-ratelimit-*")
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--kill-window-s", type=float, default=30.0, help="the kills fall within this")
    p.add_argument("--seed", type=int, default=1, help="the simulator's draws and the kill schedule")
    p.add_argument("--settle-s", type=float, default=1200.0, help="longest wait for one run's job")
    p.add_argument("--time-limit", type=float, default=3600.0, help="the whole invocation stops after this")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p


def fault_args(mix: dict[str, float]) -> list[str]:
    return [arg for kind, p in mix.items() for arg in (f"--fault-{kind}", str(p))]


def _service_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"AIDSAFE_LLM_TIMEOUT_S": str(args.llm_timeout_s), "AIDSAFE_LOG_JSON": "false"}
    if args.lease_s is not None:
        env["AIDSAFE_LEASE_SECONDS"] = str(args.lease_s)
    if args.sweep_s is not None:
        env["AIDSAFE_SWEEP_INTERVAL_S"] = str(args.sweep_s)
    for setting in args.worker_env:
        name, sep, value = setting.partition("=")
        if not sep or not name.startswith("AIDSAFE_"):
            raise SystemExit(f"--worker-env wants AIDSAFE_NAME=VALUE, not {setting!r}")
        env[name] = value
    return env


@dataclass
class Job:
    """One run's job while it runs, for what a scenario does meanwhile."""

    stack: ServiceStack
    sessions: Sessions
    http: httpx.AsyncClient
    sim_root: str
    job_id: UUID
    started: float  # monotonic, just before the POST

    async def sim_stats(self) -> dict[str, Any]:
        return dict((await self.http.get(f"{self.sim_root}/stats")).json())

    async def running(self) -> dict[UUID, tuple[int, str | None]]:
        """The job's running items: their claim counts and holders (worker ids)."""
        rows = await self.stack.sql(
            "SELECT id, attempts, claimed_by::text AS holder FROM items"
            " WHERE job_id = $1 AND status = 'running'",
            self.job_id,
        )
        return {r["id"]: (r["attempts"], r["holder"]) for r in rows}

    async def done(self) -> bool:
        rows = await self.stack.sql(
            "SELECT count(*) AS n FROM items WHERE job_id = $1 AND status <> ALL($2::text[])",
            self.job_id,
            list(FINISHED),
        )
        return bool(rows[0]["n"] == 0)


During = Callable[[Job], Coroutine[Any, Any, dict[str, Any]]]


async def sample_cap(stack: ServiceStack, stop: asyncio.Event) -> dict[str, Any]:
    """The default endpoint's adaptive cap and pause (app/llm/limits.py), read from Redis
    every POLL_S until `stop`: where the cap sat, as the lowest per 5 s, and how long the
    endpoint was paused for every worker."""
    key = f"{stack.key_prefix}:limits:default"
    caps: list[int | None] = []
    paused = 0
    redis = Redis.from_url(stack.redis_url)
    try:
        while not stop.is_set():
            cap, pause_ms = await asyncio.gather(
                redis.hget(f"{key}:aimd", "cap"), redis.pttl(f"{key}:paused")
            )
            caps.append(int(cap) if cap is not None else None)
            paused += pause_ms > 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
    finally:
        await redis.aclose()
    per_5s = int(5 / POLL_S)
    return {
        "adaptive_cap_min_by_5s": [
            min((c for c in caps[i : i + per_5s] if c is not None), default=None)
            for i in range(0, len(caps), per_5s)
        ],
        "paused_s": round(paused * POLL_S, 1),
    }


async def run_job(
    args: argparse.Namespace,
    label: str,
    sim_args: list[str],
    during: During | None = None,
    after: During | None = None,
) -> dict[str, Any]:
    """One stack, one job; `during` runs beside the job, `after` once it settled, and their
    results join the run's."""
    async with ServiceStack(f"bad_day-{label}") as stack:
        await stack.create_database()
        sim_url = await stack.start_sim_llm(
            "--latency-ms", str(args.latency_ms), "--jitter-ms", str(args.jitter_ms),
            "--max-concurrency", str(args.concurrency), "--stall-s", str(args.stall_s),
            "--agree-after", str(args.agents * args.max_rounds + 1), "--agree-prob", str(args.agree_prob),
            "--seed", str(args.seed), *sim_args,
        )  # fmt: skip
        stack.serve_simulator(
            sim_url,
            args.concurrency,
            args.max_jobs,
            **_service_env(args),
        )
        api_url = await stack.start_api()
        await stack.start_workers(args.workers)
        key = await stack.create_key()
        prompts = make_prompts(args.prompts)
        engine = stack.engine()
        try:
            async with httpx.AsyncClient(timeout=120) as http:
                sim_root = sim_url.removesuffix("/v1")
                await http.post(f"{sim_root}/stats/reset")
                pg_started = await stack.postgres_started_at()
                busy_before = machine_cpu_jiffies()
                started_wall, started = time.time(), time.monotonic()
                answer = await http.post(
                    f"{api_url}/v1/jobs",
                    json={
                        "prompts": prompts,
                        "config": {"agents": args.agents, "max_rounds": args.max_rounds},
                    },
                    headers={"Authorization": f"Bearer {key}"},
                )
                if answer.status_code != 202:
                    raise RuntimeError(f"POST /v1/jobs: {answer.status_code} {answer.text[:500]}")
                job = Job(stack, make_sessions(engine), http, sim_root, UUID(answer.json()["id"]), started)
                beside = asyncio.create_task(during(job)) if during else None
                sampled = asyncio.Event()
                sampler = asyncio.create_task(sample_cap(stack, sampled))
                settled = await wait_for_job(job.sessions, job.job_id, args.prompts, args.settle_s)
                sampled.set()
                extra = {"limiter": await sampler, **(await beside if beside else {})}
                extra |= await after(job) if after else {}
                sim = await job.sim_stats()
                busy_after = machine_cpu_jiffies()
            audit = await audit_job(job.sessions, job.job_id)
            finished_s = [
                r["at"] - started_wall
                for r in await stack.sql(
                    "SELECT extract(epoch FROM finished_at)::float8 AS at FROM items"
                    " WHERE job_id = $1 AND finished_at IS NOT NULL",
                    job.job_id,
                )
            ]
            pg_restarted = await stack.postgres_started_at() != pg_started
        finally:
            await engine.dispose()
    busy, total = (a - b for a, b in zip(busy_after, busy_before, strict=True))
    return {
        "run": label,
        "wall_s": round(max(finished_s), 2) if finished_s else None,
        "settled": settled,
        "items": _items(audit, args.prompts),
        "finished_after_s": _distribution(finished_s),
        "turns": {"stored": audit.turns, "duplicates": audit.duplicate_turns},
        "llm": _llm(sim, args.concurrency, audit),
        "problems": audit.problems(args.prompts, sim["answered"], extra.get("re_spend_bound", 0))
        + ([] if settled else [f"the job did not finish within {args.settle_s} s"]),
        "machine_cpu_busy": round(busy / total, 3) if total else None,
        "loadavg_1m_at_end": describe()["loadavg_1m"],
        "postgres_restarted_during_run": pg_restarted,
        "logs": str(stack.log_dir),
        **extra,
    }


def _items(audit: JobAudit, expected: int) -> dict[str, Any]:
    return {
        "expected": expected,
        "lost": expected - audit.items,
        "unfinished": audit.unfinished,
        "statuses": audit.statuses,
        "failed_by_code": audit.failed_by_code,
    }


def _llm(sim: dict[str, Any], cap: int, audit: JobAudit) -> dict[str, Any]:
    half_seconds = sim["mean_in_flight_by_half_second"]
    return {
        "requests": sim["requests"],
        "answered_200": sim["answered"],
        "faults": sim["faults"],
        "rate_limited_429": sim["rate_limited"],
        "re_spent": sim["answered"] - audit.turns,  # answers sent whose turn was not stored
        "cap": cap,
        "max_in_flight": sim["max_in_flight"],
        "cap_violations": sim["cap_violations"],
        "mean_in_flight_while_busy": round(sim["mean_in_flight_while_busy"], 1),
        # where concurrency was lost: the mean per 5 s from the first request
        "mean_in_flight_by_5s": [
            round(statistics.fmean(half_seconds[i : i + 10]), 1) for i in range(0, len(half_seconds), 10)
        ],
        "busy_s": round(sim["busy_s"], 2),
        "simulated_latency_ms_mean": round(sim["simulated_latency_ms_mean"], 1),
    }


def _distribution(values: list[float], bucket_s: float = 10.0) -> dict[str, Any]:
    """Percentiles and a histogram (items per bucket_s from the POST) of seconds."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    histogram: dict[str, int] = {}
    for v in ordered:
        low = int(v // bucket_s * bucket_s)
        histogram[f"{low}-{low + int(bucket_s)}"] = histogram.get(f"{low}-{low + int(bucket_s)}", 0) + 1
    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": round(ordered[-1], 1),
        "per_10s": histogram,
    }


def _ratio(run: dict[str, Any], base: dict[str, Any]) -> float | None:
    return round(run["wall_s"] / base["wall_s"], 2) if run["wall_s"] and base["wall_s"] else None


# --- scenarios ------------------------------------------------------------------------


async def faults(args: argparse.Namespace) -> dict[str, Any]:
    base = await run_job(args, "fault_free", [])
    runs = {"fault_free": base}
    for label, mix in (("everyday", EVERYDAY), ("harsh", HARSH)):
        run = await run_job(args, label, fault_args(mix))
        ratio = _ratio(run, base)
        run["mix"] = mix
        run["ratio_to_fault_free"] = ratio
        run["target_ratio"] = RATIO_TARGETS[label]
        if ratio is None or ratio > RATIO_TARGETS[label]:
            run["problems"].append(f"{ratio}x the fault-free time, over {RATIO_TARGETS[label]}x")
        runs[label] = run
    return runs


async def ratelimit(args: argparse.Namespace) -> dict[str, Any]:
    sim_args = ["--rpm-limit", str(args.rpm_limit), "--rpm-burst-s", str(args.rpm_burst_s)]
    if args.ratelimit_headers:
        sim_args.append("--ratelimit-headers")
    run = await run_job(args, "ratelimit", sim_args)
    llm = run["llm"]
    cap_rpm = args.concurrency / (args.latency_ms / 1000) * 60
    # Requests let through a minute, over the run after the first burst (the bucket's size).
    admitted = llm["requests"] - llm["rate_limited_429"] - llm["cap_violations"]
    burst = max(1.0, args.rpm_limit / 60 * args.rpm_burst_s)
    achieved_rpm = (admitted - burst) / llm["busy_s"] * 60 if llm["busy_s"] > 0 else 0.0
    share_429 = llm["rate_limited_429"] / llm["requests"] if llm["requests"] else 0.0
    run["rate_limit"] = {
        "limit_rpm": args.rpm_limit,
        "burst_requests": round(burst),
        "headers_sent": args.ratelimit_headers,
        "cap_would_send_rpm": round(cap_rpm),
        "achieved_rpm": round(achieved_rpm),
        "share_of_limit": round(achieved_rpm / args.rpm_limit, 3),
        "share_429": round(share_429, 4),
        "ideal_s": round((admitted - burst) / (args.rpm_limit / 60), 1),
        "targets_ours": RATELIMIT_TARGETS,
    }
    if achieved_rpm / args.rpm_limit < RATELIMIT_TARGETS["share_of_limit"]:
        run["problems"].append(f"{achieved_rpm:.0f} requests a minute, under 90 % of the limit")
    if share_429 > RATELIMIT_TARGETS["share_429"]:
        run["problems"].append(f"{share_429:.1%} of requests refused with 429")
    return {"ratelimit": run}


@dataclass
class Kill:
    at_s: float  # planned, seconds after the POST
    fired_at_s: float | None = None
    victim: str = ""
    sim_in_flight: int = 0  # requests in flight at the simulator just before
    items_running: int = 0  # each has at most one call in progress
    victim_id: str | None = None  # its worker id (None: killed before its first heartbeat)
    victim_items_running: int = 0  # the victim's: each may have one call whose answer is not stored
    victim_llm_slots: int = 0  # the victim's slots of the LLM cap: calls begun, not ended
    # of the victim's running items, those claimed again later, and when
    items_claimed_again: int = 0
    claimed_again_after_s: list[float] = field(default_factory=list)


def kill_schedule(rng: random.Random, kills: int, window_s: float) -> list[Kill]:
    """One kill in each of `kills` equal slices of the window, at a random point of it."""
    return [Kill(round((i + rng.random()) * window_s / kills, 2)) for i in range(kills)]


async def _kill_workers(args: argparse.Namespace, job: Job, victims: Counter[UUID]) -> dict[str, Any]:
    """Kill workers on the schedule; `victims` counts, per item, the kills it was running
    through on the victim (each may have cost it the one call it had in flight)."""
    rng = random.Random(args.seed)
    killer = WorkerKiller(job.stack, args.workers, rng)
    kills = kill_schedule(rng, args.kills, args.kill_window_s)
    # the victim's items -> (claims at the kill, the kill, its monotonic time)
    watched: dict[UUID, tuple[int, Kill, float]] = {}
    redis = Redis.from_url(job.stack.redis_url)
    kills_over = asyncio.Event()
    watch = asyncio.create_task(_watch_reclaims(job, watched, kills_over))
    try:
        for kill in kills:
            await asyncio.sleep(max(0.0, job.started + kill.at_s - time.monotonic()))
            if await job.done():
                break
            kill.sim_in_flight = (await job.sim_stats())["in_flight"]
            workers, slots = await _workers_and_slots(redis, job.stack)
            running = await job.running()
            kill.items_running = len(running)
            now = time.monotonic()
            kill.fired_at_s = round(now - job.started, 2)
            kill.victim = await killer.kill()
            kill.victim_id = workers.get(job.stack.procs[kill.victim].pid)
            kill.victim_llm_slots = sum(owner == kill.victim_id for owner in slots)
            # Only the victim's: a survivor's item killed later is timed from its own kill.
            for item, (claims, holder) in running.items():
                if kill.victim_id is not None and holder == kill.victim_id:
                    kill.victim_items_running += 1
                    victims[item] += 1
                    watched[item] = (claims, kill, now)
            print(f"[bad_day] {kill}", file=sys.stderr, flush=True)
        kills_over.set()
        await watch
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        await redis.aclose()
    fired = [k for k in kills if k.fired_at_s is not None]
    resumes = sorted(s for k in fired for s in k.claimed_again_after_s)
    return {
        "kills": [asdict(k) | {"claimed_again_after_s": _spread(k.claimed_again_after_s)} for k in fired],
        "kills_fired": len(fired),
        "claimed_again_after_s": _spread(resumes) | {"target_max": RESUME_TARGET_S},
        "re_spend_bound": sum(k.items_running for k in fired),
        "sim_in_flight_at_kills": sum(k.sim_in_flight for k in fired),
        "victims_llm_slots": sum(k.victim_llm_slots for k in fired),
        "victims_items_running": sum(k.victim_items_running for k in fired),
    }


async def _workers_and_slots(redis: Redis, stack: ServiceStack) -> tuple[dict[int, str], list[str]]:
    """The workers' ids by pid (their heartbeat keys hold "<host> pid <pid>"), and the owner
    of each slot of the LLM cap held now."""
    workers = {}
    async for key in redis.scan_iter(match=f"{stack.key_prefix}:workers:*"):
        if (value := await redis.get(key)) is not None:
            workers[int(value.decode().rsplit(" pid ", 1)[1])] = key.decode().rsplit(":", 1)[1]
    slots = await redis.zrange(f"{stack.key_prefix}:limits:default", 0, -1)
    return workers, [slot.decode().split("/")[0] for slot in slots]


async def _watch_reclaims(
    job: Job, watched: dict[UUID, tuple[int, Kill, float]], kills_over: asyncio.Event
) -> None:
    """Note when a watched item (a victim's) is claimed again (more claims than at the kill),
    or drop it if it finishes without (its job was cancelled); until the kills are over and
    nothing is watched, or the job is done."""
    while not (kills_over.is_set() and (not watched or await job.done())):
        if watched:
            rows = await job.stack.sql(
                "SELECT id, attempts, status FROM items WHERE id = ANY($1::uuid[])", list(watched)
            )
            now = time.monotonic()
            for row in rows:
                claims, kill, at = watched[row["id"]]
                if row["attempts"] > claims:
                    kill.items_claimed_again += 1
                    kill.claimed_again_after_s.append(round(now - at, 1))
                    del watched[row["id"]]
                elif row["status"] in FINISHED:
                    del watched[row["id"]]
        await asyncio.sleep(POLL_S)


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "median": round(statistics.median(values), 1),
        "max": max(values),
    }


async def _re_spent_by_item(job: Job, victims: Counter[UUID]) -> dict[str, Any]:
    """Answers bought twice, item by item: the simulator's answers to an item's prompt less
    the item's stored turns. An item runs one call at a time, so a kill it ran through on
    the victim can cost it one answer, its call in flight (begun, or answered and not yet
    stored); any more was bought twice for another reason (a live worker losing its items,
    a hedged copy answered as well)."""
    answered = Counter((await job.http.get(f"{job.sim_root}/stats/answers")).json())
    rows = await job.stack.sql(
        "SELECT i.id, i.prompt, count(t.item_id) AS turns FROM items i"
        " LEFT JOIN turns t ON t.item_id = i.id WHERE i.job_id = $1 GROUP BY i.id",
        job.job_id,
    )
    re_spent = {row["id"]: answered.pop(user_query(row["prompt"]), 0) - row["turns"] for row in rows}
    return {
        "re_spent_items": sum(n > 0 for n in re_spent.values()),
        "re_spent_beyond_kills": sum(max(0, n - victims[item]) for item, n in re_spent.items()),
        "answers_to_no_item": sum(answered.values()),  # the topics must match: this is 0
    }


async def kills(args: argparse.Namespace) -> dict[str, Any]:
    base = await run_job(args, "kills_fault_free", [])
    victims: Counter[UUID] = Counter()
    run = await run_job(
        args,
        "kills",
        [],
        during=lambda job: _kill_workers(args, job, victims),
        after=lambda job: _re_spent_by_item(job, victims),
    )
    extra_s = round(run["wall_s"] - base["wall_s"], 1) if run["wall_s"] and base["wall_s"] else None
    run["extra_s_over_fault_free"] = extra_s
    run["target_extra_s"] = KILLS_EXTRA_S_TARGET
    if extra_s is None or extra_s > KILLS_EXTRA_S_TARGET:
        run["problems"].append(f"{extra_s} s over the fault-free run, more than {KILLS_EXTRA_S_TARGET:.0f} s")
    # The bound: no more answers bought twice than calls in flight at the kills,
    # checked item by item (`_re_spent_by_item`). The victims' slots of the LLM cap
    # (`victims_llm_slots`) count their calls begun but miss those answered and not yet
    # stored, which are bought again too; the simulator's in-flight count misses more.
    if beyond := run["re_spent_beyond_kills"]:
        run["problems"].append(f"{beyond} answers bought twice beyond the calls in flight at the kills")
    if stray := run["answers_to_no_item"]:
        run["problems"].append(f"{stray} answers matched no item's prompt: the check above is blind")
    slowest = run["claimed_again_after_s"].get("max")
    if slowest is not None and slowest > RESUME_TARGET_S:
        run["problems"].append(f"a killed worker's item waited {slowest} s to be claimed again")
    return {"kills_fault_free": base, "kills": run}


async def bad_day(args: argparse.Namespace) -> dict[str, Any]:
    machine = describe()
    chosen = SCENARIOS if args.scenario == "all" else (args.scenario,)
    runs: dict[str, Any] = {}
    started = time.monotonic()
    for name in chosen:
        runs |= await {"faults": faults, "ratelimit": ratelimit, "kills": kills}[name](args)
    problems = {label: run["problems"] for label, run in runs.items() if run["problems"]}
    return {
        "benchmark": "bad_day",
        "machine": machine,
        "loadavg_1m_at_end": describe()["loadavg_1m"],
        "command": " ".join([Path(sys.executable).name, "-m", "bench.bad_day", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"}
        | {"service_env": _service_env(args)},
        "duration_s": round(time.monotonic() - started, 1),
        "headline": _headline(runs),
        "runs": runs,
        "problems": problems,
        "targets_met": not problems,
    }


def _headline(runs: dict[str, Any]) -> dict[str, Any]:
    """The figures the targets are about, one line per run."""
    line: dict[str, Any] = {}
    for label, run in runs.items():
        line[label] = {
            "wall_s": run["wall_s"],
            "ratio": run.get("ratio_to_fault_free"),
            "extra_s": run.get("extra_s_over_fault_free"),
            "max_in_flight": run["llm"]["max_in_flight"],
            "mean_in_flight": run["llm"]["mean_in_flight_while_busy"],
            "requests": run["llm"]["requests"],
            "answered": run["llm"]["answered_200"],
            "statuses": run["items"]["statuses"],
            "duplicates": run["turns"]["duplicates"],
            "re_spent": run["llm"]["re_spent"],
            "re_spend_bound": run.get("re_spend_bound"),
            "sim_in_flight_at_kills": run.get("sim_in_flight_at_kills"),
            "victims_llm_slots": run.get("victims_llm_slots"),
            "victims_items_running": run.get("victims_items_running"),
            "re_spent_beyond_kills": run.get("re_spent_beyond_kills"),
            "claimed_again_after_s": run.get("claimed_again_after_s"),
            "rate_limit": run.get("rate_limit"),
        }
        line[label] = {k: v for k, v in line[label].items() if v is not None}
    return line


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    _service_env(args)  # a malformed --worker-env stops here, before anything starts
    summary = run_bounded(lambda: bad_day(args), args.time_limit)
    publish(summary, args.json)


if __name__ == "__main__":
    main()
