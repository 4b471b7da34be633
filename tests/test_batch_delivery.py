"""Batch delivery (`delivery: batch`): a job advances in waves through the scripted batch
API and ends with the turns and CoTs an online job given the same scripts ends with, at the
batch price; it survives an expired batch and a worker killed mid-wave without losing or
repeating an answer."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from arq.connections import ArqRedis
from prometheus_client import REGISTRY
from sqlalchemy import func, select, update

from aidsafe.models import BatchProgress
from app.cli.follow import wave_text
from app.config import BatchConfig, EndpointConfig, Prices, Settings
from app.deliberation.ports import ChatReply, ChatRequest, LLMRequestRejected, Stage, TurnKey
from app.llm.batch_api import BatchAPI, input_line
from app.llm.client import chat_payload, completion_reply, fitted
from app.queue import enqueue_shares
from app.store import batches, deletions, items
from app.store.batches import AwaitingBatch, BatchedLLM, LeaseLost, Outcome
from app.store.db import Sessions
from app.store.models import Batch, BatchRequest, BatchStatus, Cot, Item, Job, TurnRow
from tests.conftest import api_client, eventually, run_worker_burst, start_worker, submit
from tests.scripted_llm import Reply, ScriptedLLM, agree, default_answer, malformed
from tests.test_api import other_backend
from workers.waves import run_round

PROMPTS = [f"Question {n}: how do tides and currents shape a coastline?" for n in range(20)]
ONLINE, BATCH = Prices(input=0.2, output=0.8), Prices(input=0.1, output=0.4)


@pytest.fixture
def batch_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "llm_batch": BatchConfig(max_requests=8, prices=BATCH),
            "llm_prices": {"default": ONLINE},
            "batch_interval_s": 0.1,
            "batch_poll_interval_s": 0.0,
            "batch_lease_s": 2.0,
            # A refused batch or file is taken for gone at its third refusal in a row.
            "batch_gone_after_s": 0.0,
        }
    )


@pytest.fixture
async def batch_api(batch_settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(batch_settings) as client:
        yield client


def _varied_answers(scripted_llm: ScriptedLLM) -> None:
    """Answers that depend on the request only (so on neither order nor timing): question n
    % 3 == 0 disagrees once in deliberation, n % 4 == 1 gets a malformed seed, then a good one."""

    def answer(body: dict[str, Any]) -> Any:
        schema = body["response_format"]["json_schema"]["name"]
        text = "\n".join(m["content"] for m in body["messages"])
        n = int(re.search(r"Question (\d+):", text).group(1))  # type: ignore[union-attr]
        if schema == "deliberation_turn" and n % 3 == 0 and "[T3]" not in text:
            return agree(False, new_thoughts=[f"Question {n} needs a note on rip currents."])
        if schema == "seed_cot" and n % 4 == 1 and len(body["messages"]) == 2:
            return malformed()
        return default_answer(schema, body)

    scripted_llm.models["scripted-model"] = answer


@dataclass(frozen=True)
class OnlineRun:
    """An online job of the varied answers (`_varied_answers`), to hold a batch job to."""

    job_id: str
    requests: int  # the scripted server's requests once it had run


async def _online_run(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    scripted_llm: ScriptedLLM,
    prompts: list[str],
) -> OnlineRun:
    _varied_answers(scripted_llm)
    job_id = await submit(api, auth, prompts)
    await run_worker_burst(settings)
    return OnlineRun(job_id, len(scripted_llm.requests))


async def _same_as_online(
    sessions: Sessions, scripted_llm: ScriptedLLM, online: OnlineRun, job_id: str
) -> tuple[dict[Any, Any], dict[int, Any]]:
    """The batch job's turns and CoTs, checked to be the online job's, each answer paid for once."""
    batched = await _record(sessions, job_id)
    assert batched == await _record(sessions, online.job_id)
    assert len(scripted_llm.requests) - online.requests == len(batched[0]), "an answer was lost or paid twice"
    return batched


async def _first_batch_expires(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    **config: Any,
) -> str:
    """Run a batch job of PROMPTS[:6] whose first batch expires with 2 of its lines answered,
    to its end: its id."""
    job_id, first, _ = await _held_in_progress(
        api, auth, settings, sessions, redis, scripted_llm, 6, **config
    )
    scripted_llm.batches.expire(first["id"], answered=2)
    scripted_llm.batches.hold = False
    await _drive(settings, sessions, redis, job_id)
    return job_id


async def _drive(settings: Settings, sessions: Sessions, redis: ArqRedis, job_id: str) -> None:
    """Run the worker and the batch rounds in turn until the job has no unfinished item."""
    await _drive_until(settings, sessions, redis, lambda: _all_finished(sessions, job_id))


async def _drive_until(
    settings: Settings,
    sessions: Sessions,
    redis: ArqRedis,
    done: Callable[[], Awaitable[bool]],
    rounds: int | None = None,
    within_s: float = 60.0,
) -> None:
    """Run the worker (burst) and a batch round in turn until `done`: at most `rounds` times,
    or, without `rounds`, for up to `within_s`. A batch whose round failed is looked at again
    only after a call's timeout (a second here): a count of rounds ran out on a fast machine
    before a fault's retries did."""
    api = BatchAPI(settings.endpoints(), settings.batch_call_timeout_s)
    deadline, done_rounds = time.monotonic() + within_s, 0
    try:
        while (done_rounds < rounds) if rounds is not None else (time.monotonic() < deadline):
            done_rounds += 1
            await run_worker_burst(settings)
            await run_round(settings, sessions, redis, api)
            if await done():
                return
    finally:
        await api.aclose()
    raise AssertionError(f"never happened: {done}")


async def _rounds(settings: Settings, sessions: Sessions, redis: ArqRedis, times: int = 1) -> None:
    """`times` batch rounds, the worker not run between them."""
    api = BatchAPI(settings.endpoints(), settings.batch_call_timeout_s)
    try:
        for _ in range(times):
            await run_round(settings, sessions, redis, api)
    finally:
        await api.aclose()


async def _all_finished(sessions: Sessions, job_id: str) -> bool:
    async with sessions() as session:
        statuses = (await session.scalars(select(Item.status).where(Item.job_id == UUID(job_id)))).all()
    return all(status in ("completed", "failed", "cancelled") for status in statuses)


async def _record(sessions: Sessions, job_id: str) -> tuple[dict[Any, Any], dict[int, Any]]:
    """The job's turns by (position, key) and its CoTs by position, without ids or timings."""
    async with sessions() as session:
        turns = (
            await session.execute(
                select(Item.position, TurnRow)
                .join(TurnRow, TurnRow.item_id == Item.id)
                .where(Item.job_id == UUID(job_id))
            )
        ).all()
        cots = (await session.scalars(select(Cot).where(Cot.job_id == UUID(job_id)))).all()
    by_key = {
        (position, t.stage, t.round, t.agent, t.attempt): (t.raw_output, t.parsed, t.outcome, t.request_hash)
        for position, t in turns
    }
    assert len(by_key) == len(turns), "a turn was stored twice"
    by_position = {
        c.position: (c.thoughts, c.refined_thoughts, c.dropped_thoughts, c.response, c.rounds_used, c.agreed)
        for c in cots
    }
    return by_key, by_position


async def test_a_batch_job_gives_the_turns_and_cots_of_an_online_job_at_the_batch_price(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS)

    batch_id = await submit(batch_api, auth, PROMPTS, delivery="batch")
    await _drive(batch_settings, sessions, arq_redis, batch_id)

    batched = await _same_as_online(sessions, scripted_llm, online, batch_id)
    assert len(batched[1]) == len(PROMPTS)
    created = scripted_llm.batches.created()
    assert all(b["endpoint"] == "/v1/chat/completions" for b in created)
    assert max(b["request_counts"]["total"] for b in created) <= 8, "a wave was not split at max_requests"
    online_job = (await batch_api.get(f"/v1/jobs/{online.job_id}", headers=auth)).json()
    job = (await batch_api.get(f"/v1/jobs/{batch_id}", headers=auth)).json()
    assert job["status"] == "completed"
    assert job["config"]["delivery"] == "batch"
    assert job["usage"]["cost_usd"] == pytest.approx(online_job["usage"]["cost_usd"] / 2)
    assert job["batch"]["wave"] >= 5  # intent, seed, its re-ask, deliberation and its second turn, refine
    assert job["batch"]["requests"]["answered"] == len(batched[0])
    assert {b["provider_status"] for b in job["batch"]["batches"]} == {"completed"}
    assert "batch" not in online_job["config"] and online_job["batch"] is None


async def test_an_expired_batch_resubmits_only_its_unanswered_requests(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    prompts = PROMPTS[:6]
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, prompts)
    job_id = await _first_batch_expires(batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm)

    await _same_as_online(sessions, scripted_llm, online, job_id)
    # The next wave: the 4 expired requests, and the next calls of the 2 answered items.
    first, second = scripted_llm.batches.created()[:2]
    resent = {line["custom_id"] for line in scripted_llm.batches.input_lines(second["id"])}
    first_lines = [line["custom_id"] for line in scripted_llm.batches.input_lines(first["id"])]
    assert len(resent) == 6
    assert set(first_lines[2:]) <= resent
    assert not set(first_lines[:2]) & resent


async def test_batch_metrics_count_the_batches_created_and_ended_and_the_requests_sent_again(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    before = {name: _sample(name, **labels) for name, labels in _BATCH_METRICS}

    await _first_batch_expires(batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm)

    made = len(scripted_llm.batches.created())
    counted = {name: _sample(name, **labels) - before[name] for name, labels in _BATCH_METRICS}
    assert counted == {
        "aidsafe_batches_created_total": made,
        "aidsafe_batches_ended_total": made,  # all collected
        "aidsafe_batch_requests_resent_total": 4,  # the expired batch's unanswered 4
    }


_BATCH_METRICS = [
    ("aidsafe_batches_created_total", {"endpoint": "default"}),
    ("aidsafe_batches_ended_total", {"endpoint": "default", "status": "collected"}),
    ("aidsafe_batch_requests_resent_total", {"endpoint": "default", "via": "next_wave"}),
]


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_worker_killed_mid_wave_is_resumed_by_another_without_loss_or_duplicates(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    scripted_llm.batches.hold = True
    job_id = await submit(batch_api, auth, PROMPTS, delivery="batch")
    workers.append(start_worker(batch_settings))
    await eventually(lambda: _provider_status(scripted_llm, "in_progress"), what="a batch in progress")
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()

    workers.append(start_worker(batch_settings))
    scripted_llm.batches.hold = False
    await eventually(lambda: _job_completed(batch_api, auth, job_id), timeout_s=120, what="the job")

    turns, cots = await _record(sessions, job_id)
    assert len(cots) == len(PROMPTS)
    assert len(scripted_llm.requests) == len(turns), "an answer was lost or paid for twice"
    async with sessions() as session:
        ours = (
            await session.scalars(select(Batch.provider_batch_id).where(Batch.job_id == UUID(job_id)))
        ).all()
    assert sorted(str(o) for o in ours) == sorted(b["id"] for b in scripted_llm.batches.created()), (
        "a batch was created twice"
    )


async def _provider_status(scripted_llm: ScriptedLLM, status: str) -> bool:
    return any(b["status"] == status for b in scripted_llm.batches.created())


async def _job_completed(api: httpx.AsyncClient, auth: dict[str, str], job_id: str) -> bool:
    status: str = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["status"]
    return status == "completed"


async def test_batch_delivery_on_an_endpoint_without_a_batch_api_is_refused(
    api: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    response = await api.post(
        "/v1/jobs", json={"prompts": ["Why is the sky blue?"], "config": {"delivery": "batch"}}, headers=auth
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "batch_unsupported"
    assert response.json()["error"]["details"] == {"endpoints": ["default"]}
    assert json.loads(response.text)["error"]["message"].startswith("delivery 'batch' needs a batch API")


async def _three_prompts_held_in_progress(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> str:
    """A batch job of three prompts whose provider batch is in progress, and held there."""
    job_id, _, _ = await _held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, 3
    )
    return job_id


async def _held_in_progress(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    prompts: int,
    **config: Any,
) -> tuple[str, dict[str, Any], list[str]]:
    """A batch job of the first `prompts` PROMPTS whose first provider batch is in progress,
    and held there: the job's id, that batch, and its lines' custom ids."""
    scripted_llm.batches.hold = True
    job_id = await submit(api, auth, PROMPTS[:prompts], delivery="batch", **config)
    await _drive_until(settings, sessions, redis, lambda: _provider_status(scripted_llm, "in_progress"))
    [first] = scripted_llm.batches.created()
    lines = [line["custom_id"] for line in scripted_llm.batches.input_lines(first["id"])]
    return job_id, first, lines


async def test_cancelling_a_batch_job_cancels_its_provider_batch(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    job_id = await _three_prompts_held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm
    )

    waiting = (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert (
        wave_text(BatchProgress.model_validate(waiting["batch"]))
        == "wave 1 · batch in_progress 0/3 · saved $0.0000"
    )

    cancelled = await batch_api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _provider_status(scripted_llm, "cancelled")
    )

    assert cancelled.json()["counts"]["by_status"] == {"cancelled": 3}
    [provider_batch] = scripted_llm.batches.created()
    assert scripted_llm.batches.cancel_requests == [provider_batch["id"]]
    job = (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "cancelled"
    assert [b["status"] for b in job["batch"]["batches"]] == ["cancelled"]


async def test_a_batch_the_provider_no_longer_knows_holds_up_no_other_job(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    scripted_llm.batches.hold = True
    await submit(batch_api, auth, PROMPTS[:2], delivery="batch")
    workers.append(start_worker(batch_settings))
    [lost] = await eventually(lambda: _in_progress(scripted_llm, 1), what="a batch in progress")
    scripted_llm.batches.forget(lost)  # each poll of it is now a 404
    scripted_llm.batches.hold = False

    other = await submit(batch_api, auth, PROMPTS[2:4], delivery="batch")

    await eventually(lambda: _job_completed(batch_api, auth, other), timeout_s=60, what="the other job")


@pytest.mark.parametrize("unanswered", ["next_wave", "online"])
async def test_a_batch_the_provider_no_longer_knows_ends_lost_and_its_requests_are_sent_once_more(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    unanswered: str,
) -> None:
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS[:3])
    job_id, lost, lost_lines = await _held_in_progress(
        batch_api,
        auth,
        batch_settings,
        sessions,
        arq_redis,
        scripted_llm,
        3,
        batch={"unanswered": unanswered},
    )
    scripted_llm.batches.forget(lost["id"])  # each poll of it is now a 404
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    await _same_as_online(sessions, scripted_llm, online, job_id)  # nothing lost, nothing paid twice
    row = await _provider_batch_row(sessions, lost["id"])
    assert row.status == "lost" and "HTTP 404" in str(row.error)
    resent = _sent_lines(scripted_llm)  # the forgotten batch is not among them
    if unanswered == "online":
        assert not set(lost_lines) & set(resent)
        assert {custom_id for custom_id, _ in await _requests(sessions, job_id, "online")} == set(lost_lines)
    else:
        assert [resent.count(custom_id) for custom_id in lost_lines] == [1, 1, 1]


@pytest.mark.parametrize("status", [400, 422])
async def test_a_batch_whose_poll_the_provider_keeps_refusing_ends_lost_once_the_refusal_has_lasted(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    status: int,
) -> None:
    """A 4xx but 404 (and 401/403) on a retrieve: a refusal, as a 404 is. It was a fault,
    the batch asked about again at every poll for ever and its items waiting as long."""
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS[:3])
    job_id, refused, refused_lines = await _held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, 3
    )
    scripted_llm.batches.refuse(refused["id"], status)  # every poll of it, from now on
    scripted_llm.batches.hold = False

    async def ended() -> bool:
        return (await _provider_batch_row(sessions, refused["id"])).finished_at is not None

    await _drive_until(batch_settings, sessions, arq_redis, ended, rounds=20)
    row = await _provider_batch_row(sessions, refused["id"])
    assert row.status == "lost" and f"HTTP {status}" in str(row.error)
    assert row.refusals >= batches.GONE_AFTER_REFUSALS, "taken for lost at its first refusal"
    # Hidden from each retrieve, it may still run: cancelled, so as not to be paid for twice.
    assert scripted_llm.batches.cancel_requests == [refused["id"]]

    await _drive(batch_settings, sessions, arq_redis, job_id)

    await _same_as_online(sessions, scripted_llm, online, job_id)  # nothing lost, nothing paid twice
    assert [_sent_lines(scripted_llm).count(custom_id) for custom_id in refused_lines] == [2, 2, 2]


@pytest.mark.parametrize("unanswered", ["next_wave", "online"])
async def test_a_lost_batch_whose_cancel_shows_answers_keeps_them_and_sends_only_the_rest_again(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    unanswered: str,
) -> None:
    """A batch hidden from every retrieve is taken for lost and cancelled; the cancel shows it
    was there, cancelled with 2 of its 3 lines answered in its output file. Thrown away, those
    2 were bought again."""
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS[:3])
    job_id, hidden, hidden_lines = await _held_in_progress(
        batch_api,
        auth,
        batch_settings,
        sessions,
        arq_redis,
        scripted_llm,
        3,
        batch={"unanswered": unanswered},
    )
    scripted_llm.batches.progress(hidden["id"], answered=2)
    scripted_llm.batches.refuse(hidden["id"], 400)  # every retrieve of it, from now on
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    await _same_as_online(sessions, scripted_llm, online, job_id)  # nothing lost, nothing paid twice
    row = await _provider_batch_row(sessions, hidden["id"])
    assert (row.status, row.provider_status) == ("lost", "cancelled") and "HTTP 400" in str(row.error)
    assert scripted_llm.batches.cancel_requests == [hidden["id"]]
    answered, cut_off = hidden_lines[:2], hidden_lines[2]
    resent = _sent_lines(scripted_llm)
    assert [resent.count(custom_id) for custom_id in answered] == [1, 1], "an answer was bought twice"
    if unanswered == "online":
        assert [custom_id for custom_id, _ in await _requests(sessions, job_id, "online")] == [cut_off]
    else:
        assert resent.count(cut_off) == 2


@pytest.mark.parametrize(("cancelling_s", "recancel_refused"), [(0.5, False), (0.5, True), (600.0, False)])
async def test_a_lost_batch_answering_its_cancel_cancelling_is_waited_for_and_its_answers_kept(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    cancelling_s: float,
    recancel_refused: bool,
) -> None:
    """OpenAI answers a cancel `cancelling`, with no files: the output file of the answers
    made before the cancel is named once the batch is `cancelled`. Read at once, there was no
    file, and those answers were bought again. It is looked at again by its cancel, or, where
    the provider refuses to cancel it again, in its batch list. A batch that stays cancelling
    is waited for AIDSAFE_BATCH_GONE_AFTER_S at most: then its requests are sent again."""
    settings = batch_settings.model_copy(update={"batch_gone_after_s": 2.0})
    online = await _online_run(batch_api, auth, settings, scripted_llm, PROMPTS[:3])
    job_id, hidden, hidden_lines = await _held_in_progress(
        batch_api, auth, settings, sessions, arq_redis, scripted_llm, 3
    )
    scripted_llm.batches.progress(hidden["id"], answered=2)
    scripted_llm.batches.refuse(hidden["id"], 400)  # every retrieve of it, from now on
    scripted_llm.batches.cancelling_s = cancelling_s
    scripted_llm.batches.recancel_refused = recancel_refused
    scripted_llm.batches.hold = False

    await _drive(settings, sessions, arq_redis, job_id)

    row = await _provider_batch_row(sessions, hidden["id"])
    resent = _sent_lines(scripted_llm)
    if cancelling_s < settings.batch_gone_after_s:
        await _same_as_online(sessions, scripted_llm, online, job_id)  # nothing lost, nothing paid twice
        assert (row.status, row.provider_status) == ("lost", "cancelled")
        assert [resent.count(custom_id) for custom_id in hidden_lines] == [1, 1, 2], "answers bought twice"
    else:
        assert (row.status, row.provider_status) == ("lost", "cancelling")
        assert "still cancelling after its cancel" in str(row.error)
        assert [resent.count(custom_id) for custom_id in hidden_lines] == [2, 2, 2]
    assert row.cancel_sent_at is not None and row.finished_at is not None
    assert row.finished_at - row.cancel_sent_at < timedelta(seconds=settings.batch_gone_after_s + 10)


async def test_a_lost_batchs_file_whose_download_fails_is_downloaded_again_without_a_second_cancel(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    """The cancel of a batch taken for lost names its output file, whose download fails (a
    503): the next look cancelled again, and a provider that refuses to cancel an ended batch
    showed no files then, so its answers were bought again."""
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS[:3])
    job_id, hidden, hidden_lines = await _held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, 3
    )
    scripted_llm.batches.progress(hidden["id"], answered=2)
    scripted_llm.batches.refuse(hidden["id"], 400)  # every retrieve of it, from now on
    scripted_llm.batches.content_failures = 1  # the first download after the cancel
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    await _same_as_online(sessions, scripted_llm, online, job_id)  # nothing lost, nothing paid twice
    assert scripted_llm.batches.cancel_requests == [hidden["id"]], "cancelled again"
    row = await _provider_batch_row(sessions, hidden["id"])
    assert (row.status, row.provider_status) == ("lost", "cancelled")
    assert scripted_llm.batches.downloads[str(row.output_file_id)] == 2
    resent = _sent_lines(scripted_llm)
    assert [resent.count(custom_id) for custom_id in hidden_lines] == [1, 1, 2], "answers bought twice"


@pytest.mark.parametrize("unanswered", ["next_wave", "online"])
@pytest.mark.parametrize("gone", ["output", "error"])
async def test_a_batch_file_the_provider_no_longer_has_sends_its_requests_once_more_and_keeps_the_other(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    gone: str,
    unanswered: str,
) -> None:
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS[:6])
    job_id, first, first_lines = await _held_in_progress(
        batch_api,
        auth,
        batch_settings,
        sessions,
        arq_redis,
        scripted_llm,
        6,
        batch={"unanswered": unanswered},
    )
    scripted_llm.batches.expire(first["id"], answered=2)  # 2 answers in its output file, 4 errors
    ended = scripted_llm.batches.created()[0]
    deleted, kept = ended[f"{gone}_file_id"], ended["error_file_id" if gone == "output" else "output_file_id"]
    scripted_llm.batches.delete_file(deleted)  # each download of it is now a 404
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    assert scripted_llm.batches.downloads[kept] == 1, "the file read was downloaded again at each poll"
    batched = await _record(sessions, job_id)
    assert batched == await _record(sessions, online.job_id), "an answer was lost"
    unread = first_lines if gone == "output" else first_lines[2:]
    paid_twice = 2 if gone == "output" else 0  # the gone output file's answers: paid, never read
    assert len(scripted_llm.requests) - online.requests == len(batched[0]) + paid_twice
    row = await _provider_batch_row(sessions, first["id"])
    assert row.status == "collected" and deleted in str(row.error) and "HTTP 404" in str(row.error)
    resent = _sent_lines(scripted_llm)[len(first_lines) :]
    if unanswered == "online":
        assert not set(first_lines) & set(resent)
        assert {custom_id for custom_id, _ in await _requests(sessions, job_id, "online")} == set(unread)
    else:
        assert [resent.count(custom_id) for custom_id in first_lines] == [
            int(custom_id in unread) for custom_id in first_lines
        ]


# --- a provider that refuses a batch or file for a while -----------------------------------------


async def _provider_batch_row(sessions: Sessions, provider_batch_id: str) -> Batch:
    async with sessions() as session:
        return (
            await session.scalars(select(Batch).where(Batch.provider_batch_id == provider_batch_id))
        ).one()


def _sent_lines(scripted_llm: ScriptedLLM) -> list[str]:
    """The custom ids of every batch's lines, the batches oldest first."""
    return [
        line["custom_id"]
        for b in scripted_llm.batches.created()
        for line in scripted_llm.batches.input_lines(b["id"])
    ]


async def _answered_normally(scripted_llm: ScriptedLLM, sessions: Sessions, first: dict[str, Any]) -> None:
    """The provider batch ended collected, its refusals forgotten, and none of its lines was
    sent again."""
    row = await _provider_batch_row(sessions, first["id"])
    assert (row.status, row.error, row.refusals, row.refused_since) == ("collected", None, 0, None)
    lines = [line["custom_id"] for line in scripted_llm.batches.input_lines(first["id"])]
    assert [_sent_lines(scripted_llm).count(custom_id) for custom_id in lines] == [1] * len(lines)


@pytest.mark.parametrize("answered_between", [False, True])
async def test_a_batch_the_provider_refuses_twice_then_finds_completes_as_if_never_refused(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    answered_between: bool,
) -> None:
    """Refusals count in a row: refused twice, answered (still in progress), then refused
    once more is three in all, never three in a row, so not lost (the period is 0 here)."""
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS[:3])
    job_id, first, _ = await _held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, 3
    )
    scripted_llm.batches.refuse(first["id"], 404, times=2)  # as a proxy might, for a while
    if answered_between:
        await _rounds(batch_settings, sessions, arq_redis, times=3)  # refused, refused, answered
        assert (await _provider_batch_row(sessions, first["id"])).refusals == 0
        scripted_llm.batches.refuse(first["id"], 404, times=1)
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    await _same_as_online(sessions, scripted_llm, online, job_id)  # nothing lost, nothing paid twice
    await _answered_normally(scripted_llm, sessions, first)


async def test_a_batch_file_the_provider_refuses_twice_then_serves_is_read_and_nothing_is_bought_again(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS[:3])
    job_id, first, _ = await _held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, 3
    )
    scripted_llm.batches.finish(first["id"])
    output_file = scripted_llm.batches.created()[0]["output_file_id"]
    scripted_llm.batches.refuse(output_file, 404, times=2)
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    await _same_as_online(sessions, scripted_llm, online, job_id)  # its answers read, none bought twice
    await _answered_normally(scripted_llm, sessions, first)


@pytest.mark.parametrize("refused", ["output", "error"])
async def test_a_batch_file_read_while_the_other_is_refused_is_downloaded_once_and_its_answers_kept(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    refused: str,
) -> None:
    """One file refused for a while, then served: the other, read at the first poll, was
    downloaded again at every poll until then. Now its lines are stored at once (its answered
    items go on meanwhile) and it is not asked for again; nothing is lost or bought twice."""
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, PROMPTS[:6])
    job_id, first, _ = await _held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, 6
    )
    scripted_llm.batches.expire(first["id"], answered=2)  # 2 answers in its output file, 4 errors
    ended = scripted_llm.batches.created()[0]
    other = ended["error_file_id" if refused == "output" else "output_file_id"]
    # Refused at fewer polls than take a file for gone.
    scripted_llm.batches.refuse(ended[f"{refused}_file_id"], 404, times=batches.GONE_AFTER_REFUSALS - 1)
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    assert scripted_llm.batches.downloads[other] == 1, "the file read was downloaded again at each poll"
    await _same_as_online(sessions, scripted_llm, online, job_id)
    row = await _provider_batch_row(sessions, first["id"])
    assert (row.status, row.error, row.refusals, row.refused_since) == ("collected", None, 0, None)
    assert (row.output_file_id, row.error_file_id) == (ended["output_file_id"], ended["error_file_id"])


async def test_a_batch_file_refused_beside_one_read_later_is_taken_for_gone_at_its_own_third_refusal(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    """Both files refused at the first poll, the output file served at the second: it is read
    once, and the error file, refused at every poll, is taken for gone at its third refusal,
    the count going on across the poll that read the other."""
    job_id, first, first_lines = await _held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, 6
    )
    scripted_llm.batches.expire(first["id"], answered=2)  # 2 answers in its output file, 4 errors
    ended = scripted_llm.batches.created()[0]
    scripted_llm.batches.refuse(ended["output_file_id"], 404, times=1)
    scripted_llm.batches.refuse(ended["error_file_id"], 404)  # every ask, from now on
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    downloads = scripted_llm.batches.downloads
    assert (downloads[ended["output_file_id"]], downloads[ended["error_file_id"]]) == (
        2,
        batches.GONE_AFTER_REFUSALS,
    )
    row = await _provider_batch_row(sessions, first["id"])
    assert row.status == "collected" and ended["error_file_id"] in str(row.error)
    assert [_sent_lines(scripted_llm).count(custom_id) for custom_id in first_lines] == [1, 1, 2, 2, 2, 2]


async def _first_batch_finished_with_its_output_file_refused(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    status: int,
) -> tuple[str, Batch, list[str]]:
    """A batch job of three prompts whose first batch completed and whose output file the
    provider refuses with `status` for ever, led until that batch ended or was refused
    GONE_AFTER_REFUSALS times: the job's id, the batch's row then, and its lines."""
    job_id, first, first_lines = await _held_in_progress(
        api, auth, settings, sessions, redis, scripted_llm, 3
    )
    scripted_llm.batches.finish(first["id"])
    scripted_llm.batches.refuse(scripted_llm.batches.created()[0]["output_file_id"], status)
    scripted_llm.batches.hold = False

    async def refused_enough_or_ended() -> bool:
        row = await _provider_batch_row(sessions, first["id"])
        return row.finished_at is not None or row.refusals >= batches.GONE_AFTER_REFUSALS

    await _drive_until(settings, sessions, redis, refused_enough_or_ended, rounds=20)
    return job_id, await _provider_batch_row(sessions, first["id"]), first_lines


async def test_a_batch_file_refused_for_ever_is_taken_for_gone_only_after_the_period_and_sent_once_more(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    settings = batch_settings.model_copy(update={"batch_gone_after_s": 3.0})
    job_id, refused, first_lines = await _first_batch_finished_with_its_output_file_refused(
        batch_api, auth, settings, sessions, arq_redis, scripted_llm, 404
    )
    assert refused.finished_at is None and refused.refused_since is not None, "taken for gone at once"

    await _drive(settings, sessions, arq_redis, job_id)

    row = await _batch_row(sessions, refused.id)
    assert row.status == "collected" and row.output_file_id is not None
    assert row.output_file_id in str(row.error) and "HTTP 404" in str(row.error)
    assert row.refused_since == refused.refused_since and row.refusals > refused.refusals
    assert row.finished_at is not None and row.refused_since is not None
    assert row.finished_at - row.refused_since >= timedelta(seconds=3)
    assert [_sent_lines(scripted_llm).count(custom_id) for custom_id in first_lines] == [2, 2, 2]


@pytest.mark.parametrize("status", [401, 403])
async def test_a_batch_output_file_the_key_may_not_have_is_asked_for_again_never_bought_again(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    status: int,
) -> None:
    """A 401 or 403 is a matter of access (a key without the scope, a gateway's rule): the
    batch waits, past the refusals that take a missing file for gone, until the operator
    mends it; its answers are then read, not bought again."""
    job_id, first, first_lines = await _held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, 3
    )
    scripted_llm.batches.finish(first["id"])
    output_file_id = scripted_llm.batches.created()[0]["output_file_id"]
    scripted_llm.batches.refuse(output_file_id, status, times=batches.GONE_AFTER_REFUSALS + 1)
    scripted_llm.batches.hold = False

    await _drive(batch_settings, sessions, arq_redis, job_id)

    assert (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["status"] == "completed"
    assert [_sent_lines(scripted_llm).count(custom_id) for custom_id in first_lines] == [1, 1, 1]
    assert (await _provider_batch_row(sessions, first["id"])).error is None


async def test_a_batch_answer_postgres_cannot_store_is_stored_with_it_replaced(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    intents = default_answer("intent_decomposition", {"messages": [{"role": "user", "content": PROMPTS[0]}]})
    assert isinstance(intents, Reply) and intents.content is not None
    scripted_llm.script("intent_decomposition", Reply(intents.content + "\x00"))

    job_id = await submit(batch_api, auth, PROMPTS[:1], delivery="batch")
    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _all_finished(sessions, job_id), rounds=30
    )

    job = (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["counts"]["by_status"] == {"completed": 1}


async def test_a_cancelled_batch_job_is_deleted_only_once_its_provider_batch_is_cancelled(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    job_id = await _three_prompts_held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm
    )
    await batch_api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)

    early = await batch_api.delete(f"/v1/jobs/{job_id}", headers=auth)
    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _provider_status(scripted_llm, "cancelled"), rounds=20
    )
    deleted = await batch_api.delete(f"/v1/jobs/{job_id}", headers=auth)

    assert (early.status_code, early.json()["error"]["code"]) == (409, "job_running")
    assert deleted.status_code == 200, deleted.text


async def test_a_batch_whose_cancel_the_provider_refuses_ends_so_its_job_can_be_deleted(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    job_id = await _three_prompts_held_in_progress(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm
    )
    [lost] = scripted_llm.batches.created()
    scripted_llm.batches.forget(lost["id"])  # its cancel is a 404
    await batch_api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)

    async def deleted() -> bool:
        return (await batch_api.delete(f"/v1/jobs/{job_id}", headers=auth)).status_code == 200

    await _drive_until(batch_settings, sessions, arq_redis, deleted, rounds=20)

    assert scripted_llm.batches.cancel_requests == [lost["id"]]


async def test_requests_for_an_endpoint_taken_out_of_the_configuration_fail_and_hold_up_no_other_job(
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    second_llm: ScriptedLLM,
) -> None:
    second = EndpointConfig(base_url=second_llm.base_url, default_model="second-model", batch=BatchConfig())
    before = batch_settings.model_copy(update={"llm_endpoints": {"second": second}})
    async with api_client(before) as api:
        gone = await submit(api, auth, PROMPTS[:2], delivery="batch", defaults={"endpoint": "second"})
    await run_worker_burst(before)  # its first requests are filed for "second"
    after = batch_settings.model_copy(update={"llm_endpoints": {}})  # the operator took it out
    async with api_client(after) as api:
        other = await submit(api, auth, PROMPTS[2:4], delivery="batch")

        await _drive_until(after, sessions, arq_redis, lambda: _all_finished(sessions, other), rounds=40)
        await _drive_until(after, sessions, arq_redis, lambda: _all_finished(sessions, gone), rounds=5)

        job = (await api.get(f"/v1/jobs/{gone}", headers=auth)).json()
        assert job["counts"]["by_status"] == {"failed": 2}
        items = (await api.get(f"/v1/jobs/{gone}/items", headers=auth)).json()["data"]
        assert {i["error_code"] for i in items} == {"llm_request_rejected"}


# --- done means: 200 prompts, a worker killed, a batch expired, exports as online's --------------

EXPORTS = ("jsonl", "trl_sft", "aidsafe_csv")


async def _exports(api: httpx.AsyncClient, auth: dict[str, str], job_id: str) -> dict[str, list[Any]]:
    """The job's exports as records, without what names the job (ids, times)."""
    files = {}
    for fmt in EXPORTS:
        response = await api.get(f"/v1/jobs/{job_id}/export", params={"format": fmt}, headers=auth)
        assert response.status_code == 200, response.text
        if fmt == "aidsafe_csv":
            files[fmt] = list(csv.DictReader(io.StringIO(response.text)))
        else:
            files[fmt] = [json.loads(line) for line in response.text.splitlines()]
    for record in files["jsonl"]:
        del record["item_id"], record["created_at"]
    return files


def _costs(files: dict[str, list[Any]]) -> list[float]:
    """Each record's cost in the full-record and CSV exports, taken out of the records."""
    full = [record["usage"].pop("cost_usd") for record in files["jsonl"]]
    return full + [float(row.pop("cost_usd")) for row in files["aidsafe_csv"]]


@pytest.mark.slow
async def test_a_200_prompt_batch_job_killed_and_expired_midway_stores_and_exports_what_an_online_job_does(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    prompts = [f"Question {n}: what keeps a suspension bridge standing in strong wind?" for n in range(200)]
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, prompts)
    settings = batch_settings.model_copy(update={"llm_batch": BatchConfig(max_requests=64, prices=BATCH)})

    scripted_llm.batches.hold = True
    job_id = await submit(batch_api, auth, prompts, delivery="batch")
    workers.append(start_worker(settings))
    first_wave = await eventually(
        lambda: _in_progress(scripted_llm, 4), timeout_s=120, what="the first wave's 4 batches in progress"
    )
    scripted_llm.batches.expire(first_wave[0], answered=10)
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    workers.append(start_worker(settings))
    scripted_llm.batches.hold = False
    await eventually(lambda: _job_completed(batch_api, auth, job_id), timeout_s=600, what="the batch job")

    batched = await _same_as_online(sessions, scripted_llm, online, job_id)
    assert len(batched[1]) == len(prompts)
    created = scripted_llm.batches.created()
    assert created[0]["status"] == "expired" and all(b["status"] == "completed" for b in created[1:])
    files = [b["input_file_id"] for b in created]
    assert len(set(files)) == len(files), "a batch was created twice from one input file"
    online_files, batch_files = (
        await _exports(batch_api, auth, online.job_id),
        await _exports(batch_api, auth, job_id),
    )
    assert _costs(batch_files) == pytest.approx([cost / 2 for cost in _costs(online_files)])
    assert batch_files == online_files
    online_job = (await batch_api.get(f"/v1/jobs/{online.job_id}", headers=auth)).json()
    job = (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["usage"]["cost_usd"] == pytest.approx(online_job["usage"]["cost_usd"] / 2)
    assert job["batch"]["saving"] == pytest.approx(
        {
            "cost_usd": job["usage"]["cost_usd"],
            "online_cost_usd": online_job["usage"]["cost_usd"],
            "saving_usd": job["usage"]["cost_usd"],
        }
    )
    async with sessions() as session:
        bodies = (
            await session.scalars(select(BatchRequest.body).where(BatchRequest.job_id == UUID(job_id)))
        ).all()
    assert len(bodies) == len(batched[0]) and not any(bodies), "an answered request kept its body"


async def _in_progress(scripted_llm: ScriptedLLM, count: int) -> list[str] | None:
    """The ids of the provider's batches once `count` are in progress."""
    running = [b["id"] for b in scripted_llm.batches.created() if b["status"] == "in_progress"]
    return running if len(running) >= count else None


# --- what a batch leaves undone ------------------------------------------------------------------


async def test_a_job_that_sends_unanswered_requests_online_sends_only_those_at_the_online_price(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    prompts = PROMPTS[:6]
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, prompts)
    job_id = await _first_batch_expires(
        batch_api, auth, batch_settings, sessions, arq_redis, scripted_llm, batch={"unanswered": "online"}
    )

    await _same_as_online(sessions, scripted_llm, online, job_id)
    first = scripted_llm.batches.created()[0]
    first_lines = [line["custom_id"] for line in scripted_llm.batches.input_lines(first["id"])]
    resent = {
        line["custom_id"]
        for b in scripted_llm.batches.created()[1:]
        for line in scripted_llm.batches.input_lines(b["id"])
    }
    assert not set(first_lines) & resent, "an expired request went in a later batch"
    sent_online = await _requests(sessions, job_id, "online")
    assert {custom_id for custom_id, _ in sent_online} == set(first_lines[2:])
    job = (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["config"]["batch"] == {"unanswered": "online"}
    assert job["batch"]["requests"]["online"] == 4
    # The turns sent online cost what the online job's did, the others half that.
    online_costs, costs = await _turn_costs(sessions, online.job_id), await _turn_costs(sessions, job_id)
    keys_online = {key for _, key in sent_online}
    assert costs == pytest.approx(
        {key: cost if key in keys_online else cost / 2 for key, cost in online_costs.items()}
    )
    saving = job["batch"]["saving"]
    assert saving["online_cost_usd"] == pytest.approx(sum(online_costs.values()))
    assert saving["saving_usd"] == pytest.approx(sum(online_costs.values()) - sum(costs.values()))


async def _requests(sessions: Sessions, job_id: str, status: str) -> list[tuple[str, tuple[Any, ...]]]:
    """The job's batch requests in this status: (custom_id, turn key by item position)."""
    async with sessions() as session:
        rows = await session.execute(
            select(BatchRequest, Item.position)
            .join(Item, Item.id == BatchRequest.item_id)
            .where(BatchRequest.job_id == UUID(job_id), BatchRequest.status == status)
        )
        return [(str(r.id), (position, r.stage, r.round, r.agent, r.attempt)) for r, position in rows]


async def _turn_costs(sessions: Sessions, job_id: str) -> dict[tuple[Any, ...], float]:
    async with sessions() as session:
        rows = await session.execute(
            select(Item.position, TurnRow)
            .join(TurnRow, TurnRow.item_id == Item.id)
            .where(Item.job_id == UUID(job_id))
        )
        costs: dict[tuple[Any, ...], float] = {}
        for position, t in rows:
            assert t.cost_usd is not None, "every turn is priced"
            costs[(position, t.stage, t.round, t.agent, t.attempt)] = t.cost_usd
        return costs


async def test_a_worker_killed_between_creating_a_batch_and_storing_its_id_leaves_one_batch_per_file(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    scripted_llm.batches.create_delay_s = 120  # the batch exists; its creator waits for the answer
    job_id = await submit(batch_api, auth, PROMPTS[:3], delivery="batch")
    workers.append(start_worker(batch_settings))
    await eventually(lambda: _provider_status(scripted_llm, "validating"), what="a batch created")
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    async with sessions() as session:
        [(status, provider_batch_id)] = (
            await session.execute(
                select(Batch.status, Batch.provider_batch_id).where(Batch.job_id == UUID(job_id))
            )
        ).all()
    assert (status, provider_batch_id) == ("uploaded", None)  # created, its id never stored

    scripted_llm.batches.create_delay_s = 0
    workers.append(start_worker(batch_settings))
    await eventually(lambda: _job_completed(batch_api, auth, job_id), timeout_s=120, what="the job")

    created = scripted_llm.batches.created()
    files = [b["input_file_id"] for b in created]
    assert len(set(files)) == len(files), "a second batch was created from one input file"
    async with sessions() as session:
        ours = (
            await session.scalars(select(Batch.provider_batch_id).where(Batch.job_id == UUID(job_id)))
        ).all()
    assert sorted(str(o) for o in ours) == sorted(b["id"] for b in created)
    turns, cots = await _record(sessions, job_id)
    assert len(cots) == 3
    assert len(scripted_llm.requests) == len(turns), "an answer was lost or paid for twice"


# --- leases: one holder at a time, one provider batch per batch ---------------------------------


async def _one_batch_formed(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, sessions: Sessions
) -> UUID:
    """A batch job of one prompt whose first batch is formed (preparing, held by none): its id."""
    job_id = await submit(api, auth, PROMPTS[:1], delivery="batch")
    await run_worker_burst(settings)
    assert await batches.form_waves(sessions, settings.endpoints()) == 1
    async with sessions() as session:
        return (await session.scalars(select(Batch.id).where(Batch.job_id == UUID(job_id)))).one()


async def _batch_row(sessions: Sessions, batch_id: UUID) -> Batch:
    async with sessions() as session:
        return (await session.scalars(select(Batch).where(Batch.id == batch_id))).one()


def _tagged(scripted_llm: ScriptedLLM, batch_id: UUID) -> list[dict[str, Any]]:
    """The provider batches created for our batch (tagged with its id)."""
    return [
        b
        for b in scripted_llm.batches.created()
        if (b["metadata"] or {}).get("aidsafe_batch") == str(batch_id)
    ]


async def test_a_holder_whose_lease_was_taken_over_writes_nothing_and_leaves_the_new_holders_lease(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    [old] = await batches.take_due(sessions, lease_s=0.01)
    await asyncio.sleep(0.1)  # its lease runs out mid-call
    [new] = await batches.take_due(sessions, lease_s=60)

    with pytest.raises(LeaseLost):
        await batches.renew(sessions, old)
    with pytest.raises(LeaseLost):
        await batches.advance(sessions, old, 0, status=BatchStatus.UPLOADED, input_file_id="file-old")
    with pytest.raises(LeaseLost):
        await batches.collect(sessions, old, BatchStatus.LOST, Outcome({}, {}), 3, error="old")
    with pytest.raises(LeaseLost):
        await batches.split_refused(sessions, old, "old")
    with pytest.raises(LeaseLost):
        await batches.abandon(sessions, old, "old")
    with pytest.raises(LeaseLost):
        await batches.refused(sessions, old, 0, 0)
    with pytest.raises(LeaseLost):
        await batches.keep_read(sessions, old, Outcome({}, {}), {"output_file_id": "file-old"})
    await batches.release(sessions, old)

    row = await _batch_row(sessions, batch_id)
    assert (row.status, row.input_file_id, row.error, row.finished_at) == ("preparing", None, None, None)
    assert row.output_file_id is None, "the old holder named a file read"
    assert (row.refusals, row.refused_since) == (0, None), "the old holder counted a refusal"
    assert row.lease_id == new.lease_id != old.lease_id
    assert await batches.take_due(sessions, lease_s=60) == [], "the old holder's release freed the batch"
    async with sessions() as session:
        statuses = (
            await session.scalars(select(BatchRequest.status).where(BatchRequest.batch_id == batch_id))
        ).all()
    assert statuses == ["submitted"], "the old holder's collect or split handed the request back"
    moved = await batches.advance(sessions, new, 0, status=BatchStatus.UPLOADED, input_file_id="file-new")
    assert (moved.status, moved.input_file_id) == (BatchStatus.UPLOADED, "file-new")


async def test_a_holder_that_lost_its_lease_mid_search_creates_no_second_provider_batch(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    """The first holder searches for an earlier provider batch (none) and, meanwhile, stalls
    past its lease (ended here by hand: a pause longer than the lease); a second takes the
    batch over and creates. The first, back, must not create one too: its renew before the
    create finds the lease another's."""
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _create_sent_before(batch_settings, sessions, arq_redis, scripted_llm, batch_id)
    scripted_llm.batches.list_delays = [0.8 * batch_settings.batch_call_timeout_s]  # answered in time

    async def first_holder() -> None:
        await _rounds(batch_settings, sessions, arq_redis)

    first = asyncio.create_task(first_holder())
    await eventually(lambda: _searched(scripted_llm), what="the first holder's search")
    async with sessions.begin() as session:
        await session.execute(update(Batch).where(Batch.id == batch_id).values(lease_until=func.now()))
    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "submitted"), 50
    )
    await first

    [created] = _tagged(scripted_llm, batch_id)
    assert len(scripted_llm.batches.created()) == 1, "both holders created a provider batch"
    assert (await _batch_row(sessions, batch_id)).provider_batch_id == created["id"]


async def _create_sent_before(
    settings: Settings, sessions: Sessions, redis: ArqRedis, scripted_llm: ScriptedLLM, batch_id: UUID
) -> None:
    """Lead the formed batch through its upload to a create the provider failed (a 503,
    nothing made), and wait until it is due again: its next holder looks for a provider batch
    before it creates one."""
    scripted_llm.batches.create_failures = 1
    api = BatchAPI(settings.endpoints(), settings.batch_call_timeout_s)
    try:
        await run_round(settings, sessions, redis, api)
    finally:
        await api.aclose()
    row = await _batch_row(sessions, batch_id)
    assert (row.status, row.create_unsent, _tagged(scripted_llm, batch_id)) == ("uploaded", False, [])
    await asyncio.sleep(settings.batch_call_timeout_s)  # a failed step's wait


async def _searched(scripted_llm: ScriptedLLM) -> bool:
    """Whether every scripted list delay was taken: the slow search is under way."""
    return not scripted_llm.batches.list_delays


async def _batch_status(sessions: Sessions, batch_id: UUID, status: str) -> bool:
    return (await _batch_row(sessions, batch_id)).status == status


async def _created_but_never_recorded(
    settings: Settings, sessions: Sessions, redis: ArqRedis, scripted_llm: ScriptedLLM, batch_id: UUID
) -> None:
    """Lead the formed batch until its provider batch exists, and die before storing its id."""
    scripted_llm.batches.create_delay_s = 30  # the batch exists; its creator waits for the answer
    api = BatchAPI(settings.endpoints(), settings.batch_call_timeout_s)

    async def lead() -> None:
        # Round after round: on a loaded machine the upload before the create may time out
        # (a second here), and the batch is due again a call's timeout later.
        while True:
            await run_round(settings, sessions, redis, api)
            await asyncio.sleep(settings.batch_call_timeout_s)

    holder = asyncio.create_task(lead())
    try:
        await eventually(lambda: _provider_status(scripted_llm, "validating"), what="a batch created")
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder
    finally:
        await api.aclose()
    assert (await _batch_row(sessions, batch_id)).provider_batch_id is None
    scripted_llm.batches.create_delay_s = 0
    # Its holder gone mid-create, the batch is due again once that create could have landed.
    await asyncio.sleep(settings.batch_call_timeout_s)


async def test_a_batch_created_but_never_recorded_is_found_by_its_tag_behind_a_hundred_newer_batches(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _created_but_never_recorded(batch_settings, sessions, arq_redis, scripted_llm, batch_id)
    await _other_tenants_batches(scripted_llm, 120)

    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "submitted"), 20
    )

    [ours] = _tagged(scripted_llm, batch_id)
    assert len(scripted_llm.batches.created()) == 121, "a second provider batch was created"
    assert (await _batch_row(sessions, batch_id)).provider_batch_id == ours["id"]


async def test_a_batch_whose_create_was_never_sent_is_created_without_a_search(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    """No earlier create, no provider batch to find: a search before every create cost a list
    call per batch, and a provider whose list kept failing held every batch's creation."""
    scripted_llm.batches.list_refused = True  # were it asked, it would answer 404
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)

    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "submitted"), 20
    )

    assert scripted_llm.batches.lists == 0
    assert len(_tagged(scripted_llm, batch_id)) == 1
    assert not (await _batch_row(sessions, batch_id)).create_unsent


@pytest.mark.parametrize("status", [401, 403, 500, 503])
async def test_a_batch_list_that_fails_or_the_key_may_not_read_holds_the_create_rather_than_make_a_second(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    status: int,
) -> None:
    """After a create that landed unrecorded, the search is refused for access (a proxy's
    passing 403, a key without the list's scope) or fails (5xx) at every look: taken for
    none found, a second provider batch was created. The batch waits, as after any fault,
    until the list answers, and then takes the batch it finds."""
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _created_but_never_recorded(batch_settings, sessions, arq_redis, scripted_llm, batch_id)
    scripted_llm.batches.list_refused, scripted_llm.batches.list_refusal_status = True, status
    api = BatchAPI(batch_settings.endpoints(), batch_settings.batch_call_timeout_s)
    try:
        for look in range(2):
            if look:
                await asyncio.sleep(batch_settings.batch_call_timeout_s)  # a failed step's wait
            await run_round(batch_settings, sessions, arq_redis, api)
    finally:
        await api.aclose()
    assert scripted_llm.batches.lists == 2 and len(_tagged(scripted_llm, batch_id)) == 1
    assert (await _batch_row(sessions, batch_id)).status == "uploaded"

    scripted_llm.batches.list_refused = False
    await asyncio.sleep(batch_settings.batch_call_timeout_s)  # a failed step's wait
    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "submitted"), 20
    )

    [ours] = _tagged(scripted_llm, batch_id)
    assert (await _batch_row(sessions, batch_id)).provider_batch_id == ours["id"]


@pytest.mark.parametrize("refusal", ["passing", "lasting"])
async def test_a_batch_list_refused_at_a_later_page_never_makes_a_second_batch(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    refusal: str,
) -> None:
    """After a create that landed unrecorded, the search's first page (newer batches, more to
    come) answers and the next is refused with a 400: taken for none found, a second provider
    batch was created and bought. The batch is looked at again; one the list then shows is
    taken, and a refusal that lasts (3 looks over AIDSAFE_BATCH_GONE_AFTER_S) ends it lost,
    its requests failed rather than bought twice."""
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _created_but_never_recorded(batch_settings, sessions, arq_redis, scripted_llm, batch_id)
    await _other_tenants_batches(scripted_llm, 120)  # ours is on the second page
    scripted_llm.batches.list_cursor_refused, scripted_llm.batches.list_refusal_status = True, 400
    job_id = (await _batch_row(sessions, batch_id)).job_id
    await _rounds(batch_settings, sessions, arq_redis)
    assert scripted_llm.batches.lists == 2 and len(scripted_llm.batches.created()) == 121
    assert (await _batch_row(sessions, batch_id)).status == "uploaded"

    if refusal == "passing":
        scripted_llm.batches.list_cursor_refused = False
        await _drive_until(
            batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "submitted"), 20
        )
        [ours] = _tagged(scripted_llm, batch_id)
        assert (await _batch_row(sessions, batch_id)).provider_batch_id == ours["id"]
    else:
        await _drive(batch_settings, sessions, arq_redis, str(job_id))
        row = await _batch_row(sessions, batch_id)
        assert row.status == "lost" and "HTTP 400" in str(row.error)
        assert row.refusals >= batches.GONE_AFTER_REFUSALS, "taken for lost at its first refusal"
        job = (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
        assert job["counts"]["by_status"] == {"failed": 1}
    assert len(scripted_llm.batches.created()) == 121, "a second provider batch was created"


async def test_a_batch_list_that_keeps_failing_ends_the_batch_lost_rather_than_hold_it_or_make_a_second(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    """After a create that landed unrecorded, every search answers 500: the batch's creation
    was held for ever. It is looked at again as a refused later page is, and once the fault
    has lasted the batch ends lost, its requests failed rather than bought twice."""
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _created_but_never_recorded(batch_settings, sessions, arq_redis, scripted_llm, batch_id)
    scripted_llm.batches.list_refused, scripted_llm.batches.list_refusal_status = True, 500
    job_id = (await _batch_row(sessions, batch_id)).job_id

    await _drive(batch_settings, sessions, arq_redis, str(job_id))

    row = await _batch_row(sessions, batch_id)
    assert row.status == "lost" and "HTTP 500" in str(row.error)
    assert row.refusals >= batches.GONE_AFTER_REFUSALS, "taken for lost at its first failure"
    assert len(scripted_llm.batches.created()) == 1, "a second provider batch was created"
    job = (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["counts"]["by_status"] == {"failed": 1}
    async with sessions() as session:
        [error] = (
            await session.scalars(select(BatchRequest.error).where(BatchRequest.batch_id == batch_id))
        ).all()
    assert "batch list failed" in str(error) and "HTTP 500" in str(error)


@pytest.mark.parametrize("refusal", ["passing", "lasting"])
async def test_a_batch_list_refused_at_its_first_page_is_taken_for_none_only_once_the_refusal_has_lasted(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    refusal: str,
) -> None:
    """After a create that landed unrecorded, the search's first page is refused (a 404).
    Taken at once for a provider without a list, a proxy's passing refusal made a second
    provider batch, bought twice. The batch is looked at again; one the list then shows is
    taken; a refusal that lasts (3 looks over AIDSAFE_BATCH_GONE_AFTER_S) is a provider
    without a list, which cannot show it: the batch is created."""
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _created_but_never_recorded(batch_settings, sessions, arq_redis, scripted_llm, batch_id)
    scripted_llm.batches.list_refused = True
    await _rounds(batch_settings, sessions, arq_redis)
    assert scripted_llm.batches.lists == 1 and len(scripted_llm.batches.created()) == 1
    assert (await _batch_row(sessions, batch_id)).status == "uploaded"

    if refusal == "passing":
        scripted_llm.batches.list_refused = False
    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "submitted"), 20
    )

    tagged = _tagged(scripted_llm, batch_id)
    if refusal == "passing":
        assert len(tagged) == 1, "a second provider batch was created"
        assert (await _batch_row(sessions, batch_id)).provider_batch_id == tagged[0]["id"]
    else:
        assert scripted_llm.batches.lists == batches.GONE_AFTER_REFUSALS
        assert len(tagged) == 2


async def test_a_provider_list_that_ignores_its_cursor_ends_the_search_and_the_batch_is_created_once(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    """A proxy that answers the first page to every list, `has_more` always: the search for
    an earlier create asked for the same page for ever, and batch delivery stopped."""
    await _other_tenants_batches(scripted_llm, 120)
    scripted_llm.batches.list_ignores_after = True
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _create_sent_before(batch_settings, sessions, arq_redis, scripted_llm, batch_id)

    async with asyncio.timeout(60):  # the search asked for the same page for ever
        await _drive_until(
            batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "submitted"), 20
        )

    assert len(_tagged(scripted_llm, batch_id)) == 1


async def test_a_provider_that_refuses_to_list_batches_still_gets_the_batch_created(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    """The search before a create is refused: there is nothing to find, not a refused batch
    (which was split until every request failed)."""
    scripted_llm.batches.list_refused = True
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _create_sent_before(batch_settings, sessions, arq_redis, scripted_llm, batch_id)

    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "submitted"), 20
    )

    assert len(_tagged(scripted_llm, batch_id)) == 1


@pytest.mark.parametrize("given_up_by", ["its timeout", "the worker stopping"])
async def test_a_create_given_up_on_is_not_tried_again_before_it_could_have_landed(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
    given_up_by: str,
) -> None:
    """A create given up on (its call timed out, or the worker stopping cancelled it) may still
    be carried out: due again at once, the batch's next holder could search before it landed
    and create a second, billed twice."""
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    scripted_llm.batches.create_delay_s = 5 * batch_settings.batch_call_timeout_s
    api = BatchAPI(batch_settings.endpoints(), batch_settings.batch_call_timeout_s)
    try:
        holder = asyncio.create_task(run_round(batch_settings, sessions, arq_redis, api))  # uploads, creates
        if given_up_by == "the worker stopping":
            await eventually(lambda: _provider_status(scripted_llm, "validating"), what="a create in flight")
            holder.cancel()  # as the worker's shutdown cancels its batch loop
        with contextlib.suppress(asyncio.CancelledError):
            await holder
    finally:
        await api.aclose()
        scripted_llm.batches.create_delay_s = 0

    async with sessions() as session:
        now = await session.scalar(select(func.now()))
    row = await _batch_row(sessions, batch_id)
    assert (row.status, row.provider_batch_id, row.lease_until) == ("uploaded", None, None)
    assert now is not None
    assert row.next_poll_at - now > timedelta(seconds=batch_settings.batch_call_timeout_s / 2)


async def test_a_worker_stopped_mid_create_releases_its_batch_before_it_exits(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    """A worker told to stop (SIGTERM) while its batch loop holds a batch gives the lease back
    before it exits, even when the release takes a moment (here it waits for a row lock, as on
    a busy Postgres). Unawaited, it was cut off by the worker's exit: the batch then waited a
    whole lease for the next worker."""
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    long_lease = batch_settings.model_copy(update={"batch_lease_s": 120.0})
    scripted_llm.batches.create_delay_s = long_lease.batch_lease_s
    try:
        workers.append(start_worker(long_lease))
        await eventually(lambda: _provider_status(scripted_llm, "validating"), what="a create in flight")
        async with sessions.begin() as holder:
            await holder.execute(select(Batch.id).where(Batch.id == batch_id).with_for_update())
            workers[0].send_signal(signal.SIGTERM)
            release = "wait_event_type = 'Lock' AND query LIKE 'UPDATE batches %'"
            await eventually(lambda: other_backend(sessions, release), what="the release waiting")
            await asyncio.sleep(1)  # the rest of the stop takes less
        assert await asyncio.to_thread(workers[0].wait, 30) == 0
    finally:
        scripted_llm.batches.create_delay_s = 0

    row = await _batch_row(sessions, batch_id)
    assert (row.status, row.lease_id, row.lease_until) == ("uploaded", None, None)


async def test_a_round_stopped_mid_create_releases_the_batches_it_took_and_had_not_reached(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    arq_redis: ArqRedis,
) -> None:
    """A round takes every due batch at once: stopped (a worker's SIGTERM) while it leads the
    first, it lets go of the others too. Before, only the one under way was released: the rest
    waited a whole lease for the next worker."""
    formed = [await _one_batch_formed(batch_api, auth, batch_settings, sessions) for _ in range(2)]
    long_lease = batch_settings.model_copy(update={"batch_lease_s": 120.0})
    scripted_llm.batches.create_delay_s = long_lease.batch_lease_s
    api = BatchAPI(long_lease.endpoints(), long_lease.batch_call_timeout_s)
    try:
        round_ = asyncio.create_task(run_round(long_lease, sessions, arq_redis, api))
        await eventually(lambda: _provider_status(scripted_llm, "validating"), what="a create in flight")
        round_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await round_
    finally:
        scripted_llm.batches.create_delay_s = 0
        await api.aclose()

    rows = [await _batch_row(sessions, batch_id) for batch_id in formed]
    assert [(row.lease_id, row.lease_until) for row in rows] == [(None, None)] * 2
    assert sorted(row.status for row in rows) == ["preparing", "uploaded"]


async def _other_tenants_batches(scripted_llm: ScriptedLLM, count: int) -> None:
    async with httpx.AsyncClient(base_url=scripted_llm.base_url) as provider:
        line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}
        other = await provider.post(
            "/files", files={"file": ("o.jsonl", json.dumps(line).encode())}, data={"purpose": "batch"}
        )
        body = {
            "input_file_id": other.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        for _ in range(count):
            assert (await provider.post("/batches", json=body)).status_code == 200


async def test_cancelling_a_job_cancels_the_provider_batch_whose_id_was_never_stored(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    batch_id = await _one_batch_formed(batch_api, auth, batch_settings, sessions)
    await _created_but_never_recorded(batch_settings, sessions, arq_redis, scripted_llm, batch_id)
    job_id = (await _batch_row(sessions, batch_id)).job_id

    await batch_api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    await _drive_until(
        batch_settings, sessions, arq_redis, lambda: _batch_status(sessions, batch_id, "cancelled"), 20
    )

    [ours] = _tagged(scripted_llm, batch_id)
    assert scripted_llm.batches.cancel_requests == [ours["id"]], "it runs on, billed, for a cancelled job"
    assert ours["status"] == "cancelled"
    assert (await _batch_row(sessions, batch_id)).provider_batch_id == ours["id"]


async def test_an_input_file_the_provider_refuses_is_split_until_the_provider_takes_it(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    prompts = PROMPTS[:6]
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, prompts)
    scripted_llm.batches.max_file_lines = 2  # a limit the endpoint's settings do not know

    job_id = await submit(batch_api, auth, prompts, delivery="batch")
    await _drive(batch_settings, sessions, arq_redis, job_id)

    await _same_as_online(sessions, scripted_llm, online, job_id)
    assert scripted_llm.batches.refused_uploads > 0
    assert max(b["request_counts"]["total"] for b in scripted_llm.batches.created()) <= 2
    async with sessions() as session:
        refused = (
            await session.scalars(
                select(Batch.error).where(Batch.job_id == UUID(job_id), Batch.status == "refused")
            )
        ).all()
    assert len(refused) == scripted_llm.batches.refused_uploads
    assert all(error is not None and "file_too_large" in error for error in refused)


async def test_a_batch_that_fails_validation_is_split_until_the_provider_takes_it(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    prompts = PROMPTS[:6]
    online = await _online_run(batch_api, auth, batch_settings, scripted_llm, prompts)
    # Taken at upload, a batch of more lines fails in validation (as over an enqueued-token limit).
    scripted_llm.batches.max_requests = 2

    job_id = await submit(batch_api, auth, prompts, delivery="batch")
    await _drive(batch_settings, sessions, arq_redis, job_id)

    await _same_as_online(sessions, scripted_llm, online, job_id)
    assert {b["status"] for b in scripted_llm.batches.created() if b["request_counts"]["total"] > 2} == {
        "failed"
    }


async def test_a_request_whose_file_the_provider_refuses_alone_fails_its_item_with_the_reason(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    scripted_llm.batches.max_file_bytes = 100  # smaller than any request

    job_id = await submit(batch_api, auth, PROMPTS[:3], delivery="batch")
    await _drive(batch_settings, sessions, arq_redis, job_id)

    job = (await batch_api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "completed" and job["counts"]["by_status"] == {"failed": 3}
    items = (await batch_api.get(f"/v1/jobs/{job_id}/items", headers=auth)).json()["data"]
    assert {(i["error_code"], i["error_message"]) for i in items} == {
        ("llm_request_rejected", "the batch API of the LLM endpoint 'default' rejected the request")
    }
    assert scripted_llm.batches.created() == []
    assert job["batch"]["requests"]["rejected"] == 3
    # 3 lines: refused whole, then as 1 and 2 lines, then the 2 one by one.
    assert scripted_llm.batches.refused_uploads == 5


async def test_a_request_over_the_servers_cap_fails_its_item_unfiled_and_the_job_goes_on(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
    scripted_llm: ScriptedLLM,
) -> None:
    # The short prompt's requests (the policies and replies of a few hundred tokens) fit;
    # the long prompt's first one (some 6,500 tokens) is over.
    capped = batch_settings.model_copy(update={"llm_max_request_tokens": 6_000})
    long_prompt = "How do tides and currents shape a coastline? " * 420  # 18,900 characters

    job_id = await submit(batch_api, auth, [PROMPTS[0], long_prompt], delivery="batch")
    await _drive(capped, sessions, arq_redis, job_id)

    items = (await batch_api.get(f"/v1/jobs/{job_id}/items", headers=auth)).json()["data"]
    assert [(i["status"], i["error_code"]) for i in items] == [
        ("completed", None),
        ("failed", "request_too_large"),
    ]
    refusal = items[1]["error_message"]
    assert refusal.startswith("role 'intent' would send endpoint 'default' a request")
    assert refusal.endswith("over the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS of 6,000; not sent")
    async with sessions() as session:
        filed = (await session.scalars(select(BatchRequest.item_id).distinct())).all()
    assert filed == [UUID(items[0]["id"])]
    provider = scripted_llm.batches
    sent = [line for batch in provider.created() for line in provider.input_lines(batch["id"])]
    assert sent and not any(long_prompt in json.dumps(line) for line in sent)


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ({"batch": {"unanswered": "online"}}, "invalid_config"),
        ({"delivery": "batch", "batch": {"unanswered": "later"}}, "validation_error"),
        ({"delivery": "batch", "batch": {"on_expiry": "online"}}, "validation_error"),
    ],
)
async def test_batch_options_are_checked(
    batch_api: httpx.AsyncClient, auth: dict[str, str], config: dict[str, Any], code: str
) -> None:
    response = await batch_api.post("/v1/jobs", json={"prompts": ["Why?"], "config": config}, headers=auth)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == code


async def test_the_purge_blanks_a_batch_jobs_requests_and_answers(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
) -> None:
    job_id = await submit(batch_api, auth, PROMPTS[:2], delivery="batch")
    await _drive(batch_settings, sessions, arq_redis, job_id)
    mine = BatchRequest.job_id == UUID(job_id)
    async with sessions.begin() as session:
        answers = (await session.scalars(select(BatchRequest.answer).where(mine))).all()
        await session.execute(
            update(Job).where(Job.id == UUID(job_id)).values(created_at=func.now() - timedelta(days=8))
        )
    assert answers and all(answers)

    assert await deletions.purge_hazardous(sessions, timedelta(days=7)) == 1

    async with sessions() as session:
        left = (await session.execute(select(BatchRequest.body, BatchRequest.answer).where(mine))).all()
    assert len(left) == len(answers)
    assert all(body == {} and answer is None for body, answer in left)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/comparisons", {"baseline_job_id": str(uuid4()), "candidate_job_id": str(uuid4())}),
        ("/v1/sample-evaluations", {"samples": [{"prompt": "Hi", "response": "Hello."}], "guard": {}}),
        (
            "/v1/model-evaluations",
            {
                "benchmarks": [
                    {
                        "name": "tiny",
                        "prompts": [{"prompt": "Hi", "expected": "comply", "category": "greeting"}],
                    }
                ],
                "targets": [{}],
            },
        ),
    ],
)
async def test_comparisons_and_evaluations_refuse_batch_delivery_rather_than_call_online(
    batch_api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, path: str, body: dict[str, Any]
) -> None:
    jobs_before = await _job_count(sessions)

    response = await batch_api.post(path, json={**body, "delivery": "batch"}, headers=auth)

    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "batch_unsupported", response.text
    assert await _job_count(sessions) == jobs_before
    online = await batch_api.post(path, json={**body, "delivery": "online"}, headers=auth)
    assert online.status_code == (404 if path == "/v1/comparisons" else 202), online.text  # no such jobs


async def _job_count(sessions: Sessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Job)) or 0)


# --- what a batch's end writes on its requests and items, and how a wave is cut ------------------


async def _filed(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, *jobs: dict[str, Any]
) -> list[UUID]:
    """Batch jobs (each a config with `prompts`: how many of PROMPTS; `key`: its API key, if
    not `auth`) whose items filed their first calls, no wave formed yet: their ids."""
    job_ids = [
        UUID(await submit(api, job.pop("key", auth), PROMPTS[: job.pop("prompts")], delivery="batch", **job))
        for job in jobs
    ]
    await run_worker_burst(settings)
    return job_ids


async def _waves_taken(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    *jobs: dict[str, Any],
) -> list[tuple[batches.Held, list[int]]]:
    """The jobs of `_filed`, their first waves formed (one batch each) and taken: per job,
    its batch held and its request ids."""
    job_ids = await _filed(api, auth, settings, *jobs)
    assert await batches.form_waves(sessions, settings.endpoints()) == len(job_ids)
    held = {h.job_id: h for h in await batches.take_due(sessions, lease_s=60)}
    return [(held[job_id], await _request_ids(sessions, job_id)) for job_id in job_ids]


async def _request_ids(sessions: Sessions, job_id: UUID) -> list[int]:
    async with sessions() as session:
        return list(
            await session.scalars(
                select(BatchRequest.id).where(BatchRequest.job_id == job_id).order_by(BatchRequest.id)
            )
        )


async def _request_rows(sessions: Sessions, ids: list[int]) -> list[tuple[Any, ...]]:
    """(status, answer, body blanked, error, submissions, answered) of the requests, in the order given."""
    async with sessions() as session:
        rows = {
            r.id: (r.status, r.answer, r.body == {}, r.error, r.submissions, r.answered_at is not None)
            for r in await session.scalars(select(BatchRequest).where(BatchRequest.id.in_(ids)))
        }
    return [rows[request_id] for request_id in ids]


def _completion(text: str) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


async def test_a_batchs_answers_are_stored_once_on_its_own_waiting_requests_and_the_rest_sent_again(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    (held, [answered_early, answered, refused, unanswered]), (_, [others]) = await _waves_taken(
        batch_api, auth, batch_settings, sessions, {"prompts": 4}, {"prompts": 1}
    )
    # The output file read at an earlier poll (its error file refused then), stored as it was.
    await batches.keep_read(
        sessions, held, Outcome({answered_early: _completion("first")}, {}), {"output_file_id": "file-out"}
    )

    resent = await batches.collect(
        sessions,
        held,
        BatchStatus.COLLECTED,
        # The early answer read again (also as refused), and lines naming another batch's
        # request (a proxy's mix-up).
        Outcome(
            {
                answered_early: _completion("again"),
                answered: _completion("late"),
                others: _completion("not mine"),
            },
            {
                refused: "HTTP 400: bad request",
                answered_early: "HTTP 400: again",
                others: "HTTP 400: not mine",
            },
        ),
        3,
        provider_status="completed",
    )

    assert resent == 1
    assert await _request_rows(sessions, [answered_early, answered, refused, unanswered, others]) == [
        ("answered", _completion("first"), True, None, 1, True),
        ("answered", _completion("late"), True, None, 1, True),
        ("rejected", None, False, "HTTP 400: bad request", 1, True),
        ("pending", None, False, None, 1, False),
        ("submitted", None, False, None, 1, False),
    ]
    row = await _batch_row(sessions, held.id)
    assert (row.status, row.provider_status, row.output_file_id) == ("collected", "completed", "file-out")
    assert row.finished_at is not None


async def test_a_request_unanswered_in_its_last_allowed_batch_fails_its_item_and_one_with_tries_left_waits(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
    arq_redis: ArqRedis,
) -> None:
    (spent, [last_try]), (left, [next_wave]) = await _waves_taken(
        batch_api, auth, batch_settings, sessions, {"prompts": 1}, {"prompts": 1}
    )

    # Each request went in 1 batch: the first job's allowed 1, the second's 2.
    assert await batches.collect(sessions, spent, BatchStatus.COLLECTED, Outcome({}, {}), 1) == 0
    assert await batches.collect(sessions, left, BatchStatus.COLLECTED, Outcome({}, {}), 2) == 1

    assert await _request_rows(sessions, [last_try, next_wave]) == [
        ("failed", None, False, "unanswered in 1 batches; last: collected", 1, False),
        ("pending", None, False, None, 1, False),
    ]
    requeued = await batches.requeue_answered(sessions)
    assert [item for shares in requeued.values() for item, _ in shares] == [
        await _item_of(sessions, last_try)
    ]
    await enqueue_shares(arq_redis, batch_settings.queue_name, requeued)
    await _drive(batch_settings, sessions, arq_redis, str(spent.job_id))
    job = (await batch_api.get(f"/v1/jobs/{spent.job_id}/items", headers=auth)).json()["data"]
    assert [(i["status"], i["error_code"], i["error_message"]) for i in job] == [
        (
            "failed",
            "llm_request_rejected",
            "the LLM endpoint 'default' left the request unanswered in every batch",
        )
    ]
    assert await batches.requeue_answered(sessions) == {}, "an ended item was queued again"


async def _item_of(sessions: Sessions, request_id: int) -> UUID:
    async with sessions() as session:
        return (
            await session.scalars(select(BatchRequest.item_id).where(BatchRequest.id == request_id))
        ).one()


async def test_a_batch_that_leaves_requests_unanswered_hands_them_online_when_its_job_says_so(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    [(held, [answered, unanswered, refused])] = await _waves_taken(
        batch_api, auth, batch_settings, sessions, {"prompts": 3, "batch": {"unanswered": "online"}}
    )

    resent = await batches.collect(
        sessions,
        held,
        BatchStatus.COLLECTED,
        Outcome({answered: _completion("kept")}, {refused: "HTTP 400: bad request"}),
        1,
    )

    assert resent == 1
    assert await _request_rows(sessions, [answered, unanswered, refused]) == [
        ("answered", _completion("kept"), True, None, 1, True),
        ("online", None, False, "unanswered by its batch (collected)", 1, False),
        ("rejected", None, False, "HTTP 400: bad request", 1, True),
    ]


async def test_a_batch_abandoned_unseen_fails_only_its_own_waiting_requests(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    other: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
) -> None:
    (held, [answered, waiting]), (_, [others]) = await _waves_taken(
        batch_api, auth, batch_settings, sessions, {"prompts": 2}, {"prompts": 1, "key": other}
    )
    # Not reached by a worker today (a batch is abandoned before its create), but a request
    # settled in the batch must stay so: its answer was bought.
    await batches.keep_read(sessions, held, Outcome({answered: _completion("kept")}, {}), {})

    await batches.abandon(sessions, held, "its batch list failed")

    assert await _request_rows(sessions, [answered, waiting, others]) == [
        ("answered", _completion("kept"), True, None, 1, True),
        ("rejected", None, False, "its batch list failed", 1, True),
        ("submitted", None, False, None, 1, False),
    ]
    row = await _batch_row(sessions, held.id)
    assert (row.status, row.error, row.finished_at is not None) == ("lost", "its batch list failed", True)
    parked = await _items(sessions, held.job_id)
    async with sessions() as session:
        before = await session.scalar(select(func.now()))

    requeued = await batches.requeue_answered(sessions)

    queued = await _items(sessions, held.job_id)
    assert {owner: sorted(shares) for owner, shares in requeued.items()} == {
        row.owner_key_id: sorted((item_id, item.enqueues) for item_id, item in queued.items())
    }
    # A fresh arq job id each, the waiting message gone, the sweep's grace counted from now.
    assert {item_id: item.enqueues for item_id, item in queued.items()} == {
        item_id: item.enqueues + 1 for item_id, item in parked.items()
    }
    assert {(item.status, item.error_message) for item in queued.values()} == {("queued", None)}
    assert all(item.updated_at >= before for item in queued.values())
    assert await batches.requeue_answered(sessions) == {}, "an item was queued twice"


async def _items(sessions: Sessions, job_id: UUID) -> dict[UUID, Any]:
    async with sessions() as session:
        rows = await session.execute(
            select(Item.id, Item.enqueues, Item.status, Item.error_message, Item.updated_at).where(
                Item.job_id == job_id
            )
        )
        return {row.id: row for row in rows}


@pytest.mark.parametrize(
    ("sizes", "max_requests", "max_bytes", "parts"),
    [
        ([], 2, 100, []),
        ([10, 10, 10, 10, 10], 2, 100, [[0, 1], [2, 3], [4]]),  # cut at max_requests lines
        ([40, 60, 1], 10, 100, [[0, 1], [2]]),  # a file of exactly max_bytes is taken
        ([60, 60, 40], 10, 100, [[0], [1, 2]]),  # each part counts its own bytes
        ([150, 10, 150], 10, 100, [[0], [1], [2]]),  # a line over max_bytes goes alone
    ],
)
def test_a_wave_is_cut_into_batches_at_the_endpoints_limits_in_order(
    sizes: list[int], max_requests: int, max_bytes: int, parts: list[list[int]]
) -> None:
    requests = [(100 + n, size) for n, size in enumerate(sizes)]
    expected = [[requests[n] for n in part] for part in parts]
    assert batches.split(requests, max_requests, max_bytes) == expected


# --- how a wave is formed, and a batch taken, split and held ------------------------------------


async def _set(sessions: Sessions, *updates: Any) -> None:
    """Run the updates in one transaction: a state a test sets up by hand."""
    async with sessions.begin() as session:
        for statement in updates:
            await session.execute(statement)


def _batch(batch_id: UUID) -> Any:
    return update(Batch).where(Batch.id == batch_id)


async def _wave(sessions: Sessions, job_id: UUID, wave: int) -> list[tuple[str, list[int]]]:
    """The job's open batches of the wave as (endpoint, the ids of its requests), by endpoint
    and first request; each checked to be a batch of the job's owner, preparing, counted and
    sized as its requests' input lines."""
    async with sessions() as session:
        owner = await session.scalar(select(Job.owner_key_id).where(Job.id == job_id))
        made = (
            await session.scalars(
                select(Batch).where(Batch.job_id == job_id, Batch.wave == wave, Batch.finished_at.is_(None))
            )
        ).all()
        requests = (
            await session.execute(
                select(BatchRequest.batch_id, BatchRequest.id, BatchRequest.body)
                .where(BatchRequest.batch_id.in_([b.id for b in made]))
                .order_by(BatchRequest.id)
            )
        ).all()
    found = []
    for batch in made:
        lines = [(r.id, len(input_line(str(r.id), r.body))) for r in requests if r.batch_id == batch.id]
        assert (batch.status, batch.owner_key_id, batch.requests, batch.bytes) == (
            "preparing",
            owner,
            len(lines),
            sum(size for _, size in lines),
        )
        found.append((batch.endpoint, [request_id for request_id, _ in lines]))
    return sorted(found)


async def _batch_of(sessions: Sessions, request_id: int) -> UUID:
    async with sessions() as session:
        batch_id = (
            await session.scalars(select(BatchRequest.batch_id).where(BatchRequest.id == request_id))
        ).one()
    assert batch_id is not None, "in no batch"
    return batch_id


async def test_a_wave_takes_its_jobs_pending_requests_by_endpoint_at_its_limits_numbered_after_its_last(
    batch_api: httpx.AsyncClient,
    auth: dict[str, str],
    other: dict[str, str],
    batch_settings: Settings,
    sessions: Sessions,
) -> None:
    first, second = await _filed(
        batch_api, auth, batch_settings, {"prompts": 5}, {"prompts": 1, "key": other}
    )
    r1, r2, r3, r4, r5 = await _request_ids(sessions, first)
    [alone] = await _request_ids(sessions, second)
    default = batch_settings.endpoints()["default"]
    endpoints = {
        "default": default.model_copy(update={"batch": BatchConfig(max_requests=2)}),
        # Its batch settings removed since the requests were filed: the provider's usual limits.
        "second": default.model_copy(update={"batch": None}),
    }
    await _set(
        sessions,
        update(BatchRequest).where(BatchRequest.id == r2).values(endpoint="second"),
        update(BatchRequest).where(BatchRequest.id == r5).values(endpoint="gone"),  # not configured
        update(Item).where(Item.job_id == second).values(status="queued"),
    )

    assert await batches.form_waves(sessions, endpoints) == 3
    assert await _wave(sessions, first, 1) == [("default", [r1, r3]), ("default", [r4]), ("second", [r2])]
    assert await _request_rows(sessions, [r1, r5, alone]) == [
        ("submitted", None, False, None, 1, False),
        ("rejected", None, False, "unknown LLM endpoint 'gone'", 0, True),
        ("pending", None, False, None, 0, False),  # its job's item queued: no wave yet
    ]

    # r1 unanswered by its batch, pending again, its item running; the other job's item parked.
    await _set(
        sessions,
        update(BatchRequest).where(BatchRequest.id == r1).values(status="pending"),
        update(Item).where(Item.id == await _item_of(sessions, r1)).values(status="running"),
        update(Item).where(Item.job_id == second).values(status="awaiting_batch"),
    )
    assert await batches.form_waves(sessions, endpoints) == 1
    assert await _wave(sessions, second, 1) == [("default", [alone])], "a job's first wave is its wave 1"
    assert await _wave(sessions, first, 2) == []

    await _set(sessions, update(Item).where(Item.job_id == first).values(status="awaiting_batch"))
    assert await batches.form_waves(sessions, endpoints) == 1
    assert await _wave(sessions, first, 2) == [("default", [r1])]
    assert (await _request_rows(sessions, [r1]))[0][4] == 2, "its second batch is counted"


async def test_a_jobs_wave_is_formed_beside_inserts_naming_the_job_and_skipped_while_another_worker_forms_it(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    [job_id] = await _filed(batch_api, auth, batch_settings, {"prompts": 1})
    job = select(Job.id).where(Job.id == job_id)
    async with sessions.begin() as session:
        # Its row held as another worker forming its wave holds it: skipped, not waited for.
        await session.execute(job.with_for_update(key_share=True))
        assert await asyncio.wait_for(batches.form_waves(sessions, batch_settings.endpoints()), 5) == 0
    async with sessions.begin() as session:
        # Held as an insert naming the job holds it (an item's turn, through its foreign key).
        await session.execute(job.with_for_update(read=True, key_share=True))
        assert await asyncio.wait_for(batches.form_waves(sessions, batch_settings.endpoints()), 5) == 1


async def test_only_open_batches_due_and_free_of_a_live_lease_are_taken_earliest_due_first_under_new_leases(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    first, cancelled = await _filed(
        batch_api, auth, batch_settings, {"prompts": 5}, {"prompts": 1, "batch": {"unanswered": "online"}}
    )
    one_each = batch_settings.endpoints()["default"].model_copy(update={"batch": BatchConfig(max_requests=1)})
    assert await batches.form_waves(sessions, {"default": one_each}) == 6
    ended, later, leased, polled, expired = [
        await _batch_of(sessions, r) for r in await _request_ids(sessions, first)
    ]
    online = await _batch_of(sessions, (await _request_ids(sessions, cancelled))[0])
    old_lease = uuid4()
    await _set(
        sessions,
        _batch(ended).values(finished_at=func.now()),
        _batch(later).values(next_poll_at=func.now() + timedelta(hours=1)),
        _batch(leased).values(lease_until=func.now() + timedelta(hours=1), lease_id=uuid4()),
        # Due before `polled`, but first in the table.
        _batch(online).values(next_poll_at=func.now()),
        _batch(polled).values(
            status="submitted",
            input_file_id="file-in",
            provider_batch_id="batch-1",
            create_unsent=True,
            output_file_id="file-out",  # read while the other was refused
            error_file_id="file-err",
            cancel_sent_at=func.now(),
            cancel_seen={"status": "cancelling"},
            next_poll_at=func.now() - timedelta(seconds=1),
        ),
        _batch(expired).values(
            lease_until=func.now() - timedelta(seconds=1),
            lease_id=old_lease,
            cancel_sent_at=func.now(),  # cancelled as lost, nothing seen of it since
            next_poll_at=func.now() - timedelta(seconds=2),
        ),
        update(Job).where(Job.id == cancelled).values(cancelled_at=func.now()),
    )

    async with sessions.begin() as session:
        # The row of the batch due first held, as by another worker taking it: skipped, not waited for.
        await session.execute(select(Batch.id).where(Batch.id == expired).with_for_update())
        taken = await asyncio.wait_for(batches.take_due(sessions, lease_s=60, limit=1), 5)
    taken += await batches.take_due(sessions, lease_s=30)
    assert await batches.take_due(sessions, lease_s=60) == [], "a batch was taken again under its lease"

    for held in taken:
        row = await _batch_row(sessions, held.id)
        assert (held.created_at, held.lease_id) == (row.created_at, row.lease_id)
    by_id = {held.id: held for held in taken}
    assert by_id == {
        polled: batches.Held(
            polled,
            first,
            "default",
            BatchStatus.SUBMITTED,
            "file-in",
            "batch-1",
            True,
            False,
            "next_wave",
            by_id[polled].created_at,
            by_id[polled].lease_id,
            60,
            frozenset({"file-out", "file-err"}),
            {"status": "cancelling"},
        ),
        expired: batches.Held(
            expired,
            first,
            "default",
            BatchStatus.PREPARING,
            None,
            None,
            False,
            False,
            "next_wave",
            by_id[expired].created_at,
            by_id[expired].lease_id,
            30,
            frozenset(),
            {},
        ),
        online: batches.Held(
            online,
            cancelled,
            "default",
            BatchStatus.PREPARING,
            None,
            None,
            False,
            True,
            "online",
            by_id[online].created_at,
            by_id[online].lease_id,
            30,
            frozenset(),
            None,
        ),
    }
    assert taken[0].id == polled, "not the batch due first of those free"
    leases = [held.lease_id for held in taken]
    assert None not in leases and len({*leases, old_lease}) == 4, "a lease taken under a token not new"


async def test_a_batch_the_provider_refuses_whole_is_split_in_two_of_its_wave_until_a_lone_request_is_refused(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    (held, [answered, *waiting]), (_, [others]) = await _waves_taken(
        batch_api, auth, batch_settings, sessions, {"prompts": 5}, {"prompts": 1}
    )
    await batches.keep_read(sessions, held, Outcome({answered: _completion("kept")}, {}), {})

    assert await batches.split_refused(sessions, held, "HTTP 400: file_too_large") == 2

    row = await _batch_row(sessions, held.id)
    assert (row.status, row.error, row.finished_at is not None) == (
        "refused",
        "HTTP 400: file_too_large",
        True,
    )
    assert await _wave(sessions, held.job_id, 1) == [("default", waiting[:2]), ("default", waiting[2:])]
    submitted = ("submitted", None, False, None, 1, False)
    assert await _request_rows(sessions, [answered, *waiting, others]) == [
        ("answered", _completion("kept"), True, None, 1, True),
        *[submitted] * 5,
    ]
    assert await _batch_of(sessions, answered) == held.id

    halves = {h.id: h for h in await batches.take_due(sessions, lease_s=60)}
    pair = await _batch_of(sessions, waiting[0])
    assert set(halves) == {pair, await _batch_of(sessions, waiting[2])}
    assert await batches.split_refused(sessions, halves[pair], "HTTP 400: again") == 2
    assert await _wave(sessions, held.job_id, 1) == [
        ("default", waiting[:1]),
        ("default", waiting[1:2]),
        ("default", waiting[2:]),
    ]

    lone = await _batch_of(sessions, waiting[0])
    [alone] = [h for h in await batches.take_due(sessions, lease_s=60) if h.id == lone]
    assert await batches.split_refused(sessions, alone, "HTTP 400: bad line") == 0
    assert await _request_rows(sessions, waiting[:2]) == [
        ("rejected", None, False, "HTTP 400: bad line", 1, True),
        submitted,
    ]
    assert await _wave(sessions, held.job_id, 1) == [("default", waiting[1:2]), ("default", waiting[2:])]


async def test_a_batch_refused_at_its_polls_is_taken_for_gone_at_its_third_refusal_once_the_period_has_passed(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    (held, _), (patient, _) = await _waves_taken(
        batch_api, auth, batch_settings, sessions, {"prompts": 1}, {"prompts": 1}
    )

    assert not await batches.refused(sessions, held, 3600, 0)
    since = (await _batch_row(sessions, held.id)).refused_since
    assert since is not None
    assert [await batches.refused(sessions, held, 3600, 0) for _ in range(3)] == [False, True, True]
    row = await _batch_row(sessions, held.id)
    assert (row.refusals, row.refused_since) == (4, since), "the refusals are counted from the first"

    # Refused as often, but not for long enough yet.
    assert [await batches.refused(sessions, patient, 3600, 3600) for _ in range(3)] == [False] * 3
    # Answered: the count starts again.
    await batches.advance(sessions, patient, 3600, provider_status="in_progress")
    row = await _batch_row(sessions, patient.id)
    assert (row.refusals, row.refused_since, row.provider_status) == (0, None, "in_progress")
    assert [await batches.refused(sessions, patient, 3600, 0) for _ in range(3)] == [False, False, True]

    for both in (held, patient):
        await batches.release(sessions, both)
    assert await batches.take_due(sessions, lease_s=60) == [], "looked at again before its poll was due"


async def test_a_holders_writes_renew_its_lease_and_its_next_look_comes_when_it_asked(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    await _filed(batch_api, auth, batch_settings, {"prompts": 1})
    assert await batches.form_waves(sessions, batch_settings.endpoints()) == 1
    [held] = await batches.take_due(sessions, lease_s=0.2)
    await batches.renew(sessions, replace(held, lease_s=60))
    await asyncio.sleep(0.3)
    assert await batches.take_due(sessions, lease_s=60) == [], "its renewed lease ran out"

    moved = await batches.advance(
        sessions, held, 0, status=BatchStatus.SUBMITTED, input_file_id="file-in", provider_batch_id="batch-1"
    )
    assert moved == replace(
        held, status=BatchStatus.SUBMITTED, input_file_id="file-in", provider_batch_id="batch-1"
    )
    await batches.release(sessions, held)
    [again] = await batches.take_due(sessions, lease_s=60)  # free, and due at once
    # The batch as it is now, not as its holder knew it.
    stale = replace(again, status=BatchStatus.PREPARING, input_file_id=None, provider_batch_id=None)
    assert await batches.advance(sessions, stale, 3600, provider_status="in_progress") == again
    await batches.release(sessions, again)
    assert await batches.take_due(sessions, lease_s=60) == [], "polled before its next poll was due"

    await _set(sessions, _batch(held.id).values(next_poll_at=func.now()))
    [due] = await batches.take_due(sessions, lease_s=60)
    await batches.release(sessions, due, 3600)
    assert await batches.take_due(sessions, lease_s=60) == [], "a failed step's batch looked at again at once"
    assert (await _batch_row(sessions, held.id)).lease_id is None


async def test_a_lost_batchs_cancel_is_timed_from_the_first_and_what_the_provider_shows_of_it_kept(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    [(held, _)] = await _waves_taken(batch_api, auth, batch_settings, sessions, {"prompts": 1})

    assert await batches.cancel_sent(sessions, held, {}, 3600, 0), "nothing to wait for"
    sent = (await _batch_row(sessions, held.id)).cancel_sent_at
    assert sent is not None
    assert not await batches.cancel_sent(sessions, held, {"status": "cancelling"}, 3600, 3600)
    await asyncio.sleep(0.2)
    assert await batches.cancel_sent(sessions, held, {"status": "cancelling"}, 3600, 0.1)

    row = await _batch_row(sessions, held.id)
    assert (row.cancel_sent_at, row.cancel_seen) == (sent, {"status": "cancelling"})
    await batches.release(sessions, held)
    assert await batches.take_due(sessions, lease_s=60) == [], "looked at again before it was due"


class _Online:
    """The online client a batch job's item falls back on (a test one: it answers every call)."""

    def __init__(self) -> None:
        self.asked: list[TurnKey | None] = []

    async def chat(self, request: ChatRequest) -> ChatReply:
        self.asked.append(request.key)
        return ChatReply("online answer", "stop", request.model, 10, 5, 1.0)


def _asked(key: TurnKey, endpoint: str = "default") -> ChatRequest:
    return ChatRequest(
        "seed",
        endpoint,
        "scripted-model",
        [{"role": "user", "content": str(key)}],
        None,
        None,
        0.2,
        100,
        key=key,
    )


async def test_a_batch_items_call_is_filed_once_per_turn_and_answered_as_its_request_was_settled(
    batch_api: httpx.AsyncClient, auth: dict[str, str], batch_settings: Settings, sessions: Sessions
) -> None:
    job_id = UUID(await submit(batch_api, auth, PROMPTS[:2], delivery="batch"))
    async with sessions() as session:
        item_ids = (
            await session.scalars(select(Item.id).where(Item.job_id == job_id).order_by(Item.position))
        ).all()
    online, endpoints = _Online(), batch_settings.endpoints()
    mine, neighbour = [
        BatchedLLM(sessions, claim, endpoints, online, batch_settings.llm_max_request_tokens)
        for item_id in item_ids
        if (claim := await items.claim(sessions, item_id, items.Limits(60, 3, 3))) is not None
    ]
    # Turns told apart by each part of their key.
    answered, refused, refused_unsaid, failed, sent_online, waiting = (
        TurnKey(Stage.SEED),
        TurnKey(Stage.DELIBERATION),
        TurnKey(Stage.SEED, round=1),
        TurnKey(Stage.SEED, agent=1),
        TurnKey(Stage.SEED, attempt=1),
        TurnKey(Stage.REFINE),
    )
    keys = [answered, refused, refused_unsaid, failed, sent_online, waiting]
    for key in keys:
        with pytest.raises(AwaitingBatch, match="filed"):
            await mine.chat(_asked(key))
    with pytest.raises(AwaitingBatch, match="still in a batch"):
        await mine.chat(_asked(answered))  # filed once
    with pytest.raises(AwaitingBatch, match="filed"):
        await neighbour.chat(_asked(answered))  # another item's turn of the same key
    with pytest.raises(LLMRequestRejected, match="unknown LLM endpoint 'gone'"):
        await mine.chat(_asked(TurnKey(Stage.INTENT), "gone"))

    async with sessions() as session:
        filed = (
            await session.scalars(
                select(BatchRequest).where(BatchRequest.job_id == job_id).order_by(BatchRequest.id)
            )
        ).all()
    body = {
        key: chat_payload(
            fitted(_asked(key), endpoints["default"], batch_settings.llm_max_request_tokens),
            endpoints["default"],
        )
        for key in keys
    }
    assert [
        (
            r.item_id,
            TurnKey(Stage(r.stage), r.round, r.agent, r.attempt),
            r.endpoint,
            r.body,
            r.status,
            r.submissions,
        )
        for r in filed
    ] == [
        *[(item_ids[0], key, "default", body[key], "pending", 0) for key in keys],
        (item_ids[1], answered, "default", body[answered], "pending", 0),
    ]
    request_of = {key: request.id for key, request in zip(keys, filed, strict=False)}
    await _set(
        sessions,
        update(BatchRequest)
        .where(BatchRequest.id == request_of[answered])
        .values(status="answered", answer=_completion("batched")),
        update(BatchRequest)
        .where(BatchRequest.id == request_of[refused])
        .values(status="rejected", error="HTTP 400: bad line"),
        update(BatchRequest).where(BatchRequest.id == request_of[refused_unsaid]).values(status="rejected"),
        update(BatchRequest)
        .where(BatchRequest.id == request_of[failed])
        .values(status="failed", error="unanswered in 3 batches; last: expired"),
        update(BatchRequest).where(BatchRequest.id == request_of[sent_online]).values(status="online"),
        update(BatchRequest).where(BatchRequest.id == request_of[waiting]).values(status="submitted"),
    )

    assert await mine.chat(_asked(answered)) == completion_reply(
        _completion("batched"), "scripted-model", 0.0
    )
    rejected = "the batch API of the LLM endpoint 'default' rejected the request"
    unanswered = "the LLM endpoint 'default' left the request unanswered in every batch"
    for key, detail, summary in [
        (refused, "HTTP 400: bad line", rejected),
        (refused_unsaid, rejected, rejected),
        (failed, "unanswered in 3 batches; last: expired", unanswered),
    ]:
        with pytest.raises(LLMRequestRejected) as raised:
            await mine.chat(_asked(key))
        assert (str(raised.value), raised.value.summary) == (detail, summary)
    assert (await mine.chat(_asked(sent_online))).content == "online answer"
    assert (online.asked, mine.sent_online, neighbour.sent_online) == ([sent_online], {sent_online}, set())
    with pytest.raises(AwaitingBatch, match="still in a batch"):
        await mine.chat(_asked(waiting))
    with pytest.raises(AwaitingBatch, match="still in a batch"):
        await neighbour.chat(_asked(answered))
