"""Dependencies as types: a route's signature says what it needs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Annotated
from uuid import UUID

from arq.connections import ArqRedis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app import threads
from app.api.state import ApiState, api_state
from app.api.summaries import JobSummaries
from app.config import Settings
from app.errors import Unauthorized
from app.presets import Presets
from app.store import jobs, keys
from app.store.db import closed_quietly
from app.store.models import ApiKey, Job


# Dependencies are `async def` even where they await nothing: FastAPI runs a plain `def` one in
# its thread pool, a thread hop per request (a tenth of the API's CPU per cached GET).
async def _state(request: Request) -> ApiState:
    return api_state(request)


StateDep = Annotated[ApiState, Depends(_state)]


# FastAPI closes a dependency with yield once the response has been sent: a session that then
# failed to close (its connection ended by a Postgres restart) raised out of the app, a
# traceback and a dropped keep-alive connection for an answer already given.
async def _session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with closed_quietly(state.sessions) as session:
        yield session


async def _settings(state: StateDep) -> Settings:
    return state.settings


async def _arq(state: StateDep) -> ArqRedis:
    return state.arq


async def _summaries(state: StateDep) -> JobSummaries:
    return state.summaries


async def _presets(state: StateDep) -> Presets:
    return state.presets


# A route that ends in a wait (a worker thread of the shared pool, a plot's turn) closes it once
# its reads are done (json_answer does), giving its connection back; what it read stays loaded.
SessionDep = Annotated[AsyncSession, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ArqDep = Annotated[ArqRedis, Depends(_arq)]
SummariesDep = Annotated[JobSummaries, Depends(_summaries)]
PresetsDep = Annotated[Presets, Depends(_presets)]

_bearer = HTTPBearer(auto_error=False, description="An API key made by `aidsafe keys create`.")


def client_address(request: Request) -> str:
    """The client's address (behind a proxy named in --forwarded-allow-ips, the one it forwards)."""
    return request.client.host if request.client else "unknown"


def threads_in_turns_of(state: ApiState, key_id: UUID) -> AbstractContextManager[None]:
    """Inside, the request's calls for a worker thread take the turns of the API key `key_id`
    (ApiState.thread_turns): one key's burst of CPU-heavy requests holds a few of the process's
    threads, and another key's request waits behind the few, not behind the whole burst."""
    return threads.in_turns(partial(state.thread_turns.turn, key_id))


# With yield, so that the turns end with the request (a test's requests share its context).
async def _current_key(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AsyncIterator[ApiKey]:
    if credentials is None:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    key = await state.known_keys.authenticate(credentials.credentials, client_address(request))
    with threads_in_turns_of(state, key.id):
        yield key


CurrentKey = Annotated[ApiKey, Depends(_current_key)]


async def _key_write_session(state: StateDep, key: CurrentKey) -> AsyncIterator[AsyncSession]:
    async with state.key_turns.turn(key.id), closed_quietly(state.sessions) as session:
        yield session


# The session of a request that locks its key's row (keys.hold), opened in the key's turn in
# this process (app/api/key_turns.py): the key's other such requests wait without a connection.
# Declare it after the body, which is then read before the turn, not while the key waits. The
# order matters: a body holds its turn until the answer, and a route taking the key's turn
# before a body turn could deadlock with the key's requests holding every body turn (tested).
KeyWriteSession = Annotated[AsyncSession, Depends(_key_write_session)]


async def _reads_hazardous(key: CurrentKey) -> bool:
    return keys.reads_hazardous(key)


# Whether the caller may read hazardous text (whispered beliefs, rejected CoTs, guard rationales).
ReadsHazardous = Annotated[bool, Depends(_reads_hazardous)]


def job_owned_by(key: Callable[..., AsyncIterator[ApiKey]]) -> Callable[..., Awaitable[Job]]:
    """A dependency giving the route the job in its path if the key `key` gives owns it,
    NotFound otherwise (another key's job does not exist for this one). The key is
    resolved first, so a request without one is a 401 whatever the job."""

    async def owned(job_id: UUID, session: SessionDep, owner: ApiKey) -> Job:
        return await jobs.get_owned(session, job_id, owner.id)

    # Set as an object: this module's string annotations cannot name the local `key`.
    owned.__annotations__["owner"] = Annotated[ApiKey, Depends(key)]
    return owned


# The caller's job named by the path's `job_id`, or 404. Its lookup opens the request's session,
# whose connection is then held, in a transaction, until the request ends: a route that also
# reads a body declares the key, then the body, then the job, so that no connection waits on a
# body (which may come slowly, timed only between bytes: one key's slow bodies held the pool).
OwnedJob = Annotated[Job, Depends(job_owned_by(_current_key))]
