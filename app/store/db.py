"""Engine and session factory. One session per concurrent task: hand out the factory."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import Engine, ExceptionContext, event, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import CONNECT_TIMEOUT, SYSTEM_ROOTS, for_asyncpg

Sessions = async_sessionmaker[AsyncSession]
log = logging.getLogger(__name__)


def make_engine(database_url: str, timeout_s: float, connections: int) -> AsyncEngine:
    """An engine of at most `connections` Postgres connections, each opened when first needed
    and kept (one that timed out or that the server closed is replaced)."""
    if connections < 1:
        raise ValueError(f"an engine needs at least one connection, not {connections}")
    # Not pool_pre_ping: with asyncpg that is three round trips (BEGIN, ping, ROLLBACK) on
    # every checkout, more than most of our statements cost. The local check below catches
    # connections a Postgres restart closed while they sat in the pool; one that breaks
    # mid-use fails its statement, SQLAlchemy invalidates the pool, and the caller's retry
    # (the worker's item retry, the client's retry after a 503) gets a fresh connection.
    # hide_parameters: a failed statement's message (logged, maybe shown) never carries the
    # values it was sent, which are user data: prompts, reviews, raw tool payloads.
    # A fixed pool, no overflow: SQLAlchemy ends an overflow connection as soon as it comes
    # back to a full pool, so bursts opened and closed 50-260 Postgres backends per benchmark
    # run, each preparing its statements again. The same cap, each connection opened once.
    # timeout_s bounds each statement (Settings.database_timeout_s says why) twice: Postgres
    # ends one that runs longer (statement_timeout), so it holds no locks past it, and the
    # client gives up on a connection that has not answered a moment after (command_timeout):
    # a silent one, whose statement the server may never have seen.
    engine = engine_for(
        database_url,
        {
            "command_timeout": timeout_s + _ANSWER_MARGIN_S,
            "server_settings": {"statement_timeout": str(round(timeout_s * 1000))},
        },
        pool_size=connections,
        max_overflow=0,
        hide_parameters=True,
    )
    watch = _watches[engine.sync_engine] = _SilenceWatch()
    event.listen(engine.sync_engine, "connect", watch.connected)
    event.listen(engine.sync_engine, "checkout", watch.checked_out)
    event.listen(engine.sync_engine, "handle_error", watch.failed)
    return engine


def engine_for(
    database_url: str, connect_args: Mapping[str, object] | None = None, **engine_options: Any
) -> AsyncEngine:
    """SQLAlchemy's engine for a database URL, each of its connections made by asyncpg.connect
    with `connect_args`. The URL, taken as the settings take it (for_asyncpg: a URL given
    otherwise too, an Alembic config's), is asyncpg's to read, as its DSN: asyncpg's own parser
    takes its query options as libpq does (SSL files, target_session_attrs, application_name,
    ...), where SQLAlchemy's dialect would pass each to asyncpg.connect as a keyword argument
    it does not take. ValueError: a URL not asyncpg's, or an option the service cannot honour."""
    url = make_url(for_asyncpg(database_url))
    arguments = dict(connect_args or {})
    if CONNECT_TIMEOUT in url.query:
        arguments["timeout"] = int(str(url.query[CONNECT_TIMEOUT]))
    dsn = url.set(drivername="postgresql").difference_update_query([CONNECT_TIMEOUT])
    if url.query.get("sslrootcert") == SYSTEM_ROOTS:  # asyncpg's own way to the system's CAs
        arguments["ssl"] = True
        dsn = dsn.difference_update_query(["sslrootcert", "sslmode"])
    if isinstance(hosts := url.query.get("host"), tuple):  # SQLAlchemy's form of several hosts
        dsn = dsn.update_query_dict({"host": ",".join(hosts)})  # libpq's, which asyncpg reads
    connect = functools.partial(asyncpg.connect, dsn.render_as_string(hide_password=False), **arguments)
    # The query is the DSN's alone: an sslpassword in it would show in the engine's repr.
    return create_async_engine(url.set(query={}), async_creator=connect, **engine_options)


class _SilenceWatch:
    """Replaces the pooled connections that cannot be trusted, at their next checkout: those
    the server closed, and those made before a statement timed out. A failover leaves every
    connection of the pool half-open at once; without this, each would make its next user
    wait out the timeout in turn. The connection whose statement timed out is discarded at
    once (SQLAlchemy does so for a session's; driver_connection for its own)."""

    def __init__(self) -> None:
        self.timed_out_at = float("-inf")
        self.cut_short_at = float("-inf")  # when a statement in flight was last cancelled

    def connected(self, _dbapi_connection: Any, record: Any) -> None:
        record.info[_CONNECTED_AT] = time.monotonic()

    def checked_out(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # asyncpg marks a connection closed as soon as the server hangs up: no round trip.
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the server closed this pooled connection")
        if record.info[_CONNECTED_AT] < self.timed_out_at:
            dbapi_connection.driver_connection.terminate()  # see interrupted()
            raise DisconnectionError("a statement timed out since this connection was made")

    def failed(self, context: ExceptionContext) -> None:
        connection = context.connection
        if connection is None or connection.invalidated:  # .connection would reconnect it
            self.interrupted(context.original_exception, None)
        else:
            self.interrupted(context.original_exception, connection.connection.driver_connection)

    def interrupted(self, error: BaseException, driver: asyncpg.Connection | None) -> None:
        """Note a statement that timed out (the pool's older connections are then replaced) or
        was cut short (see deadline), and close its connection at once: SQLAlchemy would close
        it politely first, on a silent one 2 s more for the caller."""
        if isinstance(error, TimeoutError):
            self.timed_out()
        elif isinstance(error, asyncio.CancelledError):
            self.cut_short_at = time.monotonic()
        else:
            return
        if driver is not None:
            driver.terminate()

    def timed_out(self) -> None:
        self.timed_out_at = time.monotonic()


_ANSWER_MARGIN_S = 1.0  # for Postgres's own timeout to reach a live client first
_CONNECTED_AT = "aidsafe_connected_at"
_watches: weakref.WeakKeyDictionary[Engine, _SilenceWatch] = weakref.WeakKeyDictionary()


def _engine_of(sessions: Sessions) -> AsyncEngine:
    engine: AsyncEngine = sessions.kw["bind"]
    return engine


@asynccontextmanager
async def deadline(sessions: Sessions, seconds: float) -> AsyncIterator[None]:
    """Give up on the statements inside after `seconds`, sooner than the engine's timeout.
    Giving up on a statement in flight counts as a statement timing out: the pool's
    connections made before it are replaced too, or the next try might draw another silent
    one. Giving up on a wait for the pool does not: its connections are busy, not silent."""
    watch = _watches[_engine_of(sessions).sync_engine]
    began = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        if watch.cut_short_at >= began:  # another task's cancellation may count too: harmless
            watch.timed_out()
        raise


# SQLSTATE classes of a database that is away, not of a statement that is wrong: 08
# connection exception, 57 operator intervention (query_canceled at the timeout,
# admin_shutdown, crash_shutdown, cannot_connect_now, ...); but not 08P01, a protocol
# violation: a bug in what was sent, which a retry sends again.
_AWAY_SQLSTATE_CLASSES = ("08", "57")
_PROTOCOL_VIOLATION = "08P01"


def database_away(error: BaseException) -> bool:
    """Whether a statement failed because Postgres or the connection to it went away (a
    restart, a failover, the database timeout), not because it was wrong: its connection is
    closed (SQLAlchemy then invalidates it), was refused or reset, or the server said so (to
    SQLAlchemy, or to asyncpg itself for the statements sent to the driver: driver_connection).
    A TimeoutError is a statement given up on at the engine's command timeout (SQLAlchemy
    passes it on unwrapped): a server that went silent, as a failover leaves connections."""
    if isinstance(error, DBAPIError):
        return error.connection_invalidated or _says_away(error.orig)
    return isinstance(error, (ConnectionError, TimeoutError)) or _says_away(error)


def _says_away(error: BaseException | None) -> bool:
    sqlstate = getattr(error, "sqlstate", None) or ""
    return sqlstate[:2] in _AWAY_SQLSTATE_CLASSES and sqlstate != _PROTOCOL_VIOLATION


@asynccontextmanager
async def closed_quietly(sessions: Sessions) -> AsyncIterator[AsyncSession]:
    """A session, closed at the end as `async with sessions()` does (to the end, even if the
    caller is cancelled meanwhile). Closing rolls back the transaction still open: if Postgres
    has ended the connection (a restart), or it has gone silent (a failover: the rollback is
    given up on at the command timeout), there is nothing left to roll back and the connection
    is discarded, so that failure is a warning line, not an error of the caller's, whose work
    is done (or failed with an error of its own, which passes through as it is)."""
    session = sessions()
    try:
        yield session
    finally:
        try:
            await session.__aexit__(None, None, None)
        except (DBAPIError, TimeoutError) as error:  # a silent one's rollback: a bare TimeoutError
            if not database_away(error):
                raise
            detail = error.orig if isinstance(error, DBAPIError) else repr(error)
            log.warning("a session closed on a connection the database had ended: %s", detail)


async def dispose(engine: AsyncEngine) -> None:
    """Close the engine's pooled connections, as a process that stops does: engine.dispose(),
    the connections given _GOODBYE_TIMEOUT_S in all to answer their close. One gone silent (a
    failover, a dropped NAT entry) held SQLAlchemy's close for the command timeout (a minute by
    default), each in turn, which then logged the failure as an ERROR with a traceback: it is
    ended at our end instead, a warning line. In all, not each: the pool closes them one after
    another, and a failover leaves them all silent at once."""
    goodbye = _Goodbye(time.monotonic() + _GOODBYE_TIMEOUT_S)
    sync_engine = engine.sync_engine
    event.listen(sync_engine, "close", goodbye.close_or_end)
    try:
        await engine.dispose()
    finally:
        event.remove(sync_engine, "close", goodbye.close_or_end)


class _Goodbye:
    """The pool's close event while it is disposed, before its own close (which then finds the
    connection closed): asyncpg's close within what is left of the time until `ends_at`, which
    ends the connection at our end if it fails; with none left, it is ended unasked."""

    def __init__(self, ends_at: float) -> None:
        self.ends_at = ends_at

    def close_or_end(self, dbapi_connection: Any, _record: Any) -> None:
        left = self.ends_at - time.monotonic()
        if left <= 0:
            dbapi_connection.driver_connection.terminate()
            log.warning("a pooled connection ended at our end, unasked: %s had passed", _GOODBYE)
            return
        try:
            dbapi_connection.run_async(lambda driver: driver.close(timeout=left))
        except Exception as error:  # whatever failed, asyncpg has ended the connection
            detail = f"no answer within {_GOODBYE}" if isinstance(error, TimeoutError) else repr(error)
            log.warning("a pooled connection ended at our end, its close failed: %s", detail)


_GOODBYE_TIMEOUT_S = 1.0  # a live server answers in a round trip
_GOODBYE = f"the pool's {_GOODBYE_TIMEOUT_S} s to close"


def make_sessions(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, expire_on_commit=False)


async def in_batches(
    sessions: Sessions, batch: Callable[[AsyncSession, int], Awaitable[int]], size: int
) -> int:
    """Call `batch(session, size)`, which handles at most `size` rows in the session's
    transaction and says how many, each time in a transaction of its own, until it handles
    fewer than `size`; how many in all. However large the backlog, no transaction holds the
    locks of more than one batch."""
    total = 0
    while True:
        async with sessions.begin() as session:
            handled = await batch(session, size)
        total += handled
        if handled < size:
            return total


@asynccontextmanager
async def driver_of(connection: AsyncConnection) -> AsyncIterator[asyncpg.Connection]:
    """The asyncpg connection under a checked-out SQLAlchemy one, in its transaction if it
    has begun one: for what the ORM makes slow (COPY, a completion that notifies)."""
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    try:
        yield driver
    except BaseException as error:
        if _distrusted(connection.engine, driver, error):
            await connection.invalidate()
        raise


async def copy_rows(
    session: AsyncSession, table: str, columns: Sequence[str], records: Iterable[Sequence[Any]]
) -> None:
    """Write `records` into `table` with COPY, in the session's transaction: for thousands of
    rows the ORM's multi-row INSERTs hold the event loop building their parameters."""
    async with driver_of(await session.connection()) as driver:
        await driver.copy_records_to_table(table, columns=list(columns), records=records)


@asynccontextmanager
async def driver_connection(sessions: Sessions) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection's own asyncpg connection, in autocommit, for the hot single
    statements (claim an item, record a turn): one round trip each, and none of the ORM's
    per-statement CPU. Parameters and results use SQLAlchemy's codecs: jsonb goes in as
    JSON text and comes back decoded.

    Taken from the pool as it is, not wrapped in an AsyncConnection, whose checkout and return
    cost a hot statement as much CPU as its round trip (three greenlet hops and a task each
    time). Statements in autocommit leave the return's reset nothing to send, so the
    connection goes back in place, with nothing awaited that a cancellation could cut short.
    make_engine's pool always has room for it (no overflow): closing a surplus one would be
    IO that needs SQLAlchemy's greenlet."""
    engine = _engine_of(sessions)
    pooled = await engine.raw_connection()
    try:
        driver = pooled.driver_connection
        assert driver is not None
        try:
            yield driver
        except BaseException as error:
            if _distrusted(engine, driver, error):
                pooled.invalidate()
            raise
    finally:
        pooled.close()


def _distrusted(engine: AsyncEngine, driver: asyncpg.Connection, error: BaseException) -> bool:
    """Whether a connection whose statement sent straight to the driver raised `error` must
    not be handed out again: it is closed, or the statement timed out or was cancelled, and
    the server may never answer on it again (its next user would wait for that), while the
    pool's reset sends nothing to learn so. Such a statement bypasses SQLAlchemy's error
    handling, so this does _SilenceWatch.failed's part."""
    _watches[engine.sync_engine].interrupted(error, driver)
    return bool(driver.is_closed())
