"""AIDSAFE_DATABASE_URL in the libpq form hosted databases hand out (`postgres://`, no driver,
`?sslmode=verify-full&sslrootcert=...`) connects as libpq would: asyncpg reads its options, the
service's engines and the migrations alike. An option the service cannot honour, or a driver
other than asyncpg, is refused when the settings load, named, the URL never quoted (it may carry
a password)."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from alembic import command
from alembic.config import Config
from pydantic import ValidationError
from sqlalchemy import URL, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import AsyncAdaptedQueuePool

from app.config import Settings
from app.store.db import Sessions, make_engine
from tests.conftest import ROOT
from tests.tls_postgres import (
    CERTIFICATE_USER,
    CLIENT_KEY_PASSWORD,
    DATABASE,
    PASSWORD,
    PASSWORD_USER,
    TlsPostgres,
    postgres_binaries,
    tls_postgres,
)


@pytest.mark.parametrize(
    ("given", "taken"),
    [
        (
            "postgres://u:p%40ss@db.example:5432/x?sslmode=require",
            "postgresql+asyncpg://u:p%40ss@db.example:5432/x?sslmode=require",
        ),
        ("postgresql://u@db.example/x", "postgresql+asyncpg://u@db.example/x"),
        (
            "postgresql+asyncpg://u@db.example/x?sslmode=verify-full&sslrootcert=/ca.pem&application_name=a",
            "postgresql+asyncpg://u@db.example/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fca.pem",
        ),
        # asyncpg's own name for it, which this README once gave
        (
            "postgresql+asyncpg://u@db.example/x?ssl=prefer",
            "postgresql+asyncpg://u@db.example/x?sslmode=prefer",
        ),
        # the shortest wait a connect_timeout can ask for
        (
            "postgres://u@db.example/x?connect_timeout=1",
            "postgresql+asyncpg://u@db.example/x?connect_timeout=1",
        ),
    ],
)
def test_a_libpq_style_url_is_taken_as_asyncpg_takes_it(given: str, taken: str) -> None:
    assert Settings(database_url=given).database_url == taken


async def test_a_url_with_sslmode_and_no_driver_connects(settings: Settings, sessions: Sessions) -> None:
    libpq = (
        make_url(settings.database_url).set(drivername="postgresql").update_query_dict({"sslmode": "disable"})
    )
    url = Settings(database_url=libpq.render_as_string(hide_password=False)).database_url
    assert await _one_row(url, "SELECT 1") == (1,)


async def test_each_of_several_hosts_is_tried_in_turn(settings: Settings, sessions: Sessions) -> None:
    """SQLAlchemy's form of several hosts, ?host=a:5432&host=b:5432: asyncpg is handed libpq's."""
    database = make_url(settings.database_url)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        hosts = (f"{database.host}:{database.port}", f"127.0.0.1:{closed.getsockname()[1]}")
        several = URL.create(
            database.drivername,
            database.username,
            database.password,
            database=database.database,
            query={"host": hosts},
        )
        url = Settings(database_url=several.render_as_string(hide_password=False)).database_url
        assert await _one_row(url, "SELECT 1") == (1,)


async def test_an_engine_from_a_libpq_url_keeps_the_services_engine_options(
    settings: Settings, sessions: Sessions
) -> None:
    """A pool of the connections asked for, and a failed statement's error without the values it
    was sent (user data: prompts, reviews), whatever the URL's options."""
    libpq = (
        make_url(settings.database_url).set(drivername="postgresql").update_query_dict({"sslmode": "disable"})
    )
    engine = make_engine(
        Settings(database_url=libpq.render_as_string(hide_password=False)).database_url, 5, 3
    )
    try:
        pool = engine.sync_engine.pool
        assert isinstance(pool, AsyncAdaptedQueuePool) and pool.size() == 3
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError, match="division by zero") as failed:
                await connection.execute(text("SELECT CAST(:prompt AS text), 1 / 0"), {"prompt": "hunter2"})
        assert "hunter2" not in str(failed.value)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("ssl=require&sslmode=require", "give the database URL's ssl or its sslmode, not both"),
        (
            "channel_binding=require",
            "the database URL's channel_binding is not an option the service's Postgres driver (asyncpg) "
            "honours: remove it",
        ),
        (
            "prepared_statement_cache_size=0",
            "the database URL's prepared_statement_cache_size is not an option the service's Postgres driver "
            "(asyncpg) honours: remove it",
        ),
        (
            "sslmode=hunter2",
            "the database URL's sslmode must be one of disable, allow, prefer, require, verify-ca, "
            "verify-full",
        ),
        (
            "sslrootcert=system&sslmode=require",
            "the database URL's sslrootcert=system asks for sslmode verify-full, as libpq does",
        ),
        (
            "sslrootcert=system&sslcert=/c.pem&sslkey=/k.pem",
            "the database URL's sslrootcert=system cannot go with its sslcert, sslkey (asyncpg reads none "
            "with the system's CAs): give the path of the CA bundle instead",
        ),
        (
            "target_session_attrs=hunter2",
            "the database URL's target_session_attrs must be one of any, primary, standby, prefer-standby, "
            "read-write, read-only",
        ),
        ("connect_timeout=0", "the database URL's connect_timeout must be a whole number of seconds above 0"),
        (
            "connect_timeout=2.5",
            "the database URL's connect_timeout must be a whole number of seconds above 0",
        ),
        ("sslpassword=hunter2&sslpassword=hunter3", "the database URL's sslpassword is given more than once"),
        # asyncpg's name for sslmode, named as given
        (
            "ssl=true",
            "the database URL's ssl must be one of disable, allow, prefer, require, verify-ca, verify-full",
        ),
        ("ssl=require&ssl=disable", "the database URL's ssl is given more than once"),
    ],
)
def test_an_option_the_service_cannot_honour_is_refused_by_name_not_quoted(query: str, said: str) -> None:
    """The whole refusal as the operator reads it at start: what is wrong, and what to give instead."""
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=f"postgres://u:hunter2@db.example/x?{query}")
    assert f"database_url\n  Value error, {said} [type=value_error]" in str(refused.value)
    assert "hunter" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (
            "postgresql+psycopg://u:hunter2@db.example/x",
            "the database URL names the driver psycopg, but the service connects with asyncpg alone: "
            "write postgresql:// (or postgresql+asyncpg://) in place of postgresql+psycopg://",
        ),
        (
            "postgresql+psycopg2://u:hunter2@db.example/x",
            "the database URL names the driver psycopg2, but the service connects with asyncpg alone: "
            "write postgresql:// (or postgresql+asyncpg://) in place of postgresql+psycopg2://",
        ),
        (
            "postgres+asyncpg://u:hunter2@db.example/x",
            "the database URL's scheme postgres+asyncpg:// is none the service connects with: write "
            "postgresql:// (or postgres://, postgresql+asyncpg://)",
        ),
        (
            "http://u:hunter2@db.example/x",
            "the database URL's scheme http:// is none the service connects with: write postgresql:// "
            "(or postgres://, postgresql+asyncpg://)",
        ),
        (
            "hunter2",
            "the database URL is not a URL: write postgresql://user:password@host:5432/database",
        ),
        (  # a password's @ and : unescaped: the rest of it read as the port, not a number
            "postgresql://u:p@ss:hunter2@db.example/x",
            "the database URL is not a URL: write postgresql://user:password@host:5432/database",
        ),
        (  # a password's @ unescaped: the rest of it read as the host's start, logged with it
            "postgresql://u:p@hunter2@db.example/x",
            "the database URL's host has an @ in it: write a password's @ as %40",
        ),
    ],
)
def test_a_url_not_for_asyncpg_is_refused_naming_its_driver_and_what_to_write(url: str, said: str) -> None:
    """The service's connections are asyncpg's (its connection settings, its hot statements sent
    to the driver itself): another driver's URL passed the settings and failed at the first
    connection, or when SQLAlchemy could not load it."""
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=url)
    assert f"database_url\n  Value error, {said} [type=value_error]" in str(refused.value)
    assert "hunter" not in str(refused.value)
    # A URL given otherwise (an Alembic config's) is refused alike.
    with pytest.raises(ValueError, match=re.escape(said)):
        make_engine(url, 5, 1)


@pytest.fixture(scope="module")
def server() -> Iterator[TlsPostgres]:
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    with tls_postgres(binaries) as started:
        yield started


def _libpq_url(server: TlsPostgres, user: str = "postgres", **options: str) -> str:
    """A URL to the private server as a provider hands one out, as the settings take it."""
    query = urlencode({"sslmode": "verify-full", "sslrootcert": server.file("ca.crt"), **options})
    given = f"postgres://{user}@127.0.0.1:{server.port}/{DATABASE}?{query}"
    return Settings(database_url=given).database_url


async def _one_row(url: str, sql: str) -> tuple[Any, ...]:
    engine = make_engine(url, timeout_s=5, connections=1)
    try:
        async with engine.connect() as connection:
            return tuple((await connection.execute(text(sql))).one())
    finally:
        await engine.dispose()


async def test_verify_full_with_the_providers_ca_connects_over_tls(server: TlsPostgres) -> None:
    url = _libpq_url(server, target_session_attrs="read-write")
    assert await _one_row(url, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == (True,)


async def test_a_server_whose_certificate_the_given_ca_did_not_sign_is_refused(server: TlsPostgres) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await _one_row(_libpq_url(server, sslrootcert=server.file("other-ca.crt")), "SELECT 1")


async def test_sslrootcert_system_verifies_the_server_with_the_systems_cas(
    server: TlsPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _libpq_url(server, sslrootcert="system")
    with pytest.raises(ssl.SSLCertVerificationError):  # the test CA is none of the system's
        await _one_row(url, "SELECT 1")
    monkeypatch.setenv("SSL_CERT_FILE", server.file("ca.crt"))  # OpenSSL's system CAs, as a provider's is
    assert await _one_row(url, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == (True,)


async def test_a_client_certificate_with_its_encrypted_key_logs_in(server: TlsPostgres) -> None:
    url = _libpq_url(
        server,
        CERTIFICATE_USER,
        sslcert=server.file("client.crt"),
        sslkey=server.file("client.key"),
        sslpassword=CLIENT_KEY_PASSWORD,
    )
    assert await _one_row(url, "SELECT current_user") == (CERTIFICATE_USER,)
    with pytest.raises(DBAPIError, match="requires a valid client certificate"):
        await _one_row(_libpq_url(server, CERTIFICATE_USER), "SELECT 1")


async def test_a_password_with_characters_a_url_escapes_logs_in(server: TlsPostgres) -> None:
    url = _libpq_url(server, f"{PASSWORD_USER}:{quote(PASSWORD, safe='')}")
    assert await _one_row(url, "SELECT current_user") == (PASSWORD_USER,)
    with pytest.raises(DBAPIError, match="password authentication failed"):
        await _one_row(_libpq_url(server, f"{PASSWORD_USER}:wrong"), "SELECT 1")


async def test_application_name_and_options_reach_the_server(server: TlsPostgres) -> None:
    url = _libpq_url(server, application_name="aidsafe-worker", options="-c search_path=elsewhere")
    row = await _one_row(url, "SELECT current_setting('application_name'), current_setting('search_path')")
    assert row == ("aidsafe-worker", "elsewhere")
    # The engine's own startup settings are kept beside them.
    assert await _one_row(url, "SHOW statement_timeout") == ("5s",)


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A port that takes connections and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    listening = await asyncio.start_server(hold, "127.0.0.1", 0)
    async with listening:
        yield listening.sockets[0].getsockname()[1]


async def test_connect_timeout_bounds_the_wait_for_a_server_that_does_not_answer(silent_server: int) -> None:
    url = Settings(
        database_url=f"postgres://u@127.0.0.1:{silent_server}/x?sslmode=disable&connect_timeout=2"
    ).database_url
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        await _one_row(url, "SELECT 1")
    assert time.monotonic() - began < 20  # asyncpg's own default: 60 s


async def test_the_migrations_connect_as_the_service_does(server: TlsPostgres) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = _libpq_url(server, application_name="aidsafe-migrations")
    await asyncio.to_thread(command.upgrade, config, "head")
    assert await _one_row(config.attributes["database_url"], "SELECT count(*) FROM alembic_version") == (1,)


def test_the_engine_shows_no_option_of_its_url() -> None:
    """Its URL is logged and named in errors (`aidsafe keys`' "Cannot use the database ..."): the
    URL's sslpassword is the DSN's alone."""
    engine = make_engine(
        Settings(database_url="postgres://u@db.example/x?sslpassword=hunter2").database_url, 5, 1
    )
    assert engine.url.render_as_string(hide_password=True) == "postgresql+asyncpg://u@db.example/x"
    assert "hunter2" not in repr(engine.sync_engine)
