"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.errors import error_response
from app.api.schemas import ErrorOut
from app.api.state import ApiState, api_state
from app.preflight import postgres_too_old, server_version_num

router = APIRouter(tags=["health"])
_CHECK_TIMEOUT_S = 3
# Anyone may ask, with no key: one check's answer serves every request for this long, and the
# requests that come while it runs wait for it, so a flood of them takes one connection of
# the pool, not all of it from the tenants.
READINESS_MAX_AGE_S = 1.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorOut}})
async def readyz(request: Request) -> JSONResponse:
    """Postgres and Redis both answer within a few seconds, and Postgres is recent enough for
    the schema (as checked at most READINESS_MAX_AGE_S ago)."""
    state = api_state(request)
    problems = await state.readiness.get(None, lambda: _problems(state))
    if problems:
        return error_response(503, "not_ready", "; ".join(problems))
    return JSONResponse({"status": "ready"})


async def _problems(state: ApiState) -> list[str]:
    """What does not answer, of Postgres and Redis, or a Postgres too old."""
    problems = []
    try:
        # Here, not as the API starts: it starts without Postgres, to spool webhook deliveries.
        async with asyncio.timeout(_CHECK_TIMEOUT_S), state.sessions() as session:
            version_num = await session.run_sync(server_version_num)
    except Exception as exc:
        problems.append(f"postgres: {type(exc).__name__}")
    else:
        if (too_old := postgres_too_old(version_num)) is not None:
            problems.append(f"postgres: {too_old}")
    try:
        # A hung Redis holds a call its timeout, twice (app/queue.py); a probe answers sooner.
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            await state.arq.ping()
    except Exception as exc:
        problems.append(f"redis: {type(exc).__name__}")
    return problems
