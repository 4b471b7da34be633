"""Open-loop HTTP/1.1 GET load from a fixed pool of keep-alive connections (wrk2-style).

Request i is due at start + i/rate. Due requests wait in one queue; each connection takes
the next one when it is free. A request's latency runs from its due time to the last byte
of its answer, so time spent queued behind a slow server counts (no coordinated omission).

The client is a few lines over asyncio streams rather than httpx: at hundreds of requests
per second on a 2-core machine httpx's own CPU (connection pool bookkeeping) would compete
with the server under test and fall behind the schedule. It speaks just enough HTTP/1.1 for
this: GET, keep-alive, Content-Length bodies (what uvicorn sends for JSON).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    send_lag_s: list[float] = field(default_factory=list)  # due time -> a connection took it
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    requests: int = 0


class _Connection:
    def __init__(self, host: str, port: int, request: bytes) -> None:
        self._host, self._port, self._request = host, port, request
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self) -> int:
        """Send the request, read the whole answer; returns the status code."""
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, _, headers = head.partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = None
        close = False
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length is None:
            raise ValueError("answer without Content-Length")
        await self._reader.readexactly(length)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def open_loop_get(
    url: str,
    headers: dict[str, str],
    rate: float,
    duration_s: float,
    connections: int = 64,
    drain_s: float = 20.0,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """GET `url` at `rate` per second for `duration_s` or until `stop` is set, open loop;
    see the module doc."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    result = LoadResult(requests=int(rate * duration_s))
    due_queue: asyncio.Queue[float | None] = asyncio.Queue()

    async def connection_loop() -> None:
        conn = _Connection(host, port, request)
        try:
            while (due := await due_queue.get()) is not None:
                result.send_lag_s.append(time.monotonic() - due)
                try:
                    status = await conn.get()
                except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                    result.errors[type(exc).__name__] += 1
                    await conn.close()
                    continue
                if status == 200:
                    result.latencies_s.append(time.monotonic() - due)
                else:
                    result.errors[f"HTTP {status}"] += 1
        finally:
            await conn.close()

    workers = [asyncio.create_task(connection_loop()) for _ in range(connections)]
    start = time.monotonic() + 0.05
    for i in range(result.requests):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if stop is not None and stop.is_set():
            result.requests = i
            break
        due_queue.put_nowait(due)
    for _ in workers:
        due_queue.put_nowait(None)
    last_due = start + (result.requests - 1) / rate
    _, pending = await asyncio.wait(workers, timeout=max(0.1, last_due + drain_s - time.monotonic()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    answered = len(result.latencies_s) + sum(result.errors.values())
    if answered < result.requests:
        result.errors["unfinished"] += result.requests - answered
    result.elapsed_s = time.monotonic() - start
    return result
