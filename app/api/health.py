"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.errors import error_response
from app.api.schemas import ErrorOut
from app.api.state import api_state

router = APIRouter(tags=["health"])
_CHECK_TIMEOUT_S = 3


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorOut}})
async def readyz(request: Request) -> JSONResponse:
    """Postgres and Redis both answer within a few seconds."""
    problems = []
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S), api_state(request).sessions() as session:
            await session.execute(text("select 1"))
    except Exception as exc:
        problems.append(f"postgres: {type(exc).__name__}")
    try:
        # A hung Redis holds a call its timeout, twice (app/queue.py); a probe answers sooner.
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            await api_state(request).arq.ping()
    except Exception as exc:
        problems.append(f"redis: {type(exc).__name__}")
    if problems:
        return error_response(503, "not_ready", "; ".join(problems))
    return JSONResponse({"status": "ready"})
