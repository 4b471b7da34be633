"""Work run off the event loop, in a worker thread: `in_thread` in place of asyncio.to_thread,
which ruff forbids elsewhere (pyproject's banned-api)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(work: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(*args, **kwargs)` in a worker thread, as asyncio.to_thread, except that a
    StopIteration it raises comes out as a RuntimeError (its cause): asyncio cannot set a
    StopIteration on a future (a TypeError in a loop callback), so the awaiting coroutine would
    wait for good, a request never answered."""

    def run() -> T:
        try:
            return work(*args, **kwargs)
        except StopIteration as stop:
            raise RuntimeError(f"{getattr(work, '__qualname__', work)!s} raised StopIteration") from stop

    return await asyncio.to_thread(run)
