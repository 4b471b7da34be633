"""Dependencies as types: a route's signature says what it needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from arq.connections import ArqRedis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.known_keys import KnownKeys
from app.api.summaries import JobSummaries
from app.config import Settings
from app.errors import Unauthorized
from app.store import keys
from app.store.models import ApiKey


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _arq(request: Request) -> ArqRedis:
    return request.app.state.arq


def _summaries(request: Request) -> JobSummaries:
    return request.app.state.summaries


SessionDep = Annotated[AsyncSession, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ArqDep = Annotated[ArqRedis, Depends(_arq)]
SummariesDep = Annotated[JobSummaries, Depends(_summaries)]

_bearer = HTTPBearer(auto_error=False, description="An API key made by `aidsafe keys create`.")


async def _current_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    if credentials is None:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    known_keys: KnownKeys = request.app.state.known_keys
    return await known_keys.authenticate(credentials.credentials)


CurrentKey = Annotated[ApiKey, Depends(_current_key)]


def _reads_hazardous(key: CurrentKey) -> bool:
    return keys.reads_hazardous(key)


# Whether the caller may read hazardous text (whispered beliefs, rejected CoTs, guard rationales).
ReadsHazardous = Annotated[bool, Depends(_reads_hazardous)]
