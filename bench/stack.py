"""The real service, stood up for one benchmark run and torn down after it.

A ServiceStack owns a fresh database (migrated with `alembic upgrade head`), a unique arq
queue name and Redis key prefix, and the subprocesses it starts (the simulated LLM, the
API under uvicorn, arq workers). Leaving the `async with` (normally, on error, on Ctrl-C
or SIGTERM) kills those subprocesses, deletes the run's Redis keys and drops the database.
Logs of the subprocesses go to a temporary directory that is kept for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import get_settings
from app.store.db import make_engine
from bench.machine import ROOT

PG_ADMIN_DSN = os.environ.get("AIDSAFE_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("AIDSAFE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StackError(RuntimeError):
    pass


class ServiceStack:
    """One benchmark's database, Redis namespace and processes. Use with `async with`."""

    def __init__(self, name: str, pg_admin_dsn: str = PG_ADMIN_DSN, redis_url: str = REDIS_URL) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.db_name = f"aidsafe_bench_{self.run_id}"
        self.pg_admin_dsn = pg_admin_dsn
        self.redis_url = redis_url
        admin_base = pg_admin_dsn.rsplit("/", 1)[0]
        self.database_url = admin_base.replace("postgresql://", "postgresql+asyncpg://") + "/" + self.db_name
        self.queue_name = f"aidsafe-bench:{self.run_id}:queue"
        self.key_prefix = f"aidsafe-bench:{self.run_id}"
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"aidsafe-bench-{name}-{self.run_id}-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._db_created = False
        self.service_overrides: dict[str, str] = {}

    async def __aenter__(self) -> ServiceStack:
        return self

    def serve_simulator(self, sim_url: str, concurrency: int, max_jobs: int, **more: str) -> None:
        """Point the API and workers started after this at the simulated LLM (its model,
        `concurrency` as the endpoint's cap), with `max_jobs` items per worker and `more`
        AIDSAFE_* settings."""
        self.service_overrides = {
            "AIDSAFE_LLM_BASE_URL": sim_url,
            "AIDSAFE_LLM_MODEL": "sim-llm",
            "AIDSAFE_LLM_MAX_CONCURRENCY": str(concurrency),
            "AIDSAFE_WORKER_MAX_JOBS": str(max_jobs),
            **more,
        }

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.teardown())

    # --- the database ---------------------------------------------------------------

    async def create_database(self) -> None:
        await _admin(self.pg_admin_dsn, f'CREATE DATABASE "{self.db_name}"')
        self._db_created = True
        migrate = await asyncio.to_thread(self._run, [str(BIN / "alembic"), "upgrade", "head"])
        if migrate.returncode != 0:
            raise StackError(f"alembic upgrade head failed:\n{migrate.stderr[-3000:]}")

    def engine(self) -> AsyncEngine:
        """A SQLAlchemy engine on the run's database, as the services make theirs."""
        settings = get_settings()
        return make_engine(self.database_url, settings.database_timeout_s, settings.api_db_connections)

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """A query on the run's database (for timestamps the API does not expose)."""
        conn = await asyncpg.connect(self.database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def postgres_started_at(self) -> str:
        """When the Postgres server last started: a change during a run means someone
        restarted it (the machine is shared) and the figures are suspect."""
        rows = await _retrying(lambda: self.sql("SELECT pg_postmaster_start_time()::text AS t"))
        return str(rows[0]["t"])

    # --- processes ------------------------------------------------------------------

    def env(self, **overrides: str) -> dict[str, str]:
        """The service's environment: ours only, whatever AIDSAFE_* the caller had set."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIDSAFE_")}
        env.update(
            AIDSAFE_DATABASE_URL=self.database_url,
            AIDSAFE_REDIS_URL=self.redis_url,
            AIDSAFE_QUEUE_NAME=self.queue_name,
            AIDSAFE_REDIS_KEY_PREFIX=self.key_prefix,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.service_overrides)
        env.update(overrides)
        return env

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env or self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown reaches its children
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    async def wait_http(self, name: str, url: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise StackError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise StackError(f"{name} not ready at {url} in {timeout_s} s:\n{self.log_tail(name)}")
                await asyncio.sleep(0.1)

    async def wait_log(self, name: str, marker: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while marker not in self.log_tail(name, 100_000):
            proc = self.procs[name]
            if proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} did not log {marker!r} in {timeout_s} s:\n{self.log_tail(name)}")
            await asyncio.sleep(0.1)

    async def start_sim_llm(self, *args: str, name: str = "sim_llm") -> str:
        """The simulated LLM on a free port, as process `name` (one per endpoint); returns its
        base URL (ending in /v1)."""
        port = free_port()
        argv = [sys.executable, "-m", "bench.sim_llm", "--port", str(port), *args]
        self.start(name, argv, env={k: v for k, v in os.environ.items() if not k.startswith("AIDSAFE_")})
        await self.wait_http(name, f"http://127.0.0.1:{port}/v1/models")
        return f"http://127.0.0.1:{port}/v1"

    async def start_api(self) -> str:
        """`aidsafe-api`, one process, as the README runs it; returns its URL."""
        port = free_port()
        argv = [str(BIN / "aidsafe-api"), "--host", "127.0.0.1", "--port", str(port)]
        self.start("api", argv)
        url = f"http://127.0.0.1:{port}"
        await self.wait_http("api", f"{url}/readyz")
        return url

    async def start_workers(self, count: int) -> list[int]:
        """`python -m workers` (`aidsafe-worker` from this checkout), `count` processes;
        returns their pids."""
        names = [f"worker{i}" for i in range(1, count + 1)]
        for name in names:
            self.start(name, [sys.executable, "-m", "workers"])
        for name in names:
            # logged by arq just before on_startup; the pools are made lazily after it
            await self.wait_log(name, "redis_version=")
        return [self.procs[name].pid for name in names]

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=120)

    async def create_key(self) -> str:
        """A key made as an operator would: `aidsafe keys create bench --quiet`."""
        made = await asyncio.to_thread(
            self._run, [str(BIN / "aidsafe"), "keys", "create", "bench", "--quiet"]
        )
        if made.returncode != 0:
            raise StackError(f"aidsafe keys create failed:\n{made.stderr[-3000:]}")
        return made.stdout.strip().splitlines()[-1]

    async def api_alone(self) -> tuple[str, str]:
        """A migrated database and the API, no worker: (the API's URL, a key)."""
        await self.create_database()
        api_url = await self.start_api()
        return api_url, await self.create_key()

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    # --- teardown -------------------------------------------------------------------

    def stop_processes(self) -> None:
        """SIGTERM each process group we started, then SIGKILL what is left after 5 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also any child left in the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    async def teardown(self) -> None:
        """Kill our processes, delete our Redis keys, drop our database. Postgres may be
        restarting (other people's fault tests share it), so each step is retried for a while."""
        self.stop_processes()
        item_ids: set[str] = set()
        if self._db_created:
            with contextlib.suppress(Exception):
                rows = await _retrying(lambda: self.sql("SELECT id FROM items"))
                item_ids = {str(r["id"]) for r in rows}
        try:
            await _retrying(lambda: self._delete_redis_keys(item_ids))
        except Exception as exc:  # report, but still drop the database
            print(f"[bench] could not delete Redis keys of run {self.run_id}: {exc}", file=sys.stderr)
        if self._db_created:
            drop = f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'
            await _retrying(lambda: _admin(self.pg_admin_dsn, drop))
            self._db_created = False

    async def _delete_redis_keys(self, item_ids: set[str]) -> None:
        """Our queue and prefix keys, and arq's job/result/retry/in-progress keys of our items."""
        redis = Redis.from_url(self.redis_url)
        try:
            doomed: list[bytes] = []
            for pattern in (f"{self.key_prefix}*", f"{self.queue_name}*"):
                doomed += [key async for key in redis.scan_iter(match=pattern, count=1000)]
            if item_ids:
                async for key in redis.scan_iter(match="arq:*item:*", count=5000):
                    # arq:<kind>:item:<uuid>:<enqueue counter>
                    parts = key.decode(errors="replace").split(":")
                    if len(parts) >= 4 and parts[-2] in item_ids:
                        doomed.append(key)
            for start in range(0, len(doomed), 1000):
                await redis.delete(*doomed[start : start + 1000])
        finally:
            await redis.aclose()


async def _retrying(step: Callable[[], Awaitable[T]], within_s: float = 60.0) -> T:
    """Run step, retrying connection failures (a restarting Postgres or Redis) for within_s."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await step()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


ENDED = ("completed", "cancelled", "failed")


def add_small_run_options(p: argparse.ArgumentParser, *, time_limit_s: float) -> None:
    """The options of a small run of the simulator and the service: one worker of 32 items
    against an endpoint cap of 32 unless told otherwise."""
    p.add_argument("--latency-ms", type=float, default=200.0, help="simulated LLM latency (default 200)")
    p.add_argument("--concurrency", type=int, default=32, help="each endpoint's cap (default 32)")
    p.add_argument("--workers", type=int, default=1, help="arq worker processes (default 1)")
    p.add_argument("--max-jobs", type=int, default=32, help="items per worker at once (default 32)")
    p.add_argument(
        "--time-limit",
        type=float,
        default=time_limit_s,
        help=f"stop after this many s (default {time_limit_s:g})",
    )
    p.add_argument("--json", type=Path, help="also write the summary here")


async def post_job(api: httpx.AsyncClient, key: str, body: dict[str, Any]) -> str:
    """POST /v1/jobs as `key`; the job's id."""
    answer = await api.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"})
    if answer.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs: {answer.status_code} {answer.text[:500]}")
    return str(answer.json()["id"])


async def wait_job(
    api: httpx.AsyncClient, key: str, job_id: str, deadline_s: float = math.inf
) -> dict[str, Any]:
    """Poll the job until it ends or deadline_s pass; its last summary."""
    headers = {"Authorization": f"Bearer {key}"}
    until = time.monotonic() + deadline_s
    while True:
        job: dict[str, Any] = (await api.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if job["status"] in ENDED or time.monotonic() > until:
            return job
        await asyncio.sleep(0.1)


def publish(summary: dict[str, Any], json_path: Path | None) -> None:
    """Print a run's summary, and also write it to json_path when one was given."""
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if json_path:
        json_path.write_text(text)


def run_bounded(main: Callable[[], Awaitable[T]], time_limit_s: float, *, use_uvloop: bool = False) -> T:
    """asyncio.run(main()) that stops by itself after time_limit_s, and on SIGTERM or
    Ctrl-C, in each case cancelling main so its `async with ServiceStack` tears down."""

    async def bounded() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            async with asyncio.timeout(time_limit_s):
                return await main()
        except TimeoutError:
            raise SystemExit(f"[bench] stopped: over the time limit of {time_limit_s:.0f} s") from None
        except asyncio.CancelledError:
            raise SystemExit("[bench] stopped by a signal; everything it started was torn down") from None

    loop_factory = None
    if use_uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bounded())
