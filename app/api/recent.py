"""Values an API process remembers for a short while, read again at most once per period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("aidsafe.api")


@dataclass(frozen=True, slots=True)
class _Held(Generic[V]):
    read_at: float  # when its read started
    value: V
    stretch: float  # the periods' factor (read_share)


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

    With `read_share`, a value whose read took long is kept for longer, in proportion: a read
    of d seconds keeps it fresh (and stale) for `d / read_share` if that is longer than
    `max_age_s` (and `stale_s` grows by the same factor), so one key's reads take at most
    about that share of the time, however large what they count grows and however busy the
    database they read is.

    Expired values are dropped whenever the values held have doubled since the last drop,
    so memory follows the keys read within about `max_age_s` (a job summary per job polled
    lately, not per job ever read), and each drop's cost is paid for by the reads that
    doubled the count. A key whose value was dropped is read as a new one: callers that
    arrive together for it all read."""

    def __init__(
        self,
        max_age_s: float,
        stale_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        read_share: float | None = None,
    ) -> None:
        self._max_age_s = max_age_s
        self._stale_s = stale_s
        self._clock = clock
        self._read_share = read_share
        self._values: dict[K, _Held[V]] = {}
        self._reading: dict[K, object] = {}  # key: its latest read in flight, which may keep its value
        self._behind: set[asyncio.Task[None]] = set()  # reads behind callers: the loop holds tasks weakly
        self._prune_at = 1  # drop expired values once this many are held

    def __len__(self) -> int:
        return len(self._values)

    async def get(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        held = self._values.get(key)
        if held is not None:
            age = self._clock() - held.read_at
            if age < self._max_age_s * held.stretch or key in self._reading:
                return held.value
            if age < (self._max_age_s + self._stale_s) * held.stretch:
                behind = asyncio.create_task(self._read_behind(key, read, self._reading_now(key)))
                self._behind.add(behind)
                behind.add_done_callback(self._behind.discard)
                return held.value
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
            # Kept until the next drop, even if the read was slow.
            self._values[key] = _Held(started, value, self._stretch(self._clock() - started))
        return value

    def _stretch(self, read_s: float) -> float:
        """How many times longer than the periods a value read in `read_s` is kept."""
        if not self._read_share or self._max_age_s <= 0:
            return 1.0
        return max(1.0, read_s / self._read_share / self._max_age_s)

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
        now, period = self._clock(), self._max_age_s + self._stale_s
        self._values = {
            k: held
            for k, held in self._values.items()
            if now - held.read_at < period * held.stretch or k in self._reading
        }
        self._prune_at = 2 * max(len(self._values), 1)
