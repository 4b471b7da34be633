"""Turns, in this API process, of each API key's requests that lock the key's row (keys.hold),
and of its requests' bodies being read and decoded.

A request that locks the row waits in Postgres, on one of the pool's connections, while the
key's request before it holds the row: a burst of one key's large submissions would have every
connection of the pool wait on that row, and other keys' requests none left. Here a key's
requests wait for their turn without a connection, so one key holds at most one of this
process's connections for them. The row lock stays: it orders the key's requests across
processes. A body is held in memory whole, and decoded, before its route runs (some 100 MB at
the peak for one of 32 MiB): a key's bodies take a few turns at once, each until its answer (a
body decoded, then waiting for the key's row, is in memory still), the others wait unread.

A key's requests waiting for a turn are bounded too: each holds a connection and a task, and a
burst of one key's would otherwise take every connection the process may open. Past the bound
a request is refused at once (429 `too_many_waiting`), unread.

Turns without a bound on the waiting serve work already accepted, which is never refused: the
key's requests' calls for a worker thread (app/threads.py), a few at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from uuid import UUID

from app.errors import TooManyWaiting


@dataclass
class _Turns:
    slots: asyncio.Semaphore
    users: int = 0  # requests holding or waiting for a slot


class KeyTurns:
    """`at_once` slots per key with requests under way or waiting, dropped with the last of
    them: as many as the keys busy now, however many keys there are. At most `max_waiting` of
    a key's requests wait for a slot (None: any number)."""

    def __init__(self, at_once: int = 1, *, max_waiting: int | None) -> None:
        self.at_once = at_once
        self.max_waiting = max_waiting
        self._by_key: dict[UUID, _Turns] = {}

    @asynccontextmanager
    async def turn(self, key_id: UUID, *, refuse_past_max: bool = True) -> AsyncIterator[None]:
        """Wait until one of the key's slots in this process is free (first come, first
        served), and hold it inside. TooManyWaiting if `max_waiting` requests of the key wait
        already (unless not `refuse_past_max`: a caller that sends a refusal never again)."""
        turns = self._by_key.get(key_id)
        if turns is None:
            turns = self._by_key[key_id] = _Turns(asyncio.Semaphore(self.at_once))
        if (
            refuse_past_max
            and self.max_waiting is not None
            and turns.users >= self.at_once + self.max_waiting
        ):
            raise TooManyWaiting(
                f"this API key has {self.max_waiting} requests waiting for their turn here, the most "
                "it may: send fewer at once"
            )
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
