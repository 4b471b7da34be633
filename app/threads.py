"""Work run off the event loop, in a worker thread: `in_thread` in place of asyncio.to_thread,
which ruff forbids elsewhere (pyproject's banned-api).

The threads are asyncio's default pool, a few for the whole process, taken first come, first
served. Code working for one party among several can have that party's calls take turns for
them (`in_turns`): the API gives each request the turns of its API key, so that one key's burst
of CPU-heavy requests holds a few of the threads and another key's light request one of the
rest, instead of waiting behind the whole burst."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, suppress
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

import anyio

P = ParamSpec("P")
T = TypeVar("T")

# A turn to run one call in a thread, waited for before the call is handed to the pool and
# held until its work is done.
ThreadTurn = Callable[[], AbstractAsyncContextManager[None]]

_turn: ContextVar[ThreadTurn | None] = ContextVar("thread_turn", default=None)


@contextmanager
def in_turns(turn: ThreadTurn) -> Iterator[None]:
    """Inside, in this context and the tasks started from it, every `in_thread` call waits for
    `turn()` and runs in it. Outside (workers, the CLI, requests without a key) calls take a
    thread as they come."""
    token = _turn.set(turn)
    try:
        yield
    finally:
        _turn.reset(token)


async def in_thread(work: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(*args, **kwargs)` in a worker thread, as asyncio.to_thread, in its turn if the
    caller runs `in_turns`; except that a StopIteration it raises comes out as a RuntimeError
    (its cause): asyncio cannot set a StopIteration on a future (a TypeError in a loop
    callback), so the awaiting coroutine would wait for good, a request never answered."""

    def run() -> T:
        try:
            return work(*args, **kwargs)
        except StopIteration as stop:
            raise RuntimeError(f"{getattr(work, '__qualname__', work)!s} raised StopIteration") from stop

    turn = _turn.get()
    if turn is None:
        return await asyncio.to_thread(run)
    async with turn():
        return await _to_the_end(asyncio.ensure_future(asyncio.to_thread(run)))


async def _to_the_end(call: asyncio.Future[T]) -> T:
    """`call`'s result. Cancelled, the caller still waits for `call` to end (asyncio cannot
    stop a thread), then is cancelled: so a turn is held as long as its thread works. Given
    back at the cancel, a key hanging up on its uploads could keep every thread busy decoding
    files that no one waits for."""
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        # Cancelled again meanwhile, it waits still: one wait gave the turn back then. anyio
        # cancels a cancelled scope's task at every await (Starlette's, when a client hangs up):
        # its shield keeps the wait from starting over on every turn of the loop.
        while not call.done():
            with anyio.CancelScope(shield=True), suppress(asyncio.CancelledError):
                await asyncio.wait([call])
        if not call.cancelled():
            call.exception()  # retrieved: the cancelled caller wants no result, nor its error
        raise
