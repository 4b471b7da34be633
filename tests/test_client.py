"""aidsafe.Client and aidsafe.AsyncClient against the real API over HTTP (uvicorn on a free
port), arq's real worker and the scripted LLM: submit, wait on the events, page, export,
delete; the API's error codes; retries; and the client's models against the OpenAPI document."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from redis.asyncio import Redis

import aidsafe
from aidsafe import models
from aidsafe.client import Call
from app import duplicates
from app.api import annotations as annotations_api
from app.api import schemas, webhooks
from app.config import Settings
from app.events import stream_key
from app.store.db import Sessions
from tests.conftest import eventually, run_worker_burst, served, serving
from tests.test_api import row_counts
from tests.test_cli import KITCHEN

Headers = dict[str, str]


def secret(auth: Headers) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def client(live_api: str, auth: Headers) -> Iterator[aidsafe.Client]:
    with aidsafe.Client(live_api, secret(auth)) as client:
        yield client


async def waited(client: aidsafe.Client, settings: Settings, job_id: Any) -> list[aidsafe.Event]:
    """Run the worker while `client.wait` follows the job's events; the events it saw."""
    seen: list[aidsafe.Event] = []
    waiter = asyncio.create_task(asyncio.to_thread(client.wait, job_id, on_event=seen.append))

    async def connected() -> bool:  # its snapshot came, so it sees the items finish
        return bool(seen) or waiter.done()

    await eventually(connected, what="the event stream's snapshot")
    await run_worker_burst(settings)
    final = await asyncio.wait_for(waiter, 30)
    assert final == seen[-1].data
    return seen


async def test_submit_wait_iterate_export_and_delete(
    client: aidsafe.Client, settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    prompts: list[str | dict[str, Any]] = [
        "How do I sharpen a knife?",
        {"prompt": "How do I store knives?", "metadata": {"n": 1}},
        "Dice?",
    ]
    job = client.submit(
        prompts,
        config={"agents": 2, "max_rounds": 1},
        label="knives",
        metadata={"src": "t"},
        idempotency_key="k1",
    )
    replay = client.submit(
        prompts,
        config={"agents": 2, "max_rounds": 1},
        label="knives",
        metadata={"src": "t"},
        idempotency_key="k1",
    )
    assert (replay.id, replay.replayed, job.replayed) == (job.id, True, False)
    assert (job.label, job.metadata, job.counts.total, job.status) == ("knives", {"src": "t"}, 3, "queued")

    seen = await waited(client, settings, job.id)

    assert [e.kind for e in seen][0] == "snapshot" and seen[-1].kind == "done"
    items = [e.data for e in seen if e.kind == "item"]
    assert sorted((i.position, i.status) for i in items if isinstance(i, models.ItemFinished)) == [
        (0, "completed"),
        (1, "completed"),
        (2, "completed"),
    ]
    cots = list(client.iter_cots(job.id, limit=1))  # three pages of one
    assert [(c.position, c.prompt) for c in cots] == [
        (0, prompts[0]),
        (1, "How do I store knives?"),
        (2, "Dice?"),
    ]
    assert all(isinstance(c, models.Cot) and c.refined_thoughts and c.response for c in cots)
    assert [i.metadata for i in client.iter_items(job.id, limit=2)] == [{}, {"n": 1}, {}]
    detail = client.get_item(cots[1].item_id)
    assert detail.cot is not None and detail.cot.response == cots[1].response and detail.turns
    assert client.get_report(job.id).usage_by_stage["refine"].llm_calls == 3

    path = client.export(job.id, tmp_path / "sft.jsonl", format="jsonl")
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == [c.prompt for c in cots]
    assert not (tmp_path / "sft.jsonl.part").exists()

    deletion = client.delete_job(job.id)
    assert deletion.job_id == job.id and deletion.row_counts["items"] == 3
    assert [d.job_id for d in client.list_deletions()] == [job.id]
    with pytest.raises(aidsafe.AidsafeError) as gone:
        client.get_job(job.id)
    assert (gone.value.status, gone.value.code) == (404, "not_found")
    assert await row_counts(sessions) == (0, 0)


async def test_the_async_client_does_the_same(
    live_api: str, auth: Headers, settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    async with aidsafe.AsyncClient(live_api, secret(auth)) as client:
        job = await client.submit(["a", "b", "c"], policy_set="aidsafe-default")
        seen: list[aidsafe.Event] = []
        waiter = asyncio.create_task(client.wait(job.id, on_event=seen.append))
        await asyncio.sleep(0.5)
        await run_worker_burst(settings)
        final = await asyncio.wait_for(waiter, 30)
        assert final.status == "completed" and final.counts.by_status == {"completed": 3}
        first = next(e.id for e in seen if e.kind == "item")

        resumed = [e async for e in client.events(job.id, last_event_id=first)]
        cots = [c async for c in client.iter_cots(job.id, limit=2)]
        path = await client.export(job.id, tmp_path / "rows.csv", format="aidsafe_csv")
        with pytest.raises(aidsafe.AidsafeError) as refused:
            await client.export(job.id, tmp_path / "no.docx", format="docx")
        deletion = await client.delete_job(job.id)

    assert [e.kind for e in resumed] == ["item", "item", "snapshot", "done"]
    assert [c.prompt for c in cots] == ["a", "b", "c"]
    assert path.read_text().count("\n") >= 4 and "a" in path.read_text()
    assert (refused.value.status, refused.value.code) == (422, "validation_error")
    assert not (tmp_path / "no.docx").exists() and not (tmp_path / "no.docx.part").exists()
    assert deletion.row_counts["jobs"] == 1 and await row_counts(sessions) == (0, 0)


async def test_an_export_into_a_named_pipe_or_a_symlink_writes_into_it_and_leaves_it_as_it_was(
    client: aidsafe.Client, settings: Settings, tmp_path: Path
) -> None:
    # What `-o /dev/null` is too: renaming the finished download over it would replace the device.
    job = client.submit(["a", "b"])
    await run_worker_burst(settings)
    pipe = tmp_path / "rows.jsonl"
    os.mkfifo(pipe)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()

    client.export(job.id, pipe, format="jsonl")
    reader.join(10)

    assert stat.S_ISFIFO(pipe.stat().st_mode) and not (tmp_path / "rows.jsonl.part").exists()
    assert [json.loads(line)["prompt"] for line in received[0].splitlines()] == ["a", "b"]

    # /dev/stdout with the output redirected to a file: a link to a regular file, kept a link
    kept = tmp_path / "kept.jsonl"
    kept.write_text("old rows\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(kept)
    client.export(job.id, link, format="jsonl")
    assert link.is_symlink()
    assert [json.loads(line)["prompt"] for line in kept.read_text().splitlines()] == ["a", "b"]


async def test_errors_carry_the_api_code_message_and_status(
    client: aidsafe.Client, live_api: str, sessions: Sessions
) -> None:
    def error(call: Any, *args: Any, **kwargs: Any) -> tuple[int | None, str]:
        with pytest.raises(aidsafe.AidsafeError) as raised:
            call(*args, **kwargs)
        return raised.value.status, raised.value.code

    assert error(client.get_job, uuid.uuid4()) == (404, "not_found")
    assert error(client.get_item, "not-a-uuid") == (422, "validation_error")
    assert error(client.submit, []) == (422, "validation_error")
    assert error(client.submit, ["a"], config={"agents": 99}) == (422, "validation_error")
    assert error(client.submit, ["a"], policy_set="nope") == (422, "unknown_policy_set")
    assert error(client.list_jobs, metadata="[1]") == (422, "invalid_filter")
    with aidsafe.Client(live_api, "wrong") as stranger:
        assert error(stranger.list_jobs) == (401, "unauthorized")
    with aidsafe.Client("http://127.0.0.1:9", "k") as nowhere:
        assert error(nowhere.list_jobs) == (None, "connection_failed")
    with pytest.raises(aidsafe.AidsafeError) as raised:
        client.submit([], label="x")
    assert raised.value.message.startswith("prompts") and raised.value.details
    assert await row_counts(sessions) == (0, 0)


async def test_listing_filters_relabelling_and_cancelling(client: aidsafe.Client) -> None:
    jobs = [client.submit(["a"], label=f"run-{n % 2}", metadata={"n": n}) for n in range(3)]
    zero_shot = client.submit(["b"], config={"mode": "zero_shot"})
    newest_first = [j.id for j in (zero_shot, *jobs[::-1])]

    assert [j.id for j in client.iter_jobs(limit=1)] == newest_first  # four pages of one
    assert [j.id for j in client.iter_jobs(label="run-0")] == [jobs[2].id, jobs[0].id]
    assert [j.id for j in client.iter_jobs(metadata={"n": 1})] == [jobs[1].id]
    assert [j.id for j in client.iter_jobs(kind="zero_shot")] == [zero_shot.id]
    assert [j.id for j in client.iter_jobs(kind=["zero_shot", "aidsafe"], status=["queued"])] == newest_first
    page = client.list_jobs(limit=3)
    assert len(page.data) == 3 and page.next_cursor
    assert [j.id for j in client.list_jobs(cursor=page.next_cursor).data] == [jobs[0].id]

    relabelled = client.update_job(jobs[0].id, label="renamed")
    assert (relabelled.label, relabelled.metadata) == ("renamed", {"n": 0})  # metadata left as it was
    cleared = client.update_job(jobs[0].id, label=None, metadata={})
    assert (cleared.label, cleared.metadata) == (None, {})
    cancelled = client.cancel_job(zero_shot.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelled_at is not None
    with pytest.raises(aidsafe.AidsafeError) as running:
        client.delete_job(jobs[1].id)
    assert (running.value.status, running.value.code) == (409, "job_running")


async def test_deleting_each_job_as_iter_jobs_yields_it_reaches_every_one(client: aidsafe.Client) -> None:
    """The usual clean-up: each next page is asked for after the previous page's jobs, the
    one its cursor names too, are deleted."""
    jobs = [client.submit(["a"]) for _ in range(3)]
    for job in jobs:
        client.cancel_job(job.id)

    deleted = [client.delete_job(listed.id).job_id for listed in client.iter_jobs(limit=1)]

    assert deleted == [job.id for job in reversed(jobs)]


async def test_comparisons_and_preference_pairs(client: aidsafe.Client, settings: Settings) -> None:
    prompts = ["How do I sharpen a knife?", "How do I store knives?"]
    baseline = client.submit(prompts, config={"mode": "zero_shot", "grading": {}})
    candidate = client.submit(prompts, config={"agents": 2, "pairs": {"max_tries": 1}})
    await run_worker_burst(settings)

    pairs = list(client.iter_preference_pairs(candidate.id, limit=1))
    assert [p.position for p in pairs] == [0, 1] and all(p.redacted for p in pairs)

    # The baseline is graded and the candidate too (pairs turn grading on), by the same grader.
    comparison = client.create_comparison(
        baseline.id,
        candidate.id,
        judges=[{"model": "judge-a"}, {"model": "judge-b"}],
        label="zs-vs-aidsafe",
        idempotency_key="c",
    )
    assert (comparison.baseline_job_id, comparison.prompts, comparison.replayed) == (baseline.id, 2, False)
    await waited(client, settings, comparison.id)
    judged = client.get_comparison(comparison.id)
    assert judged.status == "completed" and judged.mismatches == []
    assert [j.judge["model"] for j in judged.judges] == ["judge-a", "judge-b"]
    for judge in judged.judges:  # the scripted judge calls every pair a tie
        assert (judge.ties, judge.tie_rate.value, judge.tie_rate.n) == (2, 1.0, 2)
    assert judged.agreement is not None and judged.agreement.unanimous.value == 1.0
    assert judged.metrics["relevance"].delta.n == 2
    assert [c.id for c in client.iter_comparisons(label="zs-vs-aidsafe")] == [comparison.id]
    assert [j.kind for j in client.iter_jobs()] == ["comparison", "aidsafe", "zero_shot"]

    ungraded = client.submit(prompts, config={"mode": "zero_shot"})
    await run_worker_burst(settings)
    with pytest.raises(aidsafe.AidsafeError) as refused:
        client.create_comparison(ungraded.id, candidate.id)
    assert (refused.value.status, refused.value.code) == (422, "comparison_mismatch")
    allowed = client.create_comparison(ungraded.id, candidate.id, allow_mismatch=True)
    assert allowed.mismatches == ["grader"]


async def test_the_report_compares_whispered_and_standard_rejected_sides(
    client: aidsafe.Client, settings: Settings, tmp_path: Path
) -> None:
    job = client.submit(["How do I pick a lock?"], config={"pairs": {"max_tries": 2, "baseline": True}})
    await run_worker_burst(settings)

    pairs = client.get_report(job.id).pairs
    assert isinstance(pairs, models.PairReport) and pairs.min_gap == 1.0
    standard = pairs.candidates["standard"]  # the scripted guard passes everything: two tries each
    assert (standard.candidates, standard.judged, standard.flagged.value, standard.flagged.n) == (
        2,
        2,
        0.0,
        2,
    )
    assert standard.gap.bins["0.0"] == 2 and standard.gap.mean.value == 0.0
    assert pairs.candidates["whisper"].flagged_gap.mean == models.Interval(
        value=None, low=None, high=None, n=0
    )
    [pair] = client.list_preference_pairs(job.id).data
    assert [(t["method"], t["number"]) for t in pair.tries] == [
        ("whisper", 1),
        ("whisper", 2),
        ("standard", 1),
        ("standard", 2),
    ]
    with pytest.raises(aidsafe.AidsafeError) as refused:  # the min_gap reaches the API
        client.export(job.id, tmp_path / "x.jsonl", format="jsonl", min_gap=0.5)
    assert refused.value.code == "invalid_filter"


async def test_policy_sets_and_webhooks(client: aidsafe.Client) -> None:
    registered = client.register_policy_set(KITCHEN)
    again = client.register_policy_set(KITCHEN)

    assert (registered.created, again.created, again.id) == (True, False, registered.id)
    listed = {(p.name, p.builtin) for p in client.list_policy_sets()}
    assert {("kitchen", False), ("aidsafe-default", True)} <= listed
    assert client.get_policy_set(registered.id).policies[0]["id"] == "knives"
    job = client.submit(["Whetstone?"], policy_set="kitchen", policy_version=registered.version)
    assert job.policy_set.version == registered.version

    webhook = client.create_webhook("ls-prod")
    assert webhook.secret and webhook.url.endswith(f"/v1/webhooks/label-studio/{webhook.id}")
    assert [w.id for w in client.list_webhooks().data] == [webhook.id]
    assert client.revoke_webhook(webhook.id).revoked_at is not None
    assert client.webhook_rejections(webhook.id) == []


async def test_both_clients_page_through_webhooks_and_delete_a_revoked_one(
    client: aidsafe.Client, live_api: str, auth: Headers
) -> None:
    made = [client.create_webhook(f"ls-{n}").id for n in range(3)]
    with pytest.raises(aidsafe.AidsafeError) as live:
        client.delete_webhook(made[0])
    client.revoke_webhook(made[0])

    first = client.list_webhooks(limit=2)
    async with aidsafe.AsyncClient(live_api, secret(auth)) as async_client:
        every = [w.id async for w in async_client.iter_webhooks(limit=1)]  # three pages of one
        await async_client.delete_webhook(made[0])  # a 204: it returns nothing, and raises on an error

    assert live.value.code == "webhook_not_revoked" and live.value.status == 409
    assert ([w.id for w in first.data], first.next_cursor is not None) == (made[:2], True)
    assert every == made
    assert [w.id for w in client.iter_webhooks(limit=1)] == made[1:]


async def test_prompt_sets_registered_listed_and_pinned_by_both_clients(
    client: aidsafe.Client, live_api: str, auth: Headers, settings: Settings
) -> None:
    builtin = next(p for p in client.list_prompt_sets() if p.builtin)
    templates = client.get_prompt_set(builtin.id).templates
    document = {"name": "house", "templates": {**templates, "seed.user": "Q: $prompt\nI: $intents"}}

    registered = client.register_prompt_set(document)
    async with aidsafe.AsyncClient(live_api, secret(auth)) as async_client:
        again = await async_client.register_prompt_set(document)
        listed = {(p.name, p.builtin) for p in await async_client.list_prompt_sets()}
        with pytest.raises(aidsafe.AidsafeError) as refused:
            await async_client.register_prompt_set(
                {**document, "templates": {**templates, "seed.user": "$x"}}
            )
    job = client.submit(["Hi"], config={"agents": 1, "max_rounds": 1}, prompt_set="house")
    await run_worker_burst(settings)

    assert (registered.created, again.created, again.id) == (True, False, registered.id)
    assert listed == {("house", False), ("aidsafe-default", True)}
    assert (refused.value.status, refused.value.code) == (422, "invalid_prompt_set")
    assert job.prompt_set is not None and job.prompt_set.version == registered.version
    assert [c.prompt_set for c in client.iter_cots(job.id)] == [job.prompt_set]


async def test_presets_listed_shown_and_submitted_with_overrides(
    client: aidsafe.Client, live_api: str, auth: Headers
) -> None:
    listed = client.list_presets()
    paper = client.get_preset("paper")

    assert [p.name for p in listed] == ["paper", "quick", "thorough"] and paper in listed
    job = client.submit(
        ["Whetstone?"], preset="paper", preset_version=paper.version, config={"max_rounds": 1}
    )
    assert job.config["preset"] == {"name": "paper", "version": paper.version}
    assert (job.config["max_rounds"], len(job.config["roles"]["deliberators"])) == (1, 2)
    with pytest.raises(aidsafe.AidsafeError) as unknown:
        client.submit(["a"], preset="fast")
    assert (unknown.value.status, unknown.value.code) == (422, "unknown_preset")
    assert unknown.value.details == {"known": ["paper", "quick", "thorough"]}
    async with aidsafe.AsyncClient(live_api, secret(auth)) as async_client:
        assert await async_client.get_preset("quick") == client.get_preset("quick")


class CutAfterFirstItem(httpx.HTTPTransport):
    """Between the client and the API: the first event stream breaks right after its first
    item event, as a dropped connection does. Records each events request's Last-Event-ID."""

    def __init__(self) -> None:
        super().__init__()
        self.last_event_ids: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if not request.url.path.endswith("/events"):
            return response
        self.last_event_ids.append(request.headers.get("Last-Event-ID"))
        if len(self.last_event_ids) > 1:
            return response
        return httpx.Response(response.status_code, headers=response.headers, stream=CutStream(response))


class CutStream(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __iter__(self) -> Iterator[bytes]:
        received = b""
        for chunk in self.response.stream:  # type: ignore[union-attr]
            received += chunk
            if first_item := re.search(rb"event: item\n.*?\n\n", received, re.S):
                yield received[: first_item.end()]
                raise httpx.ReadError("connection reset by peer")
        yield received

    def close(self) -> None:
        self.response.close()


async def test_a_dropped_event_stream_resumes_from_the_last_event_id(
    live_api: str, auth: Headers, settings: Settings, redis: Redis
) -> None:
    cutter = CutAfterFirstItem()
    with aidsafe.Client(live_api, secret(auth), transport=cutter) as client:
        job = client.submit(["a", "b", "c"])
        await run_worker_burst(settings)
        first, *missed = [entry.decode() for entry, _ in await redis.xrange(stream_key(settings, job.id))]

        events = await asyncio.to_thread(lambda: list(client.events(job.id, last_event_id=first)))

    assert [e.kind for e in events] == ["item", "item", "snapshot", "done"]
    assert [e.id for e in events[:2]] == missed
    assert cutter.last_event_ids == [first, missed[0]]  # resumed after the last event it got


async def test_with_the_keys_streams_at_their_cap_wait_polls_the_job(
    auth: Headers, settings: Settings
) -> None:
    """A 429 too_many_streams means this job's stream cannot be had now, not that waiting
    failed: both clients' wait() poll the job instead (a notebook waiting on many jobs)."""
    capped = settings.model_copy(update={"events_max_streams_per_key": 1})
    refusals: list[aidsafe.EventStreamUnavailable] = []

    async def polling() -> bool:
        return len(refusals) == 2 or waiter.done() or async_waiter.done()

    with served(capped) as base_url:
        with aidsafe.Client(base_url, secret(auth)) as client:
            held, job = client.submit(["a"]), client.submit(["b"])
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=30) as http,
            http.stream("GET", f"/v1/jobs/{held.id}/events", headers=auth) as stream,
            aidsafe.AsyncClient(base_url, secret(auth)) as async_client,
        ):
            assert stream.status_code == 200  # the key's one seat, held
            with aidsafe.Client(base_url, secret(auth)) as client:
                waiter = asyncio.create_task(
                    asyncio.to_thread(client.wait, job.id, poll_s=0.1, on_polling=refusals.append)
                )
                async_waiter = asyncio.create_task(
                    async_client.wait(job.id, poll_s=0.1, on_polling=refusals.append)
                )
                await eventually(polling, what="both waits polling")
                await run_worker_burst(settings)
                finals = await asyncio.wait_for(asyncio.gather(waiter, async_waiter), 30)

    assert [(r.status, r.code) for r in refusals] == [(429, "event_stream_unavailable")] * 2
    assert all("progress streams open" in r.message for r in refusals)  # the API's own words
    assert [(f.status, f.counts.by_status) for f in finals] == [("completed", {"completed": 1})] * 2


class Gateway(httpx.HTTPTransport):
    """A reverse proxy in front of the API: a 502 page while nothing listens behind it."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.ConnectError:
            return httpx.Response(502, text="<h1>502 Bad Gateway</h1>", headers={"Content-Type": "text/html"})


async def test_wait_carries_on_while_the_api_restarts(auth: Headers, settings: Settings) -> None:
    """An API told to stop (a deploy) ends its event streams, then refuses connections (or
    its proxy answers 502) until it runs again, seconds later. wait() reconnected for some
    3 s only (at a 502: not at all), then polled, and the poll's refused connection (or 502)
    ended it: `aidsafe follow` said "No answer from the API" at every such restart."""
    seen: dict[str, list[aidsafe.Event]] = {"sync": [], "async": [], "proxied": []}
    refusals: list[aidsafe.EventStreamUnavailable] = []
    with serving(settings) as first:
        port = httpx.URL(first.url).port
        assert port is not None
        with aidsafe.Client(first.url, secret(auth)) as client:
            job = client.submit(["a"])
        async with aidsafe.AsyncClient(first.url, secret(auth)) as async_client:
            with (
                aidsafe.Client(first.url, secret(auth)) as client,
                aidsafe.Client(first.url, secret(auth), transport=Gateway()) as proxied,
            ):
                waiters = [
                    asyncio.to_thread(
                        client.wait, job.id, on_event=seen["sync"].append, on_polling=refusals.append
                    ),
                    async_client.wait(job.id, on_event=seen["async"].append, on_polling=refusals.append),
                    asyncio.to_thread(
                        proxied.wait, job.id, on_event=seen["proxied"].append, on_polling=refusals.append
                    ),
                ]
                waiting = asyncio.gather(*waiters)

                async def following() -> bool:
                    return all(seen.values()) or waiting.done()

                await eventually(following, what="the streams' snapshots")
                first.server.should_exit = True  # as on SIGTERM: the streams end without `done`
                await asyncio.to_thread(first.thread.join, 10)
                await asyncio.sleep(5)  # nothing listens: connections refused
                with serving(settings, port) as second:
                    assert second.url == first.url
                    await run_worker_burst(settings)
                    finals = await asyncio.wait_for(waiting, 30)

    assert refusals == []  # followed, never polled
    assert [f.status for f in finals] == ["completed"] * 3
    assert [events[-1].kind for events in seen.values()] == ["done"] * 3


class Proxy:
    """A reverse proxy on loopback with one backend, as nginx, envoy or a Kubernetes service in
    front of the API's one pod: each connection's bytes go both ways; one the backend refuses
    (it restarts) is answered 503 without the API's error shape, with `retry_after` if given."""

    def __init__(self, backend_port: int, retry_after: str | None = None) -> None:
        self.backend_port, self.retry_after = backend_port, retry_after
        self.unavailable = 0  # 503s answered

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Its base URL while it runs."""
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        async with server:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        try:
            head = await client.readuntil(b"\r\n\r\n")
            try:
                backend, to_backend = await asyncio.open_connection("127.0.0.1", self.backend_port)
            except OSError:
                self.unavailable += 1
                asked = f"Retry-After: {self.retry_after}\r\n" if self.retry_after else ""
                to_client.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: 19\r\nConnection: close\r\n"
                    + asked.encode()
                    + b"\r\nno healthy upstream"
                )
                await to_client.drain()
                return
            to_backend.write(head)
            piping = [
                asyncio.ensure_future(self._pipe(*ends))
                for ends in ((client, to_backend), (backend, to_client))
            ]
            await asyncio.wait(piping, return_when=asyncio.FIRST_COMPLETED)  # either side closed
            for pipe in piping:
                pipe.cancel()
            to_backend.close()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            to_client.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()


async def test_wait_carries_on_through_a_proxys_503_while_the_api_restarts(
    auth: Headers, settings: Settings
) -> None:
    """Behind a proxy with no healthy backend while the API's one pod restarts, the stream's
    503 was retried three times (some 3 s, or its Retry-After each), then wait() polled and
    the poll's 503 ended it: the restart is waited out, as a 502's, honouring Retry-After."""
    seen: dict[str, list[aidsafe.Event]] = {"sync": [], "async": []}
    refusals: list[aidsafe.EventStreamUnavailable] = []
    with serving(settings) as first:
        port = httpx.URL(first.url).port or 0
        with aidsafe.Client(first.url, secret(auth)) as client:
            job = client.submit(["a"])
        bare, asking = Proxy(port), Proxy(port, retry_after="2")
        async with (
            bare.running() as bare_url,
            asking.running() as asking_url,
            aidsafe.AsyncClient(asking_url, secret(auth)) as async_client,
        ):
            with aidsafe.Client(bare_url, secret(auth)) as client:
                waiting = asyncio.gather(
                    asyncio.to_thread(
                        client.wait, job.id, on_event=seen["sync"].append, on_polling=refusals.append
                    ),
                    async_client.wait(job.id, on_event=seen["async"].append, on_polling=refusals.append),
                )

                async def following() -> bool:
                    return all(seen.values()) or waiting.done()

                await eventually(following, what="the streams' snapshots")
                first.server.should_exit = True  # as on SIGTERM: the streams end without `done`
                await asyncio.to_thread(first.thread.join, 10)
                await asyncio.sleep(8)  # nothing behind the proxies: 503s
                with serving(settings, port):
                    await run_worker_burst(settings)
                    finals = await asyncio.wait_for(waiting, 30)

    assert refusals == []  # followed, never polled
    assert [f.status for f in finals] == ["completed"] * 2
    assert [events[-1].kind for events in seen.values()] == ["done"] * 2
    # tried a second apart, or 2 s apart as the Retry-After asked: half as often
    assert bare.unavailable >= 6 and 2 <= asking.unavailable <= (bare.unavailable + 1) // 2 + 1


async def test_wait_carries_on_while_the_apis_database_is_away(
    live_api: str, auth: Headers, settings: Settings
) -> None:
    """The API's own 503 `unavailable` (its database away) was retried three times, some 3 s,
    on the stream, then on the poll, which it ended: it is waited out too, even at the first
    request. Here the proxy's backend is an API whose database refuses connections, until
    the proxy is switched to one whose database answers."""
    away = settings.model_copy(update={"database_url": "postgresql+asyncpg://postgres@127.0.0.1:1/aidsafe"})
    seen: dict[str, list[aidsafe.Event]] = {"sync": [], "async": []}
    refusals: list[aidsafe.EventStreamUnavailable] = []
    with aidsafe.Client(live_api, secret(auth)) as client:
        job = client.submit(["a"])
    with serving(away) as database_away:
        proxy = Proxy(httpx.URL(database_away.url).port or 0)
        async with proxy.running() as proxy_url, aidsafe.AsyncClient(proxy_url, secret(auth)) as async_client:
            with aidsafe.Client(proxy_url, secret(auth)) as client:
                waiting = asyncio.gather(
                    asyncio.to_thread(
                        client.wait, job.id, on_event=seen["sync"].append, on_polling=refusals.append
                    ),
                    async_client.wait(job.id, on_event=seen["async"].append, on_polling=refusals.append),
                )
                await asyncio.sleep(8)
                assert not any(seen.values()) and not waiting.done()
                # the database is back: new connections go to the other API, and this one
                # stops, so that the proxy's connections to it close
                proxy.backend_port = httpx.URL(live_api).port or 0
                database_away.server.should_exit = True

                async def following() -> bool:
                    return all(seen.values()) or waiting.done()

                await eventually(following, what="the streams' snapshots")
                await run_worker_burst(settings)
                finals = await asyncio.wait_for(waiting, 30)

    assert refusals == []  # followed, never polled
    assert [f.status for f in finals] == ["completed"] * 2
    assert [events[-1].kind for events in seen.values()] == ["done"] * 2


async def test_a_polling_wait_carries_on_while_the_api_restarts(auth: Headers, settings: Settings) -> None:
    """wait() polls while the key's streams are at their cap; a poll's refused connection (or
    a proxy's 503) ended it, where the stream's would have been waited out: one rule for both."""
    capped = settings.model_copy(update={"events_max_streams_per_key": 1})
    refusals: list[aidsafe.EventStreamUnavailable] = []
    with serving(capped) as first:
        port = httpx.URL(first.url).port or 0
        with aidsafe.Client(first.url, secret(auth)) as client:
            held, job = client.submit(["a"]), client.submit(["b"])
        proxy = Proxy(port)
        async with (
            proxy.running() as proxy_url,
            httpx.AsyncClient(base_url=first.url, timeout=30) as http,
            aidsafe.AsyncClient(first.url, secret(auth)) as async_client,
            aidsafe.AsyncClient(proxy_url, secret(auth)) as async_proxied,
            http.stream("GET", f"/v1/jobs/{held.id}/events", headers=auth) as stream,
        ):
            assert stream.status_code == 200  # the key's one seat, held
            with (
                aidsafe.Client(first.url, secret(auth)) as client,
                aidsafe.Client(proxy_url, secret(auth)) as proxied,
            ):
                waiting = asyncio.gather(
                    asyncio.to_thread(client.wait, job.id, poll_s=0.2, on_polling=refusals.append),
                    async_client.wait(job.id, poll_s=0.2, on_polling=refusals.append),
                    asyncio.to_thread(proxied.wait, job.id, poll_s=0.2, on_polling=refusals.append),
                    async_proxied.wait(job.id, poll_s=0.2, on_polling=refusals.append),
                )

                async def polling() -> bool:
                    return len(refusals) == 4 or waiting.done()

                await eventually(polling, what="the waits polling")
                first.server.should_exit = True
                await asyncio.to_thread(first.thread.join, 10)
                await asyncio.sleep(5)  # connections refused, or 503s behind the proxy
                with serving(capped, port):
                    await run_worker_burst(settings)
                    finals = await asyncio.wait_for(waiting, 30)

    assert [r.status for r in refusals] == [429] * 4
    assert [(f.status, f.counts.by_status) for f in finals] == [("completed", {"completed": 1})] * 4
    assert proxy.unavailable >= 5


async def test_an_api_gone_for_good_ends_a_wait_after_30_s_saying_what_was_tried(
    auth: Headers, settings: Settings
) -> None:
    """Gone for good, the API was reported some 35 s on, as the poll's refused connection
    ("[Errno 111] Connection refused"); behind a proxy whose 503 asks for an hour, after three
    retries of a minute each. Either way: 30 s, and what was tried."""
    gone: list[tuple[aidsafe.AidsafeError, float]] = []  # and when, since the API stopped
    stopped = float("inf")

    async def gives_up(wait: Awaitable[object]) -> None:
        with pytest.raises(aidsafe.AidsafeError) as given_up:
            await wait
        gone.append((given_up.value, time.monotonic() - stopped))

    with serving(settings) as doomed:
        with aidsafe.Client(doomed.url, secret(auth)) as client:
            job = client.submit(["a"])  # no worker runs: it stays queued
        proxy = Proxy(httpx.URL(doomed.url).port or 0, retry_after="3600")
        async with (
            proxy.running() as proxy_url,
            aidsafe.AsyncClient(doomed.url, secret(auth)) as async_client,
        ):
            with aidsafe.Client(proxy_url, secret(auth)) as proxied:
                seen: list[aidsafe.Event] = []
                waiting = asyncio.gather(
                    gives_up(asyncio.to_thread(proxied.wait, job.id, on_event=seen.append)),
                    gives_up(async_client.wait(job.id, on_event=seen.append)),
                )

                async def following() -> bool:
                    return len(seen) == 2 or waiting.done()

                await eventually(following, what="the streams' snapshots")
                doomed.server.should_exit, stopped = True, time.monotonic()
                await asyncio.to_thread(doomed.thread.join, 10)
                await asyncio.wait_for(waiting, 45)

    said = {error.message.split("; the last, ")[1].split(",")[0]: (error, took) for error, took in gone}
    proxied_error, proxied_took = said[f"GET {proxy_url}/v1/jobs/{job.id}/events"]
    direct_error, direct_took = said[f"GET {doomed.url}/v1/jobs/{job.id}/events"]
    for error, took in (proxied_error, proxied_took), (direct_error, direct_took):
        assert (error.code, error.status) == ("connection_failed", None)
        assert error.message.startswith("the API did not come back in 30 s: tried "), error.message
        assert 30 <= took < 34
    assert proxied_error.message.endswith("got HTTP 503 Service Unavailable")
    assert ", got no connection: " in direct_error.message  # refused, as the transport words it


class RateLimited(httpx.HTTPTransport):
    """Between the client and the API: the first `times` requests get a 429 with Retry-After."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times, self.sent = times, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        if self.sent <= self.times:
            body = {"error": {"code": "rate_limited", "message": "slow down", "details": None}}
            return httpx.Response(429, json=body, headers={"Retry-After": "0"})
        return super().handle_request(request)


async def test_a_429_is_retried_for_calls_safe_to_repeat_only(
    live_api: str, auth: Headers, sessions: Sessions
) -> None:
    with aidsafe.Client(live_api, secret(auth), transport=RateLimited(2)) as client:
        assert client.list_jobs().data == []
        assert client._http._transport.sent == 3  # type: ignore[attr-defined]

    with aidsafe.Client(live_api, secret(auth), transport=RateLimited(1)) as client:
        unsafe = Call("POST", "/v1/webhooks", lambda r: r.json(), json={"name": "ls"})  # no Idempotency-Key
        with pytest.raises(aidsafe.AidsafeError) as limited:
            client._send(unsafe)
        assert (limited.value.status, limited.value.code, limited.value.message) == (
            429,
            "rate_limited",
            "slow down",
        )
        assert client.submit(["a"], idempotency_key="once").counts.total == 1

    with aidsafe.Client(live_api, secret(auth), transport=RateLimited(1)) as client:
        assert client.submit(["b"], idempotency_key="twice").replayed is False
        assert client.submit(["c"]).replayed is False  # under a key of the call's own
    assert await row_counts(sessions) == (3, 3)

    gives_up = aidsafe.Client(live_api, secret(auth), transport=RateLimited(9), max_retries=2)
    with gives_up, pytest.raises(aidsafe.AidsafeError) as gave_up:
        gives_up.list_jobs()
    assert gave_up.value.status == 429


class AnswerLost(httpx.HTTPTransport):
    """Between the client and the API: the first POST reaches the API, which stores the job,
    and its answer is replaced by the 503 an API answers when Postgres goes before it can."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = super().handle_request(request)
        if request.method != "POST":
            return answer
        self.keys.append(request.headers.get("Idempotency-Key"))
        if len(self.keys) > 1:
            return answer
        answer.read()
        body = {"error": {"code": "unavailable", "message": "the database is unavailable", "details": None}}
        return httpx.Response(503, json=body, headers={"Retry-After": "0"})


async def test_a_submission_whose_answer_was_lost_is_retried_into_the_same_job(
    live_api: str, auth: Headers, sessions: Sessions
) -> None:
    transport = AnswerLost()
    with aidsafe.Client(live_api, secret(auth), transport=transport) as client:
        submitted = client.submit(["a", "b"])  # no idempotency_key given
    assert submitted.replayed is False  # the caller's first and only submission
    assert await row_counts(sessions) == (1, 2)
    first, again = transport.keys
    assert first is not None and first == again


async def test_a_webhook_whose_answer_was_lost_is_retried_into_the_same_webhook(
    live_api: str, auth: Headers
) -> None:
    """Its secret went with the lost answer: the retry says so (None) rather than make a second
    webhook, which would count toward the key's cap."""
    transport = AnswerLost()
    with aidsafe.Client(live_api, secret(auth), transport=transport) as client:
        made = client.create_webhook("ls-prod")  # no idempotency_key given
        listed = client.list_webhooks().data
    assert (made.secret, made.replayed) == (None, False)
    assert [w.id for w in listed] == [made.id]
    first, again = transport.keys
    assert first is not None and first == again


async def test_a_webhook_made_again_under_the_callers_idempotency_key_is_replayed(
    client: aidsafe.Client,
) -> None:
    made = client.create_webhook("ls-prod", idempotency_key="ls-1")
    again = client.create_webhook("ls-prod", idempotency_key="ls-1")

    assert made.secret and not made.replayed
    assert (again.id, again.secret, again.replayed) == (made.id, None, True)


async def test_an_empty_idempotency_key_is_sent_to_be_refused_not_replaced_by_the_clients_own(
    client: aidsafe.Client, sessions: Sessions
) -> None:
    """An empty key is likely the caller's unset variable, which the API refuses (422) so that
    the caller learns its submissions are not idempotent: taken for no key, it made a job under
    a key of the call's own, and every run of the caller's another."""
    with pytest.raises(aidsafe.AidsafeError) as refused:
        client.submit(["a"], idempotency_key="")
    assert (refused.value.status, refused.value.code) == (422, "validation_error")
    assert "idempotency-key" in refused.value.message.lower()
    assert await row_counts(sessions) == (0, 0)


# The client's models beside the API's response schemas.
MIRRORED = {
    models.Job: schemas.JobOut,
    models.Batch: schemas.BatchOut,
    models.BatchProgress: schemas.BatchProgressOut,
    models.SubmittedJob: schemas.SubmittedJobOut,
    models.JobProgress: schemas.JobProgressOut,
    models.JobListed: schemas.JobListed,
    models.ItemFinished: schemas.ItemFinishedOut,
    models.Item: schemas.ItemOut,
    models.ItemDetail: schemas.ItemDetailOut,
    models.Turn: schemas.TurnOut,
    models.Cot: schemas.CotOut,
    models.Fallback: schemas.FallbackOut,
    models.PreferencePair: schemas.PreferencePairOut,
    models.Report: schemas.ReportOut,
    models.Comparison: schemas.ComparisonOut,
    models.Interval: schemas.IntervalOut,
    models.MetricComparison: schemas.MetricComparison,
    models.JudgeResults: schemas.JudgeResults,
    models.JudgeAgreement: schemas.JudgeAgreement,
    models.SubmittedComparison: schemas.SubmittedComparisonOut,
    models.ComparisonListed: schemas.ComparisonListed,
    models.Deletion: schemas.JobDeletionOut,
    models.PolicySet: schemas.PolicySetOut,
    models.PolicySetDetail: schemas.PolicySetDetailOut,
    models.Preset: schemas.PresetOut,
    models.RegisteredPolicySet: schemas.PolicySetDetailOut,
    models.PromptSet: schemas.PromptSetOut,
    models.PromptSetDetail: schemas.PromptSetDetailOut,
    models.RegisteredPromptSet: schemas.RegisteredPromptSetOut,
    models.Webhook: webhooks.WebhookOut,
    models.WebhookCreated: webhooks.WebhookCreatedOut,
    models.Rejection: webhooks.RejectionOut,
    models.Interval: schemas.IntervalOut,
    models.Review: annotations_api.ReviewOut,
    models.ItemReviews: annotations_api.ItemReviewsOut,
    models.ReviewCounts: annotations_api.ReviewCountsOut,
    models.ReviewedItems: annotations_api.ReviewedItemsOut,
    models.GraderAgreement: annotations_api.GraderAgreementOut,
    models.ReviewerAgreement: annotations_api.ReviewerAgreementOut,
    models.ReviewSummary: annotations_api.ReviewSummaryOut,
    models.JobCounts: schemas.JobCounts,
    models.Usage: schemas.Usage,
    models.Budget: schemas.BudgetOut,
    models.Estimate: schemas.EstimateOut,
    models.QualityReport: schemas.QualityReport,
    models.PairSummary: schemas.PairSummary,
    models.PairReport: schemas.PairReport,
    models.CandidateStats: schemas.CandidateStats,
    models.GapDistribution: schemas.GapDistribution,
    models.Interval: schemas.IntervalOut,
    models.Duplicates: duplicates.DuplicatesOut,
    models.DuplicateKind: duplicates.DuplicateKind,
    models.DuplicateGroup: duplicates.DuplicateGroup,
}
CLIENT_SIDE = {"replayed", "created"}  # what the client adds from the answer's status


@pytest.mark.parametrize(("model", "schema"), MIRRORED.items(), ids=[m.__name__ for m in MIRRORED])
def test_each_model_has_exactly_the_fields_the_api_sends(
    model: type[models.Model], schema: type[BaseModel]
) -> None:
    assert set(model.model_fields) - CLIENT_SIDE == set(schema.model_fields)


def test_the_client_imports_without_the_server() -> None:
    server = ("fastapi", "sqlalchemy", "arq", "asyncpg", "redis", "app", "starlette", "uvicorn")
    script = f"import sys, aidsafe; print(sorted(m for m in sys.modules if m.split('.')[0] in {server!r}))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


async def test_the_readme_example_runs(
    live_api: str, auth: Headers, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    example = readme_example()
    monkeypatch.setenv("AIDSAFE_API_URL", live_api)
    monkeypatch.setenv("AIDSAFE_API_KEY", secret(auth))
    monkeypatch.chdir(tmp_path)  # where the example writes sft.jsonl

    scope: dict[str, Any] = {}
    run = asyncio.create_task(asyncio.to_thread(exec, example, scope))

    async def submitted() -> bool:  # the worker has something to run
        return "job" in scope or run.done()

    await eventually(submitted, what="the example's submission")
    await run_worker_burst(settings)
    await asyncio.wait_for(run, 30)

    assert scope["final"].status == "completed"
    # min_score passes graded CoTs only: the example's job must ask for grading to export any
    assert len((tmp_path / "sft.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert scope["client"].list_deletions()[0].job_id == scope["job"].id
    scope["client"].close()


def readme_example() -> str:
    """The Python code block of the README's "Python client" section."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python client") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


@pytest.mark.parametrize("client_class", [aidsafe.Client, aidsafe.AsyncClient])
def test_readme_names_every_method_of_the_client(client_class: type) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python client") : readme.index("\n## CLI")]
    methods = {
        name
        for name, member in inspect.getmembers(client_class)
        if not name.startswith("_") and not isinstance(member, property)
    }

    assert methods - set(re.findall(r"`([a-z_]+)", section)) == set()
