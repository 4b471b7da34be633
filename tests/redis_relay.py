"""A TCP relay between a Redis client and the test Redis that a test can make misbehave:
its open connections can go silent at once, and the answers to the commands that carry some
bytes (a script's SHA) can be counted, held back, or lost with their connection once Redis
has run the command."""

from __future__ import annotations

import asyncio


class RedisRelay:
    """Relays every connection made to `port` to Redis at host:port. `watched`: the bytes that
    mark a command whose answer `hold_answers` and `cut_answers` act on (nothing if empty).
    It takes a client's commands one at a time, each answered before the next is sent on its
    connection, and an answer in one read: as redis-py sends them outside pipelines."""

    def __init__(self, host: str, port: int, watched: bytes = b"") -> None:
        self._target = (host, port)
        self._watched = watched
        self._open: list[tuple[asyncio.Event, asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cut = False
        self.port = 0
        self.held = 0  # answers to watched commands held back now
        self.answered = 0  # answers to watched commands passed on

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def silence(self) -> None:
        """Swallow the bytes of the connections open now, both ways, leaving their sockets
        open; connections made afterwards relay normally."""
        for silent, _, _ in self._open:
            silent.set()

    def hold_answers(self) -> None:
        """Hold back the answers to watched commands until `let_answers_through`."""
        self._flowing.clear()

    def let_answers_through(self) -> None:
        self._flowing.set()

    def cut_answers(self) -> None:
        """From now on, close a watched command's connection when Redis answers it, instead
        of passing the answer on: the client never learns what Redis did."""
        self._cut = True

    def close(self) -> None:
        self._server.close()
        for _, down, up in self._open:
            down.close()
            up.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        silent = asyncio.Event()
        self._open.append((silent, writer, up_writer))
        watched_asked = 0  # watched commands sent on this connection and not answered yet

        async def requests() -> None:
            nonlocal watched_asked
            while data := await reader.read(65536):
                if not silent.is_set():
                    # Counted before it is sent: Redis may answer before the write returns.
                    if self._watched and self._watched in data:
                        watched_asked += 1
                    up_writer.write(data)
                    await up_writer.drain()

        async def answers() -> None:
            nonlocal watched_asked
            while data := await up_reader.read(65536):
                if silent.is_set():
                    continue
                if watched_asked:
                    watched_asked -= 1
                    self.held += 1
                    await self._flowing.wait()
                    self.held -= 1
                    if self._cut:
                        writer.close()
                        up_writer.close()
                        return
                    self.answered += 1
                writer.write(data)
                await writer.drain()

        await asyncio.gather(requests(), answers(), return_exceptions=True)
