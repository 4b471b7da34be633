"""Values an API process remembers for a short while, read again at most once per period."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MAX_ENTRIES = 10_000  # beyond this, expired values are dropped


class Recent(Generic[K, V]):
    """Each value as read at most `max_age_s` ago. While one caller reads a value again,
    the others get the previous one: at most one read per key is in flight, and an expiry
    never sends every waiting request to the database at once. A read that raises is not
    remembered."""

    def __init__(self, max_age_s: float) -> None:
        self._max_age_s = max_age_s
        self._values: dict[K, tuple[float, V]] = {}  # key: (when read, value)
        self._reading: set[K] = set()

    async def get(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        entry = self._values.get(key)
        if entry is not None and (time.monotonic() - entry[0] < self._max_age_s or key in self._reading):
            return entry[1]
        started = time.monotonic()
        self._reading.add(key)
        try:
            value = await read()
        finally:
            self._reading.discard(key)
        if len(self._values) >= _MAX_ENTRIES:
            oldest = time.monotonic() - self._max_age_s
            self._values = {k: e for k, e in self._values.items() if e[0] >= oldest}
        self._values[key] = (started, value)
        return value

    def forget(self, key: K) -> None:
        """Read `key` afresh next time."""
        self._values.pop(key, None)
