"""Progress events over Server-Sent Events: what a follower of a job receives, live and after
reconnecting, with the Redis stream intact, trimmed or lost."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack, aclosing
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import httpx
import pytest
from arq.connections import create_pool
from httpx_sse import aconnect_sse
from redis.asyncio import Redis
from sqlalchemy import func, text, update

from app.api.draining import until_set
from app.api.events import ResumedEvents, server_sent
from app.config import Settings
from app.events import STREAM_PAGE, ItemFinished, JobEventSource, announce_item_finished, follow, stream_key
from app.queue import REQUEST_RETRIES, bound_calls, redis_settings
from app.store import jobs
from app.store.db import Sessions, make_engine, make_sessions
from app.store.models import ApiKey, Item, ItemStatus, Job
from tests.conftest import new_key, restartable_redis, run_worker_burst, served, serving
from tests.scripted_llm import ScriptedLLM, refusal
from tests.test_api import error_of, submit
from tests.test_viewer import logged_in
from workers.main import worker_settings
from workers.queue_worker import QueueWorker

Headers = dict[str, str]
Event = dict[str, Any]


async def events_of(
    base_url: str,
    auth: Headers,
    job_id: str,
    last_event_id: str | None = None,
    on_event: Any = None,
) -> list[Event]:
    """Every event of the stream until `done` (the server closes it then)."""
    headers = {**auth, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    received: list[Event] = []
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source,
    ):
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for sse in source.aiter_sse():
            event = {
                "event": sse.event,
                "id": sse.id or None,
                "data": json.loads(sse.data) if sse.data else None,
            }
            if sse.event == "message" and not sse.data:  # the opening comment with `retry`
                continue
            received.append(event)
            if on_event:
                await on_event(event)
    assert received[-1]["event"] == "done", received
    return received


def kinds(events: list[Event]) -> list[str]:
    return [e["event"] for e in events]


async def stream_ids(redis: Redis, settings: Settings, job_id: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await redis.xrange(stream_key(settings, UUID(job_id)))]


async def test_a_finished_job_streams_a_snapshot_then_done(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["How do I boil an egg?", "How do I poach an egg?"])
    await run_worker_burst(settings)

    events = await events_of(live_api, auth, job["id"])

    assert kinds(events) == ["snapshot", "done"]
    final = events[-1]["data"]
    assert final["status"] == "completed"
    assert final["counts"]["by_status"] == {"completed": 2}
    assert final["usage"]["llm_calls"] > 0
    assert final["refusals_by_stage"] == {}  # as on GET /v1/jobs/{id}


async def test_a_follower_hears_each_item_finish_with_its_status_and_error_code(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("intent_decomposition", refusal())
    job = await submit(api, auth, ["Write a phishing email.", "How do I spot a phishing email?"])
    connected = asyncio.Event()

    async def on_event(event: Event) -> None:
        connected.set()

    follower = asyncio.create_task(events_of(live_api, auth, job["id"], on_event=on_event))
    await asyncio.wait_for(connected.wait(), 10)  # the first snapshot: the worker may start
    await run_worker_burst(settings, max_jobs=1)
    events = await asyncio.wait_for(follower, 30)

    assert events[0]["event"] == "snapshot" and events[0]["data"]["status"] == "queued"
    items = [e for e in events if e["event"] == "item"]
    assert sorted(e["data"]["position"] for e in items) == [0, 1]
    assert sorted((e["data"]["status"], e["data"]["error_code"]) for e in items) == [
        ("completed", None),
        ("failed", "agent_refused"),
    ]
    assert all(e["id"] for e in items), "item events carry the stream id to resume from"
    assert events[-1]["data"]["status"] == "completed"
    assert events[-1]["data"]["counts"]["by_status"] == {"completed": 1, "failed": 1}


async def test_the_worker_appends_each_finished_item_to_an_expiring_stream(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, redis: Redis
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])
    await run_worker_burst(settings)

    key = stream_key(settings, UUID(job["id"]))
    entries = await redis.xrange(key)
    assert sorted(int(fields[b"position"]) for _, fields in entries) == [0, 1, 2]
    assert {fields[b"status"] for _, fields in entries} == {b"completed"}
    assert 0 < await redis.ttl(key) <= settings.events_stream_ttl_s


async def test_reconnecting_with_last_event_id_gets_only_what_was_missed(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, redis: Redis
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])
    await run_worker_burst(settings)
    first, *missed = await stream_ids(redis, settings, job["id"])

    events = await events_of(live_api, auth, job["id"], last_event_id=first)

    assert kinds(events) == ["item", "item", "snapshot", "done"]
    assert [e["id"] for e in events[:2]] == missed
    assert events[2]["id"] == missed[-1]


async def test_a_replay_longer_than_a_page_of_the_stream_is_whole_and_in_order(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, redis: Redis
) -> None:
    """The stream is read STREAM_PAGE entries at a time: a page may end within one
    millisecond's entries, and the next must start at the entry after it, not skip or repeat."""
    job = await submit(api, auth, ["a", "b", "c"])
    await run_worker_burst(settings)
    key = stream_key(settings, UUID(job["id"]))
    first, *announced = await stream_ids(redis, settings, job["id"])
    items = [e["data"] for e in await events_of(live_api, auth, job["id"], last_event_id=first)][:2]
    newest_ms = int(announced[-1].split("-")[0])
    added = [f"{newest_ms + 1 + n // 7}-{n % 7}" for n in range(2 * STREAM_PAGE + 100)]  # 7 a millisecond
    for n, entry_id in enumerate(added):
        item = items[n % 2]
        finished = ItemFinished(item["item_id"], item["position"], item["status"], item["error_code"])
        await redis.xadd(key, finished.fields(), id=entry_id)

    events = await events_of(live_api, auth, job["id"], last_event_id=first)

    assert [e["id"] for e in events if e["event"] == "item"] == announced + added
    assert kinds(events)[-2:] == ["snapshot", "done"]


@pytest.mark.parametrize("loss", ["redis lost the stream", "trimmed past the client's id"])
async def test_items_the_stream_lost_are_replayed_from_postgres(
    loss: str, live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, redis: Redis
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])
    await run_worker_burst(settings)
    key = stream_key(settings, UUID(job["id"]))
    first, *_ = await stream_ids(redis, settings, job["id"])
    if loss == "redis lost the stream":
        await redis.delete(key)
    else:
        await redis.xtrim(key, maxlen=1, approximate=False)

    events = await events_of(live_api, auth, job["id"], last_event_id=first)

    replayed = [e for e in events if e["event"] == "item"]
    assert sorted(e["data"]["position"] for e in replayed) == [0, 1, 2]
    assert kinds(events)[-2:] == ["snapshot", "done"]
    assert events[-1]["data"]["counts"]["by_status"] == {"completed": 3}


async def test_items_replayed_from_postgres_are_the_jobs_own_with_their_status_and_error_code(
    live_api: str,
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    redis: Redis,
    scripted_llm: ScriptedLLM,
) -> None:
    scripted_llm.script("intent_decomposition", refusal())
    job = await submit(api, auth, ["Write a phishing email.", "How do I spot a phishing email?"])
    await run_worker_burst(settings, max_jobs=1)
    first, *_ = await stream_ids(redis, settings, job["id"])
    await submit(api, auth, ["Another job's prompt.", "And its second."])  # ends after: in the window
    await run_worker_burst(settings)
    await redis.delete(stream_key(settings, UUID(job["id"])))

    events = await events_of(live_api, auth, job["id"], last_event_id=first)

    replayed = [e["data"] for e in events if e["event"] == "item"]
    assert sorted(e["position"] for e in replayed) == [0, 1]
    assert sorted((e["status"], e["error_code"]) for e in replayed) == [
        ("completed", None),
        ("failed", "agent_refused"),
    ]


async def test_a_cancel_no_worker_announces_still_ends_the_stream(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    job = await submit(api, auth, ["a", "b"])
    source = resyncing_events(redis, settings, sessions, job["id"], 0.2)
    received: list[str] = []
    async for event in follow(source, None):
        received.append(event.kind)
        if len(received) == 1:
            assert (await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)).status_code == 200
        if event.kind == "done":
            assert event.data["status"] == "cancelled"
        assert len(received) < 10, received

    assert received[0] == "snapshot" and received[-2:] == ["snapshot", "done"]


def resyncing_events(
    redis: Redis, settings: Settings, sessions: Sessions, job_id: str, every_s: float
) -> JobEventSource:
    """A job's events on `redis`, resyncing from Postgres every `every_s`."""
    quick = settings.model_copy(update={"events_resync_s": every_s})
    return JobEventSource(redis, sessions, quick, UUID(job_id), summary_of(sessions, job_id))


def unreachable_source(settings: Settings, sessions: Sessions, job_id: str) -> tuple[Redis, JobEventSource]:
    """A job's events on a Redis that never answers (close it), resyncing every 0.2 s."""
    unreachable = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    return unreachable, resyncing_events(unreachable, settings, sessions, job_id, 0.2)


async def test_while_redis_is_unreachable_the_follower_goes_on_from_postgres(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job = await submit(api, auth, ["a", "b"])
    unreachable, source = unreachable_source(settings, sessions, job["id"])
    received: list[tuple[str, str]] = []
    try:
        async for event in follow(source, "1-0"):
            received.append((event.kind, event.data["status"]))
            if len(received) == 1:
                await run_worker_burst(settings)  # the queue's Redis is up; the stream's is not
            assert len(received) < 20, received
    finally:
        await unreachable.aclose()

    assert received[0] == ("snapshot", "queued")
    assert received[-2:] == [("snapshot", "completed"), ("done", "completed")]


async def test_while_redis_is_unreachable_the_follower_hears_each_item_end_before_done(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """With Redis away, no entry tells of an item's end: Postgres must, before each snapshot
    and before `done` (once heard only as snapshot then done, the items' ends lost)."""
    job = await submit(api, auth, ["a", "b"])
    unreachable, source = unreachable_source(settings, sessions, job["id"])
    received: list[tuple[str, Any]] = []
    try:
        async with asyncio.timeout(20):
            async for event in follow(source, None):
                received.append((event.kind, event.data.get("position", event.data.get("status"))))
                if len(received) == 1:  # its workers end both items; neither is announced
                    await end_item(sessions, job["id"], 0, None, settings)
                    await end_item(sessions, job["id"], 1, None, settings)
                assert len(received) < 20, received
    finally:
        await unreachable.aclose()

    assert received[0] == ("snapshot", "queued")
    assert sorted(position for kind, position in received if kind == "item") == [0, 1], received
    assert received[-2:] == [("snapshot", "completed"), ("done", "completed")]


class SnapshotCutOnce:
    """A job's snapshots, the second of which Postgres ends the connection of (as a restart
    ends them all); `taken`: how many were asked for."""

    def __init__(self, sessions: Sessions, job_id: str) -> None:
        self.summary = summary_of(sessions, job_id)
        self.sessions = sessions
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        self.taken += 1
        if self.taken == 2:
            async with self.sessions() as session:
                await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        summary: dict[str, Any] = await self.summary()
        return summary


async def test_while_redis_is_unreachable_a_postgres_fault_delays_the_followers_events_and_loses_none(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """Without Redis the follower sends snapshots from Postgres: one whose connection Postgres
    ends (a restart) ended the stream there, where with Redis up the follower waits for it."""
    job = await submit(api, auth, ["a", "b"])
    unreachable = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    quick = settings.model_copy(update={"events_resync_s": 0.2})
    snapshot_cut_once = SnapshotCutOnce(sessions, job["id"])

    stream = follow(JobEventSource(unreachable, sessions, quick, UUID(job["id"]), snapshot_cut_once), None)
    received: list[tuple[str, Any]] = []
    try:
        async with asyncio.timeout(20), aclosing(stream):
            async for event in stream:
                received.append((event.kind, event.data.get("position", event.data.get("status"))))
                if len(received) == 1:
                    await end_item(sessions, job["id"], 0, None, settings)
                    await end_item(sessions, job["id"], 1, None, settings)
                assert len(received) < 20, received
    finally:
        await unreachable.aclose()

    assert snapshot_cut_once.taken > 2
    assert sorted(position for kind, position in received if kind == "item") == [0, 1], received
    assert received[-2:] == [("snapshot", "completed"), ("done", "completed")]


async def test_a_follower_waits_on_redis_for_as_long_as_its_stream_needs(
    settings: Settings, sessions: Sessions, auth: Headers, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream waits on Redis (XREAD BLOCK) until its next snapshot is due, longer than the
    API's other Redis calls may take: on their pool, each of its waits timed out and was sent
    again, over and over, and no snapshot came."""
    patient = settings.model_copy(update={"redis_timeout_s": 1.0, "events_resync_s": 2.5})
    with served(patient) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            job = await submit(client, auth, ["a"])  # no worker runs: nothing happens to it
            async with aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=auth) as source:
                started, snapshots = time.monotonic(), 0
                async with asyncio.timeout(10.0):
                    async for sse in source.aiter_sse():
                        snapshots += sse.event == "snapshot"
                        if snapshots == 2:
                            break

    assert time.monotonic() - started < 6.0, "the resync's 2.5 s wait, then the snapshot"
    assert not [r for r in caplog.records if "Redis unavailable" in r.getMessage()]


class EndsUnannounced(QueueWorker):
    """A worker whose item ends are committed but never announced, as when one is killed
    between an item's commit and its arq job's end (whose transaction announces it)."""

    async def finish_job(self, job_id: str, *args: Any, **kwargs: Any) -> None:
        self.item_endings.pop(job_id, None)
        await super().finish_job(job_id, *args, **kwargs)


async def test_an_item_whose_event_never_reached_the_stream_is_replayed_on_resume(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, redis: Redis, sessions: Sessions
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])
    one = {"max_jobs": 1, "max_burst_jobs": 1}
    await asyncio.wait_for(run_worker_burst(settings, **one), 60)  # item a: its event is stored
    (first,) = await stream_ids(redis, settings, job["id"])
    worker = EndsUnannounced(
        **{**worker_settings(settings, sweeper=False), "burst": True, "handle_signals": False, **one}
    )
    try:
        await asyncio.wait_for(worker.main(), 60)  # item b: ended in Postgres, never announced
    finally:
        await worker.close()
    await asyncio.wait_for(run_worker_burst(settings), 60)

    events = await events_of(live_api, auth, job["id"], last_event_id=first)

    assert events[-1]["data"]["counts"]["by_status"] == {"completed": 3}
    assert sorted(e["data"]["position"] for e in events if e["event"] == "item") == [1, 2]


async def end_item(
    sessions: Sessions,
    job_id: str,
    position: int,
    announce_on: Redis | None,
    settings: Settings,
    ago_s: float = 0,
) -> None:
    """What a worker does as an item ends (`ago_s` seconds ago): its row, then (unless
    `announce_on` is None, as when the worker dies in between) its entry in the job's stream."""
    async with sessions.begin() as session:
        item = (
            await session.execute(
                update(Item)
                .where(Item.job_id == UUID(job_id), Item.position == position)
                .values(status=ItemStatus.COMPLETED, finished_at=func.now() - timedelta(seconds=ago_s))
                .returning(Item.id)
            )
        ).scalar_one()
    if announce_on is not None:
        async with announce_on.pipeline(transaction=True) as pipe:
            finished = ItemFinished(str(item), position, "completed", None)
            announce_item_finished(pipe, settings, UUID(job_id), finished)
            await pipe.execute()


async def test_a_connected_follower_hears_an_item_whose_event_never_reached_the_stream(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    job = await submit(api, auth, ["a", "b"])
    source = resyncing_events(redis, settings, sessions, job["id"], 0.3)
    stream = follow(source, None)
    try:
        async with asyncio.timeout(10):
            assert (await anext(stream)).kind == "snapshot"
            await end_item(sessions, job["id"], 0, None, settings)  # the worker died before announcing it
            event = await anext(stream)
            while event.kind == "snapshot":
                event = await anext(stream)
    finally:
        await stream.aclose()

    assert (event.kind, event.data["position"]) == ("item", 0), "heard while the job still runs"


async def test_a_resume_hears_an_unannounced_item_that_ended_before_the_last_event_heard(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """Its client may have heard a later item and dropped before the check that would have
    sent the earlier one: a resume reads Postgres from up to events_resync_s before its id."""
    job = await submit(api, auth, ["a", "b"])
    await end_item(sessions, job["id"], 0, None, settings, ago_s=8)  # its worker died before announcing it
    await end_item(sessions, job["id"], 1, redis, settings)
    (last_heard,) = await stream_ids(redis, settings, job["id"])
    source = resyncing_events(redis, settings, sessions, job["id"], 10.0)

    events = [event async for event in follow(source, last_heard)]

    assert [(e.kind, e.data.get("position")) for e in events[:-2]] == [("item", 0)]
    assert [e.kind for e in events[-2:]] == ["snapshot", "done"]


async def test_a_redis_restart_under_a_connected_follower_loses_no_item(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    """The restart takes the stream's entries with it, and the API's pool reconnects without
    an error: only Postgres can tell the follower what it missed."""
    job = await submit(api, auth, ["a", "b", "c", "d"])
    heard: list[int] = []
    with restartable_redis(tmp_path) as (url, restart):
        own = settings.model_copy(update={"redis_url": url, "events_resync_s": 1.0})
        streams = await create_pool(redis_settings(url, REQUEST_RETRIES))  # as the API's (app/main.py)
        await bound_calls(streams, own.redis_timeout_s + own.events_resync_s)
        writer = Redis.from_url(url)
        stream = follow(
            JobEventSource(streams, sessions, own, UUID(job["id"]), summary_of(sessions, job["id"])), None
        )
        try:
            async with asyncio.timeout(30):
                assert (await anext(stream)).kind == "snapshot"
                reading = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(0.2)  # in its XREAD
                await end_item(sessions, job["id"], 0, writer, own)
                event = await reading
                assert event.kind == "item"
                heard.append(event.data["position"])
                # While the follower's client is slow to take the next event, b and c end,
                # then Redis restarts, empty, and d ends.
                await end_item(sessions, job["id"], 1, writer, own)
                await end_item(sessions, job["id"], 2, writer, own)
                restart()
                await writer.aclose()
                writer = Redis.from_url(url)
                await end_item(sessions, job["id"], 3, writer, own)
                async for event in stream:
                    if event.kind == "item":
                        heard.append(event.data["position"])
                    if event.kind == "done":
                        assert event.data["counts"]["by_status"] == {"completed": 4}
        finally:
            await stream.aclose()
            await streams.aclose()
            await writer.aclose()

    assert sorted(heard) == [0, 1, 2, 3]


async def test_a_postgres_fault_under_a_connected_follower_delays_its_events_and_loses_none(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """A snapshot whose connection Postgres ends (as a restart ends them all) does not end the
    stream: it goes on at the next check, from where it was, as it does without Redis."""
    job = await submit(api, auth, ["a", "b"])
    own = settings.model_copy(update={"events_resync_s": 0.2})
    snapshot_cut_once = SnapshotCutOnce(sessions, job["id"])

    stream = follow(JobEventSource(redis, sessions, own, UUID(job["id"]), snapshot_cut_once), None)
    heard: list[int] = []
    async with asyncio.timeout(30), aclosing(stream):
        assert (await anext(stream)).kind == "snapshot"
        await end_item(sessions, job["id"], 0, redis, own)
        await end_item(sessions, job["id"], 1, None, own)  # its worker died before announcing it
        async for event in stream:
            if event.kind == "item":
                heard.append(event.data["position"])
            if event.kind == "done":
                assert event.data["counts"]["by_status"] == {"completed": 2}

    assert snapshot_cut_once.taken > 2
    assert sorted(set(heard)) == [0, 1]


async def test_a_postgres_that_stops_answering_under_a_connected_follower_delays_its_events_and_loses_none(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """A failover leaves connections half-open: a snapshot's statement is given up on after
    the engine's command timeout (a TimeoutError, not a DBAPIError). The stream goes on at the
    next check, as it does when Postgres ends the connection."""
    job = await submit(api, auth, ["a", "b"])
    own = settings.model_copy(update={"events_resync_s": 0.2})
    silent = make_engine(settings.database_url, 0.2, 1)  # given up on 1.2 s into a statement
    snapshots = 0

    async def snapshot_unanswered_once() -> dict[str, Any]:
        nonlocal snapshots
        snapshots += 1
        if snapshots == 2:
            async with make_sessions(silent)() as session:
                await session.execute(text("SET LOCAL statement_timeout = 0"))  # Postgres stays silent
                await session.execute(text("SELECT pg_sleep(5)"))
        summary: dict[str, Any] = await summary_of(sessions, job["id"])()
        return summary

    stream = follow(JobEventSource(redis, sessions, own, UUID(job["id"]), snapshot_unanswered_once), None)
    heard: list[int] = []
    try:
        async with asyncio.timeout(30), aclosing(stream):
            assert (await anext(stream)).kind == "snapshot"
            await end_item(sessions, job["id"], 0, redis, own)
            await end_item(sessions, job["id"], 1, None, own)  # its worker died before announcing it
            async for event in stream:
                if event.kind == "item":
                    heard.append(event.data["position"])
                if event.kind == "done":
                    assert event.data["counts"]["by_status"] == {"completed": 2}
    finally:
        await silent.dispose()

    assert snapshots > 2
    assert sorted(set(heard)) == [0, 1]


def summary_of(sessions: Sessions, job_id: str) -> Any:
    async def snapshot() -> dict[str, Any]:
        async with sessions() as session:
            row = await session.get(Job, UUID(job_id))
            assert row is not None
            return await jobs.summary(session, row)

    return snapshot


async def test_events_of_another_keys_job_are_not_found(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job = await submit(api, auth, ["a"])
    other = await new_key(sessions, "bob")

    error_of(await api.get(f"/v1/jobs/{job['id']}/events", headers=other), 404, "not_found")
    error_of(await api.get(f"/v1/jobs/{job['id']}/events"), 401, "unauthorized")


async def test_a_last_event_id_this_api_never_sent_is_refused(api: httpx.AsyncClient, auth: Headers) -> None:
    job = await submit(api, auth, ["a"])

    response = await api.get(f"/v1/jobs/{job['id']}/events", headers={**auth, "Last-Event-ID": "yesterday"})

    error_of(response, 400, "invalid_cursor")


@pytest.mark.parametrize("last_event_id", [b"\xb2-0", b"1-\xb3"], ids=["superscript-ms", "superscript-seq"])
async def test_a_last_event_id_with_digits_other_than_ascii_is_refused(
    api: httpx.AsyncClient, auth: Headers, last_event_id: bytes
) -> None:
    """Header bytes are read as Latin-1: byte 0xb2 is "²", a digit to str.isdigit but not to int."""
    job = await submit(api, auth, ["a"])
    headers = {
        **{name.encode(): value.encode() for name, value in auth.items()},
        b"Last-Event-ID": last_event_id,
    }

    error_of(await api.get(f"/v1/jobs/{job['id']}/events", headers=headers), 400, "invalid_cursor")
    viewer = await logged_in(api, auth)
    viewed = await viewer.get(f"/view/jobs/{job['id']}/events", headers={b"Last-Event-ID": last_event_id})
    assert viewed.status_code == 400, viewed.text
    assert "not an event id this API sent" in viewed.text  # on the viewer's error page


async def test_a_resume_from_an_id_padded_with_a_no_break_space_goes_on_reading_the_stream(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """Byte 0xa0 (Latin-1) is a no-break space, which the id's check strips: XREAD was then
    asked from the id as sent, which Redis refuses, and the follower fell back to Postgres for
    good (items without ids, events_resync_s late), logging Redis as unavailable each time."""
    job = await submit(api, auth, ["a", "b"])
    await end_item(sessions, job["id"], 0, redis, settings)
    (heard,) = await stream_ids(redis, settings, job["id"])
    quick = settings.model_copy(update={"events_resync_s": 1.0})
    headers = {**auth, "Last-Event-ID": heard.encode() + b"\xa0"}

    async def end_the_last_item() -> None:
        await end_item(sessions, job["id"], 1, redis, settings)

    with served(quick) as base_url:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=10) as client,
            aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=headers) as stream,
        ):
            received: list[tuple[str, str]] = []
            async for sse in stream.aiter_sse():
                if sse.event == "message" and not sse.data:  # the opening comment with `retry`
                    continue
                received.append((sse.event, sse.id))
                if len(received) == 1:
                    await end_the_last_item()

    ended = (await stream_ids(redis, settings, job["id"]))[-1]
    assert [(kind, id) for kind, id in received if kind == "item"] == [("item", ended)], received
    assert received[0] == ("snapshot", heard) and received[-1] == ("done", ended), received


async def resume_status(base_url: str, auth: Headers, job_id: str, last_event_id: str) -> tuple[int, Any]:
    """The status of a follow resuming from `last_event_id`, and its error code if refused
    (a stream that starts is left at once: the job never ends)."""
    headers = {**auth, "Last-Event-ID": last_event_id}
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=10) as client,
        client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response,
    ):
        if response.status_code == 200:
            return 200, None
        return response.status_code, json.loads(await response.aread())["error"]["code"]


async def test_a_well_formed_last_event_id_this_api_never_sent_is_refused(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, redis: Redis
) -> None:
    job = await submit(api, auth, ["a", "b"])
    key = stream_key(settings, UUID(job["id"]))
    now_ms = int(time.time() * 1000)
    for position, entry_ms in enumerate((now_ms, now_ms + 2)):  # two events, as workers append them
        finished = ItemFinished(str(UUID(int=position)), position, "completed", None)
        await redis.xadd(key, finished.fields(), id=f"{entry_ms}-0")
    before_the_job, between_the_events, after_the_newest = "1-0", f"{now_ms + 1}-0", f"{now_ms + 60_000}-0"

    for never_sent in (before_the_job, between_the_events, after_the_newest):
        assert await resume_status(live_api, auth, job["id"], never_sent) == (400, "invalid_cursor"), (
            never_sent
        )
    assert await resume_status(live_api, auth, job["id"], f"{now_ms}-0") == (200, None)
    await redis.delete(key)  # Redis lost the stream: ids from the future are still refused
    assert await resume_status(live_api, auth, job["id"], after_the_newest) == (400, "invalid_cursor")
    assert await resume_status(live_api, auth, job["id"], f"{now_ms}-0") == (200, None)


async def test_a_key_may_hold_only_so_many_streams_open_at_once(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job = await submit(api, auth, ["a"])  # no worker runs: its streams stay open
    other = await new_key(sessions, "bob")
    others_job = await submit(api, other, ["b"])
    capped = settings.model_copy(update={"events_max_streams_per_key": 2})

    with served(capped) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:

            async def opened(headers: Headers, job_id: str) -> httpx.Response:
                async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                    await response.aread() if response.status_code != 200 else None
                    return response

            async with (
                aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=auth) as first,
                aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=auth) as second,
            ):
                assert (first.response.status_code, second.response.status_code) == (200, 200)
                refused = await opened(auth, job["id"])
                error_of(refused, 429, "too_many_streams")
                assert refused.headers["Retry-After"] == "5"
                assert (await opened(other, others_job["id"])).status_code == 200  # a seat per key

            # The seats come back once the streams end (when the server sees them closed).
            deadline = time.monotonic() + 10
            while (status := (await opened(auth, job["id"])).status_code) != 200:
                assert status == 429 and time.monotonic() < deadline, status
                await asyncio.sleep(0.1)


async def test_the_process_holds_only_so_many_streams_open_whoever_opens_them(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    keys = [auth, await new_key(sessions, "bob"), await new_key(sessions, "carol")]
    jobs = [await submit(api, key, ["a"]) for key in keys]  # no worker runs: their streams stay open
    capped = settings.model_copy(update={"events_max_streams": 2})

    with served(capped) as base_url:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=10) as client,
            aconnect_sse(client, "GET", f"/v1/jobs/{jobs[0]['id']}/events", headers=keys[0]) as first,
            aconnect_sse(client, "GET", f"/v1/jobs/{jobs[1]['id']}/events", headers=keys[1]) as second,
        ):
            assert (first.response.status_code, second.response.status_code) == (200, 200)
            async with client.stream("GET", f"/v1/jobs/{jobs[2]['id']}/events", headers=keys[2]) as third:
                await third.aread()
            assert "server" in error_of(third, 429, "too_many_streams")["message"]
            assert third.headers["Retry-After"] == "5"


async def test_keys_holding_all_their_streams_leave_a_seat_to_a_key_streaming_none(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """Keys' caps together pass the process's (32 keys' 32 streams are all 1,024): a few keys'
    streams held every seat, and each other tenant's stream was a 429 until one ended. The
    process's last seat (of 4 here) is kept for a key holding none."""
    keys = [auth, await new_key(sessions, "bob"), await new_key(sessions, "carol")]
    jobs = [await submit(api, key, ["a"]) for key in keys]  # no worker runs: their streams stay open
    capped = settings.model_copy(update={"events_max_streams_per_key": 2, "events_max_streams": 4})

    with served(capped) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client, AsyncExitStack() as held:
            asked = []
            for key, job in [*zip(keys[:2], jobs[:2], strict=True)] * 2:  # one each, then a second each
                sse = await held.enter_async_context(
                    aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=key)
                )
                asked.append(sse.response)
            async with client.stream("GET", f"/v1/jobs/{jobs[2]['id']}/events", headers=keys[2]) as third:
                assert third.status_code == 200
            assert [response.status_code for response in asked] == [200, 200, 200, 429]
            await asked[3].aread()
            refusal = error_of(asked[3], 429, "too_many_streams")["message"]
            assert "keeps its last 1 of 4 progress streams for API keys that have none open" in refusal


async def kinds_until_closed(stream: Any, after_first: Callable[[], Any]) -> list[str]:
    """The events of an open stream until the server closes it; `after_first` is awaited once
    the first event (the opening snapshot) has come."""
    received: list[str] = []
    async for sse in stream.aiter_sse():
        if sse.event == "message" and not sse.data:  # the opening comment with `retry`
            continue
        received.append(sse.event)
        if len(received) == 1:
            await after_first()
    return received


async def test_a_stream_ends_once_its_key_is_revoked_and_the_reconnection_is_refused(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """A stream of a job that runs for days outlived its key's revocation by as long."""
    job = await submit(api, auth, ["a"])  # no worker runs: the job never ends
    quick = settings.model_copy(update={"events_resync_s": 0.3, "api_key_cache_s": 0})

    async def revoke() -> None:
        async with sessions.begin() as session:
            await session.execute(update(ApiKey).values(revoked_at=func.now()))  # the only key

    with served(quick) as base_url:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=10) as client,
            aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=auth) as stream,
        ):
            received = await asyncio.wait_for(kinds_until_closed(stream, revoke), 10)
            again = await client.get(f"/v1/jobs/{job['id']}/events", headers=auth)

    assert received == ["snapshot"]
    error_of(again, 401, "unauthorized")


async def test_a_stream_of_a_job_deleted_meanwhile_ends_cleanly_and_the_reconnection_is_not_found(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """Its next snapshot found no job: an AssertionError cut the stream with a traceback."""
    job = await submit(api, auth, ["a"])  # no worker runs: the job never ends
    quick = settings.model_copy(update={"events_resync_s": 0.3})

    async def delete() -> None:  # as a purge would, between two snapshots
        async with sessions.begin() as session:
            await session.execute(text("DELETE FROM items WHERE job_id = :id"), {"id": job["id"]})
            await session.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": job["id"]})

    with served(quick) as base_url:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=10) as client,
            aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=auth) as stream,
        ):
            received = await asyncio.wait_for(kinds_until_closed(stream, delete), 10)
            again = await client.get(f"/v1/jobs/{job['id']}/events", headers=auth)

    assert received == ["snapshot"]
    error_of(again, 404, "not_found")


async def test_a_stopping_api_ends_its_streams_at_once_so_that_it_can_stop(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    """An API told to stop waited for every open stream to end: for a job that runs for days,
    until it was killed. Its clients resume elsewhere with Last-Event-ID."""
    job = await submit(api, auth, ["a"])  # no worker runs: the job never ends
    with serving(settings) as api_served:
        async with (
            httpx.AsyncClient(base_url=api_served.url, timeout=10) as client,
            aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=auth) as stream,
        ):

            async def stop() -> None:
                api_served.server.should_exit = True  # as on SIGTERM

            started = time.monotonic()
            # A clean end (a cut one raises), before the 2 s the server gives what is under way.
            received = await asyncio.wait_for(kinds_until_closed(stream, stop), 10)
            ended_s = time.monotonic() - started
        await asyncio.to_thread(api_served.thread.join, 10)

    assert received == ["snapshot"]
    assert ended_s < 1.5, ended_s
    assert not api_served.thread.is_alive()


async def test_a_client_that_leaves_mid_stream_ends_it_without_an_error(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream's next event is awaited in a task of its own (to stop at a shutdown): left
    running when the client went, closing the stream raised 'asynchronous generator is
    already running', logged as an exception of the app, and its read of Redis went on."""
    job = await submit(api, auth, ["a"])  # no worker runs: the job never ends
    with serving(settings) as api_served:
        uvicorn_logs = logging.getLogger("uvicorn")  # its own handlers: it does not propagate
        uvicorn_logs.addHandler(caplog.handler)
        try:
            async with (
                httpx.AsyncClient(base_url=api_served.url, timeout=10) as client,
                aconnect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=auth) as stream,
            ):
                async for sse in stream.aiter_sse():
                    if sse.event == "snapshot":
                        break  # and the client goes, while the stream waits for the job's next event
            await asyncio.sleep(0.5)  # the server sees it gone and ends the stream
        finally:
            uvicorn_logs.removeHandler(caplog.handler)

    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


async def test_a_stream_whose_client_leaves_closes_its_job_events_at_once() -> None:
    """A client that leaves cancels its stream (FastAPI's producer, in an anyio task group)
    while the stream waits for the job's next event. That wait ran in a task of its own, left
    running: closing the job's events then raised RuntimeError (the generator was running),
    logged as an ASGI error at every client that left, and its Redis read went on."""
    closed = asyncio.Event()

    async def job_events() -> AsyncGenerator[int, None]:
        try:
            while True:
                await asyncio.sleep(60)  # as XREAD BLOCK waits for the next entry
                yield 1
        finally:
            closed.set()

    async def stream() -> None:
        async with aclosing(job_events()) as followed:
            async for _ in until_set(followed, asyncio.Event()):
                pass

    async with anyio.create_task_group() as streams:
        streams.start_soon(stream)
        await asyncio.sleep(0.1)
        streams.cancel_scope.cancel()  # the client left

    assert closed.is_set()


async def test_a_viewer_stream_ends_once_its_session_is_logged_out(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["a"])  # no worker runs: the job never ends
    quick = settings.model_copy(update={"events_resync_s": 0.3})

    with served(quick) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as viewer:
            await logged_in(viewer, auth)

            async def log_out() -> None:
                assert (await viewer.post("/view/logout")).status_code == 303

            async with aconnect_sse(viewer, "GET", f"/view/jobs/{job['id']}/events") as stream:
                received = await asyncio.wait_for(kinds_until_closed(stream, log_out), 10)

    assert received == ["snapshot"]


async def test_a_postgres_fault_while_a_stream_checks_its_caller_still_may_read_it_does_not_end_it(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """The check after each snapshot ran unguarded: a restart then ended the stream with a
    traceback, though the snapshot before it had been waited out."""
    job = await submit(api, auth, ["a", "b"])
    checks = 0

    async def allowed_cut_once() -> bool:
        nonlocal checks
        checks += 1
        async with sessions() as session:
            if checks == 2:
                await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            return True

    source = resyncing_events(redis, settings, sessions, job["id"], 0.2)
    events = ResumedEvents(source, None, allowed_cut_once, asyncio.Event())
    kinds: list[str | None] = []
    async with asyncio.timeout(30):
        async for event in server_sent(events):
            kinds.append(event.event)
            if kinds.count("snapshot") == 2:
                await end_item(sessions, job["id"], 0, redis, settings)
                await end_item(sessions, job["id"], 1, redis, settings)

    assert checks > 2
    assert kinds[-1] == "done" and kinds.count("item") == 2
