"""Size caps on what a tenant sends to a shared LLM: policy fields and text are capped when a
set is registered, a job whose requests cannot fit an endpoint's context or the server's cap
is refused at submission, and the client never sends a request estimated over the endpoint's
limit or the server's cap on every request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from itertools import product
from typing import Any
from uuid import UUID

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from app.config import EndpointConfig, Settings
from app.deliberation.budget import request_tokens
from app.deliberation.config import Limits
from app.deliberation.policies import MAX_POLICY_TEXT_CHARS
from app.deliberation.ports import ChatRequest, LLMRequestTooLarge
from app.deliberation.prompt_sets import builtin
from app.deliberation.stages import DECLARED, GRADE, SEED
from app.llm.client import fitted
from app.store import keys, policy_sets, prompt_sets
from app.store.db import Sessions
from app.store.models import Job, PolicySetRow
from tests.conftest import api_client, client_for, new_key, run_worker_burst, submit
from tests.scripted_llm import RecordedRequest, Reply, ScriptedLLM, reply

Headers = dict[str, str]
SMALL_CONTEXT = 6_000  # the default policies (~7,300 characters) and a short prompt fit
TINY_CONTEXT = 1_000  # nothing with the default policies fits
FITTING = {"agents": 1, "max_rounds": 1, "max_tokens": 256, "defaults": {"endpoint": "small"}}
POLICY = {
    "id": "kitchen-safety",
    "title": "Kitchen safety",
    "scope": "Cooking, knives, hot surfaces.",
    "allowed": ["recipes", "knife skills"],
    "not_allowed": ["poisoning someone"],
    "borderline_examples": [{"prompt": "Is raw flour safe?", "guidance": "Explain the risk."}],
}


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def sent_tokens(request: RecordedRequest) -> int:
    """The client's estimate of a request the scripted server received."""
    body = request.body
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    return request_tokens(body["messages"], schema, body["max_tokens"])


@pytest.fixture
def capped_settings(settings: Settings, scripted_llm: ScriptedLLM) -> Settings:
    """The test settings plus endpoints with a known context on the scripted server."""
    return settings.model_copy(
        update={
            "llm_endpoints": {
                **settings.llm_endpoints,
                "small": EndpointConfig(base_url=scripted_llm.base_url, max_context_tokens=SMALL_CONTEXT),
                "tiny": EndpointConfig(base_url=scripted_llm.base_url, max_context_tokens=TINY_CONTEXT),
            }
        }
    )


@pytest.fixture
async def capped_api(capped_settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(capped_settings) as client:
        yield client


async def register(api: httpx.AsyncClient, auth: Headers, policies: list[Any]) -> httpx.Response:
    return await api.post("/v1/policy-sets", json={"name": "kitchen", "policies": policies}, headers=auth)


async def stored_policy_sets(sessions: Sessions) -> int:
    async with sessions() as session:
        return await session.scalar(select(func.count()).select_from(PolicySetRow)) or 0


async def job_count(sessions: Sessions) -> int:
    async with sessions() as session:
        return await session.scalar(select(func.count()).select_from(Job)) or 0


# --- policy sets ------------------------------------------------------------------------


async def test_a_25_mb_policy_set_under_the_body_limit_is_refused_by_the_field_caps(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    policies = [{**POLICY, "allowed": ["x" * 25_000_000]}]
    body = httpx.Request("POST", "/", json={"name": "kitchen", "policies": policies}).content
    assert len(body) < settings.max_request_bytes

    error = error_of(await register(api, auth, policies), 422, "validation_error")

    assert error["details"][0]["field"] == "policies.0.allowed.0"
    assert await stored_policy_sets(sessions) == 0


async def test_a_policy_set_whose_rendered_text_is_over_the_cap_is_refused(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # Every field within its own cap; together over the cap on the whole text.
    entries = ["y" * 1_000] * 50
    policies = [{**POLICY, "id": f"p{n}", "allowed": entries} for n in range(2)]

    error = error_of(await register(api, auth, policies), 422, "validation_error")

    assert error["details"][0]["field"] == "policies"
    assert f"{MAX_POLICY_TEXT_CHARS:,}" in error["message"]
    assert await stored_policy_sets(sessions) == 0


@pytest.mark.parametrize(
    "policy",
    [
        {**POLICY, "severity": "high"},
        {**POLICY, "borderline_examples": [{"prompt": "a", "guidance": "b", "label": "c"}]},
    ],
    ids=["policy", "borderline example"],
)
async def test_unknown_fields_in_a_policy_are_refused(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, policy: dict[str, Any]
) -> None:
    error_of(await register(api, auth, [policy]), 422, "validation_error")

    assert await stored_policy_sets(sessions) == 0


async def test_duplicate_policy_ids_are_refused(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    twins = [POLICY, {**POLICY, "title": "Kitchen safety, again"}]

    error = error_of(await register(api, auth, twins), 422, "validation_error")

    assert "kitchen-safety" in error["message"]
    assert await stored_policy_sets(sessions) == 0


async def test_a_stored_policy_set_over_the_text_cap_cannot_be_used_by_a_job(
    api: httpx.AsyncClient, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    # A set registered before the caps existed: no endpoint limit is configured here,
    # the hard cap on policy text still keeps it away from the LLM.
    async with sessions.begin() as session:
        key, secret = await keys.create_key(session, "legacy", ())
        huge = [{**POLICY, "allowed": ["z" * 200_000]}]
        await policy_sets.register(session, key.id, "huge", "", huge, None)

    response = await api.post(
        "/v1/jobs",
        json={"prompts": ["a"], "policy_set": {"name": "huge"}},
        headers={"Authorization": f"Bearer {secret}"},
    )

    error = error_of(response, 422, "request_too_large")
    assert "huge" in error["message"]
    assert await job_count(sessions) == 0


# --- jobs against an endpoint's context -------------------------------------------------


async def test_a_job_whose_prompt_and_policies_cannot_fit_the_context_is_refused(
    capped_api: httpx.AsyncClient, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    auth = await new_key(sessions)
    long_prompt = "How do I store soup safely? " * 600  # ~16,800 characters: ~5,600 tokens

    response = await capped_api.post(
        "/v1/jobs", json={"prompts": [long_prompt], "config": FITTING}, headers=auth
    )

    error = error_of(response, 422, "request_too_large")
    assert "role 'refiner'" in error["message"] and "endpoint 'small'" in error["message"]
    assert {d["role"] for d in error["details"]} == {"intent", "seed", "deliberator-1", "refiner"}
    for detail in error["details"]:
        assert detail["endpoint"] == "small"
        assert detail["max_context_tokens"] == SMALL_CONTEXT
        assert detail["estimated_tokens"] > SMALL_CONTEXT
    assert await job_count(sessions) == 0
    assert scripted_llm.requests == []


@pytest.mark.parametrize(
    ("config", "role"),
    [
        ({"intent": {"endpoint": "tiny"}}, "intent"),
        ({"deliberators": [{}, {"endpoint": "tiny"}]}, "deliberator-2"),
        ({"mode": "zero_shot", "seed": {"endpoint": "tiny"}}, "zero-shot"),
        ({"grading": {"grader": {"endpoint": "tiny"}}}, "grader"),
        ({"pairs": {"whisperer": {"endpoint": "tiny"}}}, "whisperer"),
        ({"pairs": {"generator": {"endpoint": "tiny"}}}, "generator"),
        ({"pairs": {"guard": {"endpoint": "tiny"}}}, "guard"),
    ],
)
async def test_the_refusal_names_the_role_that_cannot_fit(
    capped_api: httpx.AsyncClient, sessions: Sessions, config: dict[str, Any], role: str
) -> None:
    auth = await new_key(sessions)

    response = await capped_api.post("/v1/jobs", json={"prompts": ["Hi"], "config": config}, headers=auth)

    error = error_of(response, 422, "request_too_large")
    assert [d["role"] for d in error["details"]] == [role]
    assert f"role '{role}'" in error["message"]


async def test_a_llama_guard_fits_without_the_policy_text(
    capped_api: httpx.AsyncClient, sessions: Sessions
) -> None:
    # A Llama Guard-style guard reads only the prompt and the sample, in its own template:
    # the same endpoint that cannot take a JSON guard (above) takes it.
    auth = await new_key(sessions)
    config = {"max_tokens": 64, "pairs": {"guard": {"style": "llama_guard", "endpoint": "tiny"}}}

    response = await capped_api.post("/v1/jobs", json={"prompts": ["Hi"], "config": config}, headers=auth)

    assert response.status_code == 202, response.text


async def test_a_job_that_fits_runs_and_sends_nothing_over_the_limit(
    capped_api: httpx.AsyncClient, capped_settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    auth = await new_key(sessions)
    config = {**FITTING, "grading": {}}

    response = await capped_api.post(
        "/v1/jobs", json={"prompts": ["How do I store soup safely?"], "config": config}, headers=auth
    )
    assert response.status_code == 202, response.text
    await run_worker_burst(capped_settings)

    items = (await capped_api.get(f"/v1/jobs/{response.json()['id']}/items", headers=auth)).json()["data"]
    assert [item["status"] for item in items] == ["completed"]
    sent = scripted_llm.requests
    assert len(sent) == 5  # intent, seed, one deliberation turn, refine, grade
    assert max(sent_tokens(request) for request in sent) <= SMALL_CONTEXT


def english_reply(fields: dict[str, Any], list_field: str, items: int, max_tokens: int) -> Reply:
    """A reply as long as `max_tokens` lets a model write: its JSON at four bytes a token
    (English text runs about that), `items` sentences of `list_field` filling the rest."""
    room = max_tokens * 4 - len(json.dumps({**fields, list_field: [""] * items}))
    sentence = "Cooling soup fast keeps bacteria from growing in the pot. "
    each = (sentence * (room // items // len(sentence) + 1))[: room // items]
    answer = reply({**fields, list_field: [each] * items})
    assert answer.content is not None and len(answer.content) <= max_tokens * 4
    return answer


def script_full_length_cots(scripted_llm: ScriptedLLM, max_tokens: int, thoughts: int, turns: int) -> None:
    """The next seed, and its `turns` deliberation turns (none agreeing), as long as
    `max_tokens` lets them be."""
    seed = english_reply({"response": "Cool it."}, "thoughts", thoughts, max_tokens)
    turn = {"agree": False, "critique": "More care.", "response": "Cool it."}
    scripted_llm.script("seed_cot", seed)
    scripted_llm.script(
        "deliberation_turn", *[english_reply(turn, "new_thoughts", thoughts, max_tokens)] * turns
    )


async def items_run_at(
    settings: Settings, path: str, body: dict[str, Any], auth: Headers
) -> list[dict[str, Any]]:
    """The items of the job that `body`, posted to `path`, makes under `settings`, run."""
    async with api_client(settings) as api:
        response = await api.post(path, json=body, headers=auth)
        assert response.status_code == 202, response.text
        await run_worker_burst(settings)
        items: list[dict[str, Any]] = (
            await api.get(f"/v1/jobs/{response.json()['id']}/items", headers=auth)
        ).json()["data"]
    return items


@pytest.mark.parametrize("listed", [1, 8], ids=["as-many-as-the-schema-allows", "eight-times-as-many"])
async def test_a_job_accepted_at_the_edge_of_a_context_sends_every_request_whole_whatever_it_reads(
    settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM, listed: int
) -> None:
    """Submission counts each reply a request reads at its full max_tokens as the client will
    count it: a job accepted with no room to spare is never cut back when every reply is as
    long as it may be. Counted at a token each, the refiner's request was cut. The replies list
    `listed` times as many thoughts and intents as the schemas allow (a server ignoring them):
    read whole, their labels made the refiner's request too large to send."""
    auth, max_tokens, thoughts = await new_key(sessions), 256, Limits().thoughts_per_turn * listed
    config = {"agents": 1, "max_rounds": 1, "max_tokens": max_tokens, "defaults": {"endpoint": "edge"}}
    tiny = EndpointConfig(base_url=scripted_llm.base_url, max_context_tokens=TINY_CONTEXT)
    async with api_client(settings.model_copy(update={"llm_endpoints": {"edge": tiny}})) as api:
        refused = await api.post("/v1/jobs", json={"prompts": ["Soup?"], "config": config}, headers=auth)
    estimates = error_of(refused, 422, "request_too_large")["details"]
    largest = max(detail["estimated_tokens"] for detail in estimates)
    edge = EndpointConfig(base_url=scripted_llm.base_url, max_context_tokens=largest)
    at_the_edge = settings.model_copy(update={"llm_endpoints": {"edge": edge}})
    explicit = {"explicit_intents": [{"intent": "Store soup.", "label": "benign"}]}
    scripted_llm.script(
        "intent_decomposition", english_reply(explicit, "implicit_intents", 5 * listed, max_tokens)
    )
    script_full_length_cots(scripted_llm, max_tokens, thoughts, turns=1)

    items = await items_run_at(at_the_edge, "/v1/jobs", {"prompts": ["Soup?"], "config": config}, auth)

    assert [(item["status"], item["error_code"]) for item in items] == [("completed", None)]
    sent = scripted_llm.requests
    assert [request.schema_name for request in sent] == [
        "intent_decomposition",
        "seed_cot",
        "deliberation_turn",
        "refined_cot",
    ]
    assert [request.body["max_tokens"] for request in sent] == [max_tokens] * 4
    assert max(sent_tokens(request) for request in sent) <= largest


async def test_a_grader_reading_a_cot_never_refined_is_accepted_only_where_the_whole_cot_fits(
    settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    """With `refine: false` the CoT the grader reads is every thought of the seed and of each
    turn, and the last response: as many replies as were written, not one. Counted as one, a
    grader's endpoint at the edge of the estimate had the grader's request cut back."""
    auth, max_tokens, thoughts = await new_key(sessions), 256, Limits().thoughts_per_turn
    config = {
        "agents": 1,
        "max_rounds": 2,
        "refine": False,
        "decompose_intents": False,
        "max_tokens": max_tokens,
        "defaults": {"endpoint": "wide"},
        "grading": {"grader": {"endpoint": "grading"}},
    }
    wide = EndpointConfig(base_url=scripted_llm.base_url)

    def endpoints(grading_context: int) -> Settings:
        grading = EndpointConfig(base_url=scripted_llm.base_url, max_context_tokens=grading_context)
        return settings.model_copy(update={"llm_endpoints": {"wide": wide, "grading": grading}})

    async with api_client(endpoints(TINY_CONTEXT)) as api:
        refused = await api.post("/v1/jobs", json={"prompts": ["Soup?"], "config": config}, headers=auth)
    [estimate] = error_of(refused, 422, "request_too_large")["details"]
    assert estimate["role"] == "grader"
    at_the_edge = endpoints(estimate["estimated_tokens"])
    script_full_length_cots(scripted_llm, max_tokens, thoughts, turns=2)

    items = await items_run_at(at_the_edge, "/v1/jobs", {"prompts": ["Soup?"], "config": config}, auth)

    assert [item["status"] for item in items] == ["completed"]
    [graded] = [request for request in scripted_llm.requests if request.schema_name == "quality_scores"]
    assert graded.body["max_tokens"] == max_tokens
    assert sent_tokens(graded) <= estimate["estimated_tokens"]


async def test_a_request_grown_over_the_limit_fails_the_item_unsent(
    capped_api: httpx.AsyncClient, capped_settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    # The seed writes far more than its max_tokens (a server that ignores the limit): the
    # deliberation turn that would carry it must not be sent.
    auth = await new_key(sessions)
    scripted_llm.script("seed_cot", reply({"thoughts": ["w " * 10_000], "response": "Fine."}))

    response = await capped_api.post("/v1/jobs", json={"prompts": ["Hi"], "config": FITTING}, headers=auth)
    assert response.status_code == 202, response.text
    await run_worker_burst(capped_settings)

    items = (await capped_api.get(f"/v1/jobs/{response.json()['id']}/items", headers=auth)).json()["data"]
    assert [(item["status"], item["error_code"]) for item in items] == [("failed", "request_too_large")]
    assert "role 'deliberator-1'" in items[0]["error_message"]
    assert "endpoint 'small'" in items[0]["error_message"]
    assert scripted_llm.requests_for("deliberation_turn") == []
    assert max(sent_tokens(request) for request in scripted_llm.requests) <= SMALL_CONTEXT


async def test_a_max_tokens_over_what_the_context_leaves_is_lowered_to_it(
    capped_settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    # A re-ask after truncation doubles max_tokens: it gets the room the prompt leaves instead.
    messages = [{"role": "user", "content": "x" * 3_000}]  # about 1,000 tokens
    prompt = request_tokens(messages, SEED.schema(Limits()), 0)
    asks = [SMALL_CONTEXT, SMALL_CONTEXT - prompt, SMALL_CONTEXT - prompt - 1]

    seed_schema = SEED.schema(Limits())
    async with client_for(capped_settings) as client:
        for max_tokens in asks:
            request = ChatRequest("seed", "small", "m", messages, "seed_cot", seed_schema, 0.0, max_tokens)
            await client.chat(request)
        too_little = ChatRequest("seed", "small", "m", messages * 6, "seed_cot", seed_schema, 0.0, 256)
        with pytest.raises(LLMRequestTooLarge):
            await client.chat(too_little)

    sent = [request.body["max_tokens"] for request in scripted_llm.requests]
    assert sent == [SMALL_CONTEXT - prompt, SMALL_CONTEXT - prompt, SMALL_CONTEXT - prompt - 1]


# --- the server's cap on every request --------------------------------------------------------


async def test_a_request_over_the_servers_cap_is_not_sent_and_one_under_it_is(
    settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    # `default` has no max_context_tokens: the server's cap alone bounds what it is sent.
    capped = settings.model_copy(update={"llm_max_request_tokens": 2_000})
    schema = SEED.schema(Limits())
    under = [{"role": "user", "content": "x" * 3_000}]  # about 1,000 tokens
    over = [{"role": "user", "content": "x" * 6_000}]  # about 2,000

    async with client_for(capped) as client:
        await client.chat(ChatRequest("seed", "default", "m", under, "seed_cot", schema, 0.0, 256))
        with pytest.raises(LLMRequestTooLarge) as refused:
            await client.chat(ChatRequest("seed", "default", "m", over, "seed_cot", schema, 0.0, 256))

    assert [request.body["messages"] for request in scripted_llm.requests] == [under]
    assert refused.value.summary == str(refused.value)
    assert str(refused.value).startswith("role 'seed' would send endpoint 'default' a request of about ")
    assert str(refused.value).endswith(
        " tokens with max_tokens, over the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS of 2,000; not sent"
    )


async def test_the_servers_cap_lowers_a_max_tokens_over_what_it_leaves_as_a_context_does(
    settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    capped = settings.model_copy(update={"llm_max_request_tokens": 2_000})
    messages, schema = [{"role": "user", "content": "x" * 3_000}], SEED.schema(Limits())
    prompt = request_tokens(messages, schema, 0)

    async with client_for(capped) as client:
        await client.chat(ChatRequest("seed", "default", "m", messages, "seed_cot", schema, 0.0, 4_096))

    assert [request.body["max_tokens"] for request in scripted_llm.requests] == [2_000 - prompt]


async def test_the_servers_cap_lowers_a_max_tokens_a_short_prompts_large_schema_leaves_too_little(
    settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    # The grader's schema alone is some 530 tokens: with a prompt of two characters and a
    # max_tokens of half the cap, the request is over it.
    capped = settings.model_copy(update={"llm_max_request_tokens": 1_000})
    messages, schema = [{"role": "user", "content": "Hi"}], GRADE.schema(Limits())
    prompt = request_tokens(messages, schema, 0)

    async with client_for(capped) as client:
        await client.chat(ChatRequest("grader", "default", "m", messages, "quality_scores", schema, 0.0, 498))

    assert [request.body["max_tokens"] for request in scripted_llm.requests] == [1_000 - prompt]


@pytest.mark.parametrize("cap", [300, 1_000, 2_000, 8_192, 1_000_000])
@pytest.mark.parametrize("context", [None, 900, 4_096])
def test_no_request_fitted_to_the_servers_cap_or_a_context_is_estimated_over_it(
    cap: int, context: int | None
) -> None:
    """Whatever the characters (1 to 4 bytes), the messages and the schema, a request that
    fitted() lets through is within the lesser limit by the full estimate."""
    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", max_context_tokens=context)
    limit = min(cap, context or cap)
    texts = ["", "Hi", "x" * 700, "é" * 300, "中" * 250, "😀" * 200]
    schemas = [spec.schema(Limits()) for spec in DECLARED]
    for text, count, schema, max_tokens in product(texts, (1, 3, 40), schemas, (64, 256, cap // 2, 4_000)):
        messages = [{"role": "user", "content": text}] * count
        request = ChatRequest("grader", "default", "m", messages, "s", schema, 0.0, max_tokens)
        try:
            sent = fitted(request, endpoint, cap)
        except LLMRequestTooLarge:
            continue
        assert request_tokens(sent.messages, sent.schema, sent.max_tokens) <= limit, (text[:3], count)


async def test_the_lesser_of_the_servers_cap_and_an_endpoints_context_bounds_its_requests(
    capped_settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    messages = [{"role": "user", "content": "x" * 9_000}]  # about 3,000 tokens: over both limits
    request = ChatRequest("seed", "tiny", "m", messages, "seed_cot", SEED.schema(Limits()), 0.0, 256)
    refusals = []
    for cap in (TINY_CONTEXT - 1, TINY_CONTEXT, TINY_CONTEXT + 1):
        async with client_for(capped_settings.model_copy(update={"llm_max_request_tokens": cap})) as client:
            with pytest.raises(LLMRequestTooLarge) as refused:
                await client.chat(request)
        refusals.append(str(refused.value).split(", over ")[1])

    assert refusals == [
        f"the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS of {TINY_CONTEXT - 1:,}; not sent",
        f"its max_context_tokens of {TINY_CONTEXT:,}; not sent",
        f"its max_context_tokens of {TINY_CONTEXT:,}; not sent",
    ]
    assert scripted_llm.requests == []


async def test_a_prompt_set_echoing_a_long_prompt_fails_its_item_unsent_and_the_job_goes_on(
    api: httpx.AsyncClient, settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    # A set stored before placeholder uses were capped, pinned by a job queued before then:
    # each request is its prompt 1,000 times over. No endpoint's context is known here, so
    # the server's default cap alone keeps the long prompt's request (some 20 MB) unsent.
    async with sessions.begin() as session:
        key, secret = await keys.create_key(session, "legacy", ())
        echoing = {**builtin().templates, "zero_shot.user": "$prompt\n" * 1_000}
        echo, _ = await prompt_sets.register(session, key.id, "echo", "", echoing, None)
    auth = {"Authorization": f"Bearer {secret}"}
    long_prompt = "How do I store soup safely? " * 700  # 19,600 characters
    job_id = await submit(api, auth, ["Hi", long_prompt], mode="zero_shot")
    async with sessions.begin() as session:
        await session.execute(update(Job).where(Job.id == UUID(job_id)).values(prompt_set_id=echo.id))

    await run_worker_burst(settings)

    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    items = (await api.get(f"/v1/jobs/{job_id}/items", headers=auth)).json()["data"]
    assert job["status"] == "completed"
    assert [(item["status"], item["error_code"]) for item in items] == [
        ("completed", None),
        ("failed", "request_too_large"),
    ]
    assert items[1]["error_message"].startswith("role 'zero-shot' would send endpoint 'default' a request")
    assert items[1]["error_message"].endswith(
        "over the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS of 1,000,000; not sent"
    )
    echoes = [request.body["messages"][1]["content"].count("Hi") for request in scripted_llm.requests]
    assert echoes == [1_000]  # the short prompt's request alone


async def test_a_job_is_refused_at_submission_where_the_servers_cap_would_leave_its_prompt_no_reply(
    settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    # `default` has no max_context_tokens. The zero-shot request, the default policies and all,
    # is some 3,000 tokens without its max_tokens of 4,096: under a cap of 2,000 its item could
    # only fail; under one of 4,000 it is sent, its max_tokens lowered to what the cap leaves.
    auth = await new_key(sessions)
    body = {"prompts": ["How do I store soup safely?"], "config": {"mode": "zero_shot", "max_tokens": 4_096}}
    too_low, lowering = (
        settings.model_copy(update={"llm_max_request_tokens": cap}) for cap in (2_000, 4_000)
    )

    async with api_client(too_low) as api:
        refused = await api.post("/v1/jobs", json=body, headers=auth)
    error = error_of(refused, 422, "request_too_large")
    [detail] = error["details"]
    assert (detail["role"], detail["endpoint"], detail["max_request_tokens"]) == (
        "zero-shot",
        "default",
        2_000,
    )
    assert error["message"].startswith(
        f"role 'zero-shot' may send endpoint 'default' requests of about {detail['estimated_tokens']:,} "
        "tokens with max_tokens, over the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS of 2,000: their prompt, "
        f"of about {detail['estimated_tokens'] - 4_096:,} tokens, leaves less than 64 for a reply;"
    )
    assert await job_count(sessions) == 0

    async with api_client(lowering) as api:
        accepted = await api.post("/v1/jobs", json=body, headers=auth)
        assert accepted.status_code == 202, accepted.text
        await run_worker_burst(lowering)
        items = (await api.get(f"/v1/jobs/{accepted.json()['id']}/items", headers=auth)).json()["data"]
    assert [item["status"] for item in items] == ["completed"]
    [sent] = scripted_llm.requests
    assert sent.body["max_tokens"] < 4_096 and sent_tokens(sent) <= 4_000


async def test_a_job_over_a_context_larger_than_the_servers_cap_runs_its_max_tokens_lowered_under_both(
    settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    # The zero-shot request is some 3,000 tokens without its max_tokens of 4,096, over a context
    # of 5,000 whole; the cap of 4,000, the lesser limit, lowers its max_tokens to what it leaves.
    auth = await new_key(sessions)
    body = {"prompts": ["How do I store soup safely?"], "config": {"mode": "zero_shot", "max_tokens": 4_096}}
    limited = settings.model_copy(update={"llm_max_request_tokens": 4_000, "llm_max_context_tokens": 5_000})

    async with api_client(limited) as api:
        accepted = await api.post("/v1/jobs", json=body, headers=auth)
        assert accepted.status_code == 202, accepted.text
        await run_worker_burst(limited)
        items = (await api.get(f"/v1/jobs/{accepted.json()['id']}/items", headers=auth)).json()["data"]
    assert [item["status"] for item in items] == ["completed"]
    [sent] = scripted_llm.requests
    assert sent.body["max_tokens"] < 4_096 and sent_tokens(sent) <= 4_000


@pytest.mark.parametrize("value", ["0", "-5", "lots", ""])
def test_a_cap_on_requests_that_is_not_a_positive_count_stops_the_server_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("AIDSAFE_LLM_MAX_REQUEST_TOKENS", value)

    with pytest.raises(ValidationError, match="llm_max_request_tokens"):
        Settings()


async def test_a_comparison_whose_judge_cannot_fit_is_refused(
    capped_api: httpx.AsyncClient, capped_settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    auth = await new_key(sessions)
    job_ids = []
    for config in ({"mode": "zero_shot"}, {"agents": 1, "max_rounds": 1}):
        response = await capped_api.post("/v1/jobs", json={"prompts": ["Hi"], "config": config}, headers=auth)
        job_ids.append(response.json()["id"])
    await run_worker_burst(capped_settings)
    scripted_llm.reset()

    response = await capped_api.post(
        "/v1/comparisons",
        json={"baseline_job_id": job_ids[0], "candidate_job_id": job_ids[1], "judge": {"endpoint": "tiny"}},
        headers=auth,
    )

    error = error_of(response, 422, "request_too_large")
    assert [d["role"] for d in error["details"]] == ["judge"]
    assert await job_count(sessions) == 2
    assert scripted_llm.requests == []


async def test_a_comparison_whose_judge_fits_is_accepted(
    capped_api: httpx.AsyncClient, capped_settings: Settings, sessions: Sessions
) -> None:
    auth = await new_key(sessions)
    job_ids = []
    for config in ({"mode": "zero_shot", "max_tokens": 256}, {**FITTING, "defaults": {}}):
        response = await capped_api.post("/v1/jobs", json={"prompts": ["Hi"], "config": config}, headers=auth)
        job_ids.append(response.json()["id"])
    await run_worker_burst(capped_settings)

    response = await capped_api.post(
        "/v1/comparisons",
        json={"baseline_job_id": job_ids[0], "candidate_job_id": job_ids[1], "judge": {"endpoint": "small"}},
        headers=auth,
    )

    assert response.status_code == 202, response.text


async def test_a_comparisons_judge_reading_cots_never_refined_is_accepted_only_where_they_fit(
    settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    """A judge reads each job's CoT: with `refine: false` every thought of the seed and of each
    turn, at the labels of the job's limits, as for its grader. Counted as one reply at the
    default limits, a judge's endpoint at the edge of the estimate had its request refused."""
    auth, max_tokens, thoughts = await new_key(sessions), 256, 8
    config = {
        "agents": 1,
        "max_rounds": 2,
        "refine": False,
        "decompose_intents": False,
        "max_tokens": max_tokens,
        "limits": {"thoughts_per_turn": thoughts},
    }
    for _ in range(2):  # the two jobs compared
        script_full_length_cots(scripted_llm, max_tokens, thoughts, turns=2)
    wide = {"default": EndpointConfig(base_url=scripted_llm.base_url)}

    def judged_on(context: int) -> Settings:
        judging = EndpointConfig(base_url=scripted_llm.base_url, max_context_tokens=context)
        return settings.model_copy(update={"llm_endpoints": {**wide, "judging": judging}})

    async with api_client(judged_on(TINY_CONTEXT)) as api:
        job_ids = []
        for _ in range(2):
            response = await api.post("/v1/jobs", json={"prompts": ["Soup?"], "config": config}, headers=auth)
            job_ids.append(response.json()["id"])
        await run_worker_burst(judged_on(TINY_CONTEXT))
        body = {
            "baseline_job_id": job_ids[0],
            "candidate_job_id": job_ids[1],
            "judge": {"endpoint": "judging"},
        }
        [estimate] = error_of(
            await api.post("/v1/comparisons", json=body, headers=auth), 422, "request_too_large"
        )["details"]
    at_the_edge = judged_on(estimate["estimated_tokens"])
    scripted_llm.reset()

    items = await items_run_at(at_the_edge, "/v1/comparisons", body, auth)

    assert [item["status"] for item in items] == ["completed"]
    judged = scripted_llm.requests
    assert [request.schema_name for request in judged] == ["pairwise_judgement"] * 2
    assert [request.body["max_tokens"] for request in judged] == [settings.default_max_tokens] * 2
    assert max(sent_tokens(request) for request in judged) <= estimate["estimated_tokens"]


def test_the_default_endpoints_context_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIDSAFE_LLM_MAX_CONTEXT_TOKENS", "8192")
    monkeypatch.setenv(
        "AIDSAFE_LLM_ENDPOINTS", '{"big": {"base_url": "http://gpu/v1", "max_context_tokens": 131072}}'
    )

    endpoints = Settings().endpoints()

    assert endpoints["default"].max_context_tokens == 8192
    assert endpoints["big"].max_context_tokens == 131072
    assert (
        Settings(llm_endpoints={"x": EndpointConfig(base_url="http://x/v1")})
        .endpoints()["x"]
        .max_context_tokens
        is None
    )


# --- sample evaluations against an endpoint's context ---------------------------------------


async def test_a_sample_too_long_for_the_graders_context_is_refused_and_nothing_stored(
    capped_api: httpx.AsyncClient, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    auth = await new_key(sessions)
    short = {"prompt": "How do I store soup?", "response": "Cool it fast, then refrigerate."}
    long = {"prompt": "How do I store soup?", "response": "Cool it fast. " * 1_500}  # ~7,000 tokens
    body = {"grade": {"endpoint": "small"}, "guard": {"endpoint": "small", "style": "llama_guard"}}

    refused = await capped_api.post(
        "/v1/sample-evaluations", json={**body, "samples": [short, long, short]}, headers=auth
    )
    fitting = await capped_api.post(
        "/v1/sample-evaluations", json={**body, "samples": [short, short]}, headers=auth
    )

    error = error_of(refused, 422, "request_too_large")
    assert {d["role"] for d in error["details"]} == {"grader", "guard"}
    assert all(d["estimated_tokens"] > SMALL_CONTEXT for d in error["details"])
    assert fitting.status_code == 202, fitting.text
    assert await job_count(sessions) == 1
    assert scripted_llm.requests == []


@pytest.mark.parametrize(("other_response", "status"), [("Cool it fast. " * 1_500, 422), ("Chill it.", 202)])
async def test_a_judge_is_refused_at_submission_if_the_other_sets_sample_would_not_fit(
    capped_api: httpx.AsyncClient,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    other_response: str,
    status: int,
) -> None:
    """The other set's sample of a prompt is known at submission: counted as one reply of
    max_tokens instead, one of ~7,000 tokens was accepted and its item failed unsent."""
    auth = await new_key(sessions)
    prompt = "How do I store soup?"
    other = await capped_api.post(
        "/v1/sample-evaluations",
        json={"samples": [{"prompt": prompt, "response": other_response}], "grade": {}},
        headers=auth,
    )
    assert other.status_code == 202, other.text
    body = {
        "samples": [{"prompt": prompt, "response": "Cool it, then refrigerate."}],
        "judge": {"job_id": other.json()["id"], "judge": {"endpoint": "small"}},
    }

    response = await capped_api.post("/v1/sample-evaluations", json=body, headers=auth)

    assert response.status_code == status, response.text
    if status == 422:
        error = error_of(response, 422, "request_too_large")
        [detail] = error["details"]
        assert (detail["role"], detail["endpoint"]) == ("judge", "small")
        assert detail["estimated_tokens"] > SMALL_CONTEXT == detail["max_context_tokens"]
        assert await job_count(sessions) == 1
    assert scripted_llm.requests == []
