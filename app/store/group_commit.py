"""Group commit: what a worker process's items ask of Postgres together goes in one statement.

At hundreds of LLM calls a second, a statement and a transaction for each turn, each claim
and each completion were most of Postgres's transactions and a good part of a worker's CPU
(bench/RESULTS.md, issue 12 target 4). A `Lane` takes requests of one kind: one arriving
while no statement of its kind is in flight goes at once (no timer, no added latency when
idle); those arriving while one is in flight wait for it and go together in the next
(natural batching), up to `max_size` a statement.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")

# A request and the future its caller awaits.
Waiting = tuple[Request, asyncio.Future[Answer]]


class Lane(Generic[Request, Answer]):
    """Requests waiting for their statement, and the task sending them: one statement in flight
    at a time, with up to `max_size` of the requests waiting when it starts. `send(batch)`
    answers each request's future, or fails or cancels it; it never raises but CancelledError."""

    def __init__(
        self, send: Callable[[list[Waiting[Request, Answer]]], Awaitable[None]], max_size: int
    ) -> None:
        self._send = send
        self._max_size = max_size
        self._waiting: list[Waiting[Request, Answer]] = []
        self._sending: asyncio.Task[None] | None = None

    async def ask(self, request: Request) -> Answer:
        """The request's answer, once its statement is done."""
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.add((request, answer))
        return await answer

    def add(self, waiting: Waiting[Request, Answer]) -> None:
        self._waiting.append(waiting)
        if self._sending is None:
            # A task of its own, so that a caller cancelled does not cancel the others'
            # statement. It starts after the callbacks ready now: the requests they make join.
            # In a context of its own: it serves every caller, not the first one's log ids.
            self._sending = asyncio.create_task(self._send_waiting(), context=contextvars.Context())

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_size]
                del self._waiting[: self._max_size]
                batch = [(request, answer) for request, answer in batch if not answer.done()]
                if batch:
                    await self._send(batch)
        finally:
            self._sending = None
            for _, answer in self._waiting:  # left by a sender cancelled (the loop closing)
                answer.cancel()
            self._waiting.clear()


def fail(batch: list[Waiting[Request, Answer]], error: BaseException) -> None:
    """Hand `error` to every caller of the batch still waiting."""
    for _, answer in batch:
        if not answer.done():
            answer.set_exception(error)


def cancel(batch: list[Waiting[Request, Answer]]) -> None:
    """Cancel every caller of the batch (the statement was cancelled: the loop closing)."""
    for _, answer in batch:
        answer.cancel()
