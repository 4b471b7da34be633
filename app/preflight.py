"""Is this deployment fit to run items? `aidsafe-worker --check` asks before anything starts;
a worker or the API starting asks the part that its own work depends on (PostgreSQL's version
and schema, Redis) and logs what is wrong.

Each check names one thing and what to do about it. A failure means items would fail or be
put at risk (no such database, a PostgreSQL older than 15, a schema this code does not match,
a Redis older than 6.2 or one that may evict leases and queue marks, an endpoint that does not
answer or refuses the key); a warning, that it could not be told (an endpoint without a model
list, or one not listing the model)."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from enum import StrEnum

import aiohttp
import orjson
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError
from sqlalchemy import Connection, event, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from app.config import EndpointConfig, Settings
from app.store.db import make_engine
from app.store.models import SCHEMA_REVISION

CHECK_TIMEOUT_S = 5.0
_UNDEFINED_TABLE = "42P01"
# What a failure of the database check is reported as, by the step it failed in.
_CONNECTING = "unreachable"
_SETTING_UP = "reached, but cannot set up a connection (SQLAlchemy's first queries)"
_READING_VERSION = "cannot read the server's version (SHOW server_version_num)"
_READING_REVISION = "cannot read the schema's revision"
# LMOVE, with which workers replay the delivery spool, came in Redis 6.2; every other command
# the service sends (arq's included) is older.
MIN_REDIS_VERSION = (6, 2)
# The schema's unique keys use NULLS NOT DISTINCT, which came in PostgreSQL 15.
MIN_POSTGRES_VERSION = 15


class Verdict(StrEnum):
    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"


@dataclass(frozen=True)
class Finding:
    check: str  # "postgres", "redis", "llm:<endpoint>"
    verdict: Verdict
    detail: str


async def deployment(settings: Settings) -> list[Finding]:
    """Every check, the LLM endpoints included."""
    found = await dependencies(settings)
    endpoints = settings.endpoints()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S)) as http:
        found += await asyncio.gather(*(_endpoint(http, name, endpoints[name]) for name in sorted(endpoints)))
    return found


async def dependencies(settings: Settings) -> list[Finding]:
    """What every item depends on: the database (its version and schema) and Redis."""
    return list(await asyncio.gather(_schema(settings), _redis(settings)))


# A warning is what could not be told (a managed Redis denying INFO): logged on every start,
# an error for it would page someone each time for a deployment that may well be fine.
_LOG_LEVELS = {Verdict.FAILED: logging.ERROR, Verdict.WARNING: logging.WARNING}


async def log_problems(settings: Settings, log: logging.Logger) -> None:
    """Log what `dependencies` finds wrong, a failure as an error and a warning as a warning.
    Not a refusal to start: a rolling upgrade runs the old release against the new schema for
    a while. But a failed item or request should not be the first sign of a wrong deployment."""
    for finding in await dependencies(settings):
        if finding.verdict is not Verdict.OK:
            log.log(_LOG_LEVELS[finding.verdict], "deployment check, %s: %s", finding.check, finding.detail)


async def _schema(settings: Settings) -> Finding:
    engine = make_engine(settings.database_url, CHECK_TIMEOUT_S, connections=1)
    failing = _CONNECTING  # the step under way: what a failure is reported as

    def reached(*_: object) -> None:
        nonlocal failing
        failing = _SETTING_UP

    # Inserted before the dialect's own listener, which asks the server's version and settings.
    event.listen(engine.sync_engine, "first_connect", reached, insert=True)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), engine.connect() as connection:
            failing = _READING_VERSION
            version_num = await connection.run_sync(server_version_num)
            if (too_old := postgres_too_old(version_num)) is not None:
                return Finding("postgres", Verdict.FAILED, too_old)
            failing = _READING_REVISION
            revision = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except ProgrammingError as error:
        undefined_table = getattr(error.orig, "sqlstate", None) == _UNDEFINED_TABLE
        if failing != _READING_REVISION or not undefined_table:  # a permission denied, say
            return Finding("postgres", Verdict.FAILED, f"{failing}: {_reason(error)}")
        revision = None  # no alembic_version: never migrated
    except Exception as error:
        return Finding("postgres", Verdict.FAILED, f"{failing}: {_reason(error)}")
    finally:
        await engine.dispose()
    if revision == SCHEMA_REVISION:
        return Finding(
            "postgres", Verdict.OK, f"PostgreSQL {_postgres_release(version_num)}, schema at {revision}"
        )
    now = "has no schema" if revision is None else f"schema is at {revision}"
    return Finding(
        "postgres",
        Verdict.FAILED,
        f"the database {now}; this code needs {SCHEMA_REVISION}: run `alembic upgrade head` "
        "with this release (or run the release that matches the database)",
    )


def server_version_num(connection: Connection | Session) -> int:
    """The server's `server_version_num` (150004 for 15.4): what postgres_too_old judges."""
    return int(connection.execute(text("SHOW server_version_num")).scalar_one())


def postgres_too_old(version_num: int) -> str | None:
    """Why a server whose `server_version_num` this is cannot hold the schema, or None if it
    is MIN_POSTGRES_VERSION or later."""
    if version_num >= MIN_POSTGRES_VERSION * 10000:
        return None
    return (
        f"PostgreSQL {_postgres_release(version_num)} is older than {MIN_POSTGRES_VERSION}, which the "
        "service needs (the schema's unique keys use NULLS NOT DISTINCT): upgrade it to "
        f"{MIN_POSTGRES_VERSION} or later"
    )


def _postgres_release(version_num: int) -> str:
    """`server_version_num` as people write it: 150004 is 15.4, 90624 is 9.6.24."""
    major, rest = divmod(version_num, 10000)
    return f"{major}.{rest}" if major >= 10 else f"{major}.{rest // 100}.{rest % 100}"


async def _redis(settings: Settings) -> Finding:
    client = Redis.from_url(
        settings.redis_url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S
    )
    try:
        info = await client.info()  # its default sections hold the version and the memory's
    except NoPermissionError:  # an ACL, as managed Redis services set: it answered, but not this
        denied = "INFO is denied: cannot tell Redis's version nor whether it may evict keys"
        return Finding("redis", Verdict.WARNING, denied)
    except Exception as error:
        return Finding("redis", Verdict.FAILED, f"unreachable: {_reason(error)}")
    finally:
        await client.aclose()
    version = str(info.get("redis_version", "unknown"))
    if redis_too_old(version):
        wanted = ".".join(map(str, MIN_REDIS_VERSION))
        return Finding(
            "redis",
            Verdict.FAILED,
            f"Redis {version} is older than {wanted}, which the service needs (LMOVE, for the "
            f"delivery spool): upgrade it to {wanted} or later",
        )
    policy, limit = info.get("maxmemory_policy", "noeviction"), int(info.get("maxmemory", 0))
    if policy == "noeviction" or limit == 0:
        return Finding(
            "redis", Verdict.OK, f"Redis {version}, maxmemory-policy {policy}, maxmemory {limit or 'unset'}"
        )
    # Managed Redis (ElastiCache, Memorystore) defaults to volatile-lru, which evicts first
    # exactly the keys with a lifetime: running jobs' marks, LLM slots, budget counters.
    return Finding(
        "redis",
        Verdict.FAILED,
        f"maxmemory-policy is {policy} with maxmemory {limit}: under memory pressure Redis would "
        "drop queue entries, running jobs' marks and LLM slots (items started twice, the LLM cap "
        "exceeded); set maxmemory-policy noeviction",
    )


def redis_too_old(version: str) -> bool:
    """Whether INFO's `redis_version` is older than MIN_REDIS_VERSION (False if it is not
    major.minor...: a Redis-compatible server may say anything)."""
    numbers = re.match(r"(\d+)\.(\d+)", version)
    return numbers is not None and (int(numbers[1]), int(numbers[2])) < MIN_REDIS_VERSION


async def _endpoint(http: aiohttp.ClientSession, name: str, endpoint: EndpointConfig) -> Finding:
    check = f"llm:{name}"
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    url = f"{endpoint.base_url.rstrip('/')}/models"
    try:
        async with http.get(url, headers=headers) as answer:
            status, body = answer.status, await answer.read()
    except Exception as error:
        return Finding(check, Verdict.FAILED, f"{url} unreachable: {_reason(error)}")
    if status in (401, 403):
        return Finding(check, Verdict.FAILED, f"{url} refused the API key (HTTP {status})")
    if status >= 500 and status != 501:  # a gateway whose model server is down (501: no such route)
        return Finding(check, Verdict.FAILED, f"{url} answered HTTP {status}: the server is failing")
    served = _model_ids(body) if status < 300 else None
    if served is None:
        return Finding(check, Verdict.WARNING, f"{url} answered HTTP {status} but no model list")
    listed = ", ".join(sorted(served)) or "none"
    model = endpoint.default_model
    if model is None or model in served:
        return Finding(check, Verdict.OK, f"{url} answers; it lists {listed}")
    # Proxies may serve names they do not list (aliases, deployments): worth a look, not a stop.
    return Finding(check, Verdict.WARNING, f"{url} does not list the model {model!r} (it lists {listed})")


def _model_ids(body: bytes) -> set[str] | None:
    """The ids of an OpenAI-style model list, or None if the body is not one."""
    try:
        listed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    models = listed.get("data") if isinstance(listed, dict) else None
    if not isinstance(models, list):
        return None
    return {str(model["id"]) for model in models if isinstance(model, dict) and "id" in model}


def _reason(error: BaseException) -> str:
    """The error in a line: the driver's own for a database error (SQLAlchemy wraps it twice,
    adding lines of its own)."""
    cause = getattr(error, "orig", None) or error
    cause = cause.__cause__ or cause
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
