"""Progress events of a job: what `GET /v1/jobs/{id}/events` streams.

Workers append one entry per finished item to a Redis stream per job (trimmed, expiring).
Redis is not a store of record: a follower starts from a snapshot computed from Postgres, and
whenever the stream cannot serve what a reconnecting client missed (trimmed, expired, Redis
restarted) the missed items are read back from Postgres, so a client never ends up wrong.

Event kinds: `item` (an item finished: id, position, status, error code; its SSE id is the
stream entry id), `snapshot` (the job summary: status, counts per status and stage, usage,
quality), and `done` (the last snapshot, once the job has ended; the stream then closes).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT
from sqlalchemy import select

from app.config import Settings
from app.errors import InvalidCursor
from app.store.db import Sessions
from app.store.models import FINISHED, Item

log = logging.getLogger("aidsafe.events")

ENDED = ("completed", "cancelled")  # job statuses after which nothing changes
# Redis and Postgres clocks may differ: replays from Postgres start this much earlier
# (a duplicate item event is harmless, a missing one is not).
CLOCK_MARGIN_MS = 5_000


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
    arq job (workers/queue_worker.py): one round trip for both. A follower that misses it (the
    transaction failed, Redis lost the stream) catches up from Postgres."""
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
        rows = await session.execute(
            select(Item.id, Item.position, Item.status, Item.error_code)
            .where(Item.job_id == job_id, Item.status.in_(FINISHED), Item.finished_at >= since)
            .order_by(Item.finished_at, Item.position)
        )
        return [ItemFinished(str(r.id), r.position, r.status, r.error_code) for r in rows]


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

    async def tail(self) -> tuple[str, str]:
        """The newest entry's id (0-0 when the stream is empty or gone), and the id to resume
        after should Redis fail before an entry comes: that entry's, or with none, an id just
        before this moment on the stream's clock (Redis's), which every entry added later
        follows. Read in one transaction, so that no entry comes between the two."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(self.key, count=1)
            pipe.time()
            newest, (seconds, microseconds) = await pipe.execute()
        if newest:
            tail = newest[0][0].decode()
            return tail, tail
        return "0-0", f"{seconds * 1000 + microseconds // 1000 - 1}-0"

    async def can_replay_after(self, event_id: str) -> bool:
        """Whether every entry after `event_id` is still in the stream. Trimming removes the
        oldest entries, so it is when the oldest one left is not newer than the client's."""
        oldest = await self.redis.xrange(self.key, count=1)
        return bool(oldest) and parse_event_id(oldest[0][0].decode()) <= parse_event_id(event_id)

    async def missed_after(self, event_id: str) -> list[tuple[str, ItemFinished]]:
        """Every entry after `event_id` stored now."""
        entries = await self.redis.xrange(self.key, min=f"({event_id}")
        return [(entry_id.decode(), ItemFinished.from_fields(fields)) for entry_id, fields in entries]

    async def read_after(self, event_id: str, block_s: float) -> list[tuple[str, ItemFinished]]:
        """New entries after `event_id`, waiting up to `block_s` for one (without blocking the loop)."""
        answer = await self.redis.xread({self.key: event_id}, count=500, block=max(1, int(block_s * 1000)))
        return [
            (entry_id.decode(), ItemFinished.from_fields(f))
            for _, entries in answer
            for entry_id, f in entries
        ]


async def follow(source: JobEventSource, last_event_id: str | None) -> AsyncIterator[ProgressEvent]:
    """The job's events from `last_event_id` (or from now) until it ends.

    On (re)connect: the items missed (from the stream, or from Postgres if the stream lost
    them), then a snapshot. Then each finished item as it comes, a snapshot at most every
    `events_snapshot_interval_s` after new items and at least every `events_resync_s` (which
    also catches changes no worker announces: a cancel, an item failed by the sweeper), and
    `done` with the final snapshot. While Redis is away it keeps sending snapshots from
    Postgres and resumes, replaying what it missed, when Redis is back."""
    resume_from = last_event_id
    while True:
        cursor: list[str | None] = [resume_from]
        try:
            async for event in _follow_stream(source, resume_from, cursor):
                yield event
                if event.kind == "done":
                    return
        except RedisError:
            log.warning("events of job %s: Redis unavailable, polling Postgres", source.job_id, exc_info=True)
            if cursor[0] is None:  # it never reached the stream: resume after now (less the
                # clocks' margin: an item may be heard twice, none is missed)
                cursor[0] = f"{int(time.time() * 1000) - CLOCK_MARGIN_MS}-0"
            summary = await source.snapshot()
            yield ProgressEvent("snapshot", summary)
            if summary["status"] in ENDED:
                yield ProgressEvent("done", summary)
                return
            await asyncio.sleep(source.settings.events_resync_s)
        resume_from = cursor[0]


async def _follow_stream(
    source: JobEventSource, resume_from: str | None, cursor: list[str | None]
) -> AsyncIterator[ProgressEvent]:
    """One connection's worth of `follow`; `cursor[0]` tracks the last id sent, to resume from."""
    settings = source.settings
    position, resume_after = await source.tail()  # before the snapshot: nothing between is lost
    if resume_from is None:
        cursor[0] = resume_after  # from the tail, a resume would skip what Redis's absence hid
    elif await source.can_replay_after(resume_from):
        position = resume_from
        for position, item in await source.missed_after(resume_from):
            cursor[0] = position
            yield ProgressEvent("item", asdict(item), position)
    else:
        for item in await finished_since(source.sessions, source.job_id, parse_event_id(resume_from)[0]):
            yield ProgressEvent("item", asdict(item))
    while True:  # one snapshot per pass; then items until the next one is due
        summary = await source.snapshot()
        event_id = None if position == "0-0" else position
        cursor[0] = event_id or cursor[0]
        yield ProgressEvent("snapshot", summary, event_id)
        if summary["status"] in ENDED:
            yield ProgressEvent("done", summary, event_id)
            return
        last_snapshot, dirty = time.monotonic(), False
        while True:
            since = time.monotonic() - last_snapshot
            due_in = (settings.events_snapshot_interval_s if dirty else settings.events_resync_s) - since
            if due_in <= 0:
                break
            for entry_id, item in await source.read_after(position, due_in):
                position = cursor[0] = entry_id
                dirty = True
                yield ProgressEvent("item", asdict(item), entry_id)
