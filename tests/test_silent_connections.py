"""A connection to Redis or Postgres can go silent without closing: after a failover, or when
a NAT or load balancer drops its entry, the client's requests go nowhere and no reset comes
back. The queue's calls then give up after `redis_timeout_s` and are sent again on a new
connection (app/queue.py), so a worker's polls carry on instead of waiting for ever; a
Postgres statement gives up after `database_timeout_s`, its connection is discarded, and the
next statement goes over a new one (app/store/db.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis, create_pool
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from starlette.types import Message, Receive, Scope, Send

from app.api.exports import _StallingEnds
from app.config import Settings
from app.events import JobEventSource, follow
from app.exports.formats import FORMATS
from app.exports.options import ExportOptions
from app.exports.streaming import encoded
from app.main import create_app
from app.queue import REQUEST_RETRIES, WORKER_RETRIES, arq_job_id, bound_calls, redis_settings
from app.store import items
from app.store.db import (
    Sessions,
    database_away,
    deadline,
    dispose,
    driver_connection,
    driver_of,
    make_engine,
    make_sessions,
)
from app.store.export_rows import ExportFilter
from app.store.exports import BATCH_ROWS
from app.store.models import Item, Job
from tests.conftest import api_client, eventually, run_worker_burst, start_worker, submit
from tests.scripted_llm import ScriptedLLM, stall
from tests.test_api import error_of
from tests.test_endings import claimed_item
from tests.test_events import summary_of
from tests.test_exports import UVICORN_SCOPE, bulk_job, never_disconnects
from tests.test_liveness import item_row
from tests.test_worker import one_item, turn_count
from workers.main import _keep_lease
from workers.sweeper import sweep


class SilencingProxy:
    """A TCP proxy to a Redis server. `silence()` stops the connections open now from
    forwarding anything, and leaves them open; connections made after it forward as before.
    `hang()` silences those too: a server that takes connections and never answers."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._era = 0  # connections of an earlier era are silent
        self._hung = False
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def silence(self) -> None:
        self._era += 1

    def hang(self) -> None:
        self._hung = True

    def recover(self) -> None:
        """Connections made from now on forward again; those made before stay silent."""
        self._hung = False
        self._era += 1

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in self._writers:
            writer.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._upstream)
        self._writers += [client_writer, server_writer]
        era = self._era
        for source, sink in ((client_reader, server_writer), (server_reader, client_writer)):
            pump = asyncio.create_task(self._pump(source, sink, era))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, era: int) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if era != self._era or self._hung:  # what was sent is never delivered, nothing closes
                    await asyncio.Event().wait()
                sink.write(data)
                await sink.drain()
        sink.close()  # one side hung up: so does the other, as over a direct connection


async def _proxy_to(url: str, default_port: int) -> SilencingProxy:
    server = urlsplit(url)
    proxy = SilencingProxy(server.hostname or "127.0.0.1", server.port or default_port)
    await proxy.start()
    return proxy


@pytest.fixture
async def proxy(settings: Settings) -> AsyncIterator[SilencingProxy]:
    proxy = await _proxy_to(settings.redis_url, 6379)
    yield proxy
    await proxy.close()


@pytest.fixture
async def pg_proxy(settings: Settings) -> AsyncIterator[SilencingProxy]:
    proxy = await _proxy_to(settings.database_url, 5432)
    yield proxy
    await proxy.close()


def _through(proxy: SilencingProxy, settings: Settings, **update: object) -> Settings:
    redis_path = urlsplit(settings.redis_url).path
    return settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{proxy.port}{redis_path}", **update})


def _database_through(proxy: SilencingProxy, settings: Settings, **update: object) -> Settings:
    database = urlsplit(settings.database_url)
    via_proxy = database._replace(netloc=f"{database.username}@127.0.0.1:{proxy.port}").geturl()
    return settings.model_copy(update={"database_url": via_proxy, **update})


async def test_a_call_on_a_connection_gone_silent_is_answered_over_a_new_one(
    settings: Settings, proxy: SilencingProxy
) -> None:
    """Every connection of the pool, those arq opened before the timeout was set included."""
    pool = await create_pool(redis_settings(_through(proxy, settings).redis_url, WORKER_RETRIES))
    try:
        await bound_calls(pool, 1.0)
        await pool.ping()
        proxy.silence()
        async with asyncio.timeout(5.0):  # 1 s to give up on the silent one, then a new one
            assert await pool.ping()
    finally:
        await pool.aclose()


async def _completed(api: httpx.AsyncClient, auth: dict[str, str], job_id: str) -> bool:
    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    return bool(job["status"] == "completed")


async def _driver_query(sessions: Sessions, sql: str) -> Any:
    async with driver_connection(sessions) as connection:
        return await connection.fetchval(sql)


async def _orm_query(sessions: Sessions, sql: str) -> Any:
    async with sessions() as session:
        return await session.scalar(text(sql))


async def _driver_in_orm_query(sessions: Sessions, sql: str) -> Any:
    """As a COPY in a session's transaction does, once the ORM has begun it."""
    async with sessions.begin() as session:
        await session.execute(text("SELECT 'begun'"))
        async with driver_of(await session.connection()) as connection:
            return await connection.fetchval(sql)


QUERIES = pytest.mark.parametrize(
    "query", [_driver_query, _orm_query, _driver_in_orm_query], ids=["driver", "orm", "driver_in_orm"]
)
Query = Callable[[Sessions, str], Coroutine[Any, Any, Any]]


async def _gives_up(statement: Coroutine[Any, Any, Any]) -> None:
    """The statement raises TimeoutError within 8 s (left waiting, it would fail the test)."""
    waiting = asyncio.create_task(statement)
    done, _ = await asyncio.wait({waiting}, timeout=8.0)
    if not done:
        waiting.cancel()  # not awaited: its cleanup would wait on the silent connection too
        pytest.fail("the statement still waits on the silent connection after 8 s")
    with pytest.raises(TimeoutError):
        waiting.result()


@QUERIES
async def test_a_statement_on_a_postgres_connection_gone_silent_gives_up_and_the_next_goes_over_a_new_one(
    settings: Settings, pg_proxy: SilencingProxy, migrated: str, query: Query
) -> None:
    """Both kinds of statement we send: the driver fast path's and the ORM's."""
    engine = make_engine(_database_through(pg_proxy, settings).database_url, timeout_s=1.0, connections=1)
    sessions = make_sessions(engine)
    try:
        assert await query(sessions, "SELECT 1") == 1
        pg_proxy.silence()  # the pool's one connection
        await _gives_up(query(sessions, "SELECT 2"))
        async with asyncio.timeout(5.0):  # over a new connection: the silent one was discarded
            assert await query(sessions, "SELECT 3") == 3
    finally:
        await engine.dispose()


def _selects(sessions: Sessions, query: Query) -> asyncio.Future[list[Any]]:
    """Four statements at once: each holds a connection of its own."""
    return asyncio.gather(*(query(sessions, f"SELECT {n}") for n in range(4)))


@QUERIES
async def test_once_a_statement_timed_out_the_pools_other_connections_are_replaced_not_waited_on(
    settings: Settings, pg_proxy: SilencingProxy, migrated: str, query: Query
) -> None:
    """A failover silences every connection of the pool at once: after the first statement
    gives up, the others are not each waited on for the timeout in turn."""
    engine = make_engine(_database_through(pg_proxy, settings).database_url, timeout_s=3.0, connections=4)
    sessions = make_sessions(engine)
    try:
        assert await _selects(sessions, query) == [0, 1, 2, 3]  # four connections made
        pg_proxy.silence()
        await _gives_up(query(sessions, "SELECT 4"))

        started = time.monotonic()
        async with asyncio.timeout(10.0):
            assert await _selects(sessions, query) == [0, 1, 2, 3]
        assert time.monotonic() - started < 2.5, "a silent connection was used after the timeout (4 s)"
    finally:
        await engine.dispose()


@QUERIES
async def test_a_statement_that_outruns_the_timeout_on_a_live_server_is_ended_by_postgres(
    settings: Settings, sessions: Sessions, migrated: str, query: Query
) -> None:
    """Not only abandoned by the client: left running, it would hold its locks to the end. Its
    connection answered, so it is kept."""
    engine = make_engine(migrated, timeout_s=1.0, connections=1)
    slow_sessions = make_sessions(engine)
    try:
        backend = await query(slow_sessions, "SELECT pg_backend_pid()")
        started = time.monotonic()
        with pytest.raises((asyncpg.QueryCanceledError, DBAPIError), match="statement timeout"):
            await query(slow_sessions, "SELECT pg_sleep(30)")
        assert time.monotonic() - started < 2.0, "Postgres ended it, before the client gave up"

        async with sessions() as session:
            running = await session.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid AND state = 'active'"),
                {"pid": backend},
            )
        assert running == 0
        assert await query(slow_sessions, "SELECT pg_backend_pid()") == backend
    finally:
        await engine.dispose()


async def test_every_connection_a_driver_statement_takes_goes_back_to_the_pool(migrated: str) -> None:
    """Finished, failed or cancelled midway: a connection kept out would run the pool dry; a
    cancelled one is closed, not handed out again."""
    engine = make_engine(migrated, timeout_s=60.0, connections=2)
    sessions = make_sessions(engine)
    try:
        statements = (_driver_query(sessions, f"SELECT {n}") for n in range(5))
        assert await asyncio.gather(*statements) == [0, 1, 2, 3, 4]  # 3 more than the pool holds
        with pytest.raises(asyncpg.DivisionByZeroError):
            await _driver_query(sessions, "SELECT 1 / 0")
        reused = [await _driver_query(sessions, "SELECT pg_backend_pid()") for _ in range(3)]
        assert len(set(reused)) <= 2, "each went back to the pool and was used again, not dropped"
        cancelled = asyncio.create_task(_driver_query(sessions, "SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        in_this_database = "datname = current_database() AND query = 'SELECT pg_sleep(30)'"
        sleeping = await _driver_query(sessions, f"SELECT pid FROM pg_stat_activity WHERE {in_this_database}")
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled

        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        pids = await asyncio.gather(*(_driver_query(sessions, "SELECT pg_backend_pid()") for _ in range(2)))
        assert sleeping is not None and sleeping not in pids, "the cancelled one's connection was closed"
    finally:
        await engine.dispose()


async def test_bursts_beyond_the_pool_open_its_connections_once_and_none_beyond_it(
    migrated: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLAlchemy's overflow opened a connection for each burst and ended it after, a new
    Postgres backend that prepared its statements again. And a surplus connection that a
    driver statement handed back outside SQLAlchemy's greenlet could not be closed: it stayed
    open until the garbage collector found it, with an error in the pool's log."""
    engine = make_engine(migrated, timeout_s=60.0, connections=2)
    sessions = make_sessions(engine)
    burst = "SELECT pg_backend_pid() FROM pg_sleep(0.2)"
    try:
        first = set(await asyncio.gather(*(_driver_query(sessions, burst) for _ in range(6))))
        second = set(await asyncio.gather(*(_orm_query(sessions, burst) for _ in range(6))))
        third = set(await asyncio.gather(*(_driver_query(sessions, burst) for _ in range(6))))

        assert len(first) == 2
        assert second == first and third == first, "the same two connections, kept"
        assert not [r for r in caplog.records if r.name.startswith("sqlalchemy.pool")]
    finally:
        await engine.dispose()


def test_an_engine_without_a_connection_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one connection"):
        make_engine("postgresql+asyncpg://nowhere/none", timeout_s=1.0, connections=0)


async def test_an_api_request_held_past_the_timeout_by_a_lock_answers_503_and_the_next_carries_on(
    settings: Settings, sessions: Sessions, auth: dict[str, str]
) -> None:
    async with api_client(settings.model_copy(update={"database_timeout_s": 1.0})) as api:
        assert (await api.get("/v1/jobs", headers=auth)).status_code == 200
        async with sessions.begin() as session:
            await session.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            error_of(await api.get("/v1/jobs", headers=auth), 503, "unavailable")
            assert time.monotonic() - started < 3.0
        assert (await api.get("/v1/jobs", headers=auth)).status_code == 200


async def test_an_api_whose_postgres_connections_go_silent_answers_503_then_carries_on(
    settings: Settings, pg_proxy: SilencingProxy, auth: dict[str, str]
) -> None:
    async with api_client(_database_through(pg_proxy, settings, database_timeout_s=1.0)) as api:
        assert (await api.get("/v1/jobs", headers=auth)).status_code == 200
        pg_proxy.silence()

        started = time.monotonic()
        async with asyncio.timeout(10.0):
            response = await api.get("/v1/jobs", headers=auth)
        error_of(response, 503, "unavailable")
        assert time.monotonic() - started < 5.0

        async with asyncio.timeout(5.0):
            assert (await api.get("/v1/jobs", headers=auth)).status_code == 200


async def test_a_session_whose_connection_goes_silent_once_answered_closes_quietly(
    settings: Settings, pg_proxy: SilencingProxy, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A failover just after a response was sent: closing the request's session rolls back
    over a connection gone silent, given up on at the command timeout (a bare TimeoutError),
    which raised out of the app, a traceback for an answer already given. As for a connection
    Postgres ended, the close that failed is a warning."""
    app = create_app(_database_through(pg_proxy, settings, database_timeout_s=0.5))

    async def silenced_once_answered(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_then_silence(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                pg_proxy.silence()  # the list's transaction is still open

        await app(scope, receive, send_then_silence)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=silenced_once_answered)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            async with asyncio.timeout(10.0):
                # A route that reads to its answer (one that ends in a worker thread gives its
                # connection back before: app/api/json_answers.py).
                response = await client.get("/v1/policy-sets", headers=auth)

    assert response.status_code == 200, response.text
    assert [
        record.levelname for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR
    ] == []
    assert "a session closed on a connection the database had ended" in caplog.text


async def test_an_api_stopping_with_a_pooled_connection_gone_silent_ends_it_with_a_warning(
    settings: Settings, pg_proxy: SilencingProxy, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A failover while the connection sat in the pool: the engine's dispose as the API stops
    closed it politely, waited the command timeout for an answer (a minute by default) and
    logged the failure as an ERROR with a traceback. It is given a second, then ended."""
    async with api_client(_database_through(pg_proxy, settings, database_timeout_s=4.0)) as api:
        assert (await api.get("/v1/policy-sets", headers=auth)).status_code == 200
        pg_proxy.silence()  # its connection is back in the pool
        stopping = time.monotonic()
    stopped = time.monotonic()

    assert stopped - stopping < 3.0, "the close waited for the command timeout (5 s)"
    assert [
        record.levelname for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR
    ] == []
    assert (
        "a pooled connection ended at our end, its close failed: no answer within the pool's 1.0 s to close"
        in caplog.text
    )


async def test_a_pool_gone_silent_at_once_is_ended_in_a_second_not_a_second_each(
    settings: Settings, migrated: str, pg_proxy: SilencingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A failover leaves every pooled connection silent at once, and the pool closes them one
    after another: given a second each, a worker's 30 held its stop for 30 s, past the 30 s
    its container is given before it is killed. Together they have a second."""
    engine = make_engine(_database_through(pg_proxy, settings).database_url, 4.0, connections=4)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(4):  # each checked out at once: four connections made
            connection = await stack.enter_async_context(engine.connect())
            await connection.execute(text("SELECT 1"))
    assert "Connections in pool: 4 " in engine.pool.status()
    pg_proxy.silence()

    stopping = time.monotonic()
    await dispose(engine)
    stopped = time.monotonic()

    assert stopped - stopping < 2.0, "each silent connection was given a second of its own"
    assert [
        record.levelname for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR
    ] == []
    assert caplog.text.count("a pooled connection ended at our end") == 4


async def test_an_export_whose_connection_goes_silent_is_one_warning_naming_the_job(
    settings: Settings, sessions: Sessions, pg_proxy: SilencingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A failover mid-export: a batch read on a connection gone silent is given up on at the
    command timeout (a bare TimeoutError), which was taken for the client's stall ("took
    nothing", at INFO, no job named), where the README promises a warning naming the job."""
    job_id = await bulk_job(sessions, 3 * BATCH_ROWS)
    engine = make_engine(_database_through(pg_proxy, settings).database_url, 0.5, 2)
    chunks = encoded(make_sessions(engine), job_id, FORMATS["trl_sft"], ExportOptions(), ExportFilter())
    sent: list[Message] = []

    async def taken(message: Message) -> None:
        sent.append(message)
        if len(sent) == 3:  # the first batch's records: the export's connection is open by now
            pg_proxy.silence()

    try:
        async with asyncio.timeout(20):
            await _StallingEnds(chunks, job_id=job_id, stall_s=30)(UVICORN_SCOPE, never_disconnects, taken)
    finally:
        await engine.dispose()

    assert sent[-1].get("more_body"), "the response looks complete"
    warned = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "aidsafe.api"
    ]
    assert any(f"the export of job {job_id} was cut off" in message for message in warned), warned
    assert "took nothing" not in caplog.text


async def test_a_submission_over_a_silent_redis_waits_the_redis_timeout_not_the_progress_streams(
    settings: Settings, proxy: SilencingProxy, auth: dict[str, str]
) -> None:
    """The progress streams' pool waits as long as their XREAD BLOCK (10 s here); the
    submission's enqueue waited that long too when the API had one pool for both."""
    silenced = _through(proxy, settings, redis_timeout_s=1.0, events_resync_s=10.0)
    async with api_client(silenced) as api:
        await submit(api, auth, ["How do tides work?"])
        proxy.silence()

        started = time.monotonic()
        async with asyncio.timeout(15.0):
            await submit(api, auth, ["Why is the sky blue?"])
        assert time.monotonic() - started < 5.0, "1 s on the silent connection, then a new one"


async def test_a_submission_while_redis_hangs_is_accepted_at_once_and_the_sweeper_enqueues_it(
    settings: Settings, proxy: SilencingProxy, auth: dict[str, str], sessions: Sessions, arq_redis: ArqRedis
) -> None:
    """The job is committed before its enqueue, which the sweeper redoes if it failed: the
    request waits for Redis no longer than a call's timeout and the connection's retry."""
    async with api_client(_through(proxy, settings, redis_timeout_s=1.0)) as api:
        proxy.hang()
        started = time.monotonic()
        async with asyncio.timeout(30.0):
            job_id = await submit(api, auth, ["How do tides work?"])
        assert time.monotonic() - started < 5.0, "not the client's 40 retries of a restart"

    async with sessions() as session:
        (item,) = (await session.scalars(select(Item).where(Item.job_id == UUID(job_id)))).all()
    assert item.status == "queued"
    assert await arq_redis.zscore(settings.queue_name, arq_job_id(item.id, 1)) is None, "never enqueued"
    await asyncio.sleep(settings.enqueue_grace_s + 0.2)
    assert await sweep(settings, sessions, arq_redis) == {"expired": 0, "lost": 1}
    assert await arq_redis.zscore(settings.queue_name, arq_job_id(item.id, 2)) is not None


async def test_a_budget_patch_while_redis_hangs_answers_503_in_time_and_changes_nothing(
    settings: Settings, proxy: SilencingProxy, auth: dict[str, str], sessions: Sessions
) -> None:
    """A budget's PATCH drops the job's spending counters in Redis before it commits: on a
    Redis that never answers it gives up after the timeout, asking for a retry, and the job
    keeps the budget it had (none) until that retry goes through."""
    budget = {"budget": {"max_tokens": 10**6}}
    async with api_client(_through(proxy, settings, redis_timeout_s=1.0)) as api:
        job_id = await submit(api, auth, ["How do tides work?"])
        proxy.hang()
        started = time.monotonic()
        async with asyncio.timeout(30.0):
            refused = await api.patch(f"/v1/jobs/{job_id}", json=budget, headers=auth)
        assert time.monotonic() - started < 5.0
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "unavailable")
    async with sessions() as session:
        assert await session.scalar(select(Job.budget_max_tokens).where(Job.id == UUID(job_id))) is None
    async with api_client(settings) as api:
        retried = await api.patch(f"/v1/jobs/{job_id}", json=budget, headers=auth)
    assert (retried.status_code, retried.json()["budget"]["max_tokens"]) == (200, 10**6)


async def test_metrics_while_redis_hangs_still_count_the_items_and_leave_the_queue_depth_unknown(
    settings: Settings, proxy: SilencingProxy, auth: dict[str, str]
) -> None:
    async with api_client(_through(proxy, settings, redis_timeout_s=1.0)) as api:
        await submit(api, auth, ["How do tides work?", "Why is the sky blue?"])
        proxy.hang()
        started = time.monotonic()
        async with asyncio.timeout(30.0):
            scraped = await api.get("/metrics")
        assert time.monotonic() - started < 5.0

    assert scraped.status_code == 200
    assert 'aidsafe_items{status="queued"} 2.0' in scraped.text
    assert "aidsafe_queue_depth NaN" in scraped.text


@pytest.mark.parametrize("hung_from", ["its first call", "its first snapshot"])
async def test_a_follower_of_an_empty_stream_hears_the_items_that_ended_while_redis_hung(
    settings: Settings,
    proxy: SilencingProxy,
    auth: dict[str, str],
    sessions: Sessions,
    api: httpx.AsyncClient,
    hung_from: str,
) -> None:
    """A follower with no entry to resume after resumed from the stream's tail once Redis was
    back: past the entries of the items that ended meanwhile, which it never heard of."""
    job_id = await submit(api, auth, ["How do tides work?", "Why is the sky blue?"])
    quick = settings.model_copy(update={"events_resync_s": 1.0})
    streams = await create_pool(redis_settings(_through(proxy, settings).redis_url, REQUEST_RETRIES))
    await bound_calls(streams, 1.5)  # as the API's streams pool: the resync's wait, and more
    source = JobEventSource(streams, sessions, quick, UUID(job_id), summary_of(sessions, job_id))
    if hung_from == "its first call":
        proxy.hang()
    away = 1 if hung_from == "its first call" else 2  # events until one from Postgres came
    events: list[tuple[str, str]] = []
    try:
        async with asyncio.timeout(30.0):
            async for event in follow(source, None):
                events.append((event.kind, event.data["item_id" if event.kind == "item" else "status"]))
                if len(events) == away:  # Redis being away, this snapshot came from Postgres
                    await run_worker_burst(settings)  # over Redis itself: its entries are stored
                    proxy.recover()
                elif len(events) == 1:
                    proxy.hang()
    finally:
        await streams.aclose()

    async with sessions() as session:
        ended = set((await session.scalars(select(Item.id).where(Item.job_id == UUID(job_id)))).all())
    assert events[:away] == [("snapshot", "queued")] * away
    heard = [UUID(ref) for kind, ref in events if kind == "item"]
    assert sorted(heard) == sorted(ended), "each once"
    assert events[-1] == ("done", "completed")


@pytest.mark.parametrize("service", ["redis", "postgres"])
async def test_a_worker_whose_connections_go_silent_carries_on_over_new_ones(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    service: str,
    proxy: SilencingProxy,
    pg_proxy: SilencingProxy,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    if service == "redis":  # the queue's connections, its polls' among them
        silenced = _through(proxy, settings, redis_timeout_s=1.0)
    else:  # the pool's, idle between items
        proxy, silenced = pg_proxy, _database_through(pg_proxy, settings, database_timeout_s=1.0)
    workers.append(start_worker(silenced))
    first = await submit(api, auth, ["How do tides work?"])
    await eventually(lambda: _completed(api, auth, first), what="the first job, before the silence")

    proxy.silence()  # every connection the worker holds now
    second = await submit(api, auth, ["Why is the sky blue?"])
    await eventually(lambda: _completed(api, auth, second), what="the second job, over new connections")
    assert workers[0].poll() is None, "the worker carried on; it did not exit and restart"
    job = (await api.get(f"/v1/jobs/{second}", headers=auth)).json()
    assert job["counts"]["by_status"] == {"completed": 1}, "put back and done, not failed"


@pytest.mark.parametrize("hung", ["redis", "postgres", "both"])
async def test_a_worker_told_to_stop_while_its_stores_hang_is_gone_by_its_deadline(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    hung: str,
    proxy: SilencingProxy,
    pg_proxy: SilencingProxy,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    """Its item running, its Redis or Postgres connections (new ones too) never answering, a
    worker given SIGTERM took 66 s to stop with Postgres hung (the item's hand-back waited out
    the database timeout) and 77 s with both, past the 30 s compose gives; with Redis hung it
    ended in a traceback, its on_shutdown skipped. It is gone by AIDSAFE_WORKER_STOP_S (here
    10 s, and a margin for a loaded machine), and what it could not release is taken back as
    a dead worker's: its item is queued again once its heartbeat runs out, not lost."""
    stop_s = 10.0
    stopping = settings.model_copy(update={"worker_stop_s": stop_s})
    item_id = await _running_an_item(api, auth, sessions, scripted_llm, stopping, proxy, pg_proxy, workers)
    for store in {"redis": [proxy], "postgres": [pg_proxy], "both": [proxy, pg_proxy]}[hung]:
        store.hang()

    await _stopped_within(workers[0], stop_s + 8)

    await asyncio.sleep(stopping.heartbeat_ttl_s)
    await eventually(
        lambda: _queued_again(stopping, sessions, arq_redis, item_id), what="the item queued again"
    )


async def test_a_worker_told_to_stop_after_a_postgres_failover_hands_its_item_back_over_a_new_connection(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    proxy: SilencingProxy,
    pg_proxy: SilencingProxy,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    """The pool's connections silent, new ones answering: the hand-back waited out the database
    timeout on its silent one (the stop took 66 s), and the item was left to the heartbeat."""
    item_id = await _running_an_item(api, auth, sessions, scripted_llm, settings, proxy, pg_proxy, workers)
    pg_proxy.silence()

    await _stopped_within(workers[0], settings.worker_stop_s + 8)

    item = await item_row(sessions, item_id)
    assert (item.status, item.lease_until, item.error_message) == ("queued", None, "worker shut down")


async def _running_an_item(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    settings: Settings,
    proxy: SilencingProxy,
    pg_proxy: SilencingProxy,
    workers: list[subprocess.Popen[bytes]],
) -> UUID:
    """A worker process reaching Redis and Postgres through the proxies, at production timeouts
    and lease, with an item of a new job under way (its LLM call stalled); the item's id."""
    lasting = settings.model_copy(update={"lease_seconds": 60, "llm_timeout_s": 60.0, "redis_timeout_s": 3.0})
    scripted_llm.script("seed_cot", stall(60))
    job_id = await submit(api, auth, ["What is a good first programming language?"])
    item_id = (await one_item(sessions, job_id)).id
    workers.append(start_worker(_database_through(pg_proxy, _through(proxy, lasting))))
    await eventually(lambda: turn_count(sessions, item_id), what="the intent turn")
    return item_id


async def _stopped_within(worker: subprocess.Popen[bytes], bound_s: float) -> None:
    """Send SIGTERM; the worker must exit without an error within `bound_s`."""
    worker.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(_exit_code_within, worker, bound_s)
    assert exit_code is not None, f"still stopping {bound_s} s after the signal"
    assert exit_code == 0, "the stop ended in an error"


def _exit_code_within(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    """The process's exit code, or None if it still runs after `seconds`."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        return process.wait(timeout=seconds)
    return None


async def _queued_again(settings: Settings, sessions: Sessions, redis: ArqRedis, item_id: UUID) -> bool:
    """Whether the item waits in the queue, after a sweep (which takes a dead worker's back)."""
    await sweep(settings, sessions, redis)
    return (await item_row(sessions, item_id)).status == "queued"


async def test_giving_up_on_a_wait_for_the_pool_replaces_none_of_its_connections(migrated: str) -> None:
    """They are busy, not silent: replacing them all would only load a busy Postgres more."""
    engine = make_engine(migrated, timeout_s=60.0, connections=1)
    sessions = make_sessions(engine)
    try:
        async with sessions() as holder:
            held = await holder.scalar(text("SELECT pg_backend_pid()"))
            with pytest.raises(TimeoutError):
                async with deadline(sessions, 0.3):
                    await _orm_query(sessions, "SELECT 2")  # waits for the pool
        assert await _orm_query(sessions, "SELECT pg_backend_pid()") == held, "the pool's was kept"
    finally:
        await engine.dispose()


async def test_a_lease_renewal_on_a_silent_connection_gives_up_in_time_to_renew_over_a_new_one(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    sessions: Sessions,
    settings: Settings,
    pg_proxy: SilencingProxy,
) -> None:
    """A renewal left to wait out the database timeout (30 s here) would let the 6 s lease lapse
    and the sweeper take the item from its live worker. Every connection of the pool is silent:
    a retry must not draw the next one."""
    _, claim = await claimed_item(api, auth, sessions)
    engine = make_engine(_database_through(pg_proxy, settings).database_url, timeout_s=30.0, connections=3)
    renewing = make_sessions(engine)
    lease_s = 6
    work = asyncio.create_task(asyncio.sleep(3600))  # the item's work, running meanwhile
    watch: asyncio.Task[None] | None = None
    try:
        await asyncio.gather(*(items.renew(renewing, claim, lease_s) for _ in range(3)))  # 3 connections
        pg_proxy.silence()
        watch = asyncio.create_task(_keep_lease(renewing, claim, lease_s, work))

        until = time.monotonic() + 2 * lease_s + 1  # past the lease the silence began in, and one more
        while time.monotonic() < until:
            async with sessions() as session:
                lease = select(Item.lease_until > func.now()).where(Item.id == claim.item_id)
                held = await session.scalar(lease)
            assert held, "the lease lapsed"
            await asyncio.sleep(0.2)
        assert not work.done(), "the work goes on"
    finally:
        for task in (watch, work):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (watch, work) if t is not None), return_exceptions=True)
        await engine.dispose()


@pytest.mark.parametrize(
    ("error", "away"),
    [
        (asyncpg.exceptions.ConnectionFailureError("gone"), True),  # 08006
        (asyncpg.exceptions.AdminShutdownError("restart"), True),  # 57P01
        (asyncpg.exceptions.QueryCanceledError("timeout"), True),  # 57014, the database timeout
        (asyncpg.exceptions.ProtocolViolationError("bad message"), False),  # 08P01: a bug
        (asyncpg.exceptions.UniqueViolationError("dup"), False),
    ],
)
def test_a_protocol_violation_is_no_database_away_though_its_class_is_the_connections(
    error: Exception, away: bool
) -> None:
    """Answered 503, a bug in what was sent was retried by every client as an outage."""
    assert database_away(error) is away
