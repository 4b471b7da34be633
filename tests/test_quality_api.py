"""Grades, quality gates, preference pairs, reports and comparisons as a client sees them,
and the hazard controls around whispered beliefs and rejected CoTs.

Most tests store hand-built engine results with `items.complete` (so every number is
known); the last ones run arq's real worker against the scripted LLM."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from alembic.config import Config
from sqlalchemy import func, select, text

from app.config import Settings
from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.deliberation.quality import gate
from app.deliberation.results import (
    Completed,
    Grade,
    GuardVerdict,
    PairMethod,
    PairOutcome,
    PairTry,
    Sample,
    Thought,
)
from app.store import items, keys
from app.store.db import Sessions
from app.store.endings import failed
from app.store.models import ApiKey, Cot, Item, ItemStatus, Judgement, PairCandidate, PreferencePair
from app.store.turn_log import PostgresTurnLog
from app.store.turn_writer import TurnWriter
from tests.conftest import ROOT, new_key, run_worker_burst, worker_env
from tests.scripted_llm import ScriptedLLM, guard_verdict, malformed, reply, scores
from tests.test_api import KITCHEN_POLICIES, all_pages, error_of, items_of, register, row_counts, submit

Headers = dict[str, str]
AIDSAFE = str(Path(sys.executable).parent / "aidsafe")
LIMITS = items.Limits(lease_s=60, max_claims=10, max_failures=5)
HAZARD = "HAZARD-7f3"  # marks every hazardous text these tests store
THRESHOLDS = {"relevance": 3, "cot_policy_faithfulness": 4}
GRADED = {"grading": {"thresholds": THRESHOLDS}}
PAIRED = {"grading": {"thresholds": THRESHOLDS}, "pairs": {"max_tries": 2, "min_gap": 1.0}}


@pytest.fixture
async def scoped(sessions: Sessions) -> Headers:
    """A key with the hazardous scope."""
    return await new_key(sessions, "red-team", (keys.HAZARDOUS_READ,))


# --- hand-built engine results -------------------------------------------------------------


def a_grade(**overrides: int) -> Grade:
    return Grade(scores(**overrides))


def hazardous_grade(**overrides: int) -> Grade:
    """The grader's scores of a rejected CoT: its rationales may quote hazardous text."""
    return Grade({m: {**s, "rationale": f"{HAZARD} {m}"} for m, s in scores(**overrides).items()})


def rejected_sample(number: int) -> Sample:
    return Sample([f"{HAZARD} rejected thought {number}"], f"{HAZARD} rejected response {number}")


def passed_try(number: int, method: PairMethod = "whisper", gap: float = 0.0) -> PairTry:
    verdict = GuardVerdict(False, [], f"{HAZARD} guard passed it")
    belief = f"{HAZARD} belief {number}" if method == "whisper" else None
    return PairTry(number, belief, rejected_sample(number), None, verdict, hazardous_grade(), gap, method)


def refused_try(number: int, method: PairMethod = "whisper") -> PairTry:
    belief = f"{HAZARD} belief {number}" if method == "whisper" else None
    return PairTry(number, belief, None, f"{HAZARD} refusal", None, method=method)


def flagged_try(number: int, gap: float, method: PairMethod = "whisper") -> PairTry:
    """Graded for this gap (the chosen side scored 4 on both policy metrics)."""
    verdict = GuardVerdict(
        True,
        ["fraud-deception"],
        f"{HAZARD} guard flagged it",
        unsafe_probability=0.93,
        decided_by="logprobs",
    )
    belief = f"{HAZARD} belief {number}" if method == "whisper" else None
    rejected = int(4 - gap)
    grade = hazardous_grade(cot_policy_faithfulness=rejected, response_policy_faithfulness=rejected)
    return PairTry(number, belief, rejected_sample(number), None, verdict, grade, gap, method)


def kept_pair(gap: float = 3.0) -> PairOutcome:
    return PairOutcome(None, [refused_try(1), flagged_try(2, gap)])


def small_gap_pair(gap: float = 0.5) -> PairOutcome:
    """A pair made under the jobs' min_gap of 1."""
    return PairOutcome(None, [flagged_try(1, gap)])


def never_flagged_pair() -> PairOutcome:
    return PairOutcome("guard_never_flagged", [passed_try(1), passed_try(2)])


def completed(grade: Grade | None = None, pair: PairOutcome | None = None, text: str = "Chosen") -> Completed:
    return Completed(
        intents={"explicit_intents": ["Learn something"], "implicit_intents": []},
        thoughts=[Thought(1, f"{text} thought", "seed", 0, 0)],
        refined_thoughts=[{"text": f"{text} thought", "sources": [1]}],
        dropped=[],
        unaccounted=[],
        response=f"{text} response",
        rounds_used=1,
        agreed=True,
        agreed_by={"round": 1, "agent": 1},
        grade=grade,
        gate=gate(grade, THRESHOLDS) if grade else None,
        pair=pair,
    )


def a_turn(item_id: UUID, key: TurnKey, raw: str) -> Turn:
    return Turn(
        item_id=item_id,
        key=key,
        role=key.stage.value,
        endpoint="default",
        model="m",
        request_hash="h",
        raw_output=raw,
        outcome=TurnOutcome.OK,
        parsed={"text": raw},
        prompt_tokens=10,
        completion_tokens=5,
    )


async def finished_job(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    results: list[Completed],
    config: dict[str, Any] | None = None,
    prompts: list[str] | None = None,
    **fields: Any,
) -> str:
    """A job whose first items completed with these engine results, in order (the rest stay
    queued); `fields` are more of the job request's."""
    job = await submit(
        api, auth, prompts or [f"Prompt {n}" for n in range(len(results))], config=config or {}, **fields
    )
    for item, result in zip(await items_of(api, auth, job["id"]), results, strict=False):
        claim = await items.claim(sessions, UUID(item["id"]), LIMITS)
        assert claim is not None
        assert await items.complete(sessions, claim, result)
    job_id: str = job["id"]
    return job_id


async def job_with_hazardous_turns(api: httpx.AsyncClient, auth: Headers, sessions: Sessions) -> str:
    """One item with a kept pair, and the turns that wrote it: the chosen CoT's grade (not
    hazardous) and the whisper, rejected, guard and rejected-grade turns (hazardous)."""
    job = await submit(api, auth, ["Write a convincing lottery-win email."], config=PAIRED)
    item_id = UUID((await items_of(api, auth, job["id"]))[0]["id"])
    claim = await items.claim(sessions, item_id, LIMITS)
    assert claim is not None
    log = PostgresTurnLog(TurnWriter(sessions), claim)
    await log.record(a_turn(item_id, TurnKey(Stage.GRADE, 0), "chosen grade"))
    for stage in (Stage.WHISPER, Stage.REJECTED, Stage.GUARD, Stage.GRADE):
        await log.record(a_turn(item_id, TurnKey(stage, 2), f"{HAZARD} {stage.value}"))
    assert await items.complete(sessions, claim, completed(a_grade(), kept_pair()))
    job_id: str = job["id"]
    return job_id


async def get_ok(api: httpx.AsyncClient, auth: Headers, url: str, **params: Any) -> Any:
    response = await api.get(url, params=params, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


async def pairs_of(api: httpx.AsyncClient, auth: Headers, job_id: str, **params: Any) -> list[dict[str, Any]]:
    page = await get_ok(api, auth, f"/v1/jobs/{job_id}/preference-pairs", **params)
    pairs: list[dict[str, Any]] = page["data"]
    return pairs


# --- persistence ---------------------------------------------------------------------------


async def test_completing_an_item_stores_its_scores_gate_and_pair_in_one_go(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed(a_grade(relevance=2), kept_pair())], PAIRED)

    async with sessions() as session:
        cot = (await session.scalars(select(Cot).where(Cot.job_id == UUID(job_id)))).one()
        pair = (
            await session.scalars(select(PreferencePair).where(PreferencePair.job_id == UUID(job_id)))
        ).one()
    assert cot.scores == scores(relevance=2)
    assert (cot.accepted, cot.gate_reasons) == (False, ["relevance 2 < 3"])
    assert (pair.item_id, pair.position, pair.paired, pair.reason, pair.gap) == (
        cot.item_id,
        0,
        True,
        None,
        3.0,
    )
    assert pair.chosen_scores == cot.scores
    assert pair.belief == f"{HAZARD} belief 2"
    assert pair.rejected_thoughts == [f"{HAZARD} rejected thought 2"]
    assert pair.guard == {
        "unsafe": True,
        "categories": ["fraud-deception"],
        "rationale": f"{HAZARD} guard flagged it",
        "error": None,
        "unsafe_probability": 0.93,
        "decided_by": "logprobs",
        "logprobs_missing": None,
    }
    assert [t["number"] for t in pair.tries] == [1, 2]
    assert pair.tries[0]["rejected"] is None and pair.tries[0]["guard"] is None
    assert "grade" not in pair.tries[1]  # its rationales are hazardous: they stay in the turns


async def test_a_stale_claim_cannot_complete_the_item_twice(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job = await submit(api, auth, ["p"], config=PAIRED)
    claim = await items.claim(sessions, UUID((await items_of(api, auth, job["id"]))[0]["id"]), LIMITS)
    assert claim is not None

    assert await items.complete(sessions, claim, completed(a_grade(), kept_pair()))
    assert not await items.complete(sessions, claim, completed(a_grade(), never_flagged_pair()))

    assert not await items.end(sessions, claim, failed("unparseable_output", "too late"))

    async with sessions() as session:
        pairs = (await session.scalars(select(PreferencePair))).all()
    assert [p.paired for p in pairs] == [True]
    assert [i["status"] for i in await items_of(api, auth, job["id"])] == ["completed"]


async def test_a_job_without_grading_stores_no_scores_and_no_gate(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()])

    cot = (await get_ok(api, auth, f"/v1/jobs/{job_id}/cots"))["data"][0]

    assert (cot["scores"], cot["grade_error"]) == (None, None)
    assert cot["quality"] == {"accepted": None, "reasons": []}


# --- CoTs ------------------------------------------------------------------------------


async def test_cots_carry_scores_and_the_gate_decision(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    ungraded = Grade(None, "the grader gave no usable JSON")
    job_id = await finished_job(
        api,
        auth,
        sessions,
        [completed(a_grade()), completed(a_grade(cot_policy_faithfulness=2)), completed(ungraded)],
        GRADED,
    )

    cots = (await get_ok(api, auth, f"/v1/jobs/{job_id}/cots"))["data"]

    assert cots[0]["scores"]["coherence"] == {"score": 4, "rationale": "coherence looks fine."}
    assert [c["quality"] for c in cots] == [
        {"accepted": True, "reasons": []},
        {"accepted": False, "reasons": ["cot_policy_faithfulness 2 < 4"]},
        {"accepted": False, "reasons": ["not graded: the grader gave no usable JSON"]},
    ]
    assert (cots[2]["scores"], cots[2]["grade_error"]) == (None, "the grader gave no usable JSON")


async def test_cots_can_be_filtered_by_the_gate_decision(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    low = a_grade(relevance=1)
    results = [
        completed(a_grade()),
        completed(low),
        completed(a_grade()),
        completed(low),
        completed(a_grade()),
    ]
    job_id = await finished_job(api, auth, sessions, results, GRADED)

    accepted = await all_pages(api, auth, f"/v1/jobs/{job_id}/cots", limit=2, accepted="true")
    rejected = await all_pages(api, auth, f"/v1/jobs/{job_id}/cots", limit=2, accepted="false")

    assert [[c["position"] for c in page] for page in accepted] == [[0, 2], [4]]
    assert [[c["position"] for c in page] for page in rejected] == [[1, 3]]


# --- preference pairs ------------------------------------------------------------------


async def test_preference_pairs_page_through_in_prompt_order(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    results = [completed(a_grade(), kept_pair()) for _ in range(5)]
    job_id = await finished_job(api, auth, sessions, results, PAIRED)

    pages = await all_pages(api, auth, f"/v1/jobs/{job_id}/preference-pairs", limit=2)

    assert [[p["position"] for p in page] for page in pages] == [[0, 1], [2, 3], [4]]
    item_ids = [i["id"] for i in await items_of(api, auth, job_id)]
    assert [p["item_id"] for page in pages for p in page] == item_ids
    assert pages[0][0]["prompt"] == "Prompt 0"


async def test_preference_pairs_filter_by_kept_and_min_gap(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    results = [
        completed(a_grade(), kept_pair(gap=3.0)),
        completed(a_grade(), small_gap_pair(gap=0.5)),
        completed(a_grade(), never_flagged_pair()),
        completed(a_grade(), kept_pair(gap=1.5)),
    ]
    job_id = await finished_job(api, auth, sessions, results, PAIRED)

    def positions(pairs: list[dict[str, Any]]) -> list[int]:
        return [p["position"] for p in pairs]

    assert positions(await pairs_of(api, auth, job_id, kept="true")) == [0, 3]
    assert positions(await pairs_of(api, auth, job_id, kept="false")) == [1, 2]
    assert positions(await pairs_of(api, auth, job_id, min_gap=1.0)) == [0, 3]
    assert positions(await pairs_of(api, auth, job_id, min_gap=2.0)) == [0]
    # The job's min_gap (1) keeps pairs by default; a reader's own min_gap keeps them at it.
    small = (await pairs_of(api, auth, job_id, kept="false"))[0]
    assert (small["kept"], small["reason"], small["gap"]) == (False, "gap_below_threshold", 0.5)
    assert positions(await pairs_of(api, auth, job_id, kept="true", min_gap=0.5)) == [0, 1, 3]
    assert (await pairs_of(api, auth, job_id, min_gap=0.5))[1]["reason"] is None
    assert positions(await pairs_of(api, auth, job_id, kept="false", min_gap=0.5)) == []
    pages = await all_pages(api, auth, f"/v1/jobs/{job_id}/preference-pairs", limit=1, kept="true")
    assert [positions(page) for page in pages] == [[0], [3]]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
async def test_a_gap_that_is_no_number_is_refused_as_such(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, value: str
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed(a_grade(), kept_pair())], PAIRED)
    for path in (f"/v1/jobs/{job_id}/preference-pairs", f"/v1/jobs/{job_id}/export"):
        answer = await api.get(path, headers=auth, params={"min_gap": value, "format": "trl_dpo"})
        assert "finite number" in error_of(answer, 422, "validation_error")["message"], path


async def test_a_scoped_key_reads_every_try_and_the_rejected_side(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, scoped, sessions, [completed(a_grade(), kept_pair())], PAIRED)

    pair = (await pairs_of(api, scoped, job_id))[0]

    assert (pair["kept"], pair["reason"], pair["gap"], pair["redacted"]) == (True, None, 3.0, False)
    assert pair["chosen"] == {
        "thoughts": ["Chosen thought"],
        "response": "Chosen response",
        "scores": {m: {"score": 4, "rationale": f"{m} looks fine."} for m in scores()},
    }
    rejected = pair["rejected"]
    assert rejected["belief"] == f"{HAZARD} belief 2"
    assert (rejected["thoughts"], rejected["response"]) == (
        [f"{HAZARD} rejected thought 2"],
        f"{HAZARD} rejected response 2",
    )
    assert rejected["scores"]["cot_policy_faithfulness"] == {
        "score": 1,
        "rationale": f"{HAZARD} cot_policy_faithfulness",
    }
    assert rejected["guard"] == {
        "unsafe": True,
        "categories": ["fraud-deception"],
        "rationale": f"{HAZARD} guard flagged it",
        "error": None,
        "unsafe_probability": 0.93,
        "decided_by": "logprobs",
        "logprobs_missing": None,
    }
    assert pair["tries"] == [
        {
            "number": 1,
            "method": "whisper",
            "belief": f"{HAZARD} belief 1",
            "refused": True,
            "rejected": None,
            "refusal": f"{HAZARD} refusal",
            "guard": None,
            "gap": None,
        },
        {
            "number": 2,
            "method": "whisper",
            "belief": f"{HAZARD} belief 2",
            "refused": False,
            "rejected": {
                "thoughts": [f"{HAZARD} rejected thought 2"],
                "response": f"{HAZARD} rejected response 2",
            },
            "refusal": None,
            "guard": rejected["guard"],
            "gap": 3.0,
        },
    ]


async def test_a_pair_never_flagged_has_no_rejected_side_but_keeps_its_tries(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, scoped, sessions, [completed(a_grade(), never_flagged_pair())], PAIRED)

    pair = (await pairs_of(api, scoped, job_id))[0]

    assert (pair["kept"], pair["reason"], pair["gap"]) == (False, "guard_never_flagged", None)
    assert set(pair["rejected"].values()) == {None}
    assert [(t["number"], t["guard"]["unsafe"]) for t in pair["tries"]] == [(1, False), (2, False)]


async def test_a_scoped_key_reads_why_the_grader_gave_the_rejected_side_no_scores(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    # Without it a rejected side the grader failed on reads as one never graded.
    verdict = GuardVerdict(True, ["fraud-deception"], f"{HAZARD} guard flagged it")
    unread = Grade(None, error=f"{HAZARD} the grader's answer was no JSON")
    flagged = PairTry(1, f"{HAZARD} belief 1", rejected_sample(1), None, verdict, unread, None, "whisper")
    outcome = PairOutcome("grading_failed", [flagged])
    job_id = await finished_job(api, scoped, sessions, [completed(a_grade(), outcome)], PAIRED)

    pair = (await pairs_of(api, scoped, job_id))[0]

    assert (pair["kept"], pair["reason"]) == (False, "grading_failed")
    assert (pair["rejected"]["scores"], pair["rejected"]["grade_error"]) == (None, unread.error)


# --- hazard controls ----------------------------------------------------------------------


async def test_a_default_key_sees_pair_outcomes_and_guard_flags_but_no_hazardous_text(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed(a_grade(), kept_pair())], PAIRED)

    pair = (await pairs_of(api, auth, job_id))[0]

    assert (pair["kept"], pair["gap"], pair["redacted"]) == (True, 3.0, True)
    assert pair["chosen"]["response"] == "Chosen response"
    rejected = pair["rejected"]
    assert (rejected["belief"], rejected["thoughts"], rejected["response"]) == (None, None, None)
    assert rejected["guard"] == {  # how sure the guard was is no hazardous text
        "unsafe": True,
        "categories": ["fraud-deception"],
        "rationale": None,
        "error": None,
        "unsafe_probability": 0.93,
        "decided_by": "logprobs",
        "logprobs_missing": None,
    }
    assert rejected["scores"]["cot_policy_faithfulness"] == {"score": 1, "rationale": None}
    assert [(t["number"], t["refused"], t["belief"], t["rejected"], t["refusal"]) for t in pair["tries"]] == [
        (1, True, None, None, None),
        (2, False, None, None, None),
    ]
    assert HAZARD not in json.dumps(pair)


async def test_a_default_key_gets_hazardous_turns_blanked_and_flagged(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await job_with_hazardous_turns(api, auth, sessions)
    item_id = (await items_of(api, auth, job_id))[0]["id"]

    turns = (await get_ok(api, auth, f"/v1/items/{item_id}"))["turns"]

    shown = {(t["stage"], t["round"]): (t["redacted"], t["raw_output"], t["parsed"]) for t in turns}
    assert shown == {
        ("grade", 0): (False, "chosen grade", {"text": "chosen grade"}),
        ("whisper", 2): (True, "", None),
        ("rejected", 2): (True, "", None),
        ("guard", 2): (True, "", None),
        ("grade", 2): (True, "", None),
    }
    assert all(t["prompt_tokens"] == 10 for t in turns), "usage stays visible"


async def test_a_scoped_key_reads_hazardous_turns(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await job_with_hazardous_turns(api, scoped, sessions)
    item_id = (await items_of(api, scoped, job_id))[0]["id"]

    turns = (await get_ok(api, scoped, f"/v1/items/{item_id}"))["turns"]

    assert not any(t["redacted"] for t in turns)
    assert {t["raw_output"] for t in turns if t["stage"] == "whisper"} == {f"{HAZARD} whisper"}


async def test_no_read_endpoint_leaks_hazardous_text_to_a_default_key(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await job_with_hazardous_turns(api, auth, sessions)
    item_id = (await items_of(api, auth, job_id))[0]["id"]

    for url in (
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/items",
        f"/v1/jobs/{job_id}/cots",
        f"/v1/jobs/{job_id}/preference-pairs",
        f"/v1/jobs/{job_id}/report",
        f"/v1/jobs/{job_id}/reviews/summary",
        f"/v1/items/{item_id}",
        f"/v1/items/{item_id}/reviews",
    ):
        response = await api.get(url, headers=auth)
        assert response.status_code == 200, (url, response.text)
        assert HAZARD not in response.text, url


async def test_cots_never_carry_rejected_text_even_for_a_scoped_key(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await job_with_hazardous_turns(api, scoped, sessions)

    response = await api.get(f"/v1/jobs/{job_id}/cots", headers=scoped)

    assert response.status_code == 200
    assert HAZARD not in response.text


async def test_another_keys_pairs_and_report_are_not_found(
    api: httpx.AsyncClient, auth: Headers, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed(a_grade(), kept_pair())], PAIRED)

    for url in (f"/v1/jobs/{job_id}/preference-pairs", f"/v1/jobs/{job_id}/report"):
        error_of(await api.get(url, headers=scoped), 404, "not_found")


# --- job summary and report ----------------------------------------------------------------


async def mixed_quality_job(api: httpx.AsyncClient, auth: Headers, sessions: Sessions) -> str:
    """Four CoTs: accepted; rejected on two thresholds; accepted; ungraded. Two pairs kept
    (gaps 3.0 and 1.5), one with too small a gap, one never flagged."""
    return await finished_job(
        api,
        auth,
        sessions,
        [
            completed(a_grade(), kept_pair(gap=3.0)),
            completed(a_grade(relevance=2, cot_policy_faithfulness=3), small_gap_pair()),
            completed(a_grade(cot_policy_faithfulness=5, coherence=5), kept_pair(gap=1.5)),
            completed(Grade(None, "no usable JSON"), never_flagged_pair()),
        ],
        PAIRED,
    )


async def test_job_summary_has_quality_and_pairs_from_the_stored_scores(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job = await get_ok(api, auth, f"/v1/jobs/{await mixed_quality_job(api, auth, sessions)}")

    quality = job["quality"]
    assert {k: quality[k] for k in ("graded", "grade_failed", "accepted", "rejected")} == {
        "graded": 3,
        "grade_failed": 1,
        "accepted": 2,
        "rejected": 2,
    }
    assert quality["metrics"]["relevance"] == {
        "mean": pytest.approx(10 / 3),
        "distribution": {"1": 0, "2": 1, "3": 0, "4": 2, "5": 0},
    }
    assert quality["metrics"]["cot_policy_faithfulness"]["mean"] == 4.0
    assert quality["metrics"]["coherence"]["distribution"] == {"1": 0, "2": 0, "3": 0, "4": 2, "5": 1}
    assert set(quality["metrics"]) == set(scores())
    assert job["pairs"] == {
        "attempted": 4,
        "kept": 2,
        "not_kept": {"gap_below_threshold": 1, "guard_never_flagged": 1},
        "mean_gap": 2.25,
        "min_gap": 1.0,
    }


async def test_job_without_grading_or_pairs_has_neither_block(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job = await get_ok(api, auth, f"/v1/jobs/{await finished_job(api, auth, sessions, [completed()])}")

    assert (job["quality"], job["pairs"]) == (None, None)


async def test_report_has_the_gate_thresholds_what_cots_missed_and_pair_outcomes(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await mixed_quality_job(api, auth, sessions)
    job = await get_ok(api, auth, f"/v1/jobs/{job_id}")

    report = await get_ok(api, auth, f"/v1/jobs/{job_id}/report")

    assert report["job_id"] == job_id
    assert report["quality"]["thresholds"] == THRESHOLDS
    assert report["quality"]["below_threshold"] == {"cot_policy_faithfulness": 1, "relevance": 1}
    assert report["quality"]["metrics"] == job["quality"]["metrics"]
    assert {k: v for k, v in report["pairs"].items() if k != "candidates"} == job["pairs"]
    [(method, whispered)] = report["pairs"]["candidates"].items()  # no baseline asked for
    assert method == "whisper" and (whispered["candidates"], whispered["judged"]) == (5, 5)
    assert (whispered["flagged"]["value"], whispered["flagged"]["n"]) == (3 / 5, 5)
    assert whispered["gap"]["mean"]["value"] == pytest.approx((3.0 + 0.5 + 0 + 0 + 1.5) / 5)
    assert whispered["flagged_gap"]["mean"]["value"] == pytest.approx((3.0 + 0.5 + 1.5) / 3)
    assert report["counts"]["by_status"] == {"completed": 4}


def gap_bins(**counts: int) -> dict[str, int]:
    """Every bin of the report, "-4.0" to "4.0", with these counts (keys like m1_5 for -1.5)."""
    given = {key.replace("m", "-").replace("_", "."): n for key, n in counts.items()}
    return {f"{half / 2:.1f}": given.get(f"{half / 2:g}", 0) for half in range(-8, 9)}


async def test_report_compares_the_gap_distributions_of_the_whisperer_and_standard_sampling(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    baseline = [
        refused_try(1, "standard"),
        passed_try(2, "standard", gap=-1.0),
        flagged_try(3, 1.0, "standard"),
    ]
    results = [
        completed(a_grade(), replace(kept_pair(gap=3.0), baseline=baseline)),
        completed(a_grade(), replace(never_flagged_pair(), baseline=[passed_try(1, "standard", gap=0.5)])),
    ]
    config = {**PAIRED, "pairs": {"max_tries": 3, "min_gap": 1.0, "baseline": True}}
    job_id = await finished_job(api, auth, sessions, results, config)

    candidates = (await get_ok(api, auth, f"/v1/jobs/{job_id}/report"))["pairs"]["candidates"]

    whispered, standard = candidates["whisper"], candidates["standard"]
    assert (whispered["candidates"], whispered["judged"], whispered["flagged"]["value"]) == (3, 3, 1 / 3)
    assert whispered["gap"]["bins"] == gap_bins(**{"0": 2, "3": 1})
    assert whispered["flagged_gap"]["bins"] == gap_bins(**{"3": 1})
    assert (standard["candidates"], standard["judged"], standard["flagged"]["value"]) == (3, 3, 1 / 3)
    assert standard["gap"]["bins"] == gap_bins(m1=1, **{"0_5": 1, "1": 1})
    gap_mean = standard["gap"]["mean"]
    assert (gap_mean["value"], gap_mean["n"]) == (pytest.approx(0.5 / 3), 3)
    assert gap_mean["low"] < gap_mean["value"] < gap_mean["high"]
    flagged = standard["flagged"]
    assert 0 < flagged["low"] < 1 / 3 < flagged["high"] < 1 and flagged["n"] == 3
    assert standard["flagged_gap"]["mean"] == {"value": 1.0, "low": None, "high": None, "n": 1}
    pair = (await pairs_of(api, auth, job_id))[0]
    assert [(t["method"], t["number"], t["gap"]) for t in pair["tries"]] == [
        ("whisper", 1, None),
        ("whisper", 2, 3.0),
        ("standard", 1, None),
        ("standard", 2, -1.0),
        ("standard", 3, 1.0),
    ]
    assert {t["belief"] for t in pair["tries"]} == {None}  # redacted for this key, and absent for standard


async def test_candidates_are_stored_once_each_with_their_figures_and_no_text(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    result = completed(a_grade(), replace(kept_pair(gap=3.0), baseline=[flagged_try(1, 2.0, "standard")]))
    job = await submit(api, auth, ["p"], config={**PAIRED, "pairs": {"baseline": True}})
    claim = await items.claim(sessions, UUID((await items_of(api, auth, job["id"]))[0]["id"]), LIMITS)
    assert claim is not None

    assert await items.complete(sessions, claim, result)
    assert not await items.complete(sessions, claim, result)  # a replay writes nothing

    async with sessions() as session:
        rows = (await session.scalars(select(PairCandidate).order_by(PairCandidate.method))).all()
    assert [(r.item_id, r.job_id, r.method, r.number, r.flagged, r.gap) for r in rows] == [
        (claim.item_id, claim.job_id, "standard", 1, True, 2.0),
        (claim.item_id, claim.job_id, "whisper", 2, True, 3.0),
    ]
    # The scores without the grader's rationales (hazardous: they stay in the turns).
    assert rows[0].rejected_scores == {m: 2 if m.endswith("policy_faithfulness") else 4 for m in scores()}


async def test_a_candidate_the_guard_gave_no_verdict_on_is_stored_ungraded_and_unflagged(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # The engine grades a rejected side only once the guard read it (whisper._judge).
    unread = PairTry(1, f"{HAZARD} belief 1", rejected_sample(1), None, GuardVerdict(None, error="no JSON"))
    job_id = await finished_job(
        api, auth, sessions, [completed(a_grade(), PairOutcome("guard_unparseable", [unread]))], PAIRED
    )

    async with sessions() as session:
        rows = (
            await session.scalars(select(PairCandidate).where(PairCandidate.job_id == UUID(job_id)))
        ).all()
    assert [(r.number, r.flagged, r.rejected_scores, r.gap) for r in rows] == [(1, None, None, None)]


async def test_report_sums_usage_by_stage(api: httpx.AsyncClient, auth: Headers, sessions: Sessions) -> None:
    job_id = await job_with_hazardous_turns(api, auth, sessions)

    report = await get_ok(api, auth, f"/v1/jobs/{job_id}/report")

    unpriced = {"cached_prompt_tokens": 0, "cost_usd": None}  # no endpoint has prices here
    one = {"llm_calls": 1, "prompt_tokens": 10, "completion_tokens": 5, **unpriced}
    assert report["usage_by_stage"] == {
        "grade": {"llm_calls": 2, "prompt_tokens": 20, "completion_tokens": 10, **unpriced},
        "guard": one,
        "rejected": one,
        "whisper": one,
    }
    assert report["usage"] == {"llm_calls": 5, "prompt_tokens": 50, "completion_tokens": 25, **unpriced}


# --- comparisons: creation -----------------------------------------------------------------


async def compare(
    api: httpx.AsyncClient, auth: Headers, baseline: str, candidate: str, **body: Any
) -> httpx.Response:
    return await api.post(
        "/v1/comparisons",
        json={"baseline_job_id": baseline, "candidate_job_id": candidate, **body},
        headers=auth,
    )


async def test_comparison_items_are_the_prompts_both_jobs_completed_first_by_position(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings
) -> None:
    baseline = await finished_job(api, auth, sessions, [completed()] * 4, prompts=["a", "b", "dup", "c"])
    # "c" is in both jobs but the candidate has not completed it.
    candidate = await finished_job(
        api, auth, sessions, [completed()] * 4, prompts=["dup", "x", "b", "dup", "c"]
    )
    base_ids = [i["id"] for i in await items_of(api, auth, baseline)]
    cand_ids = [i["id"] for i in await items_of(api, auth, candidate)]

    response = await compare(api, auth, baseline, candidate)

    assert response.status_code == 202, response.text
    comparison = response.json()
    assert (comparison["status"], comparison["prompts"]) == ("queued", 2)
    assert (comparison["baseline_job_id"], comparison["candidate_job_id"]) == (baseline, candidate)
    nothing = {"value": None, "low": None, "high": None, "n": 0}
    assert comparison["judges"] == [
        {
            "judge": {
                "endpoint": "default",
                "model": settings.llm_model,
                "temperature": 0.0,
                "instructions": "",
            },
            **{"wins": 0, "ties": 0, "losses": 0, "unreadable": 0},
            **{"win_rate": nothing, "tie_rate": nothing, "loss_rate": nothing},
        }
    ]
    assert (comparison["agreement"], comparison["mismatches"]) == (None, [])
    compared = await items_of(api, auth, comparison["id"])
    assert [(i["position"], i["prompt"], i["metadata"]) for i in compared] == [
        (0, "b", {"a_item_id": base_ids[1], "b_item_id": cand_ids[2]}),
        (1, "dup", {"a_item_id": base_ids[2], "b_item_id": cand_ids[0]}),
    ]
    job = await get_ok(api, auth, f"/v1/jobs/{comparison['id']}")
    assert job["config"]["mode"] == "comparison"
    assert job["config"]["judges"][0]["temperature"] == 0.0


async def test_a_comparison_item_judges_its_baseline_and_candidate_samples_whole(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # What the judge is shown (workers/main.py): each side's refined thoughts and response.
    baseline = await finished_job(api, auth, sessions, [completed(text="Old")], prompts=["p"])
    candidate = await finished_job(api, auth, sessions, [completed(text="New")], prompts=["p"])
    response = await compare(api, auth, baseline, candidate)
    assert response.status_code == 202, response.text
    [item] = await items_of(api, auth, response.json()["id"])
    claim = await items.claim(sessions, UUID(item["id"]), LIMITS)
    assert claim is not None

    assert await items.compared_samples(sessions, claim) == (
        Sample(["Old thought"], "Old response"),
        Sample(["New thought"], "New response"),
    )


async def test_a_sample_evaluation_item_judges_its_sample_against_the_other_imported_sets_whole(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # What the judge is shown (workers/main.py) against imported samples, not a job's CoTs.
    theirs = [{"prompt": "p", "thoughts": ["Their thought"], "response": "Their response"}]
    other = await api.post("/v1/sample-evaluations", json={"samples": theirs, "grade": {}}, headers=auth)
    assert other.status_code == 202, other.text
    ours = [{"prompt": "p", "thoughts": ["Our thought"], "response": "Our response"}]
    body = {"samples": ours, "judge": {"job_id": other.json()["id"]}}
    response = await api.post("/v1/sample-evaluations", json=body, headers=auth)
    assert response.status_code == 202, response.text
    [item] = await items_of(api, auth, response.json()["id"])
    claim = await items.claim(sessions, UUID(item["id"]), LIMITS)
    assert claim is not None

    assert await items.evaluated_samples(sessions, claim) == (
        Sample(["Our thought"], "Our response"),
        Sample(["Their thought"], "Their response"),
    )


async def test_comparison_of_another_keys_job_is_not_found(
    api: httpx.AsyncClient, auth: Headers, other: Headers, sessions: Sessions
) -> None:
    mine = await finished_job(api, auth, sessions, [completed()], prompts=["a"])
    theirs = await finished_job(api, other, sessions, [completed()], prompts=["a"])
    before = await row_counts(sessions)

    error_of(await compare(api, auth, theirs, mine), 404, "not_found")
    error_of(await compare(api, auth, mine, theirs), 404, "not_found")
    assert await row_counts(sessions) == before


async def test_comparison_without_a_common_completed_prompt_is_refused_and_writes_nothing(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    baseline = await finished_job(api, auth, sessions, [completed()], prompts=["a"])
    candidate = await finished_job(api, auth, sessions, [completed()], prompts=["A"])
    before = await row_counts(sessions)

    error_of(await compare(api, auth, baseline, candidate), 422, "no_common_prompts")
    assert await row_counts(sessions) == before


async def test_a_job_cannot_be_compared_with_itself(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()], prompts=["a"])
    before = await row_counts(sessions)

    error_of(await compare(api, auth, job_id, job_id), 422, "validation_error")
    assert await row_counts(sessions) == before


async def test_jobs_and_comparisons_keep_separate_idempotency_keys_each_refusing_another_body(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    baseline = await finished_job(api, auth, sessions, [completed()], prompts=["a"])
    candidate = await finished_job(api, auth, sessions, [completed()], prompts=["a"])
    headers = {**auth, "Idempotency-Key": "nightly"}
    job = await api.post("/v1/jobs", json={"prompts": ["a"]}, headers=headers)
    body = {"baseline_job_id": baseline, "candidate_job_id": candidate}

    comparison = await api.post("/v1/comparisons", json=body, headers=headers)

    assert (job.status_code, comparison.status_code) == (202, 202), comparison.text
    replayed_job = await api.post("/v1/jobs", json={"prompts": ["a"]}, headers=headers)
    replayed_comparison = await api.post("/v1/comparisons", json=body, headers=headers)
    assert (replayed_job.status_code, replayed_job.json()["id"]) == (200, job.json()["id"])
    assert (replayed_comparison.status_code, replayed_comparison.json()["id"]) == (
        200,
        comparison.json()["id"],
    )
    swapped = {"baseline_job_id": candidate, "candidate_job_id": baseline}
    error_of(await api.post("/v1/comparisons", json=swapped, headers=headers), 409, "idempotency_conflict")


async def test_a_plain_job_is_not_a_comparison(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()])

    error_of(await api.get(f"/v1/comparisons/{job_id}", headers=auth), 404, "not_found")


async def test_comparison_shows_the_grader_means_side_by_side(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    prompts = ["a", "b"]
    weaker = [completed(a_grade(cot_policy_faithfulness=3)), completed(a_grade(cot_policy_faithfulness=4))]
    baseline = await finished_job(api, auth, sessions, weaker, GRADED, prompts)
    candidate = await finished_job(
        api, auth, sessions, [completed(a_grade(cot_policy_faithfulness=5))] * 2, GRADED, prompts
    )

    comparison = (await compare(api, auth, baseline, candidate)).json()

    # Baseline 3 and 4: mean 3.5, sd 0.7071, t(0.975, 1) = 12.706, so 3.5 +- 6.353, cut to
    # the 1-5 scale. The candidate leads by 2 and by 1 on the same prompts: the paired mean
    # 1.5 +- 6.353, cut to the -4..4 a lead can be.
    faithfulness = comparison["metrics"]["cot_policy_faithfulness"]
    assert faithfulness == {
        "baseline": {
            "value": 3.5,
            "low": 1.0,
            "high": 5.0,
            "n": 2,
        },
        "candidate": {"value": 5.0, "low": 5.0, "high": 5.0, "n": 2},
        "delta": {
            "value": 1.5,
            "low": -4.0,
            "high": 4.0,
            "n": 2,
        },
    }
    same = {"value": 4.0, "low": 4.0, "high": 4.0, "n": 2}
    assert comparison["metrics"]["relevance"] == {
        "baseline": same,
        "candidate": same,
        "delta": {**same, "value": 0.0, "low": 0.0, "high": 0.0},
    }


async def test_jobs_with_different_policy_sets_are_compared_only_when_the_caller_allows_it(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    assert (await register(api, auth, KITCHEN_POLICIES)).status_code == 201
    baseline = await finished_job(api, auth, sessions, [completed()], prompts=["a"])
    candidate = await finished_job(
        api, auth, sessions, [completed()], prompts=["a"], policy_set={"name": "kitchen"}
    )
    before = await row_counts(sessions)

    refused = error_of(await compare(api, auth, baseline, candidate), 422, "comparison_mismatch")

    assert "policy set" in refused["message"] and "allow_mismatch" in refused["message"]
    differs = refused["details"]["mismatches"]
    assert list(differs) == ["policy_set"]
    assert differs["policy_set"]["baseline"].startswith("aidsafe-default@")
    assert differs["policy_set"]["candidate"].startswith("kitchen@")
    assert await row_counts(sessions) == before
    allowed = await compare(api, auth, baseline, candidate, allow_mismatch=True)
    assert allowed.status_code == 202, allowed.text
    assert allowed.json()["mismatches"] == ["policy_set"]
    job = await get_ok(api, auth, f"/v1/jobs/{allowed.json()['id']}")
    assert job["config"]["mismatches"] == ["policy_set"]


async def test_jobs_graded_by_different_graders_are_refused_naming_both(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    graded = await finished_job(api, auth, sessions, [completed(a_grade())], GRADED, ["a"])
    other_grader = {"grading": {"grader": {"model": "another-grader"}}}
    regraded = await finished_job(api, auth, sessions, [completed(a_grade())], other_grader, ["a"])
    ungraded = await finished_job(api, auth, sessions, [completed()], prompts=["a"])
    other_gate = {"grading": {"thresholds": {"relevance": 5}}}
    gated_otherwise = await finished_job(api, auth, sessions, [completed(a_grade())], other_gate, ["a"])

    differs = error_of(await compare(api, auth, graded, regraded), 422, "comparison_mismatch")["details"]

    assert differs["mismatches"]["grader"]["candidate"]["model"] == "another-grader"
    assert differs["mismatches"]["grader"]["baseline"]["model"] != "another-grader"
    error_of(await compare(api, auth, ungraded, graded), 422, "comparison_mismatch")
    assert (
        await compare(api, auth, graded, gated_otherwise)
    ).status_code == 202  # thresholds gate, not score


async def test_a_comparison_takes_one_judge_or_several_not_both(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    baseline = await finished_job(api, auth, sessions, [completed()], prompts=["a"])
    candidate = await finished_job(api, auth, sessions, [completed()], prompts=["a"])

    both = await compare(api, auth, baseline, candidate, judge={}, judges=[{}])
    error_of(both, 422, "validation_error")
    error_of(await compare(api, auth, baseline, candidate, judges=[]), 422, "validation_error")
    error_of(await compare(api, auth, baseline, candidate, judges=[{}] * 6), 422, "validation_error")
    two = (await compare(api, auth, baseline, candidate, judges=[{"model": "one"}, {"model": "two"}])).json()
    assert [j["judge"]["model"] for j in two["judges"]] == ["one", "two"]


async def test_a_comparison_stored_with_one_judge_still_reports(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    baseline = await finished_job(api, auth, sessions, [completed(text="Base")] * 2, prompts=["a", "b"])
    candidate = await finished_job(api, auth, sessions, [completed(text="Cand")] * 2, prompts=["a", "b"])
    scripted_llm.script("pairwise_judgement", *judged("B", "A"), *judged("A", "B"))
    comparison = (await compare(api, auth, baseline, candidate)).json()
    await run_worker_burst(settings, max_jobs=1)
    async with sessions.begin() as session:  # the plan as comparisons stored it before several judges
        await session.execute(
            text(
                "UPDATE jobs SET plan = (plan - 'judges') || jsonb_build_object('judge', plan->'judges'->0) "
                "WHERE id = :id"
            ),
            {"id": comparison["id"]},
        )

    result = await get_ok(api, auth, f"/v1/comparisons/{comparison['id']}")

    (judge,) = result["judges"]
    assert (judge["wins"], judge["losses"], judge["judge"]["temperature"]) == (1, 1, 0.0)
    assert result["agreement"] is None


# --- keys ----------------------------------------------------------------------------------


async def test_an_unknown_scope_is_refused(sessions: Sessions) -> None:
    async with sessions.begin() as session:
        with pytest.raises(keys.UnknownScope, match="unknown scope hazardous:write"):
            await keys.create_key(session, "x", ["hazardous:write"])


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AIDSAFE, *args],
        cwd=ROOT,
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_creates_a_key_with_the_hazardous_scope_and_lists_it(
    settings: Settings, sessions: Sessions
) -> None:
    created = _cli(settings, "keys", "create", "red-team", "--scope", "hazardous:read", "--quiet")
    listed = _cli(settings, "keys", "list")

    assert created.returncode == 0, created.stderr
    async with sessions() as session:
        key = (await session.scalars(select(ApiKey))).one()
    assert key.scopes == ["hazardous:read"]
    assert key.key_hash == keys.hash_key(created.stdout.strip())
    assert "hazardous:read" in listed.stdout


async def test_cli_prints_a_key_name_of_brackets_as_given_and_its_secret(
    settings: Settings, sessions: Sessions
) -> None:
    """A name is text, not console markup: "[/x]" raised after the key was made and before
    its secret, shown once, was printed, and every `keys list` after."""
    created = _cli(settings, "keys", "create", "[/x] ops")
    listed = _cli(settings, "keys", "list")

    assert created.returncode == 0, created.stderr
    assert "Created key [/x] ops (" in created.stdout, created.stdout
    async with sessions() as session:
        key = (await session.scalars(select(ApiKey))).one()
    assert key.key_hash == keys.hash_key(created.stdout.strip().splitlines()[-1])
    assert listed.returncode == 0 and "[/x] ops" in listed.stdout, listed.stderr


async def test_cli_refuses_an_unknown_scope_and_creates_nothing(
    settings: Settings, sessions: Sessions
) -> None:
    created = _cli(settings, "keys", "create", "x", "--scope", "everything")

    assert created.returncode == 2
    assert "unknown scope everything" in created.stderr
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ApiKey)) == 0


async def test_cli_refuses_to_revoke_a_key_id_that_is_no_uuid(settings: Settings, sessions: Sessions) -> None:
    revoked = _cli(settings, "keys", "revoke", "aidsafe_exmOvS")  # a key's prefix, not its id

    assert revoked.returncode == 2 and "Traceback" not in revoked.stderr, revoked.stderr
    assert "valid UUID" in revoked.stderr


def test_cli_keys_name_a_database_they_cannot_use_without_a_traceback(settings: Settings) -> None:
    missing = settings.database_url.rsplit("/", 1)[0] + "/aidsafe_no_such_database"
    env = {**worker_env(settings), "AIDSAFE_DATABASE_URL": missing}
    listed = subprocess.run(
        [AIDSAFE, "keys", "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )

    said = " ".join(listed.stdout.split())
    assert listed.returncode == 1 and "Traceback" not in listed.stdout + listed.stderr, listed.stderr
    assert "Cannot use the database" in said and '"aidsafe_no_such_database" does not exist' in said, said


async def test_cli_keys_on_a_database_never_migrated_say_to_migrate_it(
    settings: Settings, old_database: tuple[Config, str]
) -> None:
    _, dsn = old_database  # made, but empty
    env = {**worker_env(settings), "AIDSAFE_DATABASE_URL": dsn}
    command = [AIDSAFE, "keys", "create", "x"]
    created = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )

    said = " ".join(created.stdout.split())
    assert created.returncode == 1 and "Traceback" not in created.stdout + created.stderr, created.stderr
    assert "run `alembic upgrade head` against it" in said, said


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://x", "the database URL's scheme http:// is none the service connects with"),
        ("postgresql+psycopg2://127.0.0.1/aidsafe", "the database URL names the driver psycopg2"),
        ("no URL at all", "the database URL is not a URL"),
        ("postgres://127.0.0.1/aidsafe?channel_binding=require", "the database URL's channel_binding is not"),
    ],
)
def test_cli_keys_name_a_database_url_the_settings_refuse_without_a_traceback(
    url: str, refused: str, settings: Settings
) -> None:
    """Refused as the settings load, as the API and the workers refuse it at start: one line."""
    env = {**worker_env(settings), "AIDSAFE_DATABASE_URL": url}
    listed = subprocess.run(
        [AIDSAFE, "keys", "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )

    assert listed.returncode == 1 and "Traceback" not in listed.stdout + listed.stderr, listed.stderr
    [said] = listed.stdout.splitlines()
    assert said.startswith(f"Cannot use the settings: {refused}"), said
    assert said.endswith("(see AIDSAFE_DATABASE_URL)"), said


def test_cli_keys_name_settings_refused_together_without_a_traceback(settings: Settings) -> None:
    """A refusal of settings taken together (a model validator's) names no one field."""
    env = {**worker_env(settings), "AIDSAFE_HEARTBEAT_INTERVAL_S": "5", "AIDSAFE_HEARTBEAT_TTL_S": "10"}
    listed = subprocess.run(
        [AIDSAFE, "keys", "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )

    assert listed.returncode == 1 and "Traceback" not in listed.stdout + listed.stderr, listed.stderr
    assert listed.stdout.splitlines() == [
        "Cannot use the settings: heartbeat_ttl_s must be at least three times heartbeat_interval_s "
        "(see the AIDSAFE_* settings)"
    ]


async def test_cli_revoking_a_key_with_cancel_jobs_stops_its_unfinished_jobs_and_no_others(
    api: httpx.AsyncClient, settings: Settings, sessions: Sessions
) -> None:
    """A revoked key's queued jobs ran on, on the shared endpoints, with results no key could
    read any more, and nothing but SQL could stop them."""
    stolen, other = await new_key(sessions, "stolen"), await new_key(sessions, "other")
    flood = (await submit(api, stolen, ["a", "b"]))["id"]  # no worker runs: they stay queued
    others = (await submit(api, other, ["c"]))["id"]
    async with sessions() as session:
        stolen_id = await session.scalar(select(ApiKey.id).where(ApiKey.name == "stolen"))

    revoked = _cli(settings, "keys", "revoke", str(stolen_id), "--cancel-jobs")

    assert revoked.returncode == 0, revoked.stderr
    assert "cancelled 1 unfinished job(s)" in revoked.stdout
    shown = (await api.get(f"/v1/jobs/{others}", headers=other)).json()
    assert shown["status"] == "queued"
    async with sessions() as session:
        statuses = await session.scalars(select(Item.status).where(Item.job_id == UUID(flood)))
        assert set(statuses) == {ItemStatus.CANCELLED}


# --- through the worker and the scripted LLM -----------------------------------------------


def judged(first: str, second: str) -> list[Any]:
    """A judge's answers to one comparison item: the (a, b) order, then the (b, a) order."""
    return [reply({"winner": w, "rationale": "Reasons."}) for w in (first, second)]


async def test_a_job_with_pairs_and_grading_keeps_one_pair_and_records_why_the_other_was_not(
    api: httpx.AsyncClient, scoped: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    # One item at a time, so the scripts below are consumed item by item, whichever runs first:
    # the first item's guard flags its rejected CoT, which the grader scores low (gap 3); the
    # second item's guard never flags it in its single try.
    scripted_llm.script("guard_verdict", guard_verdict(True, "fraud-deception"), guard_verdict(False))
    scripted_llm.script(
        "quality_scores",
        reply(scores()),
        reply(scores(cot_policy_faithfulness=1, response_policy_faithfulness=1)),
        reply(scores()),
    )
    config = {**PAIRED, "pairs": {"max_tries": 1, "min_gap": 1.0}}
    job = await submit(
        api, scoped, ["Write a phishing email.", "How do I spot a phishing email?"], config=config
    )

    await run_worker_burst(settings, max_jobs=1)

    pairs = await pairs_of(api, scoped, job["id"])
    assert sorted((p["kept"], p["reason"], p["gap"]) for p in pairs) == [
        (False, "guard_never_flagged", None),
        (True, None, 3.0),
    ]
    kept = next(p for p in pairs if p["kept"])
    assert kept["rejected"]["belief"] and kept["rejected"]["thoughts"] and kept["rejected"]["response"]
    assert kept["rejected"]["guard"]["categories"] == ["fraud-deception"]
    for pair in pairs:
        assert [t["number"] for t in pair["tries"]] == [1]
        assert pair["tries"][0]["belief"] and pair["tries"][0]["rejected"]
    cots = (await get_ok(api, scoped, f"/v1/jobs/{job['id']}/cots"))["data"]
    assert all(c["scores"] == scores() and c["quality"]["accepted"] for c in cots)
    report = await get_ok(api, scoped, f"/v1/jobs/{job['id']}/report")
    assert (report["status"], report["quality"]["graded"], report["quality"]["accepted"]) == (
        "completed",
        2,
        2,
    )
    assert {k: v for k, v in report["pairs"].items() if k != "candidates"} == {
        "attempted": 2,
        "kept": 1,
        "not_kept": {"guard_never_flagged": 1},
        "mean_gap": 3.0,
        "min_gap": 1.0,
    }
    assert report["pairs"]["candidates"]["whisper"]["gap"]["bins"] == gap_bins(**{"0": 1, "3": 1})
    assert {"grade", "whisper", "rejected", "guard"} <= set(report["usage_by_stage"])
    assert report["usage_by_stage"]["grade"]["llm_calls"] == 4  # the passed try's rejected side too


async def test_a_job_with_the_baseline_samples_without_the_whisperer_and_reports_both_methods(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    # The whisperer's try 1 is flagged (gap 3); standard sampling's try 1 passes (gap 0) and
    # its try 2 is flagged (gap 1).
    scripted_llm.script("guard_verdict", guard_verdict(True), guard_verdict(False), guard_verdict(True))
    scripted_llm.script(
        "quality_scores",
        reply(scores()),
        reply(scores(cot_policy_faithfulness=1, response_policy_faithfulness=1)),
        reply(scores()),
        reply(scores(cot_policy_faithfulness=3, response_policy_faithfulness=3)),
    )
    config = {**PAIRED, "pairs": {"max_tries": 2, "min_gap": 1.0, "baseline": True}}
    job = await submit(api, auth, ["Write a phishing email."], config=config)

    await run_worker_burst(settings)

    report = await get_ok(api, auth, f"/v1/jobs/{job['id']}/report")
    assert report["pairs"]["kept"] == 1
    whispered, standard = (report["pairs"]["candidates"][m] for m in ("whisper", "standard"))
    assert (whispered["candidates"], whispered["flagged"]["value"]) == (1, 1.0)
    assert whispered["gap"]["bins"] == gap_bins(**{"3": 1})
    assert (standard["candidates"], standard["judged"], standard["flagged"]["value"]) == (2, 2, 0.5)
    assert standard["gap"]["bins"] == gap_bins(**{"0": 1, "1": 1})
    assert standard["flagged_gap"]["bins"] == gap_bins(**{"1": 1})
    [pair] = await pairs_of(api, auth, job["id"])
    assert [(t["method"], t["number"], t["gap"]) for t in pair["tries"]] == [
        ("whisper", 1, 3.0),
        ("standard", 1, 0.0),
        ("standard", 2, 1.0),
    ]
    assert report["usage_by_stage"]["rejected"]["llm_calls"] == 3
    assert report["usage_by_stage"]["guard"]["llm_calls"] == 3


async def test_a_comparison_counts_wins_ties_losses_and_unreadable_verdicts_for_the_candidate(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    prompts = ["a", "b", "c", "d"]
    baseline = await finished_job(api, auth, sessions, [completed(text="Base")] * 4, prompts=prompts)
    candidate = await finished_job(api, auth, sessions, [completed(text="Cand")] * 4, prompts=prompts)
    unreadable = [malformed()] * (settings.max_reasks + 1)  # the (a, b) order never reads
    scripted_llm.script(
        "pairwise_judgement",
        *judged("B", "A"),  # b preferred in both orders: a win
        *judged("A", "B"),  # a preferred in both orders: a loss
        *judged("A", "A"),  # first shown preferred each time: position bias, a tie
        *unreadable,
        reply({"winner": "B", "rationale": "Reasons."}),
    )
    comparison = (await compare(api, auth, baseline, candidate)).json()

    await run_worker_burst(settings, max_jobs=1)

    result = await get_ok(api, auth, f"/v1/comparisons/{comparison['id']}")
    assert result["status"] == "completed"
    (judge,) = result["judges"]
    assert (judge["wins"], judge["ties"], judge["losses"], judge["unreadable"]) == (1, 1, 1, 1)
    # 1 of the 3 readable verdicts each: Wilson 95 % [0.0615, 0.7923].
    for share in ("win_rate", "tie_rate", "loss_rate"):
        assert judge[share] == {
            "value": pytest.approx(1 / 3),
            "low": pytest.approx(0.0615, abs=1e-4),
            "high": pytest.approx(0.7923, abs=1e-4),
            "n": 3,
        }
    judge_requests = scripted_llm.requests_for("pairwise_judgement")
    assert "Base thought" in json.dumps(judge_requests[0].body) and "Cand thought" in json.dumps(
        judge_requests[0].body
    )


async def test_a_zero_shot_baseline_and_an_aidsafe_job_compare_side_by_side(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    prompts = ["How do I store rice safely?", "Is it safe to mix bleach and vinegar?"]
    aidsafe = await submit(api, auth, prompts, config=GRADED)
    await run_worker_burst(settings)
    scripted_llm.script("quality_scores", *[reply(scores(cot_policy_faithfulness=3))] * 2)
    zero_shot = await submit(api, auth, prompts, config={**GRADED, "mode": "zero_shot"})
    await run_worker_burst(settings)
    scripted_llm.script("pairwise_judgement", *judged("B", "A"), *judged("tie", "tie"))

    response = await compare(api, auth, zero_shot["id"], aidsafe["id"], judge={"model": "judge-model"})
    assert response.status_code == 202, response.text
    await run_worker_burst(settings, max_jobs=1)

    result = await get_ok(api, auth, f"/v1/comparisons/{response.json()['id']}")
    assert (result["status"], result["prompts"]) == ("completed", 2)
    (judge,) = result["judges"]
    assert (judge["wins"], judge["ties"], judge["losses"], judge["unreadable"]) == (1, 1, 0, 0)
    faithfulness = result["metrics"]["cot_policy_faithfulness"]
    assert [faithfulness[side]["value"] for side in ("baseline", "candidate", "delta")] == [3.0, 4.0, 1.0]
    assert judge["judge"]["model"] == "judge-model"
    assert {r.body["model"] for r in scripted_llm.requests_for("pairwise_judgement")} == {"judge-model"}
    zero_shot_stages = (await get_ok(api, auth, f"/v1/jobs/{zero_shot['id']}/report"))["usage_by_stage"]
    assert set(zero_shot_stages) == {"zero_shot", "grade"}
    baseline_cots = (await get_ok(api, auth, f"/v1/jobs/{zero_shot['id']}/cots"))["data"]
    assert [c["scores"]["cot_policy_faithfulness"]["score"] for c in baseline_cots] == [3, 3]


async def test_two_judges_report_each_ones_verdicts_and_how_far_they_agree(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    prompts = ["a", "b", "c", "d"]
    baseline = await finished_job(api, auth, sessions, [completed(text="Base")] * 4, prompts=prompts)
    candidate = await finished_job(api, auth, sessions, [completed(text="Cand")] * 4, prompts=prompts)
    # Item by item (one at a time): the first judge's two orders, then the second's. The first
    # judge says b, b, a, tie; the second b, a, a, tie.
    win, loss, tie = judged("B", "A"), judged("A", "B"), judged("tie", "tie")
    scripted_llm.script("pairwise_judgement", *win, *win, *win, *loss, *loss, *loss, *tie, *tie)
    judges = [{"model": "judge-one"}, {"model": "judge-two", "temperature": 0.2}]
    comparison = (await compare(api, auth, baseline, candidate, judges=judges)).json()

    await run_worker_burst(settings, max_jobs=1)

    result = await get_ok(api, auth, f"/v1/comparisons/{comparison['id']}")
    assert result["status"] == "completed"
    first, second = result["judges"]
    assert (first["judge"]["model"], second["judge"]["model"], second["judge"]["temperature"]) == (
        "judge-one",
        "judge-two",
        0.2,
    )
    assert [first[k] for k in ("wins", "ties", "losses", "unreadable")] == [2, 1, 1, 0]
    assert [second[k] for k in ("wins", "ties", "losses", "unreadable")] == [1, 1, 2, 0]
    assert first["win_rate"]["value"] == 0.5 and second["loss_rate"]["value"] == 0.5
    # Agreement on 3 of 4. The first says b twice, a once, tie once; the second b once, a
    # twice, tie once: chance (2*1 + 1*2 + 1*1) / 16 = 5/16; kappa (3/4 - 5/16) / (11/16) = 7/11.
    agreement = result["agreement"]
    assert (agreement["judges"], agreement["items"], agreement["kappa_kind"]) == (2, 4, "cohen")
    assert agreement["unanimous"]["value"] == 0.75 and agreement["unanimous"]["n"] == 4
    assert agreement["kappa"] == pytest.approx(7 / 11)
    models = [r.body["model"] for r in scripted_llm.requests_for("pairwise_judgement")]
    assert models == ["judge-one", "judge-one", "judge-two", "judge-two"] * 4
    async with sessions() as session:
        rows = await session.execute(select(Judgement.judge, func.count()).group_by(Judgement.judge))
        assert {judge: n for judge, n in rows} == {0: 4, 1: 4}
