"""Worker processes killed (SIGKILL) mid-run while the LLM fails often, for every kind of
work besides a plain generation job (tests/test_chaos.py has that one): preference pairs
(whisperer, rejected and standard sampling, guard, grading), comparisons, sample evaluations
and model evaluations. Every item must end completed or failed with a reason; no turn or
result row stored twice; LLM answers re-bought only for calls in flight at a kill; and the
job's summary must count what its rows hold.

Unlike the chaos test, nothing restarts Redis or PostgreSQL, so these run beside other tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import distinct, exists, func, select, tuple_

from app.config import Settings
from app.store.db import Sessions
from app.store.models import (
    Cot,
    Item,
    ItemStatus,
    Judgement,
    ModelAnswer,
    PairCandidate,
    PreferencePair,
    SampleEvaluation,
    TurnRow,
)
from bench.audit import audit_job, finished, status_counts
from tests.conftest import eventually, run_worker_burst, start_worker, submit
from tests.scripted_llm import RecordedRequest, Reply, ScriptedLLM, agree, guard_verdict, reply
from tests.test_chaos import fault_mix
from tests.test_model_evaluation_api import (
    JUDGE,
    benchmark_prompts,
    evaluation_body,
    judge,
    model_under_test,
    refusing,
    submit_evaluation,
)
from tests.test_prompt_sets import register_on_builtin
from workers import liveness

pytestmark = pytest.mark.slow

WORKERS = 2
MAX_JOBS = 4
KILLS = 3
GUARD = "guard-model"  # a guard that flags some samples, by their text
SECOND_JUDGE = "second-judge"  # a judge with preferences, by the text it reads
DOUBTER = "doubter"  # a deliberator that agrees a quarter of the time, by the text it reads
TARGETS = ("model-a", "model-b")  # models under test

Headers = dict[str, str]


def killable(settings: Settings) -> Settings:
    """Workers that find a dead one within about three seconds, an LLM client that gives up
    on a stalled call after two, and no hedged calls: an item has one call in flight at most.
    The margins (a heartbeat's TTL four intervals, a lease of 10 s, a timeout eight times the
    LLM's latency) keep a busy machine from taking a live worker's items or answers."""
    return settings.model_copy(
        update={
            "worker_max_jobs": MAX_JOBS,
            "llm_timeout_s": 2.0,
            "llm_max_retries": 3,
            "item_max_failures": 20,
            "heartbeat_interval_s": 0.5,
            "heartbeat_ttl_s": 2.0,
            "lease_seconds": 10,
            "llm_hedge_factor": 0.0,
        }
    )


def _digest(body: dict[str, Any]) -> int:
    """A number fixed by the request's messages: the same request gets the same answer."""
    return hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).digest()[0]


def flags_a_third(body: dict[str, Any]) -> Reply:
    return guard_verdict(_digest(body) % 3 == 0, "physical-harm")


def doubts_by_text(body: dict[str, Any]) -> Reply:
    if _digest(body) % 4 == 0:
        return agree(True)
    return agree(False, new_thoughts=[f"A further point, {_digest(body)}."])


def prefers_by_text(body: dict[str, Any]) -> Reply:
    return reply({"winner": ("A", "B", "tie")[_digest(body) % 3], "rationale": "By the text."})


@dataclass(frozen=True)
class Holder:
    """A live worker process and its worker id, which its claims carry."""

    process: subprocess.Popen[bytes]
    worker_id: UUID


async def _holder(
    redis: Redis, settings: Settings, sessions: Sessions, job_id: UUID, workers: list[subprocess.Popen[bytes]]
) -> Holder | None:
    """A live worker that holds a running item of the job midway: with turns stored."""
    async with sessions() as session:
        holders = await session.scalars(
            select(Item.claimed_by)
            .where(
                Item.job_id == job_id,
                Item.status == ItemStatus.RUNNING,
                exists().where(TurnRow.item_id == Item.id),
            )
            .distinct()
        )
        claimed = [holder for holder in holders if holder is not None]
    alive = {process.pid: process for process in workers if process.poll() is None}
    for holder in claimed:
        where = await redis.get(liveness.heartbeat_key(settings, holder))
        if where is not None and (pid := int(where.decode().rsplit(" ", 1)[1])) in alive:
            return Holder(alive[pid], holder)
    return None


async def _held_by(sessions: Sessions, job_id: UUID, worker_id: UUID) -> list[UUID]:
    async with sessions() as session:
        held = await session.scalars(
            select(Item.id).where(
                Item.job_id == job_id, Item.status == ItemStatus.RUNNING, Item.claimed_by == worker_id
            )
        )
        return list(held)


@dataclass(frozen=True)
class KilledRun:
    answered: list[RecordedRequest]  # the LLM's 200 answers while the job ran
    held: Counter[UUID]  # per item, the kills of a worker that held it: a call in flight at most


async def run_with_kills(
    job_id: UUID,
    expected_items: int,
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
    seed: int,
) -> KilledRun:
    """Run the job on WORKERS worker processes under the chaos test's LLM fault mix (its
    stalls outlast the timeout), killing
    a worker that holds an item of the job midway KILLS times (each replaced at once), until
    every item finished."""
    rng = random.Random(seed)
    chaotic = killable(settings)
    answered_before = len(scripted_llm.answered)
    scripted_llm.unscripted = lambda: fault_mix(rng)
    workers.extend(start_worker(chaotic) for _ in range(WORKERS))
    held: Counter[UUID] = Counter()
    for _ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        victim = await eventually(
            lambda: _holder(redis, chaotic, sessions, job_id, workers),
            timeout_s=30,
            what="a worker holding an item midway",
        )
        victim.process.kill()
        victim.process.wait()
        # Still its: the sweeper waits a heartbeat's TTL before it takes them back.
        held.update(await _held_by(sessions, job_id, victim.worker_id))
        workers[workers.index(victim.process)] = start_worker(chaotic)

    async def all_finished() -> bool:
        return finished(await status_counts(sessions, job_id)) == expected_items

    await eventually(all_finished, timeout_s=60, what="every item to finish")
    scripted_llm.unscripted = lambda: None
    return KilledRun(scripted_llm.answered[answered_before:], held)


async def assert_nothing_lost_or_bought_twice(
    sessions: Sessions, job_id: UUID, expected_items: int, run: KilledRun
) -> dict[str, int]:
    """The chaos test's targets for this job, and the tighter one prompt by prompt: the
    answers the LLM sent for a prompt's items (the requests that hold the prompt) less their
    stored turns are at most the kills that took one of them midway. The job's items by
    status. The job's prompts must differ and none may hold another."""
    audit = await audit_job(sessions, job_id)
    assert audit.problems(expected_items, len(run.answered), sum(run.held.values())) == []
    async with sessions() as session:
        rows = await session.execute(
            select(Item.id, Item.prompt, func.count(TurnRow.id))
            .outerjoin(TurnRow, TurnRow.item_id == Item.id)
            .where(Item.job_id == job_id)
            .group_by(Item.id)
        )
        stored: Counter[str] = Counter()
        held: Counter[str] = Counter()
        for item, prompt, turns in rows.all():
            stored[prompt] += turns
            held[prompt] += run.held[item]
    requests = [json.dumps(request.body) for request in run.answered]
    bought = {prompt: sum(prompt in request for request in requests) for prompt in stored}
    assert sum(bought.values()) == len(requests), "an answer of no prompt of the job, or of two"
    beyond = {prompt: (n, stored[prompt], held[prompt]) for prompt, n in bought.items()}
    assert {p: found for p, found in beyond.items() if not 0 <= found[0] - found[1] <= found[2]} == {}
    return audit.statuses


async def rows_of(sessions: Sessions, table: Any, job_id: UUID) -> int:
    async with sessions() as session:
        return (
            await session.scalar(select(func.count()).select_from(table).where(table.job_id == job_id)) or 0
        )


async def turn_keys(sessions: Sessions, job_id: UUID, stage: str) -> dict[int, int]:
    """Per agent, the distinct (item, round) of the job's turns of `stage`: calls asked, re-asks
    not counted."""
    async with sessions() as session:
        rows = await session.execute(
            select(TurnRow.agent, func.count(distinct(tuple_(TurnRow.item_id, TurnRow.round))))
            .where(TurnRow.job_id == job_id, TurnRow.stage == stage)
            .group_by(TurnRow.agent)
        )
        return {agent: count for agent, count in rows.all()}


async def get_ok(api: httpx.AsyncClient, auth: Headers, path: str) -> dict[str, Any]:
    response = await api.get(path, headers=auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_preference_pairs_survive_killed_workers_and_a_failing_llm(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    prompts = 6
    scripted_llm.latency_s = 0.05
    scripted_llm.models[GUARD] = flags_a_third
    pairs = {"guard": {"model": GUARD}, "max_tries": 2, "min_gap": 0.0, "baseline": True}
    job_id = UUID(
        await submit(
            api,
            auth,
            [f"Pair prompt {n}: how do locks work?" for n in range(prompts)],
            grading={},
            pairs=pairs,
        )
    )

    run = await run_with_kills(job_id, prompts, settings, sessions, redis, scripted_llm, workers, seed=11)

    statuses = await assert_nothing_lost_or_bought_twice(sessions, job_id, prompts, run)
    completed = statuses.get("completed", 0)
    assert await rows_of(sessions, Cot, job_id) == completed
    assert await rows_of(sessions, PreferencePair, job_id) == completed
    async with sessions() as session:
        candidates = dict(
            (
                await session.execute(
                    select(PairCandidate.method, func.count())
                    .where(PairCandidate.job_id == job_id)
                    .group_by(PairCandidate.method)
                )
            ).all()
        )
    # A candidate is a rejected side the guard was asked about: one per guard call of a try.
    guarded = await turn_keys(sessions, job_id, "guard")
    assert candidates == {"whisper": guarded[0], "standard": guarded[1]}
    job = await get_ok(api, auth, f"/v1/jobs/{job_id}")
    assert job["counts"]["by_status"] == statuses
    assert job["quality"]["graded"] + job["quality"]["grade_failed"] == completed
    summary = job["pairs"]
    assert summary["attempted"] == completed
    assert summary["kept"] + sum(summary["not_kept"].values()) == completed
    report = await get_ok(api, auth, f"/v1/jobs/{job_id}/report")
    assert {method: c["candidates"] for method, c in report["pairs"]["candidates"].items()} == candidates
    async with sessions() as session:
        turns = await session.scalar(
            select(func.count()).select_from(TurnRow).where(TurnRow.job_id == job_id)
        )
    assert job["usage"]["llm_calls"] == turns


async def test_comparisons_survive_killed_workers_and_a_failing_llm(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    prompts = [f"Compared prompt {n}: how do tides work?" for n in range(16)]
    baseline = await submit(api, auth, prompts, mode="zero_shot")
    candidate = await submit(api, auth, prompts, mode="zero_shot", max_tokens=300)
    await run_worker_burst(settings, max_jobs=8)
    scripted_llm.latency_s = 0.25
    scripted_llm.models[SECOND_JUDGE] = prefers_by_text
    body = {
        "baseline_job_id": baseline,
        "candidate_job_id": candidate,
        "judges": [{}, {"model": SECOND_JUDGE}],
    }
    response = await api.post("/v1/comparisons", json=body, headers=auth)
    assert response.status_code == 202, response.text
    job_id = UUID(response.json()["id"])

    run = await run_with_kills(
        job_id, len(prompts), settings, sessions, redis, scripted_llm, workers, seed=12
    )

    # Nothing in the fault mix may fail a comparison item: an unreadable verdict is a result.
    assert await assert_nothing_lost_or_bought_twice(sessions, job_id, len(prompts), run) == {
        "completed": len(prompts)
    }
    assert await rows_of(sessions, Judgement, job_id) == 2 * len(prompts)
    assert await turn_keys(sessions, job_id, "judge") == {0: 2 * len(prompts), 1: 2 * len(prompts)}
    comparison = await get_ok(api, auth, f"/v1/comparisons/{job_id}")
    for judged in comparison["judges"]:
        assert sum(judged[k] for k in ("wins", "ties", "losses", "unreadable")) == len(prompts)
    async with sessions() as session:
        winners = dict(
            (
                await session.execute(
                    select(Judgement.winner, func.count())
                    .where(Judgement.job_id == job_id, Judgement.judge == 1)
                    .group_by(Judgement.winner)
                )
            ).all()
        )
    second = comparison["judges"][1]
    assert (second["wins"], second["ties"], second["losses"], second["unreadable"]) == tuple(
        winners.get(w, 0) for w in ("b", "tie", "a", None)
    )


async def test_sample_evaluations_survive_killed_workers_and_a_failing_llm(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    matched = 16
    theirs = [
        {"prompt": f"Sampled prompt {n}: what is rust?", "response": f"their answer {n}"}
        for n in range(matched)
    ]
    other = await api.post("/v1/sample-evaluations", json={"samples": theirs, "grade": {}}, headers=auth)
    assert other.status_code == 202, other.text
    await run_worker_burst(settings, max_jobs=8)
    ours = [
        {**sample, "response": f"our answer {n}", "thoughts": [f"step {n}"]}
        for n, sample in enumerate(theirs)
    ]
    ours.append({"prompt": "a prompt only we have", "response": "unmatched"})
    body = {
        "samples": ours,
        "grade": {},
        "guard": {"model": GUARD},
        "judge": {"job_id": other.json()["id"], "judge": {"model": SECOND_JUDGE}},
    }
    scripted_llm.latency_s = 0.25
    scripted_llm.models[GUARD] = flags_a_third
    scripted_llm.models[SECOND_JUDGE] = prefers_by_text
    response = await api.post("/v1/sample-evaluations", json=body, headers=auth)
    assert response.status_code == 202, response.text
    job_id = UUID(response.json()["id"])

    run = await run_with_kills(job_id, len(ours), settings, sessions, redis, scripted_llm, workers, seed=13)

    # Nothing in the fault mix may fail a sample: output no role could read is a result.
    assert await assert_nothing_lost_or_bought_twice(sessions, job_id, len(ours), run) == {
        "completed": len(ours)
    }
    assert await rows_of(sessions, SampleEvaluation, job_id) == len(ours)
    assert await turn_keys(sessions, job_id, "grade") == {0: len(ours)}
    assert await turn_keys(sessions, job_id, "guard") == {0: len(ours)}
    assert await turn_keys(sessions, job_id, "judge") == {0: 2 * matched}
    report = await get_ok(api, auth, f"/v1/sample-evaluations/{job_id}")
    assert report["grades"]["graded"] + report["grades"]["grade_failed"] == len(ours)
    guard = report["guard"]
    assert guard["unsafe"] + guard["safe"] + guard["unreadable"] == len(ours)
    pairwise = report["pairwise"]
    assert pairwise["unmatched"] == 1
    assert sum(pairwise[k] for k in ("wins", "ties", "losses", "unreadable")) == matched
    async with sessions() as session:
        flagged = await session.scalar(
            select(func.count()).where(
                SampleEvaluation.job_id == job_id, SampleEvaluation.guard["unsafe"].as_boolean().is_(True)
            )
        )
    assert guard["unsafe"] == flagged


async def test_model_evaluations_survive_killed_workers_and_a_failing_llm(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    per_class = 5
    for seed, model in enumerate(TARGETS):
        scripted_llm.models[model] = model_under_test(
            refusing(per_class, {"harmful": 0.6, "benign": 0.2}, seed)
        )
    scripted_llm.models[JUDGE] = judge
    scripted_llm.latency_s = 0.25
    benchmark = {"name": "kills", "prompts": benchmark_prompts(per_class)}
    submitted = await submit_evaluation(api, auth, evaluation_body([benchmark], *TARGETS))
    job_id, items = UUID(submitted["id"]), 2 * 2 * per_class

    run = await run_with_kills(job_id, items, settings, sessions, redis, scripted_llm, workers, seed=14)

    # Nothing in the fault mix may fail an answer: whatever the target says is its answer.
    assert await assert_nothing_lost_or_bought_twice(sessions, job_id, items, run) == {"completed": items}
    # One answer and one verdict of each judge per item: the target never answered twice.
    for stage in ("respond", "guard", "refusal"):
        assert await turn_keys(sessions, job_id, stage) == {0: items}, stage
    async with sessions() as session:
        answered = (
            await session.execute(
                select(
                    ModelAnswer.target,
                    func.count(),
                    func.count(ModelAnswer.judged_at),
                    func.count().filter(ModelAnswer.unsafe.is_(None)),
                    func.count().filter(ModelAnswer.refused.is_(None)),
                )
                .where(ModelAnswer.job_id == job_id)
                .group_by(ModelAnswer.target)
                .order_by(ModelAnswer.target)
            )
        ).all()
    report = await get_ok(api, auth, f"/v1/model-evaluations/{job_id}")
    by_target = report["by_target"]
    assert [
        (
            counts["items"],
            counts["completed"],
            counts["completed"] + counts["failed"],
            counts["safety_unreadable"],
            counts["refusal_unreadable"],
        )
        for counts in (by_target[f"default:{model}"] for model in TARGETS)
    ] == [(rows, judged, rows, no_safety, no_refusal) for _, rows, judged, no_safety, no_refusal in answered]


async def test_ablated_jobs_of_a_prompt_set_survive_killed_workers_and_a_failing_llm(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    scripted_llm: ScriptedLLM,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    """No intents, no refiner, three agents that seldom agree, cut at five turns, worded by a
    prompt set of the key's: each CoT is what its stored turns say, however often its item was
    taken from a dead worker."""
    prompts = 8
    terse = await register_on_builtin(api, auth, "terse", {"seed.user": "Briefly. $prompt\n$intents"})
    scripted_llm.latency_s = 0.1
    scripted_llm.models[DOUBTER] = doubts_by_text
    config = {
        "decompose_intents": False,
        "refine": False,
        "agents": 3,
        "deliberators": [{"model": DOUBTER}] * 3,
        "max_rounds": 2,
        "max_turns": 5,
    }
    body = {
        "prompts": [f"Ablated prompt {n}: how do bees fly?" for n in range(prompts)],
        "prompt_set": {"name": "terse"},
        "config": config,
    }
    response = await api.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 202, response.text
    job_id = UUID(response.json()["id"])

    run = await run_with_kills(job_id, prompts, settings, sessions, redis, scripted_llm, workers, seed=15)

    statuses = await assert_nothing_lost_or_bought_twice(sessions, job_id, prompts, run)
    async with sessions() as session:
        cots = (await session.scalars(select(Cot).where(Cot.job_id == job_id))).all()
        stages = dict(
            (
                await session.execute(
                    select(TurnRow.stage, func.count(distinct(TurnRow.item_id)))
                    .where(TurnRow.job_id == job_id)
                    .group_by(TurnRow.stage)
                )
            ).all()
        )
        spoke = dict(
            (
                await session.execute(
                    select(TurnRow.item_id, func.count(distinct(tuple_(TurnRow.round, TurnRow.agent))))
                    .where(TurnRow.job_id == job_id, TurnRow.stage == "deliberation")
                    .group_by(TurnRow.item_id)
                )
            ).all()
        )
    assert len(cots) == statuses.get("completed", 0)
    assert set(stages) <= {"seed", "deliberation"}  # no intents, no refiner
    for cot in cots:
        assert (cot.prompt_set_name, cot.prompt_set_version) == ("terse", terse["version"])
        # The stopping rule over the stored turns: the first agreement, else the turn budget.
        agreed_at = (cot.agreed_by["round"] - 1) * 3 + cot.agreed_by["agent"] if cot.agreed_by else 5
        assert spoke[cot.item_id] == agreed_at
        disagreed = agreed_at - 1 if cot.agreed_by else agreed_at
        assert len(cot.thoughts) == 2 + disagreed  # the seed's two and one a disagreeing turn
        assert [t["sources"] for t in cot.refined_thoughts] == [[n] for n in range(1, len(cot.thoughts) + 1)]
