"""A short chaos run: worker processes killed at random, Redis and PostgreSQL restarted, and
an LLM that fails often. Every item must end completed or failed with a reason; no turn
stored twice; LLM answers re-bought only for calls in flight at a kill or restart.

This restarts the machine's PostgreSQL and Redis (with the commands scripts/services.sh
uses), so it is marked `chaos`: skip it with `-m "not chaos"` on a shared machine.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from app.config import Settings
from app.store.db import Sessions
from bench.audit import audit_job, finished, status_counts
from tests.conftest import eventually, start_worker
from tests.scripted_llm import Behaviour, ScriptedLLM, http_error, stall, truncated

pytestmark = [pytest.mark.chaos, pytest.mark.serial]

PROMPTS = 40
WORKERS = 2
MAX_JOBS = 4
KILLS = 6


def restart_redis() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], check=False, capture_output=True)
    subprocess.run(
        [
            "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
            "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
            "--logfile", "/var/log/redis/ci.log",
        ],
        check=True,
    )  # fmt: skip


def restart_postgres() -> None:
    version = next(Path("/etc/postgresql").iterdir()).name
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
    )


def fault_mix(rng: random.Random) -> Behaviour | None:
    """20% 5xx, 10% 429 with Retry-After, 5% stalls past the timeout, 5% truncated JSON."""
    roll = rng.random()
    if roll < 0.20:
        return http_error(503)
    if roll < 0.30:
        return http_error(429, retry_after=0.2)
    if roll < 0.35:
        return stall(5)
    if roll < 0.40:
        return truncated()
    return None


async def test_faults_delay_work_but_lose_or_duplicate_nothing(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[Any],
) -> None:
    rng = random.Random(7)
    scripted_llm.latency_s = 0.05
    scripted_llm.unscripted = lambda: fault_mix(rng)
    chaotic = settings.model_copy(
        update={
            "worker_max_jobs": MAX_JOBS,
            "llm_timeout_s": 1.0,
            "llm_max_retries": 3,
            "item_max_failures": 20,
        }
    )
    body = {"prompts": [f"Chaos prompt {n}: how do I care for a cactus?" for n in range(PROMPTS)]}
    job_id = UUID((await api.post("/v1/jobs", json=body, headers=auth)).json()["id"])
    workers.extend(start_worker(chaotic) for _ in range(WORKERS))

    for kill in range(KILLS):
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        victim = rng.randrange(len(workers))
        workers[victim].kill()
        workers[victim].wait()
        workers[victim] = start_worker(chaotic)
        if kill == 2:
            restart_redis()
        if kill == 4:
            restart_postgres()

    async def all_finished() -> bool:
        return finished(await status_counts(sessions, job_id)) == PROMPTS

    await eventually(all_finished, timeout_s=240, what="every item to finish")

    in_flight_at_faults = (KILLS + 2) * MAX_JOBS * WORKERS  # kills, plus the Redis and Postgres restarts
    audit = await audit_job(sessions, job_id)
    assert audit.problems(PROMPTS, scripted_llm.ok_answers, in_flight_at_faults) == []
