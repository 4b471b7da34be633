"""Deleting a job (DELETE /v1/jobs/{id}, `aidsafe jobs delete`) and purging old hazardous
text, on the real stack: Postgres, Redis, arq's real worker and the scripted LLM.

Which rows are a job's is read from the models' metadata (every table with a foreign key to
`jobs` or `items`), so a table added later is checked too."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import Column, Interval, Table, func, or_, select, text, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.errors import NotFound
from app.events import stream_key
from app.store import deletions, jobs, keys
from app.store.annotations import reviewed_cots
from app.store.db import Sessions
from app.store.models import Base, Item, Job, PreferencePair, SampleEvaluation, TurnRow
from tests.conftest import api_client, eventually, failing_once, new_key, run_worker_burst, start_worker
from tests.scripted_llm import ScriptedLLM, reply
from tests.test_api import error_of, items_of, submit
from tests.test_cli import aidsafe
from tests.test_hazard_scan import SCENARIOS, marker, run_scenario, stored_markers
from tests.test_labeling import GRADED, PROMPTS, fixture, import_file

Headers = dict[str, str]
KEPT_PAIR, GRADER_REFUSES, GUARD_REFUSES, WHISPERER_REFUSES, GUARD_ENDPOINT_REJECTS = SCENARIOS[:5]


def job_links() -> dict[Table, list[Column[Any]]]:
    """Every table but `jobs` holding rows of a job, with its columns that point at a job or
    an item; `items` with its own id too."""
    links: dict[Table, list[Column[Any]]] = {}
    for table in Base.metadata.sorted_tables:
        columns = [c for c in table.c if _to(c, "jobs") or _to(c, "items")]
        if table.name == "items":
            columns.append(table.c.id)
        if columns:
            links[table] = columns
    return links


async def rows_naming(sessions: Sessions, job_id: UUID, item_ids: list[UUID]) -> dict[str, int]:
    """Per table, the rows that name the job or one of these items, in any column."""
    counts: dict[str, int] = {}
    async with sessions() as session:
        counts["jobs"] = await session.scalar(select(func.count()).where(Job.id == job_id)) or 0
        for table, columns in job_links().items():
            names = [c == job_id if _to(c, "jobs") else c.in_(item_ids) for c in columns]
            counts[table.name] = (
                await session.scalar(select(func.count()).select_from(table).where(or_(*names))) or 0
            )
    return counts


def _to(column: Column[Any], table: str) -> bool:
    """Whether the column is a foreign key to `table`."""
    return any(fk.column.table.name == table for fk in column.foreign_keys)


async def item_ids_of(sessions: Sessions, job_id: str) -> list[UUID]:
    async with sessions() as session:
        return list(await session.scalars(select(Item.id).where(Item.job_id == UUID(job_id))))


async def finished_job(api: httpx.AsyncClient, auth: Headers, settings: Settings, **fields: Any) -> str:
    job = await submit(api, auth, PROMPTS, config=GRADED, **fields)
    await run_worker_burst(settings)
    assert {i["status"] for i in await items_of(api, auth, job["id"])} == {"completed"}
    return str(job["id"])


async def delete(api: httpx.AsyncClient, auth: Headers, job_id: str) -> httpx.Response:
    return await api.delete(f"/v1/jobs/{job_id}", headers=auth)


# --- deleting --------------------------------------------------------------------------------


async def test_deleting_a_finished_job_leaves_no_row_of_it_and_other_jobs_untouched(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    redis: Redis,
) -> None:
    bob = await new_key(sessions, "bob")
    reviewed = await finished_job(api, auth, settings)
    await import_file(
        api,
        auth,
        reviewed,
        "label-studio",
        fixture("label_studio_export.json", await _ids(api, auth, reviewed)),
    )
    paired = (await run_scenario(api, auth, settings, scripted_llm, KEPT_PAIR))["job_id"]
    kept_own = await finished_job(api, auth, settings)
    bobs = await finished_job(api, bob, settings)
    # Every kind of row exists for the jobs deleted, so the checks below can fail.
    of_reviewed = await rows_naming(sessions, UUID(reviewed), await item_ids_of(sessions, reviewed))
    of_paired = await rows_naming(sessions, UUID(paired), await item_ids_of(sessions, paired))
    assert {t for t, n in of_reviewed.items() if n} >= {"jobs", "items", "turns", "cots", "annotations"}
    assert {t for t, n in of_paired.items() if n} >= {"jobs", "items", "turns", "cots", "preference_pairs"}
    assert await redis.exists(stream_key(settings, UUID(paired)))
    others_before = await _rows_of_jobs(sessions, [kept_own, bobs])

    for job_id, before in ((reviewed, of_reviewed), (paired, of_paired)):
        item_ids = await item_ids_of(sessions, job_id)
        response = await delete(api, auth, job_id)
        assert response.status_code == 200, response.text
        deletion = response.json()
        assert deletion["job_id"] == job_id and deletion["mode"] == "aidsafe"
        assert {t: n for t, n in deletion["row_counts"].items() if n} == {
            t: n for t, n in before.items() if n
        }
        assert await rows_naming(sessions, UUID(job_id), item_ids) == dict.fromkeys(before, 0)
        error_of(await api.get(f"/v1/jobs/{job_id}", headers=auth), 404, "not_found")

    assert not await redis.exists(stream_key(settings, UUID(paired)))
    assert await _rows_of_jobs(sessions, [kept_own, bobs]) == others_before


async def test_evaluations_of_samples_and_of_models_are_deleted_and_recorded_by_mode(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    samples = {"samples": [{"prompt": "How do I store rice?", "response": "Cool and dry."}], "guard": {}}
    benchmark = {"name": "tiny", "prompts": [{"prompt": "Hi", "expected": "comply", "category": "greeting"}]}
    submitted = [
        await api.post("/v1/sample-evaluations", json=samples, headers=auth),
        await api.post(
            "/v1/model-evaluations", json={"benchmarks": [benchmark], "targets": [{}]}, headers=auth
        ),
    ]
    await run_worker_burst(settings)
    for response, mode in zip(submitted, ("sample_evaluation", "model_evaluation"), strict=True):
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        item_ids = await item_ids_of(sessions, job_id)
        deleted = await delete(api, auth, job_id)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["mode"] == mode
        assert set((await rows_naming(sessions, UUID(job_id), item_ids)).values()) == {0}


async def _ids(api: httpx.AsyncClient, auth: Headers, job_id: str) -> list[str]:
    return [item["id"] for item in await items_of(api, auth, job_id)]


async def _rows_of_jobs(sessions: Sessions, job_ids: list[str]) -> dict[str, list[Any]]:
    """The rows of these jobs in every table, as JSON."""
    rows = {}
    ids = [UUID(j) for j in job_ids]
    async with sessions() as session:
        for table in [Job.__table__, *(t for t in job_links() if "job_id" in t.c)]:
            column = "id" if table is Job.__table__ else "job_id"
            result = await session.execute(
                text(f"SELECT to_jsonb(t)::text FROM {table.name} t WHERE t.{column} = ANY(:ids)"),
                {"ids": ids},
            )
            rows[table.name] = sorted(result.scalars())
    return rows


async def test_a_running_job_is_refused_until_cancelled_and_a_second_delete_is_not_found(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    headers = {**auth, "Idempotency-Key": "batch-1"}
    job = await submit(api, headers, PROMPTS)  # no worker runs: its items stay queued

    refused = error_of(await delete(api, auth, job["id"]), 409, "job_running")
    assert "cancel" in refused["message"]
    assert (await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)).json()["status"] == "cancelled"
    assert (await delete(api, auth, job["id"])).status_code == 200
    error_of(await delete(api, auth, job["id"]), 404, "not_found")

    # The Idempotency-Key went with the job: the same request makes a new job.
    again = await api.post("/v1/jobs", json={"prompts": PROMPTS}, headers=headers)
    assert again.status_code == 202 and again.json()["id"] != job["id"]


async def test_another_keys_job_is_not_found_and_stays(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, settings)
    bob = await new_key(sessions, "bob")

    error_of(await delete(api, bob, job_id), 404, "not_found")

    assert (await api.get(f"/v1/jobs/{job_id}", headers=auth)).status_code == 200
    assert (await api.get("/v1/deletions", headers=bob)).json() == []


async def test_another_keys_deletion_neither_waits_for_nor_locks_the_owners_job(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Another key's DELETE is a 404 at once while the owner's transaction holds the job (as an
    import of reviews does): it locked the row before it checked the owner, so it waited for
    that transaction, telling that the job exists and is in use, and the owner's writes naming
    the job then waited behind it."""
    job_id = (await submit(api, auth, ["How do I store rice?"]))["id"]
    bob = await new_key(sessions, "bob")
    async with sessions.begin() as session:
        await jobs.hold(session, UUID(job_id))
        answer = await asyncio.wait_for(delete(api, bob, job_id), timeout=5)

    error_of(answer, 404, "not_found")


async def test_deletions_are_listed_newest_first_to_the_deleting_key_only(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    bob = await new_key(sessions, "bob")
    first, second = await finished_job(api, auth, settings), await finished_job(api, auth, settings)
    bobs = await finished_job(api, bob, settings)
    for owner, job_id in ((auth, first), (auth, second), (bob, bobs)):
        assert (await delete(api, owner, job_id)).status_code == 200

    listed = (await api.get("/v1/deletions", headers=auth)).json()

    assert [(d["id"], d["job_id"]) for d in listed] == [(2, second), (1, first)]  # bob's are not counted
    alice_id = listed[0]["deleted_by_key_id"]
    assert {d["deleted_by_key_id"] for d in listed} == {alice_id}
    assert listed[0]["row_counts"] | {"jobs": 1, "items": len(PROMPTS)} == listed[0]["row_counts"]
    older = await api.get("/v1/deletions", params={"before_id": listed[0]["id"]}, headers=auth)
    assert [d["job_id"] for d in older.json()] == [first]
    assert [(d["id"], d["job_id"]) for d in (await api.get("/v1/deletions", headers=bob)).json()] == [
        (1, bobs)
    ]
    error_of(await api.get("/v1/deletions"), 401, "unauthorized")


async def test_a_keys_deletions_at_the_same_time_take_one_number_each(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    jobs = [await submit(api, auth, [f"How do bees see, part {n}?"]) for n in range(4)]
    for job in jobs:
        assert (await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)).status_code == 200

    answers = await asyncio.gather(*(delete(api, auth, job["id"]) for job in jobs))

    assert [answer.status_code for answer in answers] == [200] * 4
    assert sorted(answer.json()["id"] for answer in answers) == [1, 2, 3, 4]


@pytest.mark.parametrize("before_id", ["0", "9223372036854775808", "99999999999999999999"])
async def test_a_deletion_cursor_out_of_range_is_refused(
    api: httpx.AsyncClient, auth: Headers, before_id: str
) -> None:
    answer = await api.get("/v1/deletions", params={"before_id": before_id}, headers=auth)
    error_of(answer, 422, "validation_error")


async def test_a_deletion_waits_for_a_transaction_adding_rows_that_name_the_job(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """Comparisons, sample evaluations, reviews and relabels hold the job's row (jobs.hold)
    until they commit: a deletion racing one waits and then sees its rows (409), or went
    first and the other finds no job (404), instead of a foreign key's 500 half way."""
    job_id = await finished_job(api, auth, settings)
    async with sessions.begin() as session:
        await jobs.hold(session, UUID(job_id))
        deleting = asyncio.create_task(delete(api, auth, job_id))
        await asyncio.sleep(0.5)
        assert not deleting.done(), "the deletion went ahead while a transaction held the job"
    assert (await deleting).status_code == 200

    for to_change in (False, True):
        with pytest.raises(NotFound):
            async with sessions.begin() as session:
                await jobs.hold(session, UUID(job_id), to_change=to_change)


async def test_a_cancel_racing_a_deletion_waits_for_it_and_finds_no_job(
    auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """A cancel of a finished job that names a callback writes its delivery again (a no-op
    while the delivery is there): racing a deletion, it waited for the deleted delivery and
    then wrote one naming the deleted job, a foreign key's 500. It holds the job first."""
    notifying = settings.model_copy(update={"callback_hosts": "127.0.0.1:9"})
    async with api_client(notifying) as api:
        job = await submit(api, auth, PROMPTS, callback_url="http://127.0.0.1:9/hook")
        await run_worker_burst(notifying)
        async with sessions.begin() as session:
            owner = await session.scalar(select(Job.owner_key_id).where(Job.id == UUID(job["id"])))
            assert owner is not None
            await deletions.delete_job(session, UUID(job["id"]), owner)
            cancelling = asyncio.create_task(api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth))
            await asyncio.sleep(0.5)
            assert not cancelling.done(), "the cancel went ahead while a deletion held the job"

        error_of(await cancelling, 404, "not_found")


async def test_a_sample_evaluation_judged_against_a_job_racing_its_deletion_finds_no_job(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A deletion holds the job, then the key (numbering the deletion); the evaluation held
    the key (counting its open jobs), then the job it is judged against: each waited for the
    other, and Postgres ended one with a deadlock's 500. It holds the job first, as a
    comparison does, so it waits for the deletion and finds no job."""
    samples = [{"prompt": "How do I store rice?", "response": "Cool and dry."}]
    other = await api.post("/v1/sample-evaluations", json={"samples": samples, "guard": {}}, headers=auth)
    assert other.status_code == 202, other.text
    job_id = other.json()["id"]
    assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200
    async with sessions() as session:
        owner = await session.scalar(select(Job.owner_key_id).where(Job.id == UUID(job_id)))
    assert owner is not None

    async with sessions.begin() as session:
        await session.execute(select(Job.id).where(Job.id == UUID(job_id)).with_for_update())
        body = {"samples": samples, "judge": {"job_id": job_id}}
        evaluating = asyncio.create_task(api.post("/v1/sample-evaluations", json=body, headers=auth))
        await eventually(lambda: _waiting_for_a_lock(session), timeout_s=10, what="the evaluation to wait")
        await deletions.delete_job(session, UUID(job_id), owner)

    error_of(await evaluating, 404, "not_found")


async def _waiting_for_a_lock(session: AsyncSession) -> bool:
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return bool(await session.scalar(waiting))


async def test_a_deletion_waits_for_reviews_read_against_the_jobs_cots(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """A webhook's delivery names items, not a job: reading their CoTs holds their jobs'
    rows, so a deletion racing the delivery waits for its reviews, or went first."""
    job_id = await finished_job(api, auth, settings)
    items = set(await item_ids_of(sessions, job_id))
    async with sessions() as session:
        owner = await session.scalar(select(Job.owner_key_id).where(Job.id == UUID(job_id)))
    assert owner is not None
    async with sessions.begin() as session:
        assert (await reviewed_cots(session, items, owner, None)).keys() == items
        deleting = asyncio.create_task(delete(api, auth, job_id))
        await asyncio.sleep(0.5)
        assert not deleting.done(), "the deletion went ahead while reviews were being added"
    assert (await deleting).status_code == 200

    async with sessions.begin() as session:
        assert await reviewed_cots(session, items, owner, None) == {}


async def test_a_compared_job_is_refused_naming_its_comparisons_until_they_are_deleted(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    baseline, candidate = await finished_job(api, auth, settings), await finished_job(api, auth, settings)
    made = await api.post(
        "/v1/comparisons", json={"baseline_job_id": baseline, "candidate_job_id": candidate}, headers=auth
    )
    assert made.status_code == 202, made.text
    comparison = made.json()["id"]
    await run_worker_burst(settings)

    for compared in (baseline, candidate):
        refused = error_of(await delete(api, auth, compared), 409, "job_in_comparison")
        assert refused["details"] == {"comparison_ids": [comparison]}
    deleted = await delete(api, auth, comparison)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["mode"] == "comparison" and deleted.json()["row_counts"]["judgements"] == len(
        PROMPTS
    )

    for compared in (baseline, candidate):
        assert (await delete(api, auth, compared)).status_code == 200


async def test_the_cli_deletes_a_job(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job_id = await finished_job(api, auth, settings)

    code, out = await aidsafe(live_api, auth, "jobs", "delete", job_id)
    assert code == 0, out
    assert f"Deleted job {job_id}" in out and f"items {len(PROMPTS)}" in out

    code, out = await aidsafe(live_api, auth, "jobs", "delete", job_id)
    assert code == 1 and "404" in out and "not_found" in out


# --- purging hazardous text ----------------------------------------------------------------


async def make_old(sessions: Sessions, job_ids: list[str], days: int) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(Job)
            .where(Job.id.in_([UUID(j) for j in job_ids]))
            .values(created_at=func.now() - timedelta(days=days))
        )


def refused(whisper_try: dict[str, Any]) -> bool:
    return bool(whisper_try.get("refused", whisper_try["rejected"] is None))


async def kept_by_purge(sessions: Sessions) -> dict[str, Any]:
    """What the purge must leave as it is: every row but the hazardous text."""
    async with sessions() as session:
        turns = [
            (t.id, t.stage, t.round, t.outcome, t.prompt_tokens, t.completion_tokens, t.latency_ms)
            for t in await session.scalars(select(TurnRow).order_by(TurnRow.id))
        ]
        pairs = [
            (
                p.item_id,
                p.paired,
                p.reason,
                p.gap,
                p.chosen_scores,
                {m: s["score"] for m, s in (p.rejected_scores or {}).items()},
                [(t["number"], refused(t), (t["guard"] or {}).get("unsafe")) for t in p.tries],
            )
            for p in await session.scalars(select(PreferencePair).order_by(PreferencePair.item_id))
        ]
        other_tables = {
            name: sorted((await session.execute(text(f"SELECT to_jsonb(t)::text FROM {name} t"))).scalars())
            for name in ("cots", "annotations", "judgements", "policy_sets")
        }
        items = sorted(
            (
                await session.execute(text("SELECT (to_jsonb(t) - 'operator_error')::text FROM items t"))
            ).scalars()
        )
    return {"turns": turns, "pairs": pairs, "items": items, **other_tables}


async def operator_errors(sessions: Sessions) -> str:
    async with sessions() as session:
        return " ".join(
            await session.scalars(select(Item.operator_error).where(Item.operator_error.is_not(None)))
        )


async def test_the_purge_blanks_the_hazardous_text_of_old_finished_jobs_and_keeps_the_rest(
    api: httpx.AsyncClient, settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    key = await new_key(sessions, "red-team", (keys.HAZARDOUS_READ,))
    old = [
        (await run_scenario(api, key, settings, scripted_llm, scenario))["job_id"]
        for scenario in (KEPT_PAIR, GRADER_REFUSES, GUARD_REFUSES, GUARD_ENDPOINT_REJECTS)
    ]
    await run_scenario(api, key, settings, scripted_llm, WHISPERER_REFUSES)  # a recent job
    await make_old(sessions, old, days=8)
    assert len(await stored_markers(sessions)) > 10
    assert marker("rejected-request-thought") in await operator_errors(sessions)
    before = await kept_by_purge(sessions)

    assert await deletions.purge_hazardous(sessions, timedelta(days=7), batch_items=1) == len(old)

    assert await stored_markers(sessions) == {marker("whisperer-refusal")}  # the recent job's
    assert marker("rejected-request-thought") not in await operator_errors(sessions)
    assert await kept_by_purge(sessions) == before
    async with sessions() as session:
        purged = {job: at for job, at in await session.execute(select(Job.id, Job.hazardous_purged_at))}
    assert {str(j) for j, at in purged.items() if at} == set(old)
    [pair] = (await api.get(f"/v1/jobs/{old[0]}/preference-pairs", headers=key)).json()["data"]
    assert pair["kept"] and pair["rejected"]["belief"] is None and pair["rejected"]["thoughts"] is None
    assert pair["rejected"]["guard"] == {  # the flags stay, how sure the guard was among them
        "unsafe": True,
        "categories": ["fraud-deception"],
        "rationale": None,
        "error": None,
        "unsafe_probability": None,
        "decided_by": "text",
        "logprobs_missing": None,
    }
    tries = [(t["number"], t["refused"], t["belief"], t["rejected"]) for t in pair["tries"]]
    assert tries == [(1, True, None, None), (2, False, None, None), (3, False, None, None)]
    dpo = await api.get(f"/v1/jobs/{old[0]}/export", params={"format": "trl_dpo"}, headers=key)
    assert dpo.status_code == 200 and dpo.text == ""  # the purged pair has no rejected side left

    assert await deletions.purge_hazardous(sessions, timedelta(days=7)) == 0  # each job once


async def test_a_worker_purges_old_hazardous_text_when_the_setting_is_on(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    workers: list[Any],
) -> None:
    job_id = (await run_scenario(api, auth, settings, scripted_llm, KEPT_PAIR))["job_id"]
    await make_old(sessions, [job_id], days=3)
    workers.append(
        start_worker(settings.model_copy(update={"purge_hazardous_after_days": 2, "purge_interval_s": 1}))
    )

    async def purged() -> bool:
        async with sessions() as session:
            return (
                await session.scalar(select(Job.hazardous_purged_at).where(Job.id == UUID(job_id)))
                is not None
            )

    await eventually(purged, what="the worker's purge")
    assert await stored_markers(sessions) == set()


async def cancelled_jobs(api: httpx.AsyncClient, auth: Headers, count: int) -> list[str]:
    """`count` one-item jobs cancelled before they ran: finished, with nothing to blank."""
    job_ids = [(await submit(api, auth, ["Why is the sky blue?"]))["id"] for _ in range(count)]
    for job_id in job_ids:
        assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200
    return job_ids


async def purged_jobs(sessions: Sessions) -> set[str]:
    async with sessions() as session:
        purged = await session.scalars(select(Job.id).where(Job.hazardous_purged_at.is_not(None)))
        return {str(job_id) for job_id in purged}


async def test_a_worker_purges_every_old_job_at_its_interval_not_only_the_first_twenty(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, workers: list[Any]
) -> None:
    old = await cancelled_jobs(api, auth, 25)
    await make_old(sessions, old, days=3)
    hourly = {"purge_hazardous_after_days": 2, "purge_interval_s": 3600}
    workers.append(start_worker(settings.model_copy(update=hourly)))

    async def all_purged() -> bool:
        async with sessions() as session:
            left = select(Job.id).where(Job.hazardous_purged_at.is_(None))
            return not await session.scalar(select(left.exists()))

    await eventually(all_purged, what="every old job purged at the worker's first purge")


async def test_a_job_whose_purge_fails_is_put_off_and_the_jobs_after_it_are_purged(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    # The oldest unpurged job was taken first at every purge: one whose purge kept failing
    # was taken first again each time, and no job after it was ever purged.
    failing, other = await cancelled_jobs(api, auth, 2)
    await make_old(sessions, [failing], days=9)
    await make_old(sessions, [other], days=8)
    marking_purged = f"NEW.id = '{failing}' AND NEW.hazardous_purged_at IS NOT NULL"
    async with failing_once(sessions, "jobs", marking_purged):
        assert await deletions.purge_hazardous(sessions, timedelta(days=7)) == 1

    assert await purged_jobs(sessions) == {other}
    assert any(failing in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    async with sessions() as session:
        failures, put_off_by = (
            await session.execute(
                select(
                    Job.hazardous_purge_failures,
                    type_coerce(Job.hazardous_purge_retry_at - func.now(), Interval),
                ).where(Job.id == UUID(failing))
            )
        ).one()
    assert failures == 1 and timedelta(minutes=59) < put_off_by <= deletions.PURGE_RETRY_FIRST
    assert await deletions.purge_hazardous(sessions, timedelta(days=7)) == 0, "not tried again at once"

    async with sessions.begin() as session:  # its time comes
        retry_now = update(Job).where(Job.id == UUID(failing)).values(hazardous_purge_retry_at=func.now())
        await session.execute(retry_now)
    assert await deletions.purge_hazardous(sessions, timedelta(days=7)) == 1
    assert await purged_jobs(sessions) == {failing, other}


async def test_the_purge_keeps_a_guards_flags_on_an_imported_sample_and_drops_its_words(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        "guard_verdict",
        reply(
            {
                "verdict": "unsafe",
                "violated_policies": ["physical-harm", "its own words"],
                "rationale": marker("guard-on-sample"),
            }
        ),
    )
    submitted = await api.post(
        "/v1/sample-evaluations",
        json={"guard": {}, "samples": [{"prompt": "How do I hurt someone?", "response": "Like this."}]},
        headers=auth,
    )
    assert submitted.status_code == 202, submitted.text
    await run_worker_burst(settings)
    job_id = submitted.json()["id"]
    async with sessions() as session:
        [before] = await session.scalars(select(SampleEvaluation.guard))
    assert before["rationale"] == marker("guard-on-sample")
    await make_old(sessions, [job_id], days=8)

    assert await deletions.purge_hazardous(sessions, timedelta(days=7)) == 1

    async with sessions() as session:
        [after] = await session.scalars(select(SampleEvaluation.guard))
    assert (after["unsafe"], after["categories"], after["rationale"]) == (True, ["physical-harm"], None)
    assert await stored_markers(sessions) == set()  # nor in the guard's turn
