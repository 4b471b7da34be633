"""Values an API process remembers for a short while, read again at most once per period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("aidsafe.api")


class Recent(Generic[K, V]):
    """Each value as read at most `max_age_s` ago, give or take one read in flight.

    Past `max_age_s`, a value is read again by the next caller, and while that read is in
    flight the others get the value held: at most one read per key is in flight, and an expiry
    never sends every waiting request to the database at once. With `stale_s`, a value less
    than `max_age_s + stale_s` old is read again behind its caller instead, who gets the value
    held too: no caller waits for a read (a job summary of 10,000 items takes tens of
    milliseconds to count, and that poll was every poller's p99), and no answer is older than
    that bound. A read that raises is not remembered; a read behind a caller that raises drops
    the value, so the next caller reads afresh and gets the error itself (a deleted job). A key
    forgotten while it is read keeps nothing of that read.

    Expired values are dropped whenever the values held have doubled since the last drop,
    so memory follows the keys read within about `max_age_s` (a job summary per job polled
    lately, not per job ever read), and each drop's cost is paid for by the reads that
    doubled the count. A key whose value was dropped is read as a new one: callers that
    arrive together for it all read."""

    def __init__(
        self, max_age_s: float, stale_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_age_s = max_age_s
        self._stale_s = stale_s
        self._clock = clock
        self._values: dict[K, tuple[float, V]] = {}  # key: (when read, value)
        self._reading: dict[K, object] = {}  # key: its latest read in flight, which may keep its value
        self._behind: set[asyncio.Task[None]] = set()  # reads behind callers: the loop holds tasks weakly
        self._prune_at = 1  # drop expired values once this many are held

    def __len__(self) -> int:
        return len(self._values)

    async def get(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        entry = self._values.get(key)
        if entry is not None:
            age = self._clock() - entry[0]
            if age < self._max_age_s or key in self._reading:
                return entry[1]
            if age < self._max_age_s + self._stale_s:
                behind = asyncio.create_task(self._read_behind(key, read, self._reading_now(key)))
                self._behind.add(behind)
                behind.add_done_callback(self._behind.discard)
                return entry[1]
        return await self._read(key, read, self._reading_now(key))

    def forget(self, key: K) -> None:
        """Read `key` afresh next time."""
        self._values.pop(key, None)
        self._reading.pop(key, None)

    async def aclose(self) -> None:
        """Stop the reads behind callers (before the database they read goes)."""
        for behind in list(self._behind):
            behind.cancel()
        for behind in list(self._behind):
            with contextlib.suppress(asyncio.CancelledError):
                await behind

    def _reading_now(self, key: K) -> object:
        """A read of `key` starts: it is the one that may keep its value (until forgotten)."""
        self._reading[key] = this_read = object()
        return this_read

    async def _read(self, key: K, read: Callable[[], Awaitable[V]], this_read: object) -> V:
        started = self._clock()
        try:
            value = await read()
        except BaseException:
            if self._reading.get(key) is this_read:
                del self._reading[key]
            raise
        if self._reading.get(key) is this_read:  # not forgotten, nor read again since
            del self._reading[key]
            if len(self._values) >= self._prune_at:
                self._drop_expired()
            self._values[key] = (started, value)  # kept until the next drop, even if the read was slow
        return value

    async def _read_behind(self, key: K, read: Callable[[], Awaitable[V]], this_read: object) -> None:
        held = self._values.get(key)
        try:
            await self._read(key, read, this_read)
        except Exception as error:  # its caller is the next one, who reads afresh
            log.info("reading %r again failed, dropped: %r", key, error)
            if self._values.get(key) is held:
                self._values.pop(key, None)

    def _drop_expired(self) -> None:
        # A key being read again keeps its previous value: its other callers are answered with it.
        oldest = self._clock() - self._max_age_s - self._stale_s
        self._values = {k: e for k, e in self._values.items() if e[0] >= oldest or k in self._reading}
        self._prune_at = 2 * max(len(self._values), 1)
