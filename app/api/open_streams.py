"""How many streams of a kind (progress streams, exports) are open in this process, in all and
per API key, and the caps on them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from app.errors import TooManyStreams


class OpenStreams:
    """Every open stream holds something all tenants share until it ends (a progress stream a
    Redis connection, an export the memory of two batches of rows and, as it reads each, a
    Postgres connection of the API's pool), for as long as its client takes to read it, so a
    key that opened them without bound could use it up for every tenant. A key past its cap is
    refused (429) before its stream starts; and so is any key once the process has its most
    open, which many keys' caps together would pass. `what` names the streams, and `instead`
    what a refused client may do, in the refusals."""

    def __init__(self, per_key: int, in_all: int, what: str, instead: str) -> None:
        self.per_key = per_key
        self.in_all = in_all
        self.what = what
        self.instead = instead
        self._open: Counter[UUID] = Counter()

    @contextmanager
    def seat(self, key_id: UUID) -> Iterator[None]:
        """Hold one of the key's seats while the stream is open."""
        if self._open[key_id] >= self.per_key:
            raise TooManyStreams(
                f"this API key already has {self.per_key} {self.what} open (the most it may); "
                f"close one, or {self.instead}"
            )
        if self._open.total() >= self.in_all:
            raise TooManyStreams(
                f"this API server has as many {self.what} open as it may; "
                f"{self.instead}, or try again shortly"
            )
        self._open[key_id] += 1
        try:
            yield
        finally:
            self._open[key_id] -= 1
            if not self._open[key_id]:
                del self._open[key_id]
