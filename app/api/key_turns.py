"""Turns, in this API process, of each API key's requests that lock the key's row (keys.hold).

Such a request waits in Postgres, on one of the pool's connections, while the key's request
before it holds the row: a burst of one key's large submissions would have every connection
of the pool wait on that row, and other keys' requests none left. Here a key's requests wait
for their turn without a connection, so one key holds at most one of this process's
connections for them. The row lock stays: it orders the key's requests across processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from uuid import UUID


@dataclass
class _Turns:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # requests holding or waiting for the lock


class KeyTurns:
    """One lock per key with requests under way or waiting, dropped with the last of them: as
    many as the keys writing now, however many keys there are."""

    def __init__(self) -> None:
        self._by_key: dict[UUID, _Turns] = {}

    @asynccontextmanager
    async def turn(self, key_id: UUID) -> AsyncIterator[None]:
        """Wait until the key's requests before this one in this process are done (first
        come, first served), and hold the key's turn inside."""
        turns = self._by_key.setdefault(key_id, _Turns())
        turns.users += 1
        try:
            async with turns.lock:
                yield
        finally:
            turns.users -= 1
            if not turns.users:
                del self._by_key[key_id]

    def __len__(self) -> int:
        """Keys with a request holding or waiting for their turn."""
        return len(self._by_key)
