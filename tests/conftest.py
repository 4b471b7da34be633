"""Shared fixtures: a migrated Postgres database per run, real Redis, the scripted LLM
server, the API in-process, and arq's real worker in burst mode."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
import uvicorn
from alembic import command
from alembic.config import Config
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from redis.asyncio import Redis
from sqlalchemy import Engine, event, make_url, text
from sqlalchemy.pool import Pool

from app.config import EndpointConfig, Settings
from app.llm.client import OpenAICompatibleClient
from app.main import create_app
from app.server import uvicorn_options
from app.store import keys
from app.store.db import Sessions, make_engine, make_sessions
from bench.stack import free_port
from tests.scripted_llm import ScriptedLLM, running_scripted_llm
from workers.main import worker_settings
from workers.queue_worker import QueueWorker

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
PG_ADMIN_DSN = os.environ.get("AIDSAFE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("AIDSAFE_TEST_REDIS", "redis://127.0.0.1:6379/0")
ARQ_JOB_KEY_PREFIXES = (job_key_prefix, retry_key_prefix, in_progress_key_prefix, result_key_prefix)
TABLES = (
    "annotations, judgements, preference_pairs, cots, turns, items, jobs, policy_sets, prompt_sets, api_keys"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--only-serial",
        action="store_true",
        help="run only the tests marked `serial` (scripts/test.sh runs them after the parallel run)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A `serial` test disturbs what every test shares (it restarts PostgreSQL and Redis), so
    it never runs in a pytest-xdist worker, beside other tests: it is skipped there, and
    `--only-serial` runs these tests alone. xdist hands tests out in this order (every
    worker collects the same list), so `slow` tests go first: started last, one would keep
    its worker busy long after the others ran out of tests."""
    if config.getoption("only_serial"):
        config.hook.pytest_deselected(items=[item for item in items if not item.get_closest_marker("serial")])
        items[:] = [item for item in items if item.get_closest_marker("serial")]
    elif xdist_worker(config):
        alone = pytest.mark.skip(reason="runs alone, never beside other tests: use --only-serial without -n")
        for item in items:
            if item.get_closest_marker("serial"):
                item.add_marker(alone)
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def xdist_worker(config: pytest.Config) -> str | None:
    """The pytest-xdist worker this process is (`gw0`, ...), or None."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    return workerinput["workerid"] if workerinput else None


@pytest.fixture(scope="session")
def run_id(pytestconfig: pytest.Config) -> str:
    """This test session's id, naming its database and its Redis keys. Made per session, not
    at import: a process forked from a test process (mutmut runs each mutant's tests so) runs
    a session of its own and gets an id of its own; each pytest-xdist worker is a session too."""
    return uuid.uuid4().hex[:8] + (xdist_worker(pytestconfig) or "")


@pytest.fixture(scope="session")
def scripted_llm() -> Iterator[ScriptedLLM]:
    with running_scripted_llm() as server:
        yield server


@pytest.fixture(scope="session")
def second_llm() -> Iterator[ScriptedLLM]:
    """Another endpoint, to show roles can use different servers."""
    with running_scripted_llm() as server:
        yield server


def client_for(settings: Settings, timeout_s: float | None = None) -> OpenAICompatibleClient:
    """The production LLM client pointed at the test endpoints, without shared limits."""
    return OpenAICompatibleClient(
        settings.endpoints(),
        timeout_s=timeout_s or settings.llm_timeout_s,
        max_retries=settings.llm_max_retries,
        backoff_base_s=settings.llm_backoff_base_s,
        backoff_max_s=settings.llm_backoff_max_s,
        max_request_tokens=settings.llm_max_request_tokens,
    )


@pytest.fixture
async def llm(settings: Settings) -> AsyncIterator[OpenAICompatibleClient]:
    async with client_for(settings) as client:
        yield client


@pytest.fixture(scope="session")
async def settings(
    run_id: str, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> AsyncIterator[Settings]:
    """The session's configuration; the Redis keys it names are deleted when the session ends."""
    database = make_url(PG_ADMIN_DSN).set(drivername="postgresql+asyncpg", database=f"aidsafe_test_{run_id}")
    settings = Settings(
        database_url=database.render_as_string(hide_password=False),
        redis_url=REDIS_URL,
        queue_name=f"aidsafe:test:{run_id}:queue",
        redis_key_prefix=f"aidsafe:test:{run_id}",
        llm_base_url=scripted_llm.base_url,
        llm_model="scripted-model",
        llm_endpoints={"second": EndpointConfig(base_url=second_llm.base_url, default_model="second-model")},
        llm_timeout_s=2.0,
        llm_max_retries=2,
        llm_backoff_base_s=0.01,
        llm_backoff_max_s=0.05,
        lease_seconds=3,
        item_retry_base_s=0.2,
        sweep_interval_s=1,
        enqueue_grace_s=1,
        # Every test's unknown keys and webhooks come from one address and count together
        # for the whole session: limited only where a test asks (tests/test_wrong_keys.py).
        wrong_keys_per_address=1_000_000,
    )
    creator = os.getpid()
    yield settings
    if os.getpid() == creator:  # a child forked mid-session must not delete its parent's keys
        await delete_redis_keys(settings)


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment a worker subprocess needs to behave like `settings`."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        env[f"AIDSAFE_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


@contextmanager
def api_subprocess(
    settings: Settings, *args: str, stderr: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`aidsafe-api` as deployed (given `args`), in a process of its own behaving like
    `settings`: its URL once it is ready, and the process (its stderr piped where asked).
    Stopped on leaving."""
    port = free_port()
    argv = [sys.executable, "-m", "app.server", "--port", str(port), *args]
    process = subprocess.Popen(argv, cwd=ROOT, env=worker_env(settings), stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{url}/readyz"):
            assert process.poll() is None and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


async def delete_redis_keys(settings: Settings) -> None:
    """Delete the Redis keys of `settings`: those under its prefix (its queue included) and
    arq's keys of the jobs still in its queue (arq keeps every job's keys under `arq:`)."""
    client = Redis.from_url(settings.redis_url)
    try:
        queued = [job_id.decode() for job_id in await client.zrange(settings.queue_name, 0, -1)]
        arq_keys = [prefix + job_id for job_id in queued for prefix in ARQ_JOB_KEY_PREFIXES]
        own_keys = [key async for key in client.scan_iter(f"{settings.redis_key_prefix}:*")]
        if arq_keys or own_keys:
            await client.delete(*arq_keys, *own_keys)
    finally:
        await client.aclose()


async def _admin(sql: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def migrated(settings: Settings) -> AsyncIterator[str]:
    """A fresh database, built by the migrations alone, dropped after the run."""
    database = make_url(settings.database_url).database
    await _admin(f'CREATE DATABASE "{database}"')
    creator = os.getpid()
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = settings.database_url
    await asyncio.to_thread(command.upgrade, config, "head")
    yield settings.database_url
    if os.getpid() == creator:  # a child forked mid-session must not drop its parent's database
        await _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def sessions(migrated: str, settings: Settings) -> AsyncIterator[Sessions]:
    engine = make_engine(migrated, settings.database_timeout_s, settings.api_db_connections)
    yield make_sessions(engine)
    await engine.dispose()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def arq_redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    """arq's Redis pool, as the sweeper is given it."""
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    yield pool
    await pool.aclose()


@pytest.fixture(autouse=True)
async def clean_state(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[None]:
    """Each test starts with empty tables, an empty test queue and a reset LLM script."""
    if "sessions" in request.fixturenames or "api" in request.fixturenames:
        engine = make_engine(settings.database_url, settings.database_timeout_s, settings.api_db_connections)
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f"TRUNCATE {TABLES} CASCADE")
        await engine.dispose()
        await delete_redis_keys(settings)
    for name in ("scripted_llm", "second_llm"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()
    yield


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, in-process, with its lifespan (Postgres pool, arq Redis pool)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


@pytest.fixture
async def api(settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as client:
        yield client


@dataclass(frozen=True)
class WebhookTarget:
    """Where a Label Studio webhook of a key's delivers, and the headers it sends (its secret)."""

    path: str
    headers: dict[str, str]


@pytest.fixture
async def ls_webhook(api: httpx.AsyncClient, auth: dict[str, str]) -> WebhookTarget:
    """A Label Studio webhook of the `auth` key's."""
    made = await api.post("/v1/webhooks", json={"name": "test"}, headers=auth)
    assert made.status_code == 201, made.text
    webhook = made.json()
    return WebhookTarget(
        httpx.URL(webhook["url"]).path,
        {webhook["secret_header"]: webhook["secret"], "Content-Type": "application/json"},
    )


async def new_key(sessions: Sessions, name: str = "test", scopes: tuple[str, ...] = ()) -> dict[str, str]:
    async with sessions.begin() as session:
        _, secret = await keys.create_key(session, name, scopes)
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def auth(sessions: Sessions) -> dict[str, str]:
    return await new_key(sessions, "alice")


@pytest.fixture
async def other(sessions: Sessions) -> dict[str, str]:
    """A second API key, unrelated to `auth`."""
    return await new_key(sessions, "bob")


async def submit(api: httpx.AsyncClient, auth: dict[str, str], prompts: list[str], **config: Any) -> str:
    """POST a job; its id."""
    response = await api.post("/v1/jobs", json={"prompts": prompts, "config": config}, headers=auth)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def run_worker_burst(settings: Settings, **overrides: Any) -> None:
    """arq's real worker, in this process, until the queue is empty. Tests call the sweeper
    themselves."""
    options = {
        **worker_settings(settings, sweeper=False),
        "burst": True,
        "handle_signals": False,
    }
    options.update(overrides)
    worker = QueueWorker(**options)
    try:
        await worker.main()
    finally:
        await worker.close()


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float = 30, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or check}")


async def longest_loop_pause(
    work: Awaitable[T], clock: Callable[[], float] = time.thread_time
) -> tuple[T, float]:
    """`work`'s result, and the longest the event loop went without running another task
    meanwhile: how long a route running in-process held up every other request. This
    process's garbage collections are off, so that they do not count as the route's. Measured
    by default as the loop thread's CPU in that time: what the route held the loop for,
    without the time other processes took the core meanwhile (with 10 runnable processes on 2
    cores, a route that held the loop for 0.06 s of CPU paused it for 0.24 s of wall clock)."""
    task = asyncio.ensure_future(work)
    longest = 0.0
    gc.disable()
    try:
        while not task.done():
            started = clock()
            await asyncio.sleep(0.001)
            longest = max(longest, clock() - started)
    finally:
        gc.enable()
    return await task, longest


async def least_loop_pause(
    work: Callable[[], Awaitable[T]], times: int = 3, clock: Callable[[], float] = time.thread_time
) -> tuple[T, float]:
    """The last of `times` runs of `work` and the least of their longest_loop_pause: a route's
    own hold, without what the parallel suite's load adds to one run now and then."""
    least = float("inf")
    for _ in range(times):
        result, held = await longest_loop_pause(work(), clock)
        least = min(least, held)
    return result, least


async def held_and_on_the_loop(
    route: Callable[[], Awaitable[T]], on_the_loop: Callable[[], Awaitable[object]]
) -> tuple[T, float, float]:
    """The route's longest loop hold, and that of a reference done on the loop (such as the
    route's work before), each the least of five taken in turn: a loaded machine slows all
    code for a while (a whole run's requests took 20-26 ms where 7-11 is usual), so a bound in
    seconds failed now and then, or let the old route pass; a bound on their ratio does
    neither."""
    held = held_on_the_loop = float("inf")
    for _ in range(5):
        result, once = await longest_loop_pause(route())
        held = min(held, once)
        _, once = await longest_loop_pause(on_the_loop())
        held_on_the_loop = min(held_on_the_loop, once)
    return result, held, held_on_the_loop


@contextmanager
def restartable_redis(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A redis-server of this test's own, as compose runs it (no persistence): its URL, and a
    function that restarts it empty."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--dir", str(tmp_path)]

    def start() -> subprocess.Popen[bytes]:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return server
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    running = [start()]

    def restart() -> None:
        running[0].kill()
        running[0].wait()
        running[0] = start()

    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        running[0].kill()
        running[0].wait()


@pytest.fixture
async def old_database(run_id: str) -> AsyncIterator[tuple[Config, str]]:
    """An empty database of its own and an Alembic config pointed at it."""
    name = f"aidsafe_test_{run_id}_migrations"
    await _admin(f'CREATE DATABASE "{name}"')
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = dsn.replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield config, dsn
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def failing_once(sessions: Sessions, table: str, when: str) -> AsyncIterator[None]:
    """The first write to `table` of a row for which `when` holds (SQL on NEW) fails in
    Postgres, as a write cut off by a fault would; later ones go through. A sequence counts
    the firings: unlike a row, it is not rolled back with the failed write."""
    name = f"fails_once_{uuid.uuid4().hex[:12]}"
    async with sessions.begin() as session:
        await session.execute(text(f"CREATE SEQUENCE {name}"))
        await session.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                f" IF nextval('{name}') = 1 THEN RAISE EXCEPTION 'a fault injected by the test'; END IF;"
                " RETURN NEW; END $$"
            )
        )
        await session.execute(
            text(
                f"CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW"
                f" WHEN ({when}) EXECUTE FUNCTION {name}()"
            )
        )
    try:
        yield
    finally:
        async with sessions.begin() as session:
            await session.execute(text(f"DROP TRIGGER {name} ON {table}"))
            await session.execute(text(f"DROP FUNCTION {name}"))
            await session.execute(text(f"DROP SEQUENCE {name}"))


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    """A real worker process configured like `settings`: `aidsafe-worker`, from this checkout."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers"],
        cwd=ROOT,
        env=worker_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
async def workers() -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """Worker processes a test starts; killed at the end whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def live_api(settings: Settings, sessions: Sessions) -> Iterator[str]:
    """The real app over real HTTP on a free loopback port (uvicorn in a thread, with the
    options `aidsafe-api` serves it with), for clients that need it: streamed Server-Sent
    Events, the CLI, a browser. Yields the base URL."""
    with served(settings) as base_url:
        yield base_url


@contextmanager
def served(settings: Settings) -> Iterator[str]:
    """live_api's server, for an app of other settings than the session's."""
    with serving(settings) as server:
        yield server.url


@dataclass(frozen=True)
class Serving:
    """An API served in a thread: where, and its uvicorn server (`should_exit` stops it)."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread


@contextmanager
def serving(settings: Settings, port: int = 0) -> Iterator[Serving]:
    """An API on `port` (0: a free one), so that one stopped can be started again where it was."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    options = {**uvicorn_options(settings), "timeout_graceful_shutdown": 2}
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="live-api", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.01)
        yield Serving(f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def checkouts() -> Iterator[list[object]]:
    """The database connections taken, by any engine, while inside: one per lookup."""
    taken: list[object] = []

    def checkout(*args: object) -> None:
        taken.append(args)

    event.listen(Pool, "checkout", checkout)
    try:
        yield taken
    finally:
        event.remove(Pool, "checkout", checkout)


@contextmanager
def statements_sent() -> Iterator[list[str]]:
    """The SQL of every statement sent, by any engine (the driver's own included), while inside."""
    sent: list[str] = []

    def capture(*args: Any) -> None:
        sent.append(args[2])  # (connection, cursor, statement, parameters, context, executemany)

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        yield sent
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
