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
    open, which many keys' caps together would pass.

    The caps alone let a few keys fill the process (three keys' 4 exports take all 10) and
    refuse every other tenant until one of theirs ends. So the last `reserve` seats go only to
    keys holding none, as Postgres keeps its last connections for superusers
    (superuser_reserved_connections): a key's seats beyond its first are refused once they
    would take one of them, and however many seats a few keys hold, `reserve` more keys each
    get one. A fifth of the seats, at least one: a lone key still gets its whole cap while the
    cap is at most the other four fifths (4 of 8 exports, 32 of 820 streams by default), and
    with one seat in all, one key holds it.

    `what` names the streams, and `instead` what a refused client may do, in the refusals."""

    def __init__(self, per_key: int, in_all: int, what: str, instead: str) -> None:
        self.per_key = per_key
        self.in_all = in_all
        self.reserve = max(1, in_all // 5)
        self.what = what
        self.instead = instead
        self._open: Counter[UUID] = Counter()

    @contextmanager
    def seat(self, key_id: UUID) -> Iterator[None]:
        """Hold one of the key's seats while the stream is open."""
        held, in_use = self._open[key_id], self._open.total()
        if held >= self.per_key:
            raise TooManyStreams(
                f"this API key already has as many {self.what} open as it may ({self.per_key}); "
                f"close one, or {self.instead}"
            )
        if in_use >= self.in_all:
            raise TooManyStreams(
                f"this API server has as many {self.what} open as it may; "
                f"{self.instead}, or try again shortly"
            )
        if held and in_use >= self.in_all - self.reserve:
            raise TooManyStreams(
                f"this API server keeps its last {self.reserve} of {self.in_all} {self.what} for "
                f"API keys that have none open, and this API key has {held}; close one, or "
                f"{self.instead}, or try again shortly"
            )
        self._open[key_id] += 1
        try:
            yield
        finally:
            self._open[key_id] -= 1
            if not self._open[key_id]:
                del self._open[key_id]
