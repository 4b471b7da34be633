"""A job on a healthy endpoint beside another key's job on an endpoint that is down: how much
longer the healthy one takes than beside a healthy one.

    .venv/bin/python -m bench.mixed_endpoints --down 503 --x 500 --y 100

Stands up the real service (a fresh database, two simulated LLMs as the endpoints `default`
and `down`, the API, arq workers) and two API keys. Key A posts --x prompts on `down`; --after-s
later key B posts --y prompts on `default`, and its time is taken from the POST to its job's
end (`y_s`). `down` answers as --down says: `no` (healthy, the baseline), `503` (every request
HTTP 503 after the latency, no Retry-After) or `hang` (no answer until the client's
--llm-timeout-s). B's job is given up on after --y-deadline-s (`y_finished` false, `y_done`
its items ended by then). A's job is then cancelled and everything torn down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx

from bench.machine import describe
from bench.prompts import make_prompts
from bench.stack import ENDED, ServiceStack, add_small_run_options, post_job, publish, run_bounded, wait_job

_FAULTS = {"no": [], "503": ["--fault-5xx", "1"], "hang": ["--fault-stall", "1"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--down", choices=sorted(_FAULTS), default="503", help="how `down` fails (default 503)")
    p.add_argument("--x", type=int, default=500, help="key A's prompts, on `down` (default 500)")
    p.add_argument("--y", type=int, default=100, help="key B's prompts, on `default` (default 100)")
    p.add_argument("--after-s", type=float, default=1.0, help="B posts this long after A (default 1)")
    p.add_argument("--llm-timeout-s", type=float, default=10.0, help="AIDSAFE_LLM_TIMEOUT_S (default 10)")
    p.add_argument("--y-deadline-s", type=float, default=80.0, help="give up on B's job (default 80)")
    add_small_run_options(p, time_limit_s=150.0)
    return p


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    async with ServiceStack("mixed_endpoints") as stack:
        await stack.create_database()
        common = ["--latency-ms", str(args.latency_ms), "--seed", "1"]
        healthy_url = await stack.start_sim_llm(*common, name="sim_default")
        down_url = await stack.start_sim_llm(*common, *_FAULTS[args.down], name="sim_down")
        down = {"base_url": down_url, "default_model": "sim-llm", "max_concurrency": args.concurrency}
        stack.serve_simulator(
            healthy_url,
            args.concurrency,
            args.max_jobs,
            AIDSAFE_LLM_ENDPOINTS=json.dumps({"down": down}),
            AIDSAFE_LLM_TIMEOUT_S=str(args.llm_timeout_s),
        )
        api_url = await stack.start_api()
        await stack.start_workers(args.workers)
        key_a, key_b = await stack.create_key(), await stack.create_key()
        async with httpx.AsyncClient(base_url=api_url, timeout=120) as api:
            x_prompts = make_prompts(args.x, seed=1)
            x_job = await post_job(
                api, key_a, {"prompts": x_prompts, "config": {"defaults": {"endpoint": "down"}}}
            )
            await asyncio.sleep(args.after_s)
            started = time.monotonic()
            y_job = await post_job(api, key_b, {"prompts": make_prompts(args.y, seed=2)})
            y = await wait_job(api, key_b, y_job, args.y_deadline_s)
            y_s = time.monotonic() - started
            handed_back = await stack.sql(
                "SELECT count(*) AS n FROM items WHERE job_id = $1::uuid AND attempts > 1", x_job
            )
            await api.post(f"/v1/jobs/{x_job}/cancel", headers={"Authorization": f"Bearer {key_a}"})
            down_stats = (await api.get(f"{down_url.removesuffix('/v1')}/stats")).json()
    return {
        "benchmark": "mixed_endpoints",
        "machine": describe(),
        "down": args.down,
        "x": args.x,
        "y": args.y,
        "max_jobs": args.max_jobs,
        "llm_timeout_s": args.llm_timeout_s,
        "y_s": round(y_s, 2),
        "y_finished": y["status"] in ENDED,
        "y_counts": y.get("counts"),
        # A's items claimed more than once (handed back after LLMUnavailable) when B's job ended
        "x_items_tried_again": handed_back[0]["n"],
        "down_requests": down_stats.get("requests"),
    }


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    publish(run_bounded(lambda: _measure(args), args.time_limit), args.json)


if __name__ == "__main__":
    main()
