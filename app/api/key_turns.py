"""Turns, in this API process, of each API key's requests that lock the key's row (keys.hold),
and of its requests' bodies being read and decoded.

A request that locks the row waits in Postgres, on one of the pool's connections, while the
key's request before it holds the row: a burst of one key's large submissions would have every
connection of the pool wait on that row, and other keys' requests none left. Here a key's
requests wait for their turn without a connection, so one key holds at most one of this
process's connections for them. The row lock stays: it orders the key's requests across
processes. A body is held in memory whole, and decoded, before its route runs (some 100 MB at
the peak for one of 32 MiB): a key's bodies take a few turns at once, the others wait unread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from uuid import UUID


@dataclass
class _Turns:
    slots: asyncio.Semaphore
    users: int = 0  # requests holding or waiting for a slot


class KeyTurns:
    """`at_once` slots per key with requests under way or waiting, dropped with the last of
    them: as many as the keys busy now, however many keys there are."""

    def __init__(self, at_once: int = 1) -> None:
        self.at_once = at_once
        self._by_key: dict[UUID, _Turns] = {}

    @asynccontextmanager
    async def turn(self, key_id: UUID) -> AsyncIterator[None]:
        """Wait until one of the key's slots in this process is free (first come, first
        served), and hold it inside."""
        turns = self._by_key.get(key_id)
        if turns is None:
            turns = self._by_key[key_id] = _Turns(asyncio.Semaphore(self.at_once))
        turns.users += 1
        try:
            async with turns.slots:
                yield
        finally:
            turns.users -= 1
            if not turns.users:
                del self._by_key[key_id]

    def __len__(self) -> int:
        """Keys with a request holding or waiting for their turn."""
        return len(self._by_key)
