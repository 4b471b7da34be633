"""A small job behind another key's backlog: how much longer it takes than on an empty queue.

    .venv/bin/python -m bench.fair_share --backlog 2000 --small 20 --latency-ms 200 --concurrency 32

Stands up the real service (a fresh database, the simulated LLM, the API, arq workers) and
two API keys. Key B posts --small prompts on the empty queue and waits for them (`alone`);
then key A posts --backlog prompts, and --after-s later key B posts --small prompts again
(`behind`). Both times are from B's POST to its job's end. `slowdown` = behind / alone:
about 2 when the two keys share the endpoint's slots fairly (B gets every other slot), and
the backlog's whole run when the queue is first come, first served. A's job is cancelled
once B's second job ends. Everything it started is torn down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx

from bench.machine import describe
from bench.prompts import make_prompts
from bench.stack import ServiceStack, add_small_run_options, post_job, publish, run_bounded, wait_job


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backlog", type=int, default=2000, help="key A's prompts (default 2000)")
    p.add_argument("--small", type=int, default=20, help="key B's prompts, each time (default 20)")
    p.add_argument("--after-s", type=float, default=2.0, help="B posts this long after A (default 2)")
    add_small_run_options(p, time_limit_s=600.0)
    return p


async def _job_time(api: httpx.AsyncClient, key: str, prompts: list[str]) -> float:
    """POST the prompts as `key`'s job and poll it to its end: seconds from the POST."""
    started = time.monotonic()
    await wait_job(api, key, await post_job(api, key, {"prompts": prompts}))
    return time.monotonic() - started


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    async with ServiceStack("fair_share") as stack:
        await stack.create_database()
        sim_url = await stack.start_sim_llm(
            "--latency-ms", str(args.latency_ms), "--max-concurrency", str(args.concurrency), "--seed", "1"
        )
        stack.serve_simulator(sim_url, args.concurrency, args.max_jobs)
        api_url = await stack.start_api()
        await stack.start_workers(args.workers)
        heavy, light = await stack.create_key(), await stack.create_key()
        async with httpx.AsyncClient(base_url=api_url, timeout=120) as api:
            alone_s = await _job_time(api, light, make_prompts(args.small, seed=1))
            backlog = await post_job(api, heavy, {"prompts": make_prompts(args.backlog)})
            await asyncio.sleep(args.after_s)
            behind_s = await _job_time(api, light, make_prompts(args.small, seed=2))
            completed = await stack.sql("SELECT count(*) AS n FROM items WHERE status = 'completed'")
            await api.post(f"/v1/jobs/{backlog}/cancel", headers={"Authorization": f"Bearer {heavy}"})
    return {
        "benchmark": "fair_share",
        "machine": describe(),
        "backlog": args.backlog,
        "small": args.small,
        "alone_s": round(alone_s, 2),
        "behind_s": round(behind_s, 2),
        "slowdown": round(behind_s / alone_s, 2),
        # completed items of all three jobs when B's second job ended, its own included
        "completed_items_when_b_ended": completed[0]["n"],
    }


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    publish(run_bounded(lambda: _measure(args), args.time_limit), args.json)


if __name__ == "__main__":
    main()
