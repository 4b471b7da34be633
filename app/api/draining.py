"""The API's event streams end as it shuts down.

uvicorn, told to stop (SIGTERM), closes idle connections and waits for the responses under
way. An event stream follows its job for as long as the job runs, so one open stream (a
`aidsafe follow`, the viewer) held a stopping API for good: a deploy waited for the kill. As
the shutdown starts, the protocol below tells the app (through the lifespan's state), and each
stream ends; its client reconnects with Last-Event-ID to an API that runs, and hears nothing
twice and misses nothing (app/events.py). The other responses have `shutdown_grace_s`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

import anyio
from fastapi import Request

from app.api.head_limits import HeadLimitedProtocol

DRAINING = "draining"  # the lifespan state's asyncio.Event, set once the server stops

T = TypeVar("T")


class DrainingProtocol(HeadLimitedProtocol):
    """The API's HTTP protocol: its heads capped, and the shutdown told to the app."""

    def shutdown(self) -> None:
        if (draining := self.app_state.get(DRAINING)) is not None:
            draining.set()
        super().shutdown()


def draining(request: Request) -> asyncio.Event:
    """Set once the server stops; never set under a server that does not tell (the tests'
    in-process transport has no lifespan state)."""
    event: asyncio.Event = getattr(request.state, DRAINING, None) or asyncio.Event()
    return event


async def until_set(events: AsyncIterator[T], stop: asyncio.Event) -> AsyncIterator[T]:
    """`events` until `stop` is set, also while the next one is awaited (a stream waits for
    its job's next event for seconds). Each step of `events` runs in a task of its own, ended
    before this generator ends (see _ended), so that its owner can close `events`."""
    stopping = asyncio.ensure_future(stop.wait())
    next_event: asyncio.Future[T] | None = None
    try:
        while True:
            next_event = asyncio.ensure_future(anext(events))
            await asyncio.wait((next_event, stopping), return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                return  # an event that came at the same moment is sent again on the resume
            try:
                event = next_event.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        stopping.cancel()
        if next_event is not None:
            await _ended(next_event)


async def _ended(next_event: asyncio.Future[T]) -> None:
    """Cancel the wait for the next event, if under way, and let it end, shielded from this
    task's own cancellation (its client left: anyio cancels it again at every await). Left
    running, it held `events`, which its owner then could not close: RuntimeError, and a
    Redis read that went on."""
    next_event.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.wait((next_event,))  # raises nothing the step raised
    if not next_event.cancelled():
        next_event.exception()  # read: a step's fault no one awaits is not logged as lost
