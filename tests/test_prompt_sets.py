"""Prompt sets over the API: registered by content like policy sets, checked by stage and
placeholder, kept to their key, pinned by jobs, and named by every CoT and full record."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import httpx
import pytest
from sqlalchemy import delete, func, select, update

from app.config import EndpointConfig, Settings
from app.deliberation.prompt_sets import builtin
from app.store import keys, prompt_sets
from app.store.db import Sessions
from app.store.models import Job, PromptSetRow
from tests.conftest import api_client, new_key, run_worker_burst, submit
from tests.scripted_llm import ScriptedLLM

Headers = dict[str, str]
BUILTIN = dict(builtin().templates)
CUSTOM_SEED_USER = "CUSTOM QUERY>> $prompt\nINTENTS>> $intents"
ONE_AGENT = {"agents": 1, "max_rounds": 1}


def templates(**changes: str) -> dict[str, str]:
    """The built-in templates with some replaced ("__" for "." in names)."""
    return {**BUILTIN, **{name.replace("__", "."): text for name, text in changes.items()}}


async def register(
    api: httpx.AsyncClient, auth: Headers, name: str = "house", **changes: str
) -> httpx.Response:
    body = {"name": name, "description": "ours", "templates": templates(**changes)}
    return await api.post("/v1/prompt-sets", json=body, headers=auth)


async def register_on_builtin(
    api: httpx.AsyncClient, auth: Headers, name: str, templates: dict[str, str]
) -> dict[str, Any]:
    """Register `templates` over the built-in set's; the new set as the API shows it."""
    body = {"name": name, "base": {"name": "aidsafe-default"}, "templates": templates}
    response = await api.post("/v1/prompt-sets", json=body, headers=auth)
    assert response.status_code == 201, response.text
    shown: dict[str, Any] = response.json()
    return shown


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


async def stored_prompt_sets(sessions: Sessions) -> int:
    async with sessions() as session:
        return await session.scalar(select(func.count()).select_from(PromptSetRow)) or 0


async def job_count(sessions: Sessions) -> int:
    async with sessions() as session:
        return await session.scalar(select(func.count()).select_from(Job)) or 0


# --- registering -----------------------------------------------------------------------------


async def test_the_builtin_set_is_listed_with_its_templates(api: httpx.AsyncClient, auth: Headers) -> None:
    listed = (await api.get("/v1/prompt-sets", headers=auth)).json()

    assert [(s["name"], s["version"], s["builtin"]) for s in listed] == [
        ("aidsafe-default", builtin().version, True)
    ]
    shown = (await api.get(f"/v1/prompt-sets/{listed[0]['id']}", headers=auth)).json()
    assert shown["templates"] == BUILTIN


async def test_a_set_registers_once_per_content_and_a_change_is_a_new_version(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    first = await register(api, auth, seed__user=CUSTOM_SEED_USER)
    again = await register(api, auth, seed__user=CUSTOM_SEED_USER)
    changed = await register(api, auth, seed__user=CUSTOM_SEED_USER + "\n")

    assert (first.status_code, again.status_code, changed.status_code) == (201, 200, 201)
    assert again.json()["id"] == first.json()["id"]
    assert changed.json()["version"] != first.json()["version"]
    assert first.json()["templates"]["seed.user"] == CUSTOM_SEED_USER
    assert (first.json()["builtin"], first.json()["description"]) == (False, "ours")
    listed = (await api.get("/v1/prompt-sets", headers=auth)).json()
    assert sorted(s["name"] for s in listed) == ["aidsafe-default", "house", "house"]


async def test_another_key_can_neither_see_nor_use_a_keys_set(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    mine = (await register(api, auth, seed__user=CUSTOM_SEED_USER)).json()
    other = await new_key(sessions, "other")

    listed = (await api.get("/v1/prompt-sets", headers=other)).json()
    shown = await api.get(f"/v1/prompt-sets/{mine['id']}", headers=other)
    used = await api.post(
        "/v1/jobs", json={"prompts": ["Hi"], "prompt_set": {"name": "house"}}, headers=other
    )

    assert [s["name"] for s in listed] == ["aidsafe-default"]
    assert shown.status_code == 404
    assert "house" in error_of(used, 422, "unknown_prompt_set")["message"]
    assert await job_count(sessions) == 0


@pytest.mark.parametrize(
    ("changes", "stage", "template", "placeholder", "says"),
    [
        (
            {"seed__user": CUSTOM_SEED_USER + " $tone"},
            "seed",
            "seed.user",
            "tone",
            "unknown placeholder $tone",
        ),
        (
            {"refine__user": "$prompt $intents $thoughts"},
            "refine",
            "refine.user",
            "response",
            "missing placeholder",
        ),
        ({"judge__system": "Pick one: costs $5"}, "judge", "judge.system", None, "Invalid placeholder"),
        (
            # Each use of $policies is up to 50,000 characters in every request.
            {"preamble": "$policies ${policies}\n" * 2},
            "every stage (preamble)",
            "preamble",
            "policies",
            "placeholder $policies is used 4 times, at most 3",
        ),
        (
            {"grade__system": "Grade $prompt"},
            "grade",
            "grade.system",
            "prompt",
            "unknown placeholder $prompt",
        ),
    ],
)
async def test_an_unusable_template_is_a_422_naming_stage_template_and_placeholder(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    changes: dict[str, str],
    stage: str,
    template: str,
    placeholder: str | None,
    says: str,
) -> None:
    error = error_of(await register(api, auth, **changes), 422, "invalid_prompt_set")

    assert f"template '{template}' (stage {stage})" in error["message"] and says in error["message"]
    assert error["details"] == [
        {
            "template": template,
            "stage": stage,
            "placeholder": placeholder,
            "message": error["details"][0]["message"],
        }
    ]
    assert await stored_prompt_sets(sessions) == 0


async def test_a_placeholder_may_be_used_three_times_in_a_template(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    response = await register(api, auth, seed__user="$prompt, $intents; once more: $prompt, ${prompt}")

    assert response.status_code == 201, response.text


async def test_a_stage_without_its_template_or_an_unknown_template_is_a_422(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    body = {"name": "house", "templates": {**templates(), "intnet.system": "typo"}}
    del body["templates"]["whisper.user"]  # type: ignore[attr-defined]

    error = error_of(await api.post("/v1/prompt-sets", json=body, headers=auth), 422, "invalid_prompt_set")

    assert (
        "unknown template 'intnet.system'" in error["message"] and "(and 1 more problems)" in error["message"]
    )
    assert [(d["template"], d["stage"]) for d in error["details"]] == [
        ("intnet.system", ""),
        ("whisper.user", "whisper"),
    ]
    assert error["details"][1]["message"] == "stage whisper has no template 'whisper.user'"
    assert await stored_prompt_sets(sessions) == 0


async def test_a_template_over_the_field_cap_is_a_validation_error(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    response = await register(api, auth, seed__system="x" * 20_001)

    assert error_of(response, 422, "validation_error")["details"][0]["field"] == "templates.seed.system"


# --- endpoint contexts ------------------------------------------------------------------------

SMALL_CONTEXT = 6_000  # the default policies and a short prompt fit, with max_tokens 256
LONG_SEED_INSTRUCTIONS = (
    "Think hard about every angle of the request before you answer. " * 200
)  # ~4,300 tokens


@pytest.fixture
def small_settings(settings: Settings, scripted_llm: ScriptedLLM) -> Settings:
    """Every endpoint has a known context (the default's too): nothing may be over them all."""
    small = EndpointConfig(base_url=scripted_llm.base_url, max_context_tokens=SMALL_CONTEXT)
    return settings.model_copy(update={"llm_max_context_tokens": 2_000, "llm_endpoints": {"small": small}})


@pytest.fixture
async def small_api(small_settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(small_settings) as client:
        yield client


async def test_templates_too_long_for_every_endpoint_are_a_422_naming_the_stage(
    small_api: httpx.AsyncClient, sessions: Sessions
) -> None:
    auth = await new_key(sessions)

    error = error_of(
        await register(
            small_api,
            auth,
            seed__system=LONG_SEED_INSTRUCTIONS,
            seed__user=LONG_SEED_INSTRUCTIONS + CUSTOM_SEED_USER,
        ),
        422,
        "invalid_prompt_set",
    )

    assert error["message"].startswith("stage seed: templates seed.system, seed.user make requests of about")
    assert [(d["stage"], d["max_context_tokens"]) for d in error["details"]] == [("seed", SMALL_CONTEXT)]
    assert (await register(small_api, auth, seed__system=LONG_SEED_INSTRUCTIONS)).status_code == 201


async def test_the_fit_check_at_submission_uses_the_jobs_prompt_set(
    small_api: httpx.AsyncClient, sessions: Sessions
) -> None:
    auth = await new_key(sessions)
    assert (await register(small_api, auth, seed__system=LONG_SEED_INSTRUCTIONS)).status_code == 201
    config = {**ONE_AGENT, "max_tokens": 256, "defaults": {"endpoint": "small"}}

    with_builtin = await small_api.post("/v1/jobs", json={"prompts": ["Hi"], "config": config}, headers=auth)
    with_long = await small_api.post(
        "/v1/jobs", json={"prompts": ["Hi"], "config": config, "prompt_set": {"name": "house"}}, headers=auth
    )

    assert with_builtin.status_code == 202, with_builtin.text
    error = error_of(with_long, 422, "request_too_large")
    assert [d["role"] for d in error["details"]] == ["seed"]
    assert await job_count(sessions) == 1


# --- jobs ------------------------------------------------------------------------------------


async def test_a_job_runs_in_the_words_of_its_pinned_set_and_every_cot_and_record_names_it(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    registered = (await register(api, auth, seed__user=CUSTOM_SEED_USER)).json()
    await register(api, auth, seed__user=CUSTOM_SEED_USER + " (newer)")  # a later version of the name

    body = {
        "prompts": ["How do I store bleach?"],
        "config": ONE_AGENT,
        "prompt_set": {"name": "house", "version": registered["version"]},
    }
    submitted = await api.post("/v1/jobs", json=body, headers=auth)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    await run_worker_burst(settings, max_jobs=1)

    seed_request = scripted_llm.requests_for("seed_cot")[0].body["messages"][-1]["content"]
    assert seed_request.startswith("CUSTOM QUERY>> How do I store bleach?\nINTENTS>> Explicit")
    pinned = {"id": registered["id"], "name": "house", "version": registered["version"]}
    assert (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["prompt_set"] == pinned
    cots = (await api.get(f"/v1/jobs/{job_id}/cots", headers=auth)).json()["data"]
    assert [cot["prompt_set"] for cot in cots] == [pinned]
    export = await api.get(f"/v1/jobs/{job_id}/export", params={"format": "jsonl"}, headers=auth)
    record = json.loads(export.text.splitlines()[0])
    assert (record["prompt_set_name"], record["prompt_set_version"]) == ("house", registered["version"])


async def test_a_job_without_a_prompt_set_pins_the_builtin_one(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    submitted = await api.post("/v1/jobs", json={"prompts": ["Hi"], "config": ONE_AGENT}, headers=auth)
    await run_worker_burst(settings, max_jobs=1)

    shown = submitted.json()["prompt_set"]
    assert (shown["name"], shown["version"]) == ("aidsafe-default", builtin().version)
    cot = (await api.get(f"/v1/jobs/{submitted.json()['id']}/cots", headers=auth)).json()["data"][0]
    assert cot["prompt_set"] == shown
    seed_request = scripted_llm.requests_for("seed_cot")[0].body["messages"][-1]["content"]
    assert seed_request.startswith("User query:\n<<<\nHi\n>>>")


async def test_a_job_pinned_to_an_earlier_builtin_version_keeps_its_wording_after_an_upgrade(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    """The built-in files change with a release. A job pinned to the earlier built-in version
    (as one submitted before the upgrade is stored, and one naming that version to reproduce
    an earlier run) is still asked in its words; a new job in the new ones, limits named."""
    earlier_refiner = "# Your task: refinement\nProduce the final chain of thought and response."
    async with sessions.begin() as session:  # as the earlier release registered its built-in set
        earlier, _ = await prompt_sets.register(
            session, None, "aidsafe-default", "", templates(refine__system=earlier_refiner), None
        )
    config = {**ONE_AGENT, "limits": {"kept_thoughts": 5, "max_drops": 7}}
    pinned = {"name": "aidsafe-default", "version": earlier.version}
    old = await api.post(
        "/v1/jobs", json={"prompts": ["Hi"], "config": config, "prompt_set": pinned}, headers=auth
    )
    new = await api.post("/v1/jobs", json={"prompts": ["Hi"], "config": config}, headers=auth)
    assert (old.status_code, new.status_code) == (202, 202), (old.text, new.text)

    await run_worker_burst(settings, max_jobs=1)

    refiners = [r.body["messages"][0]["content"] for r in scripted_llm.requests_for("refined_cot")]
    worded_earlier = [system for system in refiners if earlier_refiner in system]
    worded_now = [system for system in refiners if "in order: 1 to 5 (" in system and "(0 to 7)" in system]
    assert (len(worded_earlier), len(worded_now)) == (1, 1), refiners
    for job, version in ((old, earlier.version), (new, builtin().version)):
        cot = (await api.get(f"/v1/jobs/{job.json()['id']}/cots", headers=auth)).json()["data"][0]
        assert (cot["prompt_set"]["name"], cot["prompt_set"]["version"]) == ("aidsafe-default", version)


async def test_a_job_without_a_version_pins_the_builtin_set_this_process_ships_not_a_newer_releases(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """In a rolling upgrade (or after a rollback) processes of two releases share the database:
    a newer one's built-in row is the newest stored, but this process words its jobs as it ships
    them, and that newer wording may use a placeholder this release does not know."""
    async with sessions.begin() as session:
        await prompt_sets.ensure_default(session)  # this process's row, stored first
    newer_refiner = "# Your task: refinement\nKeep at most $kept_thoughts_of_a_later_release."
    async with sessions.begin() as session:  # as a newer release registers its built-in set
        newer, _ = await prompt_sets.register(
            session, None, "aidsafe-default", "", templates(refine__system=newer_refiner), None
        )

    submitted = await api.post("/v1/jobs", json={"prompts": ["Hi"], "config": ONE_AGENT}, headers=auth)

    assert submitted.status_code == 202, submitted.text
    shown = submitted.json()["prompt_set"]
    assert (
        (shown["name"], shown["version"])
        == ("aidsafe-default", builtin().version)
        != (newer.name, newer.version)
    )


async def test_an_unknown_prompt_set_version_is_a_422_and_no_job(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    await register(api, auth, seed__user=CUSTOM_SEED_USER)

    response = await api.post(
        "/v1/jobs",
        json={"prompts": ["Hi"], "prompt_set": {"name": "house", "version": "0" * 16}},
        headers=auth,
    )

    assert "version 0000000000000000" in error_of(response, 422, "unknown_prompt_set")["message"]
    assert await job_count(sessions) == 0


async def test_a_set_the_stages_have_outgrown_is_refused_at_submission(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    # Written straight to the store: as if registered before the template it lacks existed.
    outgrown = templates()
    del outgrown["judge.user"]
    async with sessions.begin() as session:
        key, secret = await keys.create_key(session, "legacy")
        await prompt_sets.register(session, key.id, "old", "", outgrown, None)

    response = await api.post(
        "/v1/jobs",
        json={"prompts": ["Hi"], "prompt_set": {"name": "old"}},
        headers={"Authorization": f"Bearer {secret}"},
    )

    error = error_of(response, 422, "invalid_prompt_set")
    assert "no longer fits the stages: stage judge has no template 'judge.user'" in error["message"]
    assert "again with base 'aidsafe-default' to take the new templates (judge.user)" in error["message"]
    assert await job_count(sessions) == 0

    # What the message says to do: the old templates, the missing one from the built-in set.
    again = await api.post(
        "/v1/prompt-sets",
        json={"name": "old", "templates": outgrown, "base": {"name": "aidsafe-default"}},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert (again.status_code, again.json()["inherited"]) == (201, ["judge.user"])
    resubmitted = await api.post(
        "/v1/jobs",
        json={"prompts": ["Hi"], "prompt_set": {"name": "old"}},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert resubmitted.status_code == 202, resubmitted.text
    assert resubmitted.json()["prompt_set"]["version"] == again.json()["version"]


async def test_a_set_stored_before_placeholder_uses_were_capped_is_refused_at_submission(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    """Its requests were each the policies some 2,000 times over, and rendering them to check
    them at submission held the event loop for a second."""
    async with sessions.begin() as session:
        key, secret = await keys.create_key(session, "legacy")
        await prompt_sets.register(
            session, key.id, "echo", "", templates(preamble="$policies\n" * 1999), None
        )

    response = await api.post(
        "/v1/jobs",
        json={"prompts": ["Hi"], "prompt_set": {"name": "echo"}},
        headers={"Authorization": f"Bearer {secret}"},
    )

    error = error_of(response, 422, "invalid_prompt_set")
    assert "placeholder $policies is used 1,999 times, at most 3" in error["message"]
    assert await job_count(sessions) == 0


async def test_a_comparison_is_refused_when_its_candidates_set_lacks_a_template_the_judge_uses(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings
) -> None:
    """The judge is worded by the candidate job's set, which was not checked again: a set
    pinned before judge.user existed was a KeyError, a 500."""
    outgrown = templates()
    del outgrown["judge.user"]
    async with sessions.begin() as session:
        key, secret = await keys.create_key(session, "legacy")
        old, _ = await prompt_sets.register(session, key.id, "old", "", outgrown, None)
    auth = {"Authorization": f"Bearer {secret}"}
    baseline, candidate = [await submit(api, auth, ["Hi"], **ONE_AGENT) for _ in "ab"]
    async with sessions.begin() as session:  # as if submitted while the set still fitted
        await session.execute(update(Job).where(Job.id == UUID(candidate)).values(prompt_set_id=old.id))
    await run_worker_burst(settings)

    response = await api.post(
        "/v1/comparisons",
        json={"baseline_job_id": baseline, "candidate_job_id": candidate},
        headers=auth,
    )

    error = error_of(response, 422, "invalid_prompt_set")
    assert error["message"].startswith(
        f"the candidate job's prompt set 'old' version {old.version} no longer fits the stages: "
        "stage judge has no template 'judge.user'"
    ), error
    assert await job_count(sessions) == 2


async def test_a_set_registered_on_a_base_stores_every_template_and_names_what_it_took(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    mine = await register(api, auth, "mine", seed__user=CUSTOM_SEED_USER)
    on_base = await api.post(
        "/v1/prompt-sets",
        json={"name": "terse", "templates": {"refine.system": "Be terse."}, "base": {"name": "mine"}},
        headers=auth,
    )

    body = on_base.json()
    assert on_base.status_code == 201, on_base.text
    assert body["templates"] == templates(seed__user=CUSTOM_SEED_USER, refine__system="Be terse.")
    assert body["base"] == {k: mine.json()[k] for k in ("id", "name", "version")}
    assert body["inherited"] == sorted(set(BUILTIN) - {"refine.system"})
    shown = (await api.get(f"/v1/prompt-sets/{body['id']}", headers=auth)).json()
    assert shown["templates"] == body["templates"]
    # The same whole content given in full is the same version.
    full = await api.post(
        "/v1/prompt-sets", json={"name": "terse", "templates": body["templates"]}, headers=auth
    )
    assert (full.status_code, full.json()["id"], full.json()["base"]) == (200, body["id"], None)


async def test_a_base_the_key_cannot_see_or_a_template_it_breaks_is_a_422_and_nothing_stored(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    await register(api, auth, "mine", seed__user=CUSTOM_SEED_USER)
    other = await new_key(sessions, "other")
    before = await stored_prompt_sets(sessions)

    unseen = await api.post(
        "/v1/prompt-sets",
        json={"name": "copy", "templates": {}, "base": {"name": "mine"}},
        headers=other,
    )
    broken = await api.post(
        "/v1/prompt-sets",
        json={"name": "x", "templates": {"seed.user": "$tone"}, "base": {"name": "aidsafe-default"}},
        headers=auth,
    )

    assert "'mine'" in error_of(unseen, 422, "unknown_prompt_set")["message"]
    assert "unknown placeholder $tone" in error_of(broken, 422, "invalid_prompt_set")["message"]
    assert await stored_prompt_sets(sessions) == before


async def test_a_job_from_before_prompt_sets_runs_and_names_the_builtin_set(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    submitted = await api.post("/v1/jobs", json={"prompts": ["Hi"], "config": ONE_AGENT}, headers=auth)
    job_id = submitted.json()["id"]
    async with sessions.begin() as session:  # as the migration leaves jobs submitted before it
        await session.execute(update(Job).where(Job.id == job_id).values(prompt_set_id=None))
        await session.execute(delete(PromptSetRow))

    await run_worker_burst(settings, max_jobs=1)

    assert (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["prompt_set"] is None
    cot = (await api.get(f"/v1/jobs/{job_id}/cots", headers=auth)).json()["data"][0]
    assert (cot["prompt_set"]["name"], cot["prompt_set"]["version"]) == ("aidsafe-default", builtin().version)
