"""Another key's listing behind one key's burst of viewer item pages: how long it waits.

    .venv/bin/python -m bench.key_threads --pages 12 --rounds 5

Stands up the real service (a fresh database, the simulated LLM with --rewrite, the API, one
arq worker) and two API keys. Key A runs one prompt of 4 agents and 20 rounds, each of its 80
turns rewriting the response whole: its item's viewer page is then some of the costliest to
render (every revision diffed against the one before, in one of the API's worker threads).
Key B runs one prompt. Then, --rounds times: A asks for its item's page --pages times at once
and, --after-s later, B lists its jobs (GET /v1/jobs). `listing_behind_ms` is B's listing's
latency, `burst_s` the time from the burst's first request to its last answer; `alone` gives
both without the other (B's listing 10 times, A's page 3 times). With the per-key share of
threads (AIDSAFE_THREADS_PER_KEY, --threads-per-key) B's listing waits behind at most that many
of A's pages; before it, behind all of them. Everything it started is torn down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable
from typing import Any

import httpx

from bench.machine import describe
from bench.stack import ServiceStack, add_small_run_options, post_job, publish, run_bounded, wait_job


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pages", type=int, default=12, help="key A's item pages at once (default 12)")
    p.add_argument("--rounds", type=int, default=5, help="bursts, one after the other (default 5)")
    p.add_argument("--after-s", type=float, default=0.05, help="B lists this long after the burst starts")
    p.add_argument("--threads-per-key", type=int, default=2, help="AIDSAFE_THREADS_PER_KEY (default 2)")
    add_small_run_options(p, time_limit_s=600.0)
    p.set_defaults(latency_ms=5.0)
    return p


async def _timed(request: Awaitable[httpx.Response]) -> float:
    """Seconds until `request` is answered; RuntimeError unless with 200."""
    started = time.monotonic()
    answer = await request
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.request.url}: {answer.status_code} {answer.text[:300]}")
    return time.monotonic() - started


async def _one_round(
    viewer: httpx.AsyncClient,
    page: str,
    api: httpx.AsyncClient,
    listing: dict[str, str],
    args: argparse.Namespace,
) -> tuple[float, float]:
    """(B's listing's latency, the burst's time), in seconds."""
    started = time.monotonic()
    burst = [asyncio.ensure_future(_timed(viewer.get(page))) for _ in range(args.pages)]
    await asyncio.sleep(args.after_s)
    listing_s = await _timed(api.get("/v1/jobs", headers=listing))
    await asyncio.gather(*burst)
    return listing_s, time.monotonic() - started


def _ms(values_s: list[float]) -> list[float]:
    return [round(value * 1000, 1) for value in values_s]


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    async with ServiceStack("key_threads") as stack:
        await stack.create_database()
        sim_url = await stack.start_sim_llm(
            "--latency-ms", str(args.latency_ms), "--jitter-ms", "0", "--agree-after", "81", "--rewrite"
        )
        stack.serve_simulator(
            sim_url, args.concurrency, args.max_jobs, AIDSAFE_THREADS_PER_KEY=str(args.threads_per_key)
        )
        api_url = await stack.start_api()
        await stack.start_workers(args.workers)
        a, b = await stack.create_key(), await stack.create_key()
        async with (
            httpx.AsyncClient(base_url=api_url, timeout=120) as api,
            httpx.AsyncClient(base_url=api_url, timeout=120) as viewer,
        ):
            deliberated = {"prompts": ["How do I store rice?"], "config": {"agents": 4, "max_rounds": 20}}
            job = await post_job(api, a, deliberated)
            await wait_job(api, b, await post_job(api, b, {"prompts": ["How do I boil an egg?"]}))
            await wait_job(api, a, job)
            items = (await api.get(f"/v1/jobs/{job}/items", headers={"Authorization": f"Bearer {a}"})).json()
            page = f"/view/items/{items['data'][0]['id']}"
            await viewer.post("/view/login", data={"api_key": a})
            listing = {"Authorization": f"Bearer {b}"}
            listing_alone = [await _timed(api.get("/v1/jobs", headers=listing)) for _ in range(10)]
            page_alone = [await _timed(viewer.get(page)) for _ in range(3)]
            rounds = [await _one_round(viewer, page, api, listing, args) for _ in range(args.rounds)]
    behind = [listing_s for listing_s, _ in rounds]
    return {
        "benchmark": "key_threads",
        "machine": describe(),
        "pages": args.pages,
        "threads_per_key": args.threads_per_key,
        "alone": {"listing_ms": _ms(listing_alone), "page_ms": _ms(page_alone)},
        "listing_behind_ms": _ms(behind),
        "listing_behind_median_ms": _ms([statistics.median(behind)])[0],
        "burst_s": [round(burst_s, 2) for _, burst_s in rounds],
    }


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    publish(run_bounded(lambda: _measure(args), args.time_limit), args.json)


if __name__ == "__main__":
    main()
