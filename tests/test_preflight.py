"""`aidsafe-worker --check` and the checks a worker makes as it starts, against real services:
the session's migrated database and others at older revisions, the shared Redis and one of the
test's own set to evict, and the scripted LLM servers' model lists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import asyncpg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from redis.asyncio import Redis
from sqlalchemy import make_url

from app import preflight
from app.config import Settings
from app.preflight import Finding, Verdict
from app.store.models import SCHEMA_REVISION
from tests.conftest import PG_ADMIN_DSN, ROOT, _admin, api_client, restartable_redis, worker_env
from tests.scripted_llm import ScriptedLLM


def _verdicts(found: list[Finding]) -> dict[str, Verdict]:
    return {finding.check: finding.verdict for finding in found}


def _detail(found: list[Finding], check: str) -> str:
    return next(finding.detail for finding in found if finding.check == check)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_models_schema_revision_is_alembics_head() -> None:
    """Else a worker would take a current database for an old one, or the reverse."""
    head = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_current_head()
    assert head == SCHEMA_REVISION


async def test_a_deployment_as_the_tests_run_it_checks_out(
    settings: Settings, migrated: str, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.listed_models = ["other-model", "scripted-model"]
    second_llm.listed_models = ["second-model"]

    found = await preflight.deployment(settings)

    assert _verdicts(found) == {
        "postgres": Verdict.OK,
        "redis": Verdict.OK,
        "llm:default": Verdict.OK,
        "llm:second": Verdict.OK,
    }
    assert SCHEMA_REVISION in _detail(found, "postgres")
    assert "other-model, scripted-model" in _detail(found, "llm:default")


async def test_a_database_behind_the_code_or_never_migrated_fails_naming_both_revisions(
    settings: Settings, old_database: tuple[Config, str]
) -> None:
    config, _ = old_database
    old = settings.model_copy(update={"database_url": config.attributes["database_url"]})

    never_migrated = await preflight.dependencies(old)
    await asyncio.to_thread(command.upgrade, config, "0027_purge_retries")
    behind = await preflight.dependencies(old)
    await asyncio.to_thread(command.upgrade, config, "head")
    current = await preflight.dependencies(old)

    assert _verdicts(never_migrated)["postgres"] is Verdict.FAILED
    assert "has no schema" in _detail(never_migrated, "postgres")
    assert _verdicts(behind)["postgres"] is Verdict.FAILED
    assert "0027_purge_retries" in _detail(behind, "postgres")
    assert SCHEMA_REVISION in _detail(behind, "postgres")
    assert "alembic upgrade head" in _detail(behind, "postgres")
    assert _verdicts(current)["postgres"] is Verdict.OK


async def test_unreachable_postgres_and_redis_fail_each_on_its_own(settings: Settings) -> None:
    nowhere = settings.model_copy(
        update={
            "database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/aidsafe",
            "redis_url": f"redis://127.0.0.1:{_closed_port()}/0",
        }
    )

    found = await preflight.dependencies(nowhere)

    assert _verdicts(found) == {"postgres": Verdict.FAILED, "redis": Verdict.FAILED}
    assert all(_detail(found, check).startswith("unreachable: ") for check in ("postgres", "redis"))


async def test_the_redis_check_names_the_version_it_found(settings: Settings) -> None:
    client = Redis.from_url(settings.redis_url)
    try:
        version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()

    found = await preflight.dependencies(settings)

    assert _verdicts(found)["redis"] is Verdict.OK
    assert _detail(found, "redis").startswith(f"Redis {version}, ")


async def test_the_postgres_check_names_the_version_it_found(settings: Settings, migrated: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN)  # the same server
    try:
        version = await connection.fetchval("SHOW server_version")  # "15.4 (Debian 15.4-1)"
    finally:
        await connection.close()

    found = await preflight.dependencies(settings)

    assert _verdicts(found)["postgres"] is Verdict.OK
    assert _detail(found, "postgres").startswith(f"PostgreSQL {version.split()[0]}, schema at ")


@contextlib.asynccontextmanager
async def _relay_misspelling(host: str, port: int, word: bytes, misspelt: bytes) -> AsyncIterator[int]:
    """The port of a relay to the PostgreSQL at host:port that misspells `word` in what it is
    sent (plain TCP, no TLS): a PostgreSQL-like server that does not know that word."""

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, client: bool) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data.replace(word, misspelt) if client else data)
                await sink.drain()
        finally:
            sink.close()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(
            pipe(client_reader, server_writer, client=True),
            pipe(server_reader, client_writer, client=False),
            return_exceptions=True,
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_server_that_cannot_tell_its_version_fails_saying_so(
    settings: Settings, migrated: str
) -> None:
    """Not PostgreSQL, or a pooler's console: `SHOW server_version_num` is refused. The check
    reached the server, and the schema's revision is not what it could not read."""
    url = make_url(settings.database_url)
    assert url.host is not None and url.port is not None
    async with _relay_misspelling(url.host, url.port, b"server_version_num", b"server_version_nux") as port:
        relayed = url.set(host="127.0.0.1", port=port).update_query_dict({"ssl": "disable"})
        found = await preflight.dependencies(
            settings.model_copy(update={"database_url": relayed.render_as_string(hide_password=False)})
        )

    assert _verdicts(found)["postgres"] is Verdict.FAILED
    assert _detail(found, "postgres").startswith(
        "cannot read the server's version (SHOW server_version_num): "
    ), _detail(found, "postgres")
    assert "server_version_nux" in _detail(found, "postgres")


async def test_a_server_reached_that_fails_the_first_queries_of_a_connection_is_not_unreachable(
    settings: Settings, migrated: str
) -> None:
    """SQLAlchemy's first connection asks `SELECT pg_catalog.version()` (and more) before the
    check's own queries: a server that cannot answer it was reached all the same."""
    url = make_url(settings.database_url)
    assert url.host is not None and url.port is not None
    async with _relay_misspelling(url.host, url.port, b"pg_catalog.version", b"pg_catalog.versiox") as port:
        relayed = url.set(host="127.0.0.1", port=port).update_query_dict({"ssl": "disable"})
        found = await preflight.dependencies(
            settings.model_copy(update={"database_url": relayed.render_as_string(hide_password=False)})
        )

    assert _verdicts(found)["postgres"] is Verdict.FAILED
    assert _detail(found, "postgres").startswith(
        "reached, but cannot set up a connection (SQLAlchemy's first queries): "
    ), _detail(found, "postgres")
    assert "versiox" in _detail(found, "postgres")


def test_a_postgresql_older_than_15_is_too_old_and_the_refusal_names_both_versions() -> None:
    """The schema's unique keys use NULLS NOT DISTINCT, which came in 15. Versions before 10
    had three parts (90624 is 9.6.24)."""
    assert preflight.postgres_too_old(150000) is None
    assert preflight.postgres_too_old(170002) is None
    assert preflight.postgres_too_old(140011) == (
        "PostgreSQL 14.11 is older than 15, which the service needs (the schema's unique keys use "
        "NULLS NOT DISTINCT): upgrade it to 15 or later"
    )
    assert str(preflight.postgres_too_old(90624)).startswith("PostgreSQL 9.6.24 is older than 15")


def test_a_redis_older_than_6_2_is_too_old() -> None:
    """LMOVE, which replays the delivery spool, came in 6.2. The version is compared as numbers
    (10.0 is newer than 6.2); a server that names no major.minor is let through."""
    too_old = {version: preflight.redis_too_old(version) for version in ("5.0.14", "6.0.16", "6.2.0")}
    recent = {version: preflight.redis_too_old(version) for version in ("7.0.15", "10.0.0", "unknown")}
    assert too_old == {"5.0.14": True, "6.0.16": True, "6.2.0": False}
    assert recent == {"7.0.15": False, "10.0.0": False, "unknown": False}


async def test_a_redis_that_may_evict_keys_fails_and_one_that_never_does_passes(
    settings: Settings, migrated: str, tmp_path: Path
) -> None:
    with restartable_redis(tmp_path) as (url, _):
        own = settings.model_copy(update={"redis_url": url})
        client = Redis.from_url(url)
        try:
            unbounded = await preflight.dependencies(own)  # no maxmemory: nothing is ever evicted
            await client.config_set("maxmemory", "100mb")
            await client.config_set("maxmemory-policy", "volatile-lru")  # managed Redis's default
            evicting = await preflight.dependencies(own)
            await client.config_set("maxmemory-policy", "noeviction")
            refusing = await preflight.dependencies(own)
        finally:
            await client.aclose()

    assert _verdicts(unbounded)["redis"] is Verdict.OK
    assert _verdicts(evicting)["redis"] is Verdict.FAILED
    assert "volatile-lru" in _detail(evicting, "redis")
    assert "noeviction" in _detail(evicting, "redis")
    assert _verdicts(refusing)["redis"] is Verdict.OK


async def test_an_endpoint_refusing_the_key_or_unreachable_fails_and_one_unlisting_warns(
    settings: Settings, migrated: str, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.models_status = 401
    second_llm.listed_models = ["someone-else"]
    refused = await preflight.deployment(settings)
    scripted_llm.models_status = 404  # a server without a model list
    unlisted = await preflight.deployment(settings)
    scripted_llm.models_status = 501  # a gateway without the route
    unimplemented = await preflight.deployment(settings)
    scripted_llm.models_status = 502  # a gateway whose model server is down
    failing = await preflight.deployment(settings)
    gone = await preflight.deployment(
        settings.model_copy(update={"llm_base_url": f"http://127.0.0.1:{_closed_port()}/v1"})
    )

    assert _verdicts(refused)["llm:default"] is Verdict.FAILED
    assert "refused the API key" in _detail(refused, "llm:default")
    assert _verdicts(refused)["llm:second"] is Verdict.WARNING
    assert "'second-model'" in _detail(refused, "llm:second")
    assert "someone-else" in _detail(refused, "llm:second")
    assert _verdicts(unlisted)["llm:default"] is Verdict.WARNING
    assert "HTTP 404" in _detail(unlisted, "llm:default")
    assert _verdicts(unimplemented)["llm:default"] is Verdict.WARNING
    assert _verdicts(failing)["llm:default"] is Verdict.FAILED
    assert "HTTP 502" in _detail(failing, "llm:default")
    assert _verdicts(gone)["llm:default"] is Verdict.FAILED
    assert "unreachable" in _detail(gone, "llm:default")


def _check(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "--check"],
        cwd=ROOT,
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_aidsafe_worker_check_prints_each_finding_and_exits_1_only_on_a_failure(
    settings: Settings,
    migrated: str,
    old_database: tuple[Config, str],
    scripted_llm: ScriptedLLM,
    second_llm: ScriptedLLM,
) -> None:
    scripted_llm.listed_models = ["scripted-model"]
    config, _ = old_database
    await asyncio.to_thread(command.upgrade, config, "0027_purge_retries")

    warned = await asyncio.to_thread(_check, settings)  # second-model is not listed: a warning
    behind = await asyncio.to_thread(
        _check, settings.model_copy(update={"database_url": config.attributes["database_url"]})
    )

    assert warned.returncode == 0, warned.stderr
    assert [line.split()[:2] for line in warned.stdout.splitlines()] == [
        ["ok", "postgres"],
        ["ok", "redis"],
        ["ok", "llm:default"],
        ["warning", "llm:second"],
    ]
    assert behind.returncode == 1, behind.stderr
    assert behind.stdout.splitlines()[0].split()[:2] == ["failed", "postgres"]


async def test_a_worker_starting_on_a_database_behind_its_code_says_so_and_runs_on(
    settings: Settings, migrated: str, old_database: tuple[Config, str]
) -> None:
    """It logs the finding rather than refusing: a rolling upgrade runs the old release against
    the new schema for a while."""
    config, _ = old_database
    await asyncio.to_thread(command.upgrade, config, "0027_purge_retries")
    behind = settings.model_copy(update={"database_url": config.attributes["database_url"]})
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers",
        cwd=ROOT,
        env=worker_env(behind),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert worker.stderr is not None
        first = (await asyncio.wait_for(worker.stderr.readline(), timeout=60)).decode()
        await asyncio.sleep(1)
        running = worker.returncode is None
    finally:
        worker.kill()
        # Drained, not just waited for: Python 3.12's wait() returns only once the pipes are
        # closed too, and a stderr left unread past its buffer is paused and never sees its
        # end (once in CI this test hung there, the worker long gone). Bounded all the same.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.communicate(), timeout=30)

    assert "deployment check, postgres" in first
    assert "0027_purge_retries" in first
    assert running


class _Errors(logging.Handler):
    """The errors a logger logs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_an_api_starting_on_a_database_never_migrated_says_so_and_serves_on(
    settings: Settings, migrated: str, old_database: tuple[Config, str]
) -> None:
    """Its requests would fail with a missing table: the log says why, and what to run, before
    the first request (whose connection the check's would otherwise be taken for)."""
    config, _ = old_database
    unmigrated = settings.model_copy(update={"database_url": config.attributes["database_url"]})
    errors, logger = _Errors(), logging.getLogger("app.main")
    logger.addHandler(errors)
    try:
        async with api_client(unmigrated) as api:
            logged_before_serving = list(errors.messages)
            alive = await api.get("/healthz")
    finally:
        logger.removeHandler(errors)

    [message] = logged_before_serving
    assert message.startswith("deployment check, postgres: the database has no schema;")
    assert "run `alembic upgrade head`" in message
    assert alive.status_code == 200


@contextlib.asynccontextmanager
async def _redis_denying_info(tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a Redis of the test's own, as a user its ACL denies INFO (as managed Redis
    services do) and allows every other command."""
    with restartable_redis(tmp_path) as (redis_url, _):
        admin = Redis.from_url(redis_url)
        try:
            await admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-info")
        finally:
            await admin.aclose()
        yield redis_url.replace("redis://", "redis://app:pw@")


async def test_a_redis_denying_info_or_a_database_denying_its_revision_is_not_called_unmigrated(
    settings: Settings, migrated: str, old_database: tuple[Config, str], tmp_path: Path
) -> None:
    """Managed Redis services deny INFO by ACL (workers/liveness.py copes): reachable, the
    policy unknown. A role that may not read alembic_version has a schema all the same."""
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "head")
    role = f"aidsafe_test_reader_{uuid4().hex[:8]}"  # roles are the server's: dropped below
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"CREATE ROLE {role} LOGIN")
    finally:
        await connection.close()
    url = make_url(config.attributes["database_url"]).set(username=role)
    async with _redis_denying_info(tmp_path) as redis_url:
        denied = settings.model_copy(
            update={"redis_url": redis_url, "database_url": url.render_as_string(hide_password=False)}
        )
        try:
            found = await preflight.dependencies(denied)
        finally:
            await _admin(f"DROP ROLE {role}")  # its connections are closed: no database holds it

    assert _verdicts(found) == {"postgres": Verdict.FAILED, "redis": Verdict.WARNING}
    assert "cannot read the schema's revision" in _detail(found, "postgres")
    assert "permission denied" in _detail(found, "postgres")
    assert "INFO is denied" in _detail(found, "redis")


async def test_a_redis_denying_info_is_logged_as_a_warning_as_each_process_starts(
    settings: Settings, migrated: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It could not be told, not found wrong: logged as an error, it was one on every start of
    every worker and API process on a managed Redis."""
    logger = logging.getLogger("aidsafe.test_preflight")
    async with _redis_denying_info(tmp_path) as redis_url:
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            await preflight.log_problems(settings.model_copy(update={"redis_url": redis_url}), logger)

    [logged] = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert logged == (
        "WARNING",
        "deployment check, redis: INFO is denied: cannot tell Redis's version nor whether it may evict keys",
    )


def test_the_readmes_sample_check_shows_the_schema_this_release_needs() -> None:
    """The README shows `aidsafe-worker --check`'s answer; a migration added since would make
    its schema line one the check now fails on."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.findall(r"^ok\s+postgres\s+PostgreSQL \S+, schema at (\S+)$", readme, re.MULTILINE)
    assert shown == [SCHEMA_REVISION]
