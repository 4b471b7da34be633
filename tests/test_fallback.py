"""Refused prompts do not drop out: the job's fallback role as a client sets it and sees it,
through the API and arq's real worker against the scripted LLM (the stage agents on the
default endpoint, the fallback on `second`)."""

from __future__ import annotations

from typing import Any

import httpx

import aidsafe
from app.config import Settings
from app.deliberation.config import RoleConfig
from app.deliberation.ports import FALLBACK_ATTEMPT
from app.plan import JobConfigIn, RoleIn, resolve
from tests.conftest import run_worker_burst
from tests.scripted_llm import ScriptedLLM, refusal, reply, scores
from tests.test_api import error_of, items_of, submit

Headers = dict[str, str]
FALLBACK = {"endpoint": "second", "model": "fallback-model", "temperature": 0.1}
SEED = {"thoughts": ["The fallback reasons it through."], "response": "A safe answer."}


async def get_ok(api: httpx.AsyncClient, auth: Headers, url: str) -> Any:
    response = await api.get(url, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_refused_stage_completes_on_the_fallback_and_the_cot_and_report_say_so(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    scripted_llm: ScriptedLLM,
    second_llm: ScriptedLLM,
) -> None:
    # One item at a time: whichever runs first has its seed refused by both, the other's by
    # the stage's agent only.
    scripted_llm.script("seed_cot", refusal(), refusal())
    second_llm.script("seed_cot", refusal("I will not do that either."), reply(SEED))
    config = {"agents": 1, "max_rounds": 1, "fallback": FALLBACK}
    job = await submit(api, auth, ["Refused twice.", "Refused once."], config=config)
    assert job["config"]["fallback"] == {**FALLBACK, "instructions": ""}  # the role's own stay

    await run_worker_burst(settings, max_jobs=1)

    refused, second = sorted(await items_of(api, auth, job["id"]), key=lambda i: i["status"] != "failed")
    assert (refused["status"], refused["error_code"], refused["stage"]) == ("failed", "agent_refused", "seed")
    assert "fallback-model" in refused["error_message"]
    assert second["status"] == "completed"
    detail = await get_ok(api, auth, f"/v1/items/{second['id']}")
    seed_turns = [
        (t["attempt"], t["endpoint"], t["model"], t["outcome"])
        for t in detail["turns"]
        if t["stage"] == "seed"
    ]
    assert sorted(seed_turns) == [
        (0, "default", "scripted-model", "refused"),
        (FALLBACK_ATTEMPT, "second", "fallback-model", "ok"),
    ]
    assert detail["cot"]["fallbacks"] == [
        {"stage": "seed", "round": 0, "agent": 0, "model": "fallback-model"}
    ]
    assert detail["cot"]["thoughts"][0]["text"] == SEED["thoughts"][0]
    [cot] = (await get_ok(api, auth, f"/v1/jobs/{job['id']}/cots"))["data"]
    assert cot["fallbacks"] == detail["cot"]["fallbacks"]

    report = await get_ok(api, auth, f"/v1/jobs/{job['id']}/report")
    # Both items' refusals by the stage's agent, and the fallback's one.
    refusals = {"seed": {"fallback-model": 1, "scripted-model": 2}}
    assert report["refusals_by_stage"] == refusals
    assert report["usage_by_stage"]["seed"]["llm_calls"] == 4
    # The job's own view counts them the same; the client reads them typed, with a total.
    view = await get_ok(api, auth, f"/v1/jobs/{job['id']}")
    assert view["refusals_by_stage"] == refusals
    assert aidsafe.models.Job.model_validate(view).refusals == 3


async def test_without_a_fallback_a_refusal_fails_the_item_and_is_counted(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    scripted_llm: ScriptedLLM,
    second_llm: ScriptedLLM,
) -> None:
    scripted_llm.script("deliberation_turn", refusal(in_refusal_field=True))
    job = await submit(api, auth, ["Refused."], config={"agents": 1, "max_rounds": 1})
    assert job["config"].get("fallback") is None

    await run_worker_burst(settings, max_jobs=1)

    [item] = await items_of(api, auth, job["id"])
    assert (item["status"], item["error_code"], item["stage"]) == ("failed", "agent_refused", "deliberation")
    assert second_llm.requests == []
    report = await get_ok(api, auth, f"/v1/jobs/{job['id']}/report")
    assert report["refusals_by_stage"] == {"deliberation": {"scripted-model": 1}}


async def test_a_job_that_refuses_nothing_reports_no_refusals_and_no_fallbacks(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, second_llm: ScriptedLLM
) -> None:
    job = await submit(api, auth, ["Fine."], config={"agents": 1, "max_rounds": 1, "fallback": FALLBACK})

    await run_worker_burst(settings, max_jobs=1)

    [cot] = (await get_ok(api, auth, f"/v1/jobs/{job['id']}/cots"))["data"]
    assert cot["fallbacks"] == []
    assert (await get_ok(api, auth, f"/v1/jobs/{job['id']}/report"))["refusals_by_stage"] == {}
    view = await get_ok(api, auth, f"/v1/jobs/{job['id']}")
    assert view["refusals_by_stage"] == {} and aidsafe.models.Job.model_validate(view).refusals == 0
    assert second_llm.requests == []


async def test_a_refused_grade_and_whisper_fall_back_and_the_cot_the_job_and_the_report_say_so(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    scripted_llm: ScriptedLLM,
    second_llm: ScriptedLLM,
) -> None:
    scripted_llm.script("quality_scores", refusal())
    scripted_llm.script("whisper_belief", refusal())
    scripted_llm.script("rejected_cot", refusal("I can't reason from that belief."))  # stays its own
    second_llm.script("quality_scores", reply(scores()))
    second_llm.script("whisper_belief", reply({"belief": "Rules bend for a good cause."}))
    config = {"agents": 1, "max_rounds": 1, "fallback": FALLBACK, "grading": {}, "pairs": {"max_tries": 1}}
    job = await submit(api, auth, ["Graded."], config=config)

    await run_worker_burst(settings, max_jobs=1)

    [cot] = (await get_ok(api, auth, f"/v1/jobs/{job['id']}/cots"))["data"]
    assert cot["fallbacks"] == [
        {"stage": "grade", "round": 0, "agent": 0, "model": "fallback-model"},
        {"stage": "whisper", "round": 1, "agent": 0, "model": "fallback-model"},
    ]
    assert cot["scores"]["relevance"]["score"] == 4  # the fallback's grade
    refusals = {
        "grade": {"scripted-model": 1},
        "rejected": {"scripted-model": 1},
        "whisper": {"scripted-model": 1},
    }
    assert (await get_ok(api, auth, f"/v1/jobs/{job['id']}"))["refusals_by_stage"] == refusals
    assert (await get_ok(api, auth, f"/v1/jobs/{job['id']}/report"))["refusals_by_stage"] == refusals
    [pair] = (await get_ok(api, auth, f"/v1/jobs/{job['id']}/preference-pairs"))["data"]
    assert pair["reason"] == "guard_never_flagged"  # the generator's refusal was the one try


async def test_a_fallback_on_an_unknown_endpoint_is_refused_at_submission(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    response = await api.post(
        "/v1/jobs", json={"prompts": ["a"], "config": {"fallback": {"endpoint": "nowhere"}}}, headers=auth
    )

    assert "fallback: unknown endpoint 'nowhere'" in error_of(response, 422, "invalid_config")["message"]


def test_the_server_default_fallback_applies_unless_the_job_names_its_own_or_turns_it_off(
    settings: Settings,
) -> None:
    server = settings.model_copy(update={"fallback_endpoint": "second", "fallback_temperature": 0.2})

    def fallback(**config: Any) -> RoleConfig | None:
        return resolve(JobConfigIn(defaults=RoleIn(model="job-model"), **config), server).fallback

    # The endpoint's default model, not the job's: the fallback stands in for the job's model.
    assert fallback() == RoleConfig("second", "second-model", 0.2)
    assert fallback(fallback={"model": "big-model"}) == RoleConfig("second", "big-model", 0.2)
    assert fallback(fallback={"endpoint": "default", "temperature": 0.9}) == RoleConfig(
        "default", "scripted-model", 0.9
    )
    assert fallback(fallback=False) is None
    assert resolve(JobConfigIn(), settings).fallback is None  # no server default: none
