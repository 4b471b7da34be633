"""The API's memory under a stream of jobs, each submitted and then polled (issue 12, target 6).

    .venv/bin/python -m bench.api_memory --jobs 3000 --prompts-per-job 10

Stands up a fresh database and the API alone (`aidsafe-api`, one process; no
worker, so the jobs stay queued and their arq jobs are deleted at the end). POSTs --jobs
jobs one after another, GETs each --gets times right after its POST (GET /v1/jobs/{id}
answers from the job summaries the process remembers), and reads the API's RSS every
--sample-every jobs. The figure is a least-squares slope of RSS in KB per job, after
--warmup jobs (pools, imports and caches filling): memory kept per job ever submitted or
read shows as a steady slope, memory for the jobs of the last moments as a slope near 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.machine import cpu_seconds, describe, machine_cpu_jiffies, rss_mb
from bench.prompts import make_prompts
from bench.stack import ServiceStack, publish, run_bounded


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--prompts-per-job", type=int, default=10)
    p.add_argument("--gets", type=int, default=2, help="GET /v1/jobs/{id} after each POST")
    p.add_argument("--sample-every", type=int, default=100, help="jobs between RSS readings")
    p.add_argument("--warmup", type=int, default=300, help="jobs before the slope's first point")
    p.add_argument("--time-limit", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return p.parse_args(argv)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    async with ServiceStack("api_memory") as stack:
        api_url, key = await stack.api_alone()
        api_pid = stack.pid("api")
        pg_started = await stack.postgres_started_at()
        rss: list[tuple[int, float]] = []  # (jobs submitted, MB)
        machine_before, cpu_before, started = machine_cpu_jiffies(), cpu_seconds(api_pid), time.monotonic()
        async with httpx.AsyncClient(
            base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client:
            for number in range(1, args.jobs + 1):
                prompts = make_prompts(args.prompts_per_job, seed=number)
                answer = await client.post("/v1/jobs", json={"prompts": prompts})
                if answer.status_code != 202:
                    raise RuntimeError(f"POST /v1/jobs: {answer.status_code} {answer.text[:500]}")
                for _ in range(args.gets):
                    (await client.get(f"/v1/jobs/{answer.json()['id']}")).raise_for_status()
                if number % args.sample_every == 0 and (mb := rss_mb(api_pid)) is not None:
                    rss.append((number, mb))
        elapsed = time.monotonic() - started
        busy, total = (a - b for a, b in zip(machine_cpu_jiffies(), machine_before, strict=True))
        summary: dict[str, Any] = {
            "benchmark": "api_memory",
            "postgres_restarted_during_run": await stack.postgres_started_at() != pg_started,
            "machine": describe(),
            "command": " ".join([Path(sys.executable).name, "-m", "bench.api_memory", *sys.argv[1:]]),
            "settings": {
                "api": "aidsafe-api, 1 process",
                "jobs": args.jobs,
                "prompts_per_job": args.prompts_per_job,
                "gets_per_job": args.gets,
            },
            "elapsed_s": round(elapsed, 1),
            "jobs_per_s": round(args.jobs / elapsed, 1),
            "api_cpu_s": round(cpu_seconds(api_pid) - cpu_before, 1),
            "machine_cpu_busy": round(busy / total, 3) if total else None,
            "rss_mb": _growth([p for p in rss if p[0] >= args.warmup]),
            "rss_mb_by_jobs": dict(rss),
            "logs": str(stack.log_dir),
        }
    return summary


def _growth(points: list[tuple[int, float]]) -> dict[str, Any]:
    if len(points) < 2:
        return {"samples": len(points)}
    slope, _ = statistics.linear_regression([p[0] for p in points], [p[1] for p in points])
    return {
        "samples": len(points),
        "first": points[0][1],
        "last": points[-1][1],
        "kb_per_job": round(slope * 1024, 2),
        "mb_per_1000_jobs": round(slope * 1000, 2),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    publish(run_bounded(lambda: measure(args), args.time_limit), args.json)


if __name__ == "__main__":
    main()
