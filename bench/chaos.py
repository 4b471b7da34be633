"""Chaos run: one job of many prompts while workers are killed -9 at random moments, Redis
and PostgreSQL are restarted, and the LLM fails often.

    .venv/bin/python -m bench.chaos --prompts 500 --kills 20

Starts a private PostgreSQL cluster and a private Redis (bench/services.py: the machine's
own are shared, and this restarts them), the simulated LLM with a fault mix (20% 503,
10% 429 with Retry-After, 5% stalls past the client timeout, 5% truncated JSON), the API
and --workers arq workers, and POSTs the prompts as one job. While the job runs it fires
--kills SIGKILLs at a random worker (restarting it at once), one Redis restart and one
PostgreSQL restart, each when a random share of the items (2-90 %) has finished, plus a
random delay. Then it waits for every item to finish and reports (JSON on stdout):

- items lost (not in the database) and items not finished (target: 0, 0); the final
  state of every item: completed, or failed with a reason (counted by error code);
- turns stored twice (target 0; a unique key should make it impossible);
- LLM answers bought twice: 200 answers the simulator sent minus turns stored. Only a call
  in progress at a fault may be re-bought, and an item has at most one call in progress,
  so the bound is the sum over the faults of the items running at that moment; the sum of
  the requests in flight at the simulator at those moments is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from app.store.db import Sessions, make_sessions
from bench.audit import JobAudit, audit_job, finished, status_counts
from bench.machine import describe
from bench.prompts import make_prompts
from bench.services import PrivatePostgres, PrivateRedis, private_services
from bench.stack import ServiceStack, publish, run_bounded

FAULT_MIX = ("--fault-5xx", "0.2", "--fault-429", "0.1", "--fault-stall", "0.05", "--fault-truncated", "0.05")
# Faults fire when this share of the items has finished (uniformly drawn), so that all of
# them land while the job runs, however long the noisy machine makes it.
FIRST_FAULT_AT, LAST_FAULT_AT = 0.02, 0.90
MIN_GAP_S = 1.0  # between two faults, so a restarted worker gets going before the next kill
POLL_S = 0.25


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=500)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs of a random worker")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-jobs", type=int, default=16, help="AIDSAFE_WORKER_MAX_JOBS")
    p.add_argument("--concurrency", type=int, default=32, help="AIDSAFE_LLM_MAX_CONCURRENCY")
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--jitter-ms", type=float, default=50.0)
    p.add_argument("--llm-timeout-s", type=float, default=5.0, help="stalls outlast it")
    p.add_argument("--lease-s", type=int, default=10, help="AIDSAFE_LEASE_SECONDS")
    p.add_argument("--seed", type=int, default=1, help="fault schedule and the simulator's faults")
    p.add_argument("--settle-s", type=float, default=900.0, help="wait for the job after the last fault")
    p.add_argument("--time-limit", type=float, default=2400.0, help="the run stops itself after this")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p


@dataclass
class Fault:
    action: str  # "kill", "redis" or "postgres"
    at_finished: float  # share of the items finished that triggers it
    at_s: float = 0.0  # seconds after the POST
    victim: str = ""  # the killed worker's process name
    sim_in_flight: int = 0  # requests in flight at the simulator just before
    items_running: int = 0  # items claimed just before: each has at most one call in progress
    took_s: float = 0.0


def schedule(rng: random.Random, kills: int) -> list[Fault]:
    actions = ["kill"] * kills + ["redis", "postgres"]
    rng.shuffle(actions)
    moments = sorted(rng.uniform(FIRST_FAULT_AT, LAST_FAULT_AT) for _ in actions)
    return [Fault(action, at) for action, at in zip(actions, moments, strict=True)]


class WorkerKiller:
    """SIGKILLs a random worker of the stack and starts a new one in its slot at once."""

    def __init__(self, stack: ServiceStack, workers: int, rng: random.Random) -> None:
        self.stack, self.rng = stack, rng
        self.workers = [f"worker{n}" for n in range(1, workers + 1)]  # current process per slot
        self.restarts = 0

    async def kill(self) -> str:
        """Kill one; returns the killed process's name."""
        slot = self.rng.randrange(len(self.workers))
        name = self.workers[slot]
        victim = self.stack.procs[name]
        os.killpg(victim.pid, signal.SIGKILL)  # no shutdown hook runs: a crash
        await asyncio.to_thread(victim.wait)
        self.restarts += 1
        self.workers[slot] = f"worker{slot + 1}-restart{self.restarts}"
        self.stack.start(self.workers[slot], [sys.executable, "-m", "workers"])
        return name


class Chaos:
    """Fires the faults at the stack's workers and the private servers."""

    def __init__(
        self, stack: ServiceStack, postgres: PrivatePostgres, redis: PrivateRedis, workers: int, seed: int
    ) -> None:
        self.postgres, self.redis = postgres, redis
        self.rng = random.Random(seed)
        self.killer = WorkerKiller(stack, workers, self.rng)

    async def fire(self, fault: Fault) -> None:
        started = time.monotonic()
        if fault.action == "kill":
            fault.victim = await self.killer.kill()
        elif fault.action == "redis":
            await asyncio.to_thread(self.redis.restart)
        else:
            await asyncio.to_thread(self.postgres.restart)
        fault.took_s = round(time.monotonic() - started, 3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    services_logs = Path(tempfile.mkdtemp(prefix="aidsafe-bench-chaos-services-"))
    with private_services(services_logs) as (postgres, redis):
        async with ServiceStack("chaos", postgres.dsn, redis.url) as stack:
            summary = await _run(stack, postgres, redis, args)
    summary["logs"] = {"service": str(stack.log_dir), "postgres_and_redis": str(services_logs)}
    return summary


async def _run(
    stack: ServiceStack, postgres: PrivatePostgres, redis: PrivateRedis, args: argparse.Namespace
) -> dict[str, Any]:
    await stack.create_database()
    sim_url = await stack.start_sim_llm(
        "--latency-ms", str(args.latency_ms), "--jitter-ms", str(args.jitter_ms), *FAULT_MIX,
        "--seed", str(args.seed),
    )  # fmt: skip
    stack.serve_simulator(
        sim_url,
        args.concurrency,
        args.max_jobs,
        AIDSAFE_LLM_TIMEOUT_S=str(args.llm_timeout_s),
        AIDSAFE_LEASE_SECONDS=str(args.lease_s),
        # Recovery timers shortened, so the run measures the faults rather than the waits.
        AIDSAFE_SWEEP_INTERVAL_S="2",
        AIDSAFE_ENQUEUE_GRACE_S="5",
        AIDSAFE_ITEM_RETRY_BASE_S="1",
        AIDSAFE_LOG_JSON="false",
    )
    api_url = await stack.start_api()
    await stack.start_workers(args.workers)
    key = await stack.create_key()
    engine = stack.engine()
    sessions = make_sessions(engine)
    chaos = Chaos(stack, postgres, redis, args.workers, args.seed)
    faults = schedule(random.Random(args.seed), args.kills)
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            answer = await http.post(
                f"{api_url}/v1/jobs",
                json={"prompts": make_prompts(args.prompts)},
                headers={"Authorization": f"Bearer {key}"},
            )
            if answer.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs: {answer.status_code} {answer.text[:500]}")
            job_id, started = UUID(answer.json()["id"]), time.monotonic()
            fired = await _fire_all(chaos, faults, http, sim_url, sessions, job_id, args.prompts, started)
            settled = await wait_for_job(sessions, job_id, args.prompts, args.settle_s)
            duration_s = time.monotonic() - started
            sim = (await http.get(f"{sim_url.removesuffix('/v1')}/stats")).json()
        audit = await audit_job(sessions, job_id)
    finally:
        await engine.dispose()
    return _summary(args, faults[:fired], settled, duration_s, sim, audit)


async def _fire_all(
    chaos: Chaos,
    faults: list[Fault],
    http: httpx.AsyncClient,
    sim_url: str,
    sessions: Sessions,
    job_id: UUID,
    prompts: int,
    started: float,
) -> int:
    """Fire each fault once its share of items has finished; the number fired."""
    for fired, fault in enumerate(faults):
        while True:
            counts = await status_counts(sessions, job_id)
            if finished(counts) >= fault.at_finished * prompts:
                break
            if finished(counts) == prompts:
                return fired
            await asyncio.sleep(POLL_S)
        await asyncio.sleep(chaos.rng.uniform(0, 1))  # a random moment, not a poll tick
        fault.at_s = round(time.monotonic() - started, 3)
        fault.sim_in_flight = (await http.get(f"{sim_url.removesuffix('/v1')}/stats")).json()["in_flight"]
        fault.items_running = (await status_counts(sessions, job_id)).get("running", 0)
        await chaos.fire(fault)
        print(f"[chaos] {fault}", file=sys.stderr, flush=True)
        await asyncio.sleep(MIN_GAP_S)
    return len(faults)


async def wait_for_job(sessions: Sessions, job_id: UUID, prompts: int, within_s: float) -> bool:
    """Whether every item finished within within_s."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if finished(await status_counts(sessions, job_id)) == prompts:
            return True
        await asyncio.sleep(POLL_S)
    return False


def _summary(
    args: argparse.Namespace,
    faults: list[Fault],
    settled: bool,
    duration_s: float,
    sim: dict[str, Any],
    audit: JobAudit,
) -> dict[str, Any]:
    bound = sum(f.items_running for f in faults)
    problems = audit.problems(args.prompts, sim["answered"], bound)
    if len(faults) < args.kills + 2:
        problems.append(f"only {len(faults)} of {args.kills + 2} faults fired before the job ended")
    if not settled:
        problems.append(f"the job did not finish within {args.settle_s} s of the last fault")
    return {
        "benchmark": "chaos",
        "machine": describe(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.chaos", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "duration_s": round(duration_s, 1),
        "items": {
            "expected": args.prompts,
            "lost": args.prompts - audit.items,
            "unfinished": audit.unfinished,
            "statuses": audit.statuses,
            "failed_by_code": audit.failed_by_code,
        },
        "turns": {"stored": audit.turns, "duplicates": audit.duplicate_turns},
        "llm": {
            "requests": sim["requests"],
            "answered_200": sim["answered"],
            "faults": sim["faults"],
            "re_spent": sim["answered"] - audit.turns,
            "bound_items_running_at_faults": bound,
            "sim_in_flight_at_faults": sum(f.sim_in_flight for f in faults),
        },
        "faults": [asdict(f) for f in faults],
        "problems": problems,
        "targets_met": not problems,
    }


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    summary = run_bounded(lambda: run(args), args.time_limit)
    publish(summary, args.json)


if __name__ == "__main__":
    main()
