"""A connection to Redis can go silent without closing: after a failover, or when a NAT or
load balancer drops its entry, the client's requests go nowhere and no reset comes back. The
queue's calls then give up after `redis_timeout_s` and are sent again on a new connection
(app/queue.py), so a worker's polls carry on instead of waiting for ever."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
from arq.connections import create_pool

from app.config import Settings
from app.queue import bound_calls, redis_settings
from tests.conftest import eventually, start_worker, submit


class SilencingProxy:
    """A TCP proxy to a Redis server. `silence()` stops the connections open now from
    forwarding anything, and leaves them open; connections made after it forward as before."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._era = 0  # connections of an earlier era are silent
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def silence(self) -> None:
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
                if era != self._era:  # silenced: what was sent is never delivered, nothing closes
                    await asyncio.Event().wait()
                sink.write(data)
                await sink.drain()


@pytest.fixture
async def proxy(settings: Settings) -> AsyncIterator[SilencingProxy]:
    redis = urlsplit(settings.redis_url)
    proxy = SilencingProxy(redis.hostname or "127.0.0.1", redis.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.close()


def _through(proxy: SilencingProxy, settings: Settings, **update: object) -> Settings:
    redis_path = urlsplit(settings.redis_url).path
    return settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{proxy.port}{redis_path}", **update})


async def test_a_call_on_a_connection_gone_silent_is_answered_over_a_new_one(
    settings: Settings, proxy: SilencingProxy
) -> None:
    """Every connection of the pool, those arq opened before the timeout was set included."""
    pool = await create_pool(redis_settings(_through(proxy, settings).redis_url))
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


async def test_a_worker_whose_queue_connections_go_silent_carries_on_over_new_ones(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    proxy: SilencingProxy,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    workers.append(start_worker(_through(proxy, settings, redis_timeout_s=1.0)))
    first = await submit(api, auth, ["How do tides work?"])
    await eventually(lambda: _completed(api, auth, first), what="the first job, before the silence")

    proxy.silence()  # every connection the worker holds now, its polls' among them
    second = await submit(api, auth, ["Why is the sky blue?"])
    await eventually(lambda: _completed(api, auth, second), what="the second job, over new connections")
    assert workers[0].poll() is None, "the worker carried on; it did not exit and restart"
