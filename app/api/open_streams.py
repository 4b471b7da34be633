"""How many progress streams are open in this process, in all and per API key, and the caps on them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from app.errors import TooManyStreams


class OpenStreams:
    """Every open stream holds a Redis connection (XREAD BLOCK) and a task until it ends, so a
    key that opened them without bound could use up Redis's connections for every tenant and
    the workers. A key past its cap is refused (429) before its stream starts; and so is any
    key once the process has its most open, which many keys' caps together would pass."""

    def __init__(self, per_key: int, in_all: int) -> None:
        self.per_key = per_key
        self.in_all = in_all
        self._open: Counter[UUID] = Counter()

    @contextmanager
    def seat(self, key_id: UUID) -> Iterator[None]:
        """Hold one of the key's seats while the stream is open."""
        if self._open[key_id] >= self.per_key:
            raise TooManyStreams(
                f"this API key already has {self.per_key} progress streams open (the most it may); "
                "close one, or poll GET /v1/jobs/{id} instead"
            )
        if self._open.total() >= self.in_all:
            raise TooManyStreams(
                "this API server has as many progress streams open as it may; "
                "poll GET /v1/jobs/{id} instead, or try again shortly"
            )
        self._open[key_id] += 1
        try:
            yield
        finally:
            self._open[key_id] -= 1
            if not self._open[key_id]:
                del self._open[key_id]
