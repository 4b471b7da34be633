"""GET /v1/jobs/{id}/events: a job's progress as Server-Sent Events (see app/events.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api.deps import CurrentKey, SessionDep
from app.api.jobs import PAGE_ERRORS
from app.events import JobEventSource, follow, parse_event_id
from app.store import jobs
from app.store.models import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
RETRY_MS = 2_000  # how long an EventSource waits before it reconnects


async def _followed_job(job_id: UUID, session: SessionDep, key: CurrentKey) -> UUID:
    await jobs.get_owned(session, job_id, key.id)
    # The stream may last hours: give the connection back now, each snapshot takes its own.
    await session.close()
    return job_id


async def _last_event_id(last_event_id: Annotated[str | None, Header()] = None) -> str | None:
    """Checked before the stream starts, so a bad one gets a 400, not a broken stream."""
    if last_event_id:
        parse_event_id(last_event_id)
    return last_event_id or None


FollowedJob = Annotated[UUID, Depends(_followed_job)]
LastEventId = Annotated[str | None, Depends(_last_event_id)]


def job_event_source(request: Request, job_id: UUID) -> JobEventSource:
    """The job's events with snapshots from a short-lived session each (for any auth in front)."""
    state = request.app.state

    async def snapshot() -> dict[str, Any]:
        async with state.sessions() as session:
            job = await session.get(Job, job_id)
            assert job is not None
            return await jobs.summary(session, job)

    return JobEventSource(state.arq, state.sessions, state.settings, job_id, snapshot)


async def server_sent(source: JobEventSource, last_event_id: str | None) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(comment="connected", retry=RETRY_MS)
    async for event in follow(source, last_event_id):
        yield ServerSentEvent(event=event.kind, data=event.data, id=event.id)


# Not in the OpenAPI document: a generated request for a job that never ends would stream forever.
@router.get(
    "/{job_id}/events", response_class=EventSourceResponse, responses=PAGE_ERRORS, include_in_schema=False
)
async def job_events(
    request: Request, job_id: FollowedJob, last_event_id: LastEventId
) -> AsyncIterator[ServerSentEvent]:
    """Events `item` (an item finished), `snapshot` (job status, counts, usage, quality) and
    `done` (the job ended; the stream closes). Each id can be sent back as `Last-Event-ID` to
    resume; keep-alive comments come every 15 s."""
    async for event in server_sent(job_event_source(request, job_id), last_event_id):
        yield event
