"""GET /v1/jobs/{id}/events: a job's progress as Server-Sent Events (see app/events.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.bodies import inlined
from app.api.deps import CurrentKey, OwnedJob, SessionDep
from app.api.draining import draining, until_set
from app.api.errors import documented_beside_a_stream
from app.api.schemas import ItemFinishedOut, JobProgressOut
from app.api.state import api_state
from app.errors import JobDeleted
from app.events import JobEventSource, follow
from app.store import jobs, keys
from app.store.db import database_away
from app.store.models import Job

log = logging.getLogger("aidsafe.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
RETRY_MS = 2_000  # how long an EventSource waits before it reconnects
LastEventIdHeader = Annotated[str | None, Header()]


# Whether the caller may still read the job (its key not revoked, its viewer session live),
# asked in a session of its own.
StillAllowed = Callable[[AsyncSession], Awaitable[bool]]


@dataclass(frozen=True)
class ResumedEvents:
    """A job's events, the id of the last one the client has (None: from now), whether
    its caller may still read them, and the server's shutdown (app/api/draining.py)."""

    source: JobEventSource
    last_event_id: str | None
    allowed: Callable[[], Awaitable[bool]]
    draining: asyncio.Event


def job_event_source(request: Request, job_id: UUID) -> JobEventSource:
    """The job's events with snapshots from a short-lived session each (for any auth in front)."""
    state = api_state(request)

    async def snapshot() -> dict[str, Any]:
        async with state.sessions() as session:
            job = await session.get(Job, job_id)
            if job is None:  # deleted since the stream began (a purge between two snapshots)
                raise JobDeleted(f"job {job_id} was deleted")
            return await jobs.summary(session, job)

    return JobEventSource(state.streams, state.sessions, state.settings, job_id, snapshot)


@asynccontextmanager
async def resumed(
    request: Request, session: AsyncSession, job: Job, last_event_id: str | None, still_allowed: StillAllowed
) -> AsyncIterator[ResumedEvents]:
    """The job's events from `last_event_id`, for a route's dependency with yield: the seat of
    the job's key among its open streams is held until the response ends. A key at its cap and
    a Last-Event-ID this API never sent are refused before the stream starts, so they get a 429
    or a 400, not a broken stream."""
    with api_state(request).open_streams.seat(job.owner_key_id):
        # The stream may last hours: give the connection back now, each snapshot takes its own.
        await session.close()
        sessions = api_state(request).sessions
        source = job_event_source(request, job.id)
        if last_event_id:
            await source.check_sent(last_event_id, job.created_at)

        async def allowed() -> bool:
            async with sessions() as own:
                return await still_allowed(own)

        yield ResumedEvents(source, last_event_id or None, allowed, draining(request))


async def server_sent(events: ResumedEvents) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(comment="connected", retry=RETRY_MS)
    async with aclosing(follow(events.source, events.last_event_id)) as followed:
        try:
            async for event in until_set(followed, events.draining):
                # A stream may outlive its key's revocation by hours: it ends at the next
                # snapshot (every events_resync_s at most), and the reconnection is refused.
                if event.kind == "snapshot" and not await _still_allowed(events):
                    return
                yield ServerSentEvent(event=event.kind, data=event.data, id=event.id)
        except JobDeleted:  # as a revoked key's stream: ended, and the reconnection gets 404
            log.info("events of job %s: the job was deleted; the stream ends", events.source.job_id)


async def _still_allowed(events: ResumedEvents) -> bool:
    """Whether the caller may still read the stream. While Postgres is away, yes until the next
    snapshot checks again: the fault ended the stream with a traceback."""
    try:
        return await events.allowed()
    except Exception as error:
        if not database_away(error):
            raise
        log.warning("events of job %s: the caller's access not checked, Postgres away", events.source.job_id)
        return True


async def _followed(
    request: Request,
    job: OwnedJob,
    key: CurrentKey,
    session: SessionDep,
    last_event_id: LastEventIdHeader = None,
) -> AsyncIterator[ResumedEvents]:
    async def key_live(own: AsyncSession) -> bool:
        return await keys.is_live(own, key.id)

    async with resumed(request, session, job, last_event_id, key_live) as events:
        yield events


def _event(kind: str, data: type[BaseModel], when: str) -> dict[str, Any]:
    """One kind of event as the OpenAPI document shows it: its name, and its JSON data."""
    return {
        "type": "object",
        "description": when,
        "required": ["event", "data"],
        "properties": {
            "event": {"const": kind},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": inlined(data.model_json_schema()),
            },
            "id": {"type": "string", "description": "Send back as Last-Event-ID to resume after it."},
            "retry": {"type": "integer", "minimum": 0},
        },
    }


EVENTS = {
    "description": "The job's events, until it ends.",
    "content": {
        "text/event-stream": {
            "itemSchema": {
                "oneOf": [
                    _event("item", ItemFinishedOut, "An item ended."),
                    _event("snapshot", JobProgressOut, "On connect, then while items end and every 10 s."),
                    _event("done", JobProgressOut, "The job ended (the last snapshot); the stream closes."),
                ]
            }
        }
    },
}


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: EVENTS, **documented_beside_a_stream(400, 401, 404, 422, 429, 503)},
)
async def job_events(
    events: Annotated[ResumedEvents, Depends(_followed)],
) -> AsyncIterator[ServerSentEvent]:
    """Events `item` (an item finished), `snapshot` (job status, counts, usage, quality) and
    `done` (the job ended; the stream closes). Each id can be sent back as `Last-Event-ID` to
    resume; keep-alive comments come every 15 s."""
    async for event in server_sent(events):
        yield event
