"""Progress events of a job: what `GET /v1/jobs/{id}/events` streams.

Workers append one entry per finished item to a Redis stream per job (trimmed, expiring).
Redis is not a store of record: an entry may never be written (the worker died after the
item's commit, its transaction failed) or be lost later (trimmed, expired, Redis restarted,
with or without an error a follower would see). So the stream only makes followers quick;
Postgres makes them complete: a follower starts from a snapshot computed from Postgres, and on
every (re)connect and every `events_resync_s` it checks the items ended since its last check
against those it sent, and sends the missing ones. Every item's end is heard at least once.

Event kinds: `item` (an item finished: id, position, status, error code; its SSE id is the
stream entry id), `snapshot` (the job summary: status, counts per status and stage, usage,
quality), and `done` (the last snapshot, once the job has ended; the stream then closes).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.errors import InvalidCursor
from app.store.db import Sessions, database_away
from app.store.models import FINISHED, Item
from app.threads import in_thread

log = logging.getLogger("aidsafe.events")

ENDED = ("completed", "cancelled")  # job statuses after which nothing changes
# Redis and Postgres clocks may differ: replays from Postgres start this much earlier
# (a duplicate item event is harmless, a missing one is not).
CLOCK_MARGIN_MS = 5_000
# Entries read from a stream at a time: reading and decoding 20,000 at once (a stream at its
# cap) held the event loop for ~0.1 s; 500 take ~3 ms.
STREAM_PAGE = 500
# How long a follower waits for Postgres to come back (a restart takes seconds) before it ends
# the stream: as long as the Python client waits for an API that restarts.
POSTGRES_AWAY_S = 30.0


@dataclass(frozen=True)
class ItemFinished:
    item_id: str
    position: int
    status: str
    error_code: str | None

    def fields(self) -> dict[FieldT, EncodableT]:  # as XADD takes them: str keys and values
        return {k: "" if v is None else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> ItemFinished:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(text["item_id"], int(text["position"]), text["status"], text["error_code"] or None)


@dataclass(frozen=True)
class ProgressEvent:
    kind: str  # item | snapshot | done
    data: dict[str, Any]
    id: str | None = None  # a stream entry id; the client sends it back as Last-Event-ID


def stream_key(settings: Settings, job_id: UUID) -> str:
    return f"{settings.redis_key_prefix}:events:{job_id}"


def parse_event_id(text: str) -> tuple[int, int]:
    """A stream entry id `<ms>-<seq>` as a comparable pair; InvalidCursor if it is not one."""
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    parts = re.fullmatch(r"([0-9]{1,15})-([0-9]{1,15})", text.strip())
    if parts is None:
        raise _never_sent()
    return int(parts[1]), int(parts[2])


def _never_sent() -> InvalidCursor:
    return InvalidCursor("Last-Event-ID is not an event id this API sent")


# --- the worker side ----------------------------------------------------------------------


def announce_item_finished(pipe: Pipeline, settings: Settings, job_id: UUID, event: ItemFinished) -> None:
    """Append the item's end to its job's stream, in the transaction `pipe` that ends the item's
    arq job (workers/queue_worker.py): one round trip for both. Should it never arrive (the
    transaction failed, the worker died first) or be lost, followers hear of the item from
    Postgres at their next check (`follow`)."""
    key = stream_key(settings, job_id)
    pipe.xadd(key, event.fields(), maxlen=settings.events_stream_max_len, approximate=True)
    pipe.expire(key, settings.events_stream_ttl_s)


# --- the API side -------------------------------------------------------------------------


async def forget_job(redis: Redis, settings: Settings, job_id: UUID) -> None:
    """Drop a deleted job's stream. Best effort: it expires anyway (events_stream_ttl_s)."""
    try:
        await redis.delete(stream_key(settings, job_id))
    except RedisError:
        log.warning("could not delete the event stream of deleted job %s", job_id, exc_info=True)


async def finished_since(sessions: Sessions, job_id: UUID, since_ms: int) -> list[ItemFinished]:
    """Items of the job that ended at or after this time (ms since the epoch), in the order they ended."""
    since = datetime.fromtimestamp(max(0, since_ms - CLOCK_MARGIN_MS) / 1000, tz=UTC)
    async with sessions() as session:
        rows = (
            await session.execute(
                select(Item.id, Item.position, Item.status, Item.error_code)
                .where(Item.job_id == job_id, Item.status.in_(FINISHED), Item.finished_at >= since)
                .order_by(Item.finished_at, Item.position)
            )
        ).all()
    # Off the event loop: a job's 10,000 rows take 30-50 ms to turn into items. The rows were all
    # fetched, so the connection is given back first: waiting for a thread of the shared pool,
    # behind other requests' work, a follower held it in an open transaction.
    return await in_thread(
        lambda: [ItemFinished(str(r.id), r.position, r.status, r.error_code) for r in rows]
    )


class EndsSent:
    """The items whose end a follower was sent, as far as its next check against Postgres
    needs them: that check reads the items that ended since `checked_ms` (less the clocks'
    margin), and only those can come again."""

    def __init__(self, checked_ms: int) -> None:
        self.checked_ms = checked_ms
        self.item_ids: set[str] = set()

    def note(self, item: ItemFinished) -> None:
        if item.status in FINISHED:
            self.item_ids.add(item.item_id)

    def is_news(self, item: ItemFinished) -> bool:
        """Whether to send a stream entry's event, noting an end as sent: not once the item's
        end was sent (a check may find it in Postgres before its entry comes)."""
        news = item.item_id not in self.item_ids
        self.note(item)
        return news

    async def missed(self, sessions: Sessions, job_id: UUID) -> list[ItemFinished]:
        """The items Postgres has ended since the last check whose end was not sent, now noted
        as sent; the next check reads from this one."""
        checked_ms = int(time.time() * 1000)
        ended = await finished_since(sessions, job_id, self.checked_ms)
        missed = [item for item in ended if item.item_id not in self.item_ids]
        self.checked_ms, self.item_ids = checked_ms, {item.item_id for item in ended}
        return missed


@dataclass(frozen=True)
class StreamTail:
    """A job's stream as a follower (re)connects: see JobEventSource.tail."""

    newest: str
    resume_after: str
    recent: list[tuple[str, ItemFinished]]


class JobEventSource:
    """Reads one job's events: the Redis stream for what is new, Postgres for the truth."""

    def __init__(
        self,
        redis: Redis,
        sessions: Sessions,
        settings: Settings,
        job_id: UUID,
        snapshot: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        self.redis, self.sessions, self.settings, self.job_id = redis, sessions, settings, job_id
        self.key = stream_key(settings, job_id)
        self.snapshot = snapshot

    async def check_sent(self, event_id: str, job_created_at: datetime) -> None:
        """InvalidCursor unless `event_id` can be an id this API sent for this job: one of its
        stream's entries. Where the stream no longer holds that stretch (trimmed, expired, lost
        with Redis), the id must at least fall between the job's creation and its newest
        entry, or now if it has none. Event ids are checked, not signed: every API process
        must accept every other's, with no secret to share."""
        sent = parse_event_id(event_id)
        if sent[0] < job_created_at.timestamp() * 1000 - CLOCK_MARGIN_MS:
            raise _never_sent()
        entry_id = f"{sent[0]}-{sent[1]}"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:  # one view of the stream
                pipe.xrange(self.key, count=1)
                pipe.xrevrange(self.key, count=1)
                pipe.xrange(self.key, min=entry_id, max=entry_id)
                oldest, newest, same = await pipe.execute()
        except RedisError:  # following goes on from Postgres; only the clock can tell
            oldest = newest = same = []
        if newest:
            beyond_newest = sent > parse_event_id(newest[0][0].decode())
            held_but_missing = parse_event_id(oldest[0][0].decode()) <= sent and not same
            if beyond_newest or held_but_missing:
                raise _never_sent()
        elif sent[0] > time.time() * 1000 + CLOCK_MARGIN_MS:
            raise _never_sent()

    async def tail(self, since_ms: int) -> StreamTail:
        """The newest entry's id (0-0 when the stream is empty or gone); the id to resume after
        should Redis fail before an entry comes: that entry's, or with none, an id just before
        this moment on the stream's clock (Redis's), which every entry added later follows;
        and the entries from `since_ms` up to that newest one, in order. The first two are read
        in one transaction; the entries then a page at a time (STREAM_PAGE), up to that newest
        one only, so that none added since is among them. An entry lost between pages (trimmed,
        expired, Redis restarted) is missing from them, as one lost before the read would be:
        its item's end is in Postgres, which `EndsSent.missed` reads after."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(self.key, count=1)
            pipe.time()
            newest, (seconds, microseconds) = await pipe.execute()
        if not newest:
            return StreamTail("0-0", f"{seconds * 1000 + microseconds // 1000 - 1}-0", [])
        tail = newest[0][0].decode()
        entries: list[tuple[str, ItemFinished]] = []
        start = f"{max(0, since_ms)}-0"
        while page := await self.redis.xrange(self.key, min=start, max=tail, count=STREAM_PAGE):
            entries += _decoded(page)
            last_ms, last_seq = parse_event_id(entries[-1][0])
            start = f"{last_ms}-{last_seq + 1}"  # the next possible id (an exclusive "(id" needs Redis 6.2)
        return StreamTail(tail, tail, entries)

    async def read_after(self, event_id: str, block_s: float) -> list[tuple[str, ItemFinished]]:
        """New entries after `event_id`, waiting up to `block_s` for one (without blocking the loop)."""
        answer = await self.redis.xread(
            {self.key: event_id}, count=STREAM_PAGE, block=max(1, int(block_s * 1000))
        )
        return [entry for _, entries in answer for entry in _decoded(entries)]


def _decoded(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[tuple[str, ItemFinished]]:
    """Stream entries as Redis gives them: (id, fields)."""
    return [(entry_id.decode(), ItemFinished.from_fields(fields)) for entry_id, fields in entries]


async def follow(source: JobEventSource, last_event_id: str | None) -> AsyncGenerator[ProgressEvent, None]:
    """The job's events from `last_event_id` (or from now) until it ends.

    On resuming: the items Postgres has ended since shortly before `last_event_id` that the
    stream holds no entry of (without ids), then the entries after it (with theirs). Then, as on
    connecting, a snapshot; each finished item as it comes; a snapshot at most every
    `events_snapshot_interval_s` after new items and at least every `events_resync_s` (which
    also catches changes no worker announces: a cancel, an item failed by the sweeper); and
    `done` with the final snapshot. Every `events_resync_s`, and before `done`, the items
    Postgres has ended since the last such check whose end was not sent are sent (without
    ids): an entry never written, or lost with Redis, delays an item's event, never loses it.
    An item may be heard twice (an end sent from Postgres comes again after a resume), none is
    missed. While Redis is away it keeps sending snapshots from Postgres, each after the check
    (so the items' ends come from Postgres alone, before `done` too), and resumes, catching up,
    when Redis is back. While Postgres is away (a restart, a failover) it sends nothing, and
    goes on from where it was once Postgres answers, checking first; away over
    POSTGRES_AWAY_S, it raises."""
    resync_ms = int(source.settings.events_resync_s * 1000)
    # One tracker for the whole follow, across Redis's absences: each check (on the stream or
    # off it) reads Postgres from the last one.
    resume_from: str | None = None
    if last_event_id is None:
        sent = EndsSent(int(time.time() * 1000))
    else:  # reading stops at each check (below): every end before the id, less this, was sent
        ms, seq = parse_event_id(last_event_id)
        sent = EndsSent(ms - resync_ms)
        # As Redis writes it: XREAD refuses the spaces parse_event_id strips (a no-break space).
        resume_from = f"{ms}-{seq}"
    away_since: float | None = None  # when Postgres failed the follow, since its last event
    redis_away = False
    while True:
        cursor: list[str | None] = [resume_from]
        try:
            # A pass without Redis runs in the try too: a Postgres fault in it is waited out
            # as on the stream (run in the RedisError clause, it ended the stream).
            events = (
                _without_redis(source, sent)
                if redis_away
                else _follow_stream(source, resume_from, cursor, sent)
            )
            async for event in events:
                away_since = None
                yield event
                if event.kind == "done":
                    return
            # Only a pass without Redis ends before done: Redis is tried again after a pause.
            redis_away = False
            await asyncio.sleep(source.settings.events_resync_s)
        except RedisError:
            log.warning("events of job %s: Redis unavailable, polling Postgres", source.job_id, exc_info=True)
            if cursor[0] is None:  # it never reached the stream: resume after now (less the
                # clocks' margin: an item may be heard twice, none is missed)
                cursor[0] = f"{int(time.time() * 1000) - CLOCK_MARGIN_MS}-0"
            redis_away = True
        except (DBAPIError, ConnectionError, TimeoutError) as error:
            if not database_away(error):  # a DBAPIError may not be; the others always are
                raise
            away_since = away_since or time.monotonic()
            if time.monotonic() - away_since > POSTGRES_AWAY_S:
                raise
            # A restart or failover: go on from where it was once Postgres answers again; the
            # check against Postgres then sends what ended meanwhile.
            log.warning("events of job %s: Postgres unavailable, trying again", source.job_id, exc_info=True)
            if cursor[0] is None:  # as without Redis: resume after now, less the clocks' margin
                cursor[0] = f"{int(time.time() * 1000) - CLOCK_MARGIN_MS}-0"
            await asyncio.sleep(source.settings.events_resync_s)
        resume_from = cursor[0]


async def _without_redis(source: JobEventSource, sent: EndsSent) -> AsyncIterator[ProgressEvent]:
    """One pass of `follow` while Redis is away: a snapshot from Postgres, and `done` if the
    job ended. Postgres alone tells of the items' ends now: checked after the snapshot was read
    (once it says the job ended, every end is in Postgres) and before it is sent."""
    summary = await source.snapshot()
    for item in await sent.missed(source.sessions, source.job_id):
        yield ProgressEvent("item", asdict(item))
    yield ProgressEvent("snapshot", summary)
    if summary["status"] in ENDED:
        yield ProgressEvent("done", summary)


async def _follow_stream(
    source: JobEventSource, resume_from: str | None, cursor: list[str | None], sent: EndsSent
) -> AsyncIterator[ProgressEvent]:
    """One connection's worth of `follow`; `cursor[0]` tracks the last id sent, to resume from;
    `sent` is the follow's record of the ends it sent and of its last check against Postgres."""
    settings = source.settings
    resync_s = settings.events_resync_s
    # Before the snapshot: nothing between is lost.
    tail = await source.tail(sent.checked_ms - CLOCK_MARGIN_MS)
    if resume_from is None:
        cursor[0] = tail.resume_after  # from the tail, a resume would skip what Redis's absence hid
        position = tail.newest
    else:
        position = resume_from
    # The entries up to `position` were sent (or, from now, are counted by the first snapshot).
    # In id order: bisection finds where the replay starts, parsing a few ids, not all of them
    # (20,000 regex matches, ~40 ms of the event loop).
    first_unsent = bisect.bisect_right(
        tail.recent, parse_event_id(position), key=lambda entry: parse_event_id(entry[0])
    )
    replay = tail.recent[first_unsent:]
    for _, item in tail.recent:
        sent.note(item)
    checked = time.monotonic()
    if resume_from is not None:
        # Postgres's first: a client dropping during the replay resumes from the replay's ids,
        # which may be far past the ends it missed.
        missed = await sent.missed(source.sessions, source.job_id)
        for item in missed:
            yield ProgressEvent("item", asdict(item))
        ended = {item.item_id for item in missed}
        for position, item in replay:
            cursor[0] = position
            if item.item_id not in ended:  # a status before the end just sent: stale now
                yield ProgressEvent("item", asdict(item), position)
    while True:  # one snapshot per pass; then items until the next one is due
        summary = await source.snapshot()
        job_ended = summary["status"] in ENDED
        # Once a snapshot says the job ended, every item's end is in Postgres: check before done.
        if job_ended or time.monotonic() - checked >= resync_s:
            checked = time.monotonic()
            for item in await sent.missed(source.sessions, source.job_id):
                yield ProgressEvent("item", asdict(item))
        event_id = None if position == "0-0" else position
        cursor[0] = event_id or cursor[0]
        yield ProgressEvent("snapshot", summary, event_id)
        if job_ended:
            yield ProgressEvent("done", summary, event_id)
            return
        last_snapshot, dirty = time.monotonic(), False
        while True:
            # Reading stops at the next check: no id sent is more than events_resync_s past one.
            due = checked + resync_s
            if dirty:
                due = min(due, last_snapshot + settings.events_snapshot_interval_s)
            due_in = due - time.monotonic()
            if due_in <= 0:
                break
            for entry_id, item in await source.read_after(position, due_in):
                position = cursor[0] = entry_id
                if sent.is_news(item):
                    dirty = True
                    yield ProgressEvent("item", asdict(item), entry_id)
