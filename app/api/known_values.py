"""Whether a value is in a small column (API keys' hashes, webhooks' ids), from the whole
column as read at most once a second or so: what a request from an address past its failures
(app/api/failures.py) is checked against, so that its guesses cost no lookup each, and a key
or webhook that exists is still served. Read only while some address is past its limit."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from sqlalchemy import Select

from app.api.recent import Recent
from app.store.db import Sessions, closed_quietly

T = TypeVar("T", bound=Hashable)

# A value made since the last read is not known till the next: a new key or webhook may be
# refused for this long, from an address past its limit only.
MAX_AGE_S = 1.0
# A column that takes long to read is read less often (Recent's read_share), up to ten times
# MAX_AGE_S: at most some 5 % of a connection's time, however many guesses come.
READ_SHARE = 0.05


class KnownValues(Generic[T]):
    def __init__(self, sessions: Sessions, column: Select[T]) -> None:
        self._sessions = sessions
        self._column = column
        self._all: Recent[None, frozenset[T]] = Recent(MAX_AGE_S, read_share=READ_SHARE)

    async def holds(self, value: T) -> bool:
        return value in await self._all.get(None, self._read)

    async def _read(self) -> frozenset[T]:
        async with closed_quietly(self._sessions) as session:
            return frozenset(await session.scalars(self._column))

    async def aclose(self) -> None:
        """Stop the read in flight (before the database it reads goes)."""
        await self._all.aclose()
