"""The one JSON error shape, {"error": {"code", "message", "details"}}, mapped in one place."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ClusterDownError, OutOfMemoryError, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from app.api.schemas import ErrorOut
from app.errors import InvalidRequest, ServiceError
from app.store.db import database_away

log = logging.getLogger("aidsafe.api")

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")  # those a route may serve
_WHY = {
    400: (
        "Malformed request: a body that is not UTF-8 JSON text sent as application/json (or is "
        "sent compressed: a Content-Encoding, a Transfer-Encoding but chunked), or a cursor this "
        "API did not return, or that another listing returned (invalid_cursor)."
    ),
    401: (
        "No API key, or an unknown or revoked one (a 429 too_many_wrong_keys instead, until "
        "Retry-After, from a client address, or an IPv6 one's /64 network, that sent too many "
        "lately)."
    ),
    403: "The API key lacks the scope this request needs (missing_scope).",
    404: "No such resource visible to this API key.",
    408: (
        "No byte of the request's body came for AIDSAFE_BODY_STALL_S (30 s by default; "
        "request_timeout): the body is refused, and may be sent again."
    ),
    409: (
        "The Idempotency-Key was already used with a different request body (idempotency_conflict), "
        "or the job to delete is still running (job_running) or compared (job_in_comparison)."
    ),
    413: (
        "The request body is over a size limit: its bytes, its JSON values, or what an uploaded "
        "file decodes to."
    ),
    422: (
        "The request is invalid: validation_error (details name each field and its problem), or a "
        "code naming what the service will not take, such as invalid_config, unknown_policy_set, "
        "request_too_large or invalid_sample_file (the README's HTTP API section lists every code)."
    ),
    429: (
        "Come back after Retry-After: an unknown or revoked API key from a client address (an IPv6 "
        "one: its /64 network) that sent too many lately (too_many_wrong_keys); this key's requests "
        "waiting for their turn past AIDSAFE_MAX_WAITING_PER_KEY (too_many_waiting); or, for "
        "progress streams and exports, as many open as the key or the server may, or the rest kept "
        "for keys with none (too_many_streams)."
    ),
    503: "The database or the queue (Redis) is unavailable (unavailable); retry shortly.",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route really returns, all in the one error
    shape (a listed 422 also replaces FastAPI's own HTTPValidationError, which we never send)."""
    return {status: {"model": ErrorOut, "description": _WHY[status]} for status in statuses}


def documented_beside_a_stream(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """As `documented`, for a route whose success is not JSON (an event stream): FastAPI would
    list the errors under the route's media type, but they are JSON like every other."""
    return {status: described(status) for status in statuses}


def described(status: int) -> dict[str, Any]:
    """The OpenAPI response of an error status, in the one error shape, as FastAPI would make
    it of `documented`'s entry: for where FastAPI makes none (an operation's `openapi_extra`)."""
    error = {"$ref": f"#/components/schemas/{ErrorOut.__name__}"}
    return {"description": _WHY[status], "content": {"application/json": {"schema": error}}}


# Our own 503s say when to come back, as proxies' do: a restarting Postgres or Redis is back in
# seconds, and clients (our SDK among them) wait a Retry-After out rather than guess.
RETRY_SHORTLY = {"Retry-After": "2"}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"code": code, "message": message, "details": details}},
        headers=headers,
    )


def service_error_response(exc: ServiceError) -> JSONResponse:
    """`exc` in the one error shape, with its Retry-After if it has one."""
    headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
    return error_response(exc.status, exc.code, exc.message, exc.details, headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    # The client closed its connection before its body had come: no bug of ours to log as one
    # (a 500 and a traceback, as often as a client liked), and nobody reads the answer.
    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        return error_response(400, "bad_request", "the connection closed before the request's body had come")

    @app.exception_handler(RequestValidationError)  # path, query and header parameters
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        invalid = InvalidRequest.of(exc.errors())
        return error_response(invalid.status, invalid.code, invalid.message, invalid.details)

    # A connection to Postgres refused, reset or timed out before SQLAlchemy wraps it; other
    # OSErrors (a file, a socket of another service) are bugs, not "the database is away".
    @app.exception_handler(ConnectionError)
    @app.exception_handler(TimeoutError)
    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    # Statements sent on the asyncpg connection itself (app/store/db.py driver_connection):
    # connection lost, Postgres shutting down or starting up, or a statement it ended at the
    # database timeout (QueryCanceledError).
    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(asyncpg.OperatorInterventionError)
    @app.exception_handler(asyncpg.InterfaceError)
    # No connection of the API's pool came free in time: they are all in use.
    @app.exception_handler(PoolTimeoutError)
    async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error_response(
            503, "unavailable", "the database is unavailable; retry shortly", headers=RETRY_SHORTLY
        )

    # Redis refused, reset, timed out (`redis_timeout_s`), failing over (a replica's READONLY)
    # or full: a retry can go through. Requests that must not fail on it catch it themselves (a
    # submission's enqueue: the sweeper redoes it). Its other errors (a script's) are bugs, 500.
    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    @app.exception_handler(ReadOnlyError)
    @app.exception_handler(OutOfMemoryError)
    @app.exception_handler(TryAgainError)
    @app.exception_handler(ClusterDownError)
    async def _redis_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return error_response(
            503, "unavailable", "the queue is unavailable; retry shortly", headers=RETRY_SHORTLY
        )

    # SQLAlchemy wraps most of what asyncpg raises in a bare DBAPIError (or InternalError), the
    # faults above included: a connection the server closed mid-statement (a restart, a
    # failover), Postgres shutting down or starting up, a statement it ended at the database
    # timeout. Answered 500, a client gives up where a retry would go through. Any other is a
    # bug, answered 500 as before.
    @app.exception_handler(DBAPIError)
    async def _statement_failed(request: Request, exc: DBAPIError) -> JSONResponse:
        if not database_away(exc):
            raise exc
        return await _database_unavailable(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        # Starlette's own headers, such as a 405's `Allow`, are part of the answer.
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette's names the methods of the first route on the path only: GET /v1/jobs
            # and POST /v1/jobs are two routes.
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    # Last resort, for a bug: still the one shape, and nothing of the request or the failed
    # statement in the answer. Starlette re-raises afterwards, so the server logs the traceback.
    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", "an unexpected error occurred; it was logged")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on the request's path, asked of the routes themselves
    (included routers nest them)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
