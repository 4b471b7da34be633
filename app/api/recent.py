"""Values an API process remembers for a short while, read again at most once per period."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("aidsafe.api")

# A read's time counts its waits too (for a pooled connection, for the loop): one unlucky
# read must not keep a job's status for minutes.
MAX_STRETCH = 10.0


@dataclass(frozen=True, slots=True)
class _Held(Generic[V]):
    read_at: float  # when its read started
    value: V
    stretch: float  # the periods' factor (read_share)


class Recent(Generic[K, V]):
    """Each value as read at most `max_age_s` ago, give or take one read in flight.

    Past `max_age_s`, a value is read again by the next caller, and the others that come while
    that read is in flight wait for it too: at most one read per key is in flight, and an
    expiry never sends every waiting request to the database at once. With `stale_s`, a value less
    than `max_age_s + stale_s` old is read again behind its caller instead, who gets the value
    held too: no caller waits for a read (a job summary of 10,000 items takes tens of
    milliseconds to count, and that poll was every poller's p99), and no answer is older than
    that bound. A read that raises is not remembered, and drops the value held, so the next
    caller reads afresh and gets the error itself (a deleted job). A key forgotten while it is
    read keeps nothing of that read.

    With `read_share`, a value whose read took long is kept for longer, in proportion: a read
    of d seconds keeps it fresh for `d / read_share` if that is longer than `max_age_s`, up to
    MAX_STRETCH times it (and `stale_s` grows by the same factor), so one key's reads take
    about that share of the time at most, however large what they count grows and however
    busy the database they read is, up to that bound.

    Expired values are dropped whenever the values held have doubled since the last drop,
    so memory follows the keys read within about `max_age_s` (a job summary per job polled
    lately, not per job ever read), and each drop's cost is paid for by the reads that
    doubled the count.

    A key with no value held (new, dropped, or older than both periods) is read once for all
    the callers that come while that read is in flight: each of them waits for it, and none
    is answered with a value older than both periods. (Each read its own, and only the
    latest kept its value: with callers coming faster than a read took, no read was ever
    kept, and every poll of a large job counted it, each count slower for the others.)"""

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
        self._reading: dict[K, asyncio.Task[V]] = {}  # key: its read in flight
        self._reads: set[asyncio.Task[V]] = set()  # every read in flight: the loop holds tasks weakly
        self._prune_at = 1  # drop expired values once this many are held

    def __len__(self) -> int:
        return len(self._values)

    async def get(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        held = self._values.get(key)
        if held is not None:
            age = self._clock() - held.read_at
            if age < self._max_age_s * held.stretch:
                return held.value
            if age < (self._max_age_s + self._stale_s) * held.stretch:
                if key not in self._reading:
                    self._start_reading(key, read)  # behind this caller
                return held.value
        # Too old to answer with, even while it is read again (a key revoked an hour ago).
        reading = self._reading.get(key) or self._start_reading(key, read)
        # Shielded: a caller that goes away leaves the read to the others waiting on it.
        return await asyncio.shield(reading)

    def forget(self, key: K) -> None:
        """Read `key` afresh next time."""
        self._values.pop(key, None)
        self._reading.pop(key, None)

    async def aclose(self) -> None:
        """Stop the reads in flight (before the database they read goes)."""
        reads = list(self._reads)
        for reading in reads:
            reading.cancel()
        await asyncio.gather(*reads, return_exceptions=True)  # a read that ended in an error too

    def _start_reading(self, key: K, read: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """The one read of `key` in flight, which keeps its value unless forgotten meanwhile."""
        reading = asyncio.create_task(self._read(key, read))
        self._reading[key] = reading
        self._reads.add(reading)
        reading.add_done_callback(functools.partial(self._read_done, key))
        return reading

    async def _read(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        started, held = self._clock(), self._values.get(key)
        this_read = asyncio.current_task()
        try:
            value = await read()
        except BaseException as error:
            if self._reading.get(key) is this_read:
                del self._reading[key]
                # Its callers get the error; the next caller reads afresh and gets it too (a
                # deleted job), instead of the value held before.
                if isinstance(error, Exception) and held is not None and self._values.get(key) is held:
                    del self._values[key]
                    log.info("reading %r again failed, its value dropped: %r", key, error)
            raise
        if self._reading.get(key) is this_read:  # not forgotten since
            del self._reading[key]
            if len(self._values) >= self._prune_at:
                self._drop_expired()
            # Kept until the next drop, even if the read was slow.
            self._values[key] = _Held(started, value, self._stretch(self._clock() - started))
        return value

    def _read_done(self, key: K, reading: asyncio.Task[V]) -> None:
        self._reads.discard(reading)
        if self._reading.get(key) is reading:  # cancelled before it started: _read never ran
            del self._reading[key]
        if not reading.cancelled():
            reading.exception()  # retrieved: a read behind its caller has no one else to raise to

    def _stretch(self, read_s: float) -> float:
        """How many times longer than the periods a value read in `read_s` is kept."""
        if not self._read_share or self._max_age_s <= 0:
            return 1.0
        return min(MAX_STRETCH, max(1.0, read_s / self._read_share / self._max_age_s))

    def _drop_expired(self) -> None:
        # A key being read again keeps its previous value: its other callers are answered with it.
        now, period = self._clock(), self._max_age_s + self._stale_s
        self._values = {
            k: held
            for k, held in self._values.items()
            if now - held.read_at < period * held.stretch or k in self._reading
        }
        self._prune_at = 2 * max(len(self._values), 1)
