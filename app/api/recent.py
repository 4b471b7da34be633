"""Values an API process remembers for a short while, read again at most once per period."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Each value as read at most `max_age_s` ago. While one caller reads a value again,
    the others get the previous one: at most one read per key is in flight, and an expiry
    never sends every waiting request to the database at once. A read that raises is not
    remembered.

    Expired values are dropped whenever the values held have doubled since the last drop,
    so memory follows the keys read within about `max_age_s` (a job summary per job polled
    lately, not per job ever read), and each drop's cost is paid for by the reads that
    doubled the count. A key whose value was dropped is read as a new one: callers that
    arrive together for it all read."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age_s = max_age_s
        self._clock = clock
        self._values: dict[K, tuple[float, V]] = {}  # key: (when read, value)
        self._reading: set[K] = set()
        self._prune_at = 1  # drop expired values once this many are held

    def __len__(self) -> int:
        return len(self._values)

    async def get(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        entry = self._values.get(key)
        if entry is not None and (self._clock() - entry[0] < self._max_age_s or key in self._reading):
            return entry[1]
        started = self._clock()
        self._reading.add(key)
        try:
            value = await read()
        finally:
            self._reading.discard(key)
        if len(self._values) >= self._prune_at:
            self._drop_expired()
        self._values[key] = (started, value)  # kept until the next drop, even if the read was slow
        return value

    def forget(self, key: K) -> None:
        """Read `key` afresh next time."""
        self._values.pop(key, None)

    def _drop_expired(self) -> None:
        # A key being read again keeps its previous value: its other callers are answered with it.
        oldest = self._clock() - self._max_age_s
        self._values = {k: e for k, e in self._values.items() if e[0] >= oldest or k in self._reading}
        self._prune_at = 2 * max(len(self._values), 1)
