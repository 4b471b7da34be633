"""The /v1 HTTP API as a client sees it: the real app on real Postgres and Redis, with
arq's real worker in burst mode against the scripted LLM where results are needed."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.routing import iter_route_contexts
from redis.asyncio import Redis
from sqlalchemy import func, select, text
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE

from app.api.state import ApiState
from app.config import Settings
from app.errors import ServiceError
from app.main import create_app
from app.queue import arq_job_id
from app.server import uvicorn_options
from app.store import policy_sets
from app.store.db import Sessions
from app.store.models import Item, Job, TurnRow
from tests.conftest import (
    ROOT,
    api_client,
    checkouts,
    eventually,
    least_loop_pause,
    run_worker_burst,
    statements_sent,
)
from tests.scripted_llm import ScriptedLLM

Headers = dict[str, str]
HEX = re.compile(r"[0-9a-f]+")
KITCHEN_POLICIES = [
    {
        "id": "kitchen-safety",
        "title": "Kitchen safety",
        "scope": "Cooking, knives, hot surfaces.",
        "allowed": ["recipes", "knife skills"],
        "not_allowed": ["poisoning someone"],
    }
]
KITCHEN_POLICIES_V2 = [{**KITCHEN_POLICIES[0], "allowed": ["recipes", "knife skills", "food storage"]}]
V1_PATHS = {
    "/v1/jobs": {"get", "post"},
    "/v1/jobs/estimate": {"post"},
    "/v1/jobs/{job_id}": {"get", "delete", "patch"},
    "/v1/jobs/{job_id}/cancel": {"post"},
    "/v1/jobs/{job_id}/items": {"get"},
    "/v1/jobs/{job_id}/cots": {"get"},
    "/v1/items/{item_id}": {"get"},
    "/v1/jobs/{job_id}/preference-pairs": {"get"},
    "/v1/jobs/{job_id}/report": {"get"},
    "/v1/jobs/{job_id}/callbacks": {"get"},
    "/v1/jobs/{job_id}/events": {"get"},
    "/v1/jobs/{job_id}/export": {"get"},
    "/v1/comparisons": {"get", "post"},
    "/v1/comparisons/{comparison_id}": {"get"},
    "/v1/comparisons/{comparison_id}/report": {"get"},
    "/v1/comparisons/{comparison_id}/plots/{plot}.png": {"get"},
    "/v1/sample-evaluations": {"post"},
    "/v1/sample-evaluations/upload": {"post"},
    "/v1/sample-evaluations/{job_id}": {"get"},
    "/v1/sample-evaluations/{job_id}/samples": {"get"},
    "/v1/sample-evaluations/{job_id}/samples/{item_id}": {"get"},
    "/v1/model-evaluations": {"post"},
    "/v1/model-evaluations/{evaluation_id}": {"get"},
    "/v1/policy-sets": {"get", "post"},
    "/v1/policy-sets/{policy_set_id}": {"get"},
    "/v1/prompt-sets": {"get", "post"},
    "/v1/prompt-sets/{prompt_set_id}": {"get"},
    "/v1/presets": {"get"},
    "/v1/presets/{preset_name}": {"get"},
    "/v1/jobs/{job_id}/label-studio/config": {"get"},
    "/v1/jobs/{job_id}/annotations/label-studio": {"post"},
    "/v1/jobs/{job_id}/argilla/settings": {"get"},
    "/v1/jobs/{job_id}/annotations/argilla": {"post"},
    "/v1/jobs/{job_id}/reviews/summary": {"get"},
    "/v1/items/{item_id}/reviews": {"get"},
    "/v1/webhooks": {"get", "post"},
    "/v1/webhooks/{webhook_id}": {"delete"},
    "/v1/webhooks/{webhook_id}/revoke": {"post"},
    "/v1/webhooks/{webhook_id}/rejections": {"get"},
    "/v1/webhooks/label-studio/{webhook_id}": {"post"},
    "/v1/deletions": {"get"},
}
# Label Studio calls its webhook with the webhook's own secret, not an API key (test_webhooks.py).
SECRET_AUTHENTICATED = {"/v1/webhooks/label-studio/{webhook_id}"}


# --- helpers ------------------------------------------------------------------------------


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert the one error shape, {"error": {"code", "message", "details"}}, and return it."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    error: dict[str, Any] = body["error"]
    return error


async def submit(api: httpx.AsyncClient, auth: Headers, prompts: list[str], **fields: Any) -> dict[str, Any]:
    response = await api.post("/v1/jobs", json={"prompts": prompts, **fields}, headers=auth)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def all_pages(
    api: httpx.AsyncClient, auth: Headers, url: str, limit: int, **filters: Any
) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following next_cursor until it is null. (Filters go in
    `filters`: httpx drops a query string in `url` when it is given params.)"""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {**filters, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await api.get(url, params=params, headers=auth)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "next_cursor never ends"


async def items_of(api: httpx.AsyncClient, auth: Headers, job_id: str, **params: Any) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/jobs/{job_id}/items", params={"limit": 500, **params}, headers=auth)
    assert response.status_code == 200, response.text
    page: list[dict[str, Any]] = response.json()["data"]
    return page


async def register(
    api: httpx.AsyncClient, auth: Headers, policies: list[dict[str, Any]], name: str = "kitchen"
) -> httpx.Response:
    return await api.post("/v1/policy-sets", json={"name": name, "policies": policies}, headers=auth)


async def row_counts(sessions: Sessions) -> tuple[int, int]:
    async with sessions() as session:
        jobs_ = await session.scalar(select(func.count()).select_from(Job))
        items_ = await session.scalar(select(func.count()).select_from(Item))
    return jobs_ or 0, items_ or 0


# --- errors and validation ----------------------------------------------------------------

INVALID_JOBS = {
    "empty prompts": ({"prompts": []}, "validation_error"),
    "prompts and items": ({"prompts": ["a"], "items": [{"prompt": "b"}]}, "validation_error"),
    "neither prompts nor items": ({}, "validation_error"),
    "10,001 prompts": ({"prompts": ["p"] * 10_001}, "validation_error"),
    "prompt over 20,000 chars": ({"prompts": ["x" * 20_001]}, "validation_error"),
    "item prompt over 20,000 chars": ({"items": [{"prompt": "x" * 20_001}]}, "validation_error"),
    "blank prompt": ({"prompts": ["   "]}, "validation_error"),
    "unknown field": ({"prompts": ["a"], "priority": "high"}, "validation_error"),
    "unknown endpoint": (
        {"prompts": ["a"], "config": {"refiner": {"endpoint": "nowhere"}}},
        "invalid_config",
    ),
    "unknown default endpoint": (
        {"prompts": ["a"], "config": {"defaults": {"endpoint": "nowhere"}}},
        "invalid_config",
    ),
    "deliberators != agents": (
        {"prompts": ["a"], "config": {"agents": 3, "deliberators": [{}, {}]}},
        "invalid_config",
    ),
    "unknown policy set": ({"prompts": ["a"], "policy_set": {"name": "no-such-set"}}, "unknown_policy_set"),
    "unknown policy set version": (
        {"prompts": ["a"], "policy_set": {"name": "aidsafe-default", "version": "0123456789abcdef"}},
        "unknown_policy_set",
    ),
}


@pytest.mark.parametrize(("body", "code"), INVALID_JOBS.values(), ids=INVALID_JOBS.keys())
async def test_invalid_job_is_rejected_with_422_and_the_error_shape(
    api: httpx.AsyncClient, auth: Headers, body: dict[str, Any], code: str
) -> None:
    error_of(await api.post("/v1/jobs", json=body, headers=auth), 422, code)


async def test_rejected_jobs_write_and_enqueue_nothing(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, redis: Redis, settings: Settings
) -> None:
    for body, _ in INVALID_JOBS.values():
        assert (await api.post("/v1/jobs", json=body, headers=auth)).status_code == 422

    assert await row_counts(sessions) == (0, 0)
    assert await redis.zcard(settings.queue_name) == 0


async def test_validation_error_details_name_the_field(api: httpx.AsyncClient, auth: Headers) -> None:
    error = error_of(
        await api.post("/v1/jobs", json={"prompts": ["a"], "priority": 1}, headers=auth),
        422,
        "validation_error",
    )

    assert {"field": "priority", "problem": "Extra inputs are not permitted"} in error["details"]


async def test_malformed_json_body_is_a_bad_request(api: httpx.AsyncClient, auth: Headers) -> None:
    response = await api.post(
        "/v1/jobs", content=b'{"prompts": ["a"', headers={**auth, "Content-Type": "application/json"}
    )

    error_of(response, 400, "bad_request")


async def test_invalid_policy_set_body_is_a_validation_error(api: httpx.AsyncClient, auth: Headers) -> None:
    bad_id = [{**KITCHEN_POLICIES[0], "id": "Not A Slug"}]

    error_of(await register(api, auth, bad_id), 422, "validation_error")


async def test_too_long_idempotency_key_is_a_validation_error(api: httpx.AsyncClient, auth: Headers) -> None:
    response = await api.post(
        "/v1/jobs", json={"prompts": ["a"]}, headers={**auth, "Idempotency-Key": "k" * 201}
    )

    error_of(response, 422, "validation_error")


async def test_malformed_uuid_in_path_is_a_validation_error(api: httpx.AsyncClient, auth: Headers) -> None:
    for path in ["/v1/jobs/not-a-uuid", "/v1/jobs/not-a-uuid/items", "/v1/items/42", "/v1/policy-sets/nope"]:
        error_of(await api.get(path, headers=auth), 422, "validation_error")


async def test_bad_listing_parameters_are_validation_errors(api: httpx.AsyncClient, auth: Headers) -> None:
    job = await submit(api, auth, ["a"])

    bad_params: list[dict[str, str | int]] = [{"limit": 0}, {"limit": 501}, {"status": "done"}]
    for params in bad_params:
        response = await api.get(f"/v1/jobs/{job['id']}/items", params=params, headers=auth)
        error_of(response, 422, "validation_error")


FOREIGN_CURSORS = [
    "not a cursor!",
    base64.urlsafe_b64encode(b"x:3").decode(),
    base64.urlsafe_b64encode(b"p:three").decode(),
]


@pytest.mark.parametrize("listing", ["items", "cots"])
async def test_cursor_the_api_did_not_issue_is_rejected(
    api: httpx.AsyncClient, auth: Headers, listing: str
) -> None:
    job = await submit(api, auth, ["a"])

    for cursor in FOREIGN_CURSORS:
        response = await api.get(f"/v1/jobs/{job['id']}/{listing}", params={"cursor": cursor}, headers=auth)
        error_of(response, 400, "invalid_cursor")


async def test_a_well_formed_cursor_the_api_never_issued_is_rejected(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])
    made_up = base64.urlsafe_b64encode(b"p:0").decode().rstrip("=")
    random_row = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")

    for cursor in (made_up, random_row):
        response = await api.get(f"/v1/jobs/{job['id']}/items", params={"cursor": cursor}, headers=auth)
        error_of(response, 400, "invalid_cursor")


async def test_a_cursor_is_good_only_for_the_job_and_listing_that_issued_it(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    job, another = await submit(api, auth, ["a", "b"]), await submit(api, auth, ["a", "b"])
    page = await api.get(f"/v1/jobs/{job['id']}/items", params={"limit": 1}, headers=auth)
    cursor = page.json()["next_cursor"]

    for path in (f"/v1/jobs/{another['id']}/items", f"/v1/jobs/{job['id']}/cots"):
        error_of(await api.get(path, params={"cursor": cursor}, headers=auth), 400, "invalid_cursor")
    rest = await api.get(f"/v1/jobs/{job['id']}/items", params={"cursor": cursor}, headers=auth)
    assert [item["prompt"] for item in rest.json()["data"]] == ["b"]


async def test_request_without_a_valid_key_is_unauthorized(api: httpx.AsyncClient) -> None:
    missing: dict[str, str] = {}
    wrong, not_bearer = {"Authorization": "Bearer aidsafe_nope"}, {"Authorization": "Basic dTpw"}

    for headers in (missing, wrong, not_bearer):
        response = await api.post("/v1/jobs", json={"prompts": ["a"]}, headers=headers)
        error_of(response, 401, "unauthorized")


async def test_every_v1_operation_requires_a_key(api: httpx.AsyncClient) -> None:
    some_id = uuid.uuid4()
    for path, methods in V1_PATHS.items():
        if path in SECRET_AUTHENTICATED:
            continue
        url = path.format(
            job_id=some_id,
            item_id=some_id,
            policy_set_id=some_id,
            prompt_set_id=some_id,
            comparison_id=some_id,
            evaluation_id=some_id,
            webhook_id=some_id,
            preset_name="paper",
            plot="scores",
        )
        for method in methods:
            error_of(await api.request(method, url, json={}), 401, "unauthorized")


async def test_cursor_beyond_any_position_is_rejected(api: httpx.AsyncClient, auth: Headers) -> None:
    job = await submit(api, auth, ["a"])
    cursor = base64.urlsafe_b64encode(b"p:99999999999999999999").decode()

    response = await api.get(f"/v1/jobs/{job['id']}/items", params={"cursor": cursor}, headers=auth)

    error_of(response, 400, "invalid_cursor")


async def test_prompt_with_a_nul_character_is_a_validation_error(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    error_of(
        await api.post("/v1/jobs", json={"prompts": ["a\u0000b"]}, headers=auth), 422, "validation_error"
    )


@pytest.mark.parametrize(
    "body",
    [
        '{"items": [{"prompt": "a", "metadata": {"score": NaN}}]}',
        '{"items": [{"prompt": "a", "metadata": {"score": Infinity}}]}',
        '{"prompts": ["lone surrogate \\ud800 here"]}',
        '{"items": [{"prompt": "   "}]}',
    ],
    ids=["nan", "infinity", "lone-surrogate", "blank-item-prompt"],
)
async def test_input_postgres_cannot_store_is_a_validation_error(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, body: str
) -> None:
    headers = {**auth, "Content-Type": "application/json"}

    error_of(await api.post("/v1/jobs", content=body, headers=headers), 422, "validation_error")
    assert await row_counts(sessions) == (0, 0)


async def test_body_over_the_size_limit_is_refused_with_413(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    prompt = "x" * 15_000
    count = settings.max_request_bytes // len(prompt) + 10
    body = json.dumps({"prompts": [prompt] * count}).encode()

    error_of(await api.post("/v1/jobs", content=body, headers=auth), 413, "payload_too_large")


async def test_chunked_body_over_the_size_limit_is_refused_with_413(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompts": ["'
        for _ in range(settings.max_request_bytes // 1_000_000 + 1):
            yield b"x" * 1_000_000
        yield b'"]}'

    response = await api.post(
        "/v1/jobs", content=chunks(), headers={**auth, "Content-Type": "application/json"}
    )
    error_of(response, 413, "payload_too_large")


async def test_chunked_body_under_the_limit_is_accepted(api: httpx.AsyncClient, auth: Headers) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompts": '
        yield b'["How do tides work?"]}'

    response = await api.post(
        "/v1/jobs", content=chunks(), headers={**auth, "Content-Type": "application/json"}
    )
    assert response.status_code == 202, response.text


async def test_a_body_of_exactly_the_size_limit_is_read_with_its_length_declared_or_not(
    settings: Settings, auth: Headers
) -> None:
    """The limit is the largest size read: a body of that many bytes goes through whether its
    length is declared or counted as it comes, and one byte more is refused either way."""
    cap = 1_000
    json_auth = {**auth, "Content-Type": "application/json"}
    async with api_client(settings.model_copy(update={"max_request_bytes": cap})) as api:
        for size, status in ((cap, 201), (cap + 1, 413)):
            body = b'{"name": "ls"' + b" " * (size - len(b'{"name": "ls"}')) + b"}"

            async def undeclared(body: bytes = body) -> AsyncIterator[bytes]:  # sent chunked
                yield body

            for content in (body, undeclared()):
                response = await api.post("/v1/webhooks", content=content, headers=json_auth)

                assert response.status_code == status, (size, response.text)


async def test_a_chunked_body_is_capped_for_a_route_that_reads_it_without_a_cap_of_its_own(
    settings: Settings,
) -> None:
    """Each of the service's routes reads its body capped (bodies.read_capped), so only this
    test shows the middleware's count: the cap for any route that reads the body whole, as
    FastAPI's own body parameters do."""
    cap = 1_000
    app = create_app(settings.model_copy(update={"max_request_bytes": cap}))

    async def body_size(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    app.add_api_route("/body-size", body_size, methods=["POST"])

    async def chunks(size: int) -> AsyncIterator[bytes]:  # two: the cap is on their sum
        yield b"x" * (size // 2)
        yield b"x" * (size - size // 2)

    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as api,
    ):
        read = await api.post("/body-size", content=chunks(cap))
        refused = await api.post("/body-size", content=chunks(cap + 1))

    assert read.json() == {"size": cap}
    error_of(refused, 413, "payload_too_large")


async def test_the_lifespan_messages_pass_through_every_middleware(settings: Settings) -> None:
    """The tests' clients enter the lifespan directly, and uvicorn's default takes a lifespan
    whose messages fail for an app without one and serves anyway: a middleware that broke them
    would go unseen."""
    incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await create_app(settings)({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    assert [message["type"] for message in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


def refuses_its_setting(app: ASGIApp) -> ASGIApp:
    """A middleware given a bad setting: Starlette builds the middleware at the app's first
    call, the lifespan's, before the app's router could report the failure."""
    raise ValueError("not a setting this middleware takes")


async def test_the_api_exits_rather_than_serve_when_its_start_fails_outside_its_lifespan(
    settings: Settings,
) -> None:
    """uvicorn's default took such a failure for an app without a lifespan and served every
    request a 500; with the API's options (those of `aidsafe-api`) it exits, as on any other
    failed start."""
    app = create_app(settings)
    app.add_middleware(refuses_its_setting)
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="critical", **uvicorn_options(settings)))

    with pytest.raises(SystemExit) as exited:
        async with asyncio.timeout(10):
            await server.serve()

    assert exited.value.code == STARTUP_FAILURE
    assert not server.started


async def test_unknown_config_field_is_a_validation_error(api: httpx.AsyncClient, auth: Headers) -> None:
    body = {"prompts": ["a"], "config": {"agentz": 5}}

    error_of(await api.post("/v1/jobs", json=body, headers=auth), 422, "validation_error")


async def test_unknown_route_is_not_found_in_the_error_shape(api: httpx.AsyncClient, auth: Headers) -> None:
    error_of(await api.get("/v1/nothing-here", headers=auth), 404, "not_found")


async def test_wrong_method_is_reported_in_the_error_shape(api: httpx.AsyncClient, auth: Headers) -> None:
    error_of(await api.delete("/v1/jobs", headers=auth), 405, "method_not_allowed")


async def test_wrong_method_answer_names_the_allowed_methods(api: httpx.AsyncClient, auth: Headers) -> None:
    response = await api.delete(f"/v1/jobs/{uuid.uuid4()}/cancel", headers=auth)

    error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


async def test_wrong_method_answer_names_the_methods_of_every_route_on_the_path(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """Starlette named those of the first route matching the path only."""
    job = await api.put(f"/v1/jobs/{uuid.uuid4()}", headers=auth)
    jobs = await api.options("/v1/jobs", headers=auth)

    error_of(job, 405, "method_not_allowed")
    assert job.headers["allow"] == "DELETE, GET, PATCH"
    error_of(jobs, 405, "method_not_allowed")
    assert jobs.headers["allow"] == "GET, POST"


# --- submitting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "first"),
    [({}, "intent"), ({"mode": "zero_shot"}, "zero_shot"), ({"decompose_intents": False}, "seed")],
)
async def test_queued_items_show_the_stage_they_run_first(
    api: httpx.AsyncClient, auth: Headers, config: dict[str, Any], first: str
) -> None:
    """Progress counts items by stage: a zero-shot job's, or one that decomposes no intents,
    never show the intent stage they do not run."""
    response = await api.post("/v1/jobs", json={"prompts": ["a", "b"], "config": config}, headers=auth)

    assert response.json()["counts"]["by_stage"] == {first: {"queued": 2}}, response.text


async def test_submitted_job_is_accepted_as_queued(api: httpx.AsyncClient, auth: Headers) -> None:
    response = await api.post("/v1/jobs", json={"prompts": ["a", "b", "c"]}, headers=auth)

    assert response.status_code == 202, response.text
    job = response.json()
    assert uuid.UUID(job["id"])
    assert job["status"] == "queued"
    assert job["counts"] == {"total": 3, "by_status": {"queued": 3}, "by_stage": {"intent": {"queued": 3}}}
    assert job["usage"] == {
        "llm_calls": 0,
        "prompt_tokens": 0,
        "cached_prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": None,  # the default endpoint has no prices here
    }
    assert job["cancelled_at"] is None


async def test_submitted_job_names_the_default_policy_set_version(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    job = await submit(api, auth, ["a"])

    assert job["policy_set"]["name"] == "aidsafe-default"
    assert HEX.fullmatch(job["policy_set"]["version"])
    listed = (await api.get("/v1/policy-sets", headers=auth)).json()
    assert job["policy_set"]["id"] in {p["id"] for p in listed}


async def test_a_job_without_a_version_pins_the_policy_set_this_process_ships_not_a_newer_releases(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """In a rolling upgrade (or after a rollback) a newer release's default policies are the
    newest built-in row, stored beside this process's; its jobs get the policies it ships."""
    async with sessions.begin() as session:
        shipped = await policy_sets.ensure_default(session)  # this process's row, stored first
    async with sessions.begin() as session:  # as a newer release registers its default policies
        newer, _ = await policy_sets.register(session, None, "aidsafe-default", "", KITCHEN_POLICIES, None)

    job = await submit(api, auth, ["a"])

    assert (job["policy_set"]["id"], job["policy_set"]["version"]) == (str(shipped.id), shipped.version)
    assert shipped.version != newer.version


async def test_listing_policy_sets_holds_the_event_loop_briefly(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """Each listing made sure of the default set by parsing its YAML file on the event loop,
    which held every other request for 11 ms of CPU; parsed once a process, 3 ms."""
    assert (await api.get("/v1/policy-sets", headers=auth)).status_code == 200

    response, held = await least_loop_pause(lambda: api.get("/v1/policy-sets", headers=auth))

    assert response.status_code == 200, response.text
    assert [p["name"] for p in response.json()] == ["aidsafe-default"]
    # The least of three requests: CI's load inflates one's loop CPU by half again or more.
    assert held < 0.008, f"the event loop was held for {held:.3f} s of CPU"


async def test_job_config_is_resolved_from_server_defaults(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["a"])

    default_role = {
        "endpoint": "default",
        "model": "scripted-model",
        "temperature": settings.default_temperature,
        "instructions": "",
    }
    assert job["config"] == {
        "mode": "aidsafe",
        "max_rounds": settings.default_max_rounds,
        "max_tokens": settings.default_max_tokens,
        "max_reasks": settings.max_reasks,
        "roles": {
            "intent": default_role,
            "seed": default_role,
            "deliberators": [default_role] * settings.default_agents,
            "refiner": default_role,
        },
        "grading": None,
        "pairs": None,
        "max_turns": None,
        "decompose_intents": True,
        "refine": True,
        "limits": {"thoughts_per_turn": 6, "kept_thoughts": 12, "max_drops": 24},
    }


async def test_job_config_fills_each_role_from_job_defaults_then_server_defaults(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    config = {
        "agents": 3,
        "max_rounds": 2,
        "defaults": {"temperature": 0.2, "instructions": "Be brief."},
        "refiner": {"endpoint": "second", "instructions": "Keep every policy name."},
        "seed": {"model": "seed-model", "temperature": 0.0},
    }

    roles = (await submit(api, auth, ["a"], config=config))["config"]["roles"]

    brief = "Be brief."
    assert roles["intent"] == {
        "endpoint": "default",
        "model": "scripted-model",
        "temperature": 0.2,
        "instructions": brief,
    }
    assert roles["seed"] == {
        "endpoint": "default",
        "model": "seed-model",
        "temperature": 0.0,
        "instructions": brief,
    }
    assert roles["refiner"] == {
        "endpoint": "second",
        "model": "second-model",
        "temperature": 0.2,
        "instructions": "Keep every policy name.",
    }
    assert len(roles["deliberators"]) == 3


async def test_submitted_items_keep_prompt_order_and_metadata(api: httpx.AsyncClient, auth: Headers) -> None:
    items = [{"prompt": "first", "metadata": {"source": "s1"}}, {"prompt": "second"}]
    response = await api.post("/v1/jobs", json={"items": items}, headers=auth)
    assert response.status_code == 202, response.text

    stored = await items_of(api, auth, response.json()["id"])

    assert [(i["position"], i["prompt"], i["metadata"]) for i in stored] == [
        (0, "first", {"source": "s1"}),
        (1, "second", {}),
    ]


async def test_submitting_enqueues_one_arq_job_per_item(
    api: httpx.AsyncClient, auth: Headers, redis: Redis, settings: Settings
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])

    item_ids = [i["id"] for i in await items_of(api, auth, job["id"])]
    queued = {member.decode() for member in await redis.zrange(settings.queue_name, 0, -1)}
    assert queued == {arq_job_id(uuid.UUID(item_id), 1) for item_id in item_ids}


# --- idempotency --------------------------------------------------------------------------


async def test_same_idempotency_key_and_body_replays_the_first_job(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, redis: Redis, settings: Settings
) -> None:
    headers = {**auth, "Idempotency-Key": "batch-1"}
    first = await api.post("/v1/jobs", json={"prompts": ["a", "b"]}, headers=headers)
    assert first.status_code == 202, first.text

    again = await api.post("/v1/jobs", json={"prompts": ["a", "b"]}, headers=headers)

    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert await row_counts(sessions) == (1, 2)
    assert await redis.zcard(settings.queue_name) == 2


async def test_same_idempotency_key_with_another_body_is_a_conflict(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    headers = {**auth, "Idempotency-Key": "batch-1"}
    assert (await api.post("/v1/jobs", json={"prompts": ["a"]}, headers=headers)).status_code == 202

    response = await api.post("/v1/jobs", json={"prompts": ["b"]}, headers=headers)

    error_of(response, 409, "idempotency_conflict")
    assert await row_counts(sessions) == (1, 1)


async def test_an_empty_idempotency_key_is_refused_not_used_as_a_key(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    response = await api.post("/v1/jobs", json={"prompts": ["a"]}, headers={**auth, "Idempotency-Key": ""})

    error_of(response, 422, "validation_error")
    assert await row_counts(sessions) == (0, 0)


async def test_idempotency_keys_are_scoped_to_the_api_key(
    api: httpx.AsyncClient, auth: Headers, other: Headers
) -> None:
    body = {"prompts": ["a"]}
    mine = await api.post("/v1/jobs", json=body, headers={**auth, "Idempotency-Key": "shared"})
    theirs = await api.post("/v1/jobs", json=body, headers={**other, "Idempotency-Key": "shared"})

    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.json()["id"] != theirs.json()["id"]


async def test_concurrent_posts_with_one_idempotency_key_make_one_job(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    headers = {**auth, "Idempotency-Key": "raced"}

    responses = await asyncio.gather(
        *(api.post("/v1/jobs", json={"prompts": ["a", "b"]}, headers=headers) for _ in range(2))
    )

    assert sorted(r.status_code for r in responses) == [200, 202], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await row_counts(sessions) == (1, 2)


# --- one key cannot see another's data ----------------------------------------------------

OWNED_RESOURCES = {
    "job": ("GET", "/v1/jobs/{job}"),
    "items": ("GET", "/v1/jobs/{job}/items"),
    "cots": ("GET", "/v1/jobs/{job}/cots"),
    "cancel": ("POST", "/v1/jobs/{job}/cancel"),
    "item detail": ("GET", "/v1/items/{item}"),
    "custom policy set": ("GET", "/v1/policy-sets/{policy_set}"),
}


@pytest.mark.parametrize(("method", "template"), OWNED_RESOURCES.values(), ids=OWNED_RESOURCES.keys())
async def test_another_keys_resources_are_not_found(
    api: httpx.AsyncClient, auth: Headers, other: Headers, method: str, template: str
) -> None:
    job = await submit(api, auth, ["a"])
    item = (await items_of(api, auth, job["id"]))[0]
    policy_set = (await register(api, auth, KITCHEN_POLICIES)).json()
    path = template.format(job=job["id"], item=item["id"], policy_set=policy_set["id"])

    error_of(await api.request(method, path, headers=other), 404, "not_found")
    assert (await api.request(method, path, headers=auth)).status_code == 200


async def test_another_key_cannot_cancel_a_job(api: httpx.AsyncClient, auth: Headers, other: Headers) -> None:
    job = await submit(api, auth, ["a"])

    await api.post(f"/v1/jobs/{job['id']}/cancel", headers=other)

    assert (await api.get(f"/v1/jobs/{job['id']}", headers=auth)).json()["status"] == "queued"


async def test_custom_policy_set_is_listed_only_for_its_key(
    api: httpx.AsyncClient, auth: Headers, other: Headers
) -> None:
    await register(api, auth, KITCHEN_POLICIES)

    mine = (await api.get("/v1/policy-sets", headers=auth)).json()
    theirs = (await api.get("/v1/policy-sets", headers=other)).json()

    assert "kitchen" in {p["name"] for p in mine}
    assert "kitchen" not in {p["name"] for p in theirs}


async def test_builtin_default_policy_set_is_listed_for_every_key(
    api: httpx.AsyncClient, auth: Headers, other: Headers
) -> None:
    for headers in (auth, other):
        listed = (await api.get("/v1/policy-sets", headers=headers)).json()
        assert [(p["name"], p["builtin"]) for p in listed] == [("aidsafe-default", True)]


async def test_another_keys_policy_set_cannot_be_used_by_name(
    api: httpx.AsyncClient, auth: Headers, other: Headers
) -> None:
    await register(api, auth, KITCHEN_POLICIES)

    response = await api.post(
        "/v1/jobs", json={"prompts": ["a"], "policy_set": {"name": "kitchen"}}, headers=other
    )

    error_of(response, 422, "unknown_policy_set")


# --- pagination ---------------------------------------------------------------------------


async def test_items_page_through_in_prompt_order_via_next_cursor(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    prompts = [f"prompt {n}" for n in range(7)]
    job = await submit(api, auth, prompts)

    pages = await all_pages(api, auth, f"/v1/jobs/{job['id']}/items", limit=3)

    assert [len(page) for page in pages] == [3, 3, 1]
    items = [item for page in pages for item in page]
    assert [i["position"] for i in items] == list(range(7))
    assert [i["prompt"] for i in items] == prompts
    assert len({i["id"] for i in items}) == 7


async def test_items_can_be_filtered_by_status(api: httpx.AsyncClient, auth: Headers) -> None:
    job = await submit(api, auth, ["a", "b", "c"])

    assert len(await items_of(api, auth, job["id"], status="queued")) == 3
    assert await items_of(api, auth, job["id"], status="cancelled") == []


async def test_cancelled_items_are_found_by_the_cancelled_filter(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])
    await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)

    assert await items_of(api, auth, job["id"], status="queued") == []
    assert [i["position"] for i in await items_of(api, auth, job["id"], status="cancelled")] == [0, 1, 2]


async def test_filtered_items_page_through_via_next_cursor(api: httpx.AsyncClient, auth: Headers) -> None:
    job = await submit(api, auth, [f"p{n}" for n in range(5)])
    await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)

    pages = await all_pages(api, auth, f"/v1/jobs/{job['id']}/items", limit=2, status="cancelled")

    assert [[i["position"] for i in page] for page in pages] == [[0, 1], [2, 3], [4]]


async def test_cots_page_through_in_prompt_order_after_the_worker_runs(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    prompts = [f"How do I cook dish {n}?" for n in range(5)]
    job = await submit(api, auth, prompts)
    await run_worker_burst(settings)

    pages = await all_pages(api, auth, f"/v1/jobs/{job['id']}/cots", limit=2)

    assert [len(page) for page in pages] == [2, 2, 1]
    cots = [cot for page in pages for cot in page]
    item_ids = [i["id"] for i in await items_of(api, auth, job["id"])]
    assert [c["item_id"] for c in cots] == item_ids
    assert [(c["position"], c["prompt"]) for c in cots] == list(enumerate(prompts))


async def test_cots_of_a_job_not_yet_run_are_an_empty_page(api: httpx.AsyncClient, auth: Headers) -> None:
    job = await submit(api, auth, ["a"])

    response = await api.get(f"/v1/jobs/{job['id']}/cots", headers=auth)

    assert response.json() == {"data": [], "next_cursor": None}


async def test_item_detail_has_its_turns_and_cot(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["How do I sharpen a knife?"])
    await run_worker_burst(settings)
    item = (await items_of(api, auth, job["id"]))[0]

    detail = (await api.get(f"/v1/items/{item['id']}", headers=auth)).json()

    assert detail["status"] == "completed"
    assert detail["cot"]["item_id"] == item["id"]
    assert detail["cot"]["prompt"] == "How do I sharpen a knife?"
    assert detail["turns"]
    for turn in detail["turns"]:
        assert {
            "stage",
            "round",
            "agent",
            "outcome",
            "raw_output",
            "prompt_tokens",
            "completion_tokens",
        } <= set(turn)
    assert {t["stage"] for t in detail["turns"]} >= {"intent", "seed", "deliberation", "refine"}
    assert all(t["outcome"] == "ok" and t["raw_output"] for t in detail["turns"])


def a_turn_row(item: Item, n: int, cost: float | None) -> TurnRow:
    return TurnRow(
        item_id=item.id,
        job_id=item.job_id,
        stage="seed",
        round=0,
        agent=0,
        attempt=n,
        role="seed",
        endpoint="default",
        model="m",
        request_hash="h",
        raw_output="{}",
        outcome="ok",
        prompt_tokens=100,
        cached_prompt_tokens=10,
        completion_tokens=15,
        cost_usd=cost,
        latency_ms=1.0,
    )


async def test_an_items_detail_of_many_long_turns_is_shaped_and_encoded_off_the_event_loop(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """An item's detail carries every turn: 300 turns of 64 KB are a 20 MB answer, which
    FastAPI made into models and encoded on the event loop."""
    job = await submit(api, auth, ["a"])
    item_id = uuid.UUID((await items_of(api, auth, job["id"]))[0]["id"])
    async with sessions.begin() as session:
        item = await session.get_one(Item, item_id)
        for n in range(300):
            turn = a_turn_row(item, n, cost=None)
            turn.raw_output = f"{n} " + "word " * 13_000
            session.add(turn)

    response, held = await least_loop_pause(lambda: api.get(f"/v1/items/{item_id}", headers=auth))

    assert response.status_code == 200, response.text
    turns = response.json()["turns"]
    assert [t["raw_output"].split(" ", 1)[0] for t in turns] == [str(n) for n in range(300)]
    assert held < 0.03, f"the event loop was held for {held:.3f} s of CPU"


async def test_item_detail_before_the_worker_runs_has_no_turns_or_cot(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    job = await submit(api, auth, ["a"])
    item = (await items_of(api, auth, job["id"]))[0]

    detail = (await api.get(f"/v1/items/{item['id']}", headers=auth)).json()

    assert (detail["status"], detail["cot"], detail["turns"]) == ("queued", None, [])


# --- cancelling ---------------------------------------------------------------------------


async def test_cancelling_a_queued_job_cancels_every_item(api: httpx.AsyncClient, auth: Headers) -> None:
    job = await submit(api, auth, ["a", "b", "c"])

    response = await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)

    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] is not None
    assert cancelled["counts"]["by_status"] == {"cancelled": 3}
    assert {i["status"] for i in await items_of(api, auth, job["id"])} == {"cancelled"}


async def test_workers_run_nothing_of_a_cancelled_job(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    job = await submit(api, auth, ["a", "b"])
    await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)

    await run_worker_burst(settings)

    after = (await api.get(f"/v1/jobs/{job['id']}", headers=auth)).json()
    assert after["status"] == "cancelled"
    assert after["usage"]["llm_calls"] == 0
    assert scripted_llm.requests == []
    for item in await items_of(api, auth, job["id"]):
        assert (await api.get(f"/v1/items/{item['id']}", headers=auth)).json()["turns"] == []


async def test_cancelling_twice_is_harmless(api: httpx.AsyncClient, auth: Headers) -> None:
    job = await submit(api, auth, ["a"])
    first = await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)

    second = await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)

    assert second.status_code == 200, second.text
    assert second.json()["status"] == "cancelled"
    assert second.json()["cancelled_at"] == first.json()["cancelled_at"]


async def test_cancelling_a_completed_job_keeps_its_results(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["a", "b"])
    await run_worker_burst(settings)

    cancelled = (await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)).json()

    assert cancelled["counts"]["by_status"] == {"completed": 2}
    assert len((await api.get(f"/v1/jobs/{job['id']}/cots", headers=auth)).json()["data"]) == 2


async def test_cancelling_a_finished_job_leaves_it_completed(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["a", "b"])
    await run_worker_burst(settings)

    cancelled = (await api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)).json()

    assert (cancelled["status"], cancelled["cancelled_at"]) == ("completed", None)
    again = (await api.get(f"/v1/jobs/{job['id']}", headers=auth)).json()
    assert (again["status"], again["cancelled_at"]) == ("completed", None)


# --- policy sets --------------------------------------------------------------------------


async def test_registering_a_policy_set_returns_201_with_a_content_hash_version(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    response = await register(api, auth, KITCHEN_POLICIES)

    assert response.status_code == 201, response.text
    created = response.json()
    assert HEX.fullmatch(created["version"])
    assert (created["name"], created["builtin"]) == ("kitchen", False)
    assert created["policies"][0]["id"] == "kitchen-safety"


async def test_registering_identical_content_again_returns_the_same_version(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    first = (await register(api, auth, KITCHEN_POLICIES)).json()

    again = await register(api, auth, KITCHEN_POLICIES)

    assert again.status_code == 200, again.text
    assert (again.json()["id"], again.json()["version"]) == (first["id"], first["version"])


async def test_another_key_registering_the_same_content_gets_its_own_new_row(
    api: httpx.AsyncClient, auth: Headers, other: Headers
) -> None:
    first = (await register(api, auth, KITCHEN_POLICIES)).json()

    theirs = await register(api, other, KITCHEN_POLICIES)

    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["version"] == first["version"]
    assert theirs.json()["id"] != first["id"]


async def test_changed_content_is_a_new_version_and_the_old_one_stays(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    old = (await register(api, auth, KITCHEN_POLICIES)).json()

    new = await register(api, auth, KITCHEN_POLICIES_V2)

    assert new.status_code == 201, new.text
    assert new.json()["version"] != old["version"]
    kept = (await api.get(f"/v1/policy-sets/{old['id']}", headers=auth)).json()
    assert (kept["version"], kept["policies"]) == (old["version"], old["policies"])


async def test_job_naming_a_custom_set_uses_its_newest_version(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    await register(api, auth, KITCHEN_POLICIES)
    newest = (await register(api, auth, KITCHEN_POLICIES_V2)).json()

    job = await submit(api, auth, ["How long do leftovers keep?"], policy_set={"name": "kitchen"})
    await run_worker_burst(settings)

    expected = {"id": newest["id"], "name": "kitchen", "version": newest["version"]}
    assert job["policy_set"] == expected
    cots = (await api.get(f"/v1/jobs/{job['id']}/cots", headers=auth)).json()["data"]
    assert [c["policy_set"] for c in cots] == [expected]


async def test_job_pinned_to_an_old_version_keeps_it(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    old = (await register(api, auth, KITCHEN_POLICIES)).json()
    await register(api, auth, KITCHEN_POLICIES_V2)

    pinned = {"name": "kitchen", "version": old["version"]}
    job = await submit(api, auth, ["How do I dice onions?"], policy_set=pinned)
    await run_worker_burst(settings)

    assert job["policy_set"]["version"] == old["version"]
    cots = (await api.get(f"/v1/jobs/{job['id']}/cots", headers=auth)).json()["data"]
    assert [c["policy_set"]["version"] for c in cots] == [old["version"]]


async def test_job_keeps_its_version_when_a_newer_one_is_registered(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    old = (await register(api, auth, KITCHEN_POLICIES)).json()
    job = await submit(api, auth, ["How do I dice onions?"], policy_set={"name": "kitchen"})

    await register(api, auth, KITCHEN_POLICIES_V2)
    await run_worker_burst(settings)

    cots = (await api.get(f"/v1/jobs/{job['id']}/cots", headers=auth)).json()["data"]
    assert [c["policy_set"]["version"] for c in cots] == [old["version"]]


# --- health and the OpenAPI document ------------------------------------------------------


async def test_healthz_answers_ok(api: httpx.AsyncClient) -> None:
    response = await api.get("/healthz")

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_readyz_answers_ready_with_postgres_and_redis_up(api: httpx.AsyncClient) -> None:
    response = await api.get("/readyz")

    assert (response.status_code, response.json()) == (200, {"status": "ready"})


async def test_readyz_asks_postgres_its_version(api: httpx.AsyncClient) -> None:
    """The API starts without Postgres (to spool webhook deliveries while it is away), so
    readiness is where a server older than 15 shows: 503 not_ready with
    preflight.postgres_too_old's message (which test_preflight checks on such versions, which
    this server cannot report)."""
    with statements_sent() as sent:
        response = await api.get("/readyz")

    assert response.status_code == 200
    assert "SHOW server_version_num" in sent


async def test_readyz_of_a_flood_takes_one_connection_and_names_what_does_not_answer(
    settings: Settings,
) -> None:
    """Anyone may ask, with no key, and each asked Postgres on a connection of the pool: a
    flood of them held the pool from the tenants. One check serves them all."""
    async with api_client(settings) as api:
        with checkouts() as taken:
            answers = await asyncio.gather(*(api.get("/readyz") for _ in range(50)))
        assert [answer.status_code for answer in answers] == [200] * 50
        assert len(taken) == 1

    # The API starts without Postgres (it connects at its first request).
    gone = settings.model_copy(update={"database_url": f"{settings.database_url}_no_such_database"})
    async with api_client(gone) as api:
        refused = error_of(await api.get("/readyz"), 503, "not_ready")
    assert refused["message"].startswith("postgres: "), refused


async def test_openapi_document_lists_every_v1_path(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]

    assert {path: set(ops) for path, ops in paths.items() if path.startswith("/v1")} == V1_PATHS


def test_readme_lists_every_route_of_the_app(settings: Settings) -> None:
    """README's route table names each method and path the app serves, and no other."""
    served = {
        (method, route.path)
        for route in iter_route_contexts(create_app(settings).routes)
        for method in route.methods or ()
        if method != "HEAD"
    }
    readme = (ROOT / "README.md").read_text(encoding="utf-8")

    listed = set(re.findall(r"^\| `([A-Z]+)` \| `([^`]+)` \|", readme, re.MULTILINE))

    assert listed == served


def test_readme_lists_every_error_code_of_the_service() -> None:
    """README's list of error codes names the code of every domain error."""

    def subclasses(cls: type[ServiceError]) -> list[type[ServiceError]]:
        return [cls, *(sub for direct in cls.__subclasses__() for sub in subclasses(direct))]

    # CallbackRefused is only ever raised as one of its subclasses, each with its own code;
    # the web viewer answers CrossSiteRequest with an HTML page, not this JSON shape.
    not_in_json = {"callback_not_allowed", "cross_site_request"}
    codes = {error.code for error in subclasses(ServiceError)} - not_in_json
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = readme[readme.index("\nCodes: ") : readme.index("\nItem failure codes")]

    assert codes - set(re.findall(r"`([a-z_]+)`", paragraph)) == set()


async def test_openapi_document_declares_bearer_auth_on_every_v1_operation(api: httpx.AsyncClient) -> None:
    document = (await api.get("/openapi.json")).json()

    schemes = document["components"]["securitySchemes"]
    [(name, scheme)] = schemes.items()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, ops in V1_PATHS.items():
        for op in ops:
            if path in SECRET_AUTHENTICATED:
                continue
            assert document["paths"][path][op]["security"] == [{name: []}], (path, op)


async def test_openapi_document_lists_429_on_every_v1_operation(api: httpx.AsyncClient) -> None:
    """Any /v1 request may be refused 429: an unknown key from an address that sent too many
    (too_many_wrong_keys), a key's requests past AIDSAFE_MAX_WAITING_PER_KEY (too_many_waiting),
    as the README's HTTP API says; a client made from the document must expect it."""
    document = (await api.get("/openapi.json")).json()

    undocumented = {
        (path, op)
        for path, ops in V1_PATHS.items()
        for op in ops
        if "429" not in document["paths"][path][op]["responses"]
    }
    assert undocumented == set()


# --- a finished job -----------------------------------------------------------------------


async def test_completed_job_reports_counts_by_status_and_stage(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])
    await run_worker_burst(settings)

    done = (await api.get(f"/v1/jobs/{job['id']}", headers=auth)).json()

    assert done["status"] == "completed"
    assert done["counts"] == {
        "total": 3,
        "by_status": {"completed": 3},
        "by_stage": {"done": {"completed": 3}},
    }


async def test_completed_job_usage_sums_its_items_turns(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])
    await run_worker_burst(settings)

    usage = (await api.get(f"/v1/jobs/{job['id']}", headers=auth)).json()["usage"]

    turns = []
    for item in await items_of(api, auth, job["id"]):
        turns += (await api.get(f"/v1/items/{item['id']}", headers=auth)).json()["turns"]
    assert usage["llm_calls"] > 0
    assert usage == {
        "llm_calls": len(turns),
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "cached_prompt_tokens": sum(t["cached_prompt_tokens"] for t in turns),
        "completion_tokens": sum(t["completion_tokens"] for t in turns),
        "cost_usd": None,  # the default endpoint has no prices here
    }


async def test_body_that_is_not_utf8_is_a_bad_request(api: httpx.AsyncClient, auth: Headers) -> None:
    headers = {**auth, "Content-Type": "application/json"}

    error_of(
        await api.post("/v1/jobs", content=b'{"prompts": ["\xff\xfe"]}', headers=headers), 400, "bad_request"
    )


async def test_a_database_that_refuses_connections_is_a_503(settings: Settings) -> None:
    unreachable = settings.model_copy(
        update={"database_url": "postgresql+asyncpg://postgres@127.0.0.1:1/none"}
    )

    async with api_client(unreachable) as client:
        response = await client.get(f"/v1/jobs/{uuid.uuid4()}", headers={"Authorization": "Bearer aidsafe_x"})

    error_of(response, 503, "unavailable")
    assert response.headers["Retry-After"] == "2"


async def test_a_statement_whose_connection_the_database_ends_is_a_503_to_retry(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A Postgres restart or failover ends the API's connections mid-statement (as
    pg_terminate_backend does one): the answer says to retry, as the SDK then does, not 500."""
    job = await submit(api, auth, ["a"])
    async with sessions.begin() as holder:
        await holder.execute(select(Job.id).where(Job.id == job["id"]).with_for_update())
        patch = asyncio.create_task(api.patch(f"/v1/jobs/{job['id']}", json={"label": "x"}, headers=auth))
        waiting = await eventually(
            lambda: other_backend(sessions, "wait_event_type = 'Lock'"), 10, "the PATCH to wait"
        )
        await holder.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": waiting})

    response = await patch
    error_of(response, 503, "unavailable")
    assert response.headers["Retry-After"] == "2"
    assert (await api.patch(f"/v1/jobs/{job['id']}", json={"label": "x"}, headers=auth)).status_code == 200


async def test_a_session_whose_connection_the_database_ends_once_answered_closes_quietly(
    settings: Settings,
    auth: Headers,
    sessions: Sessions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FastAPI closes a request's session after the response has been sent. A Postgres restart
    just then made closing it raise out of the app: uvicorn logged "Exception in ASGI
    application" with a traceback and dropped the kept-alive connection. The answer stands;
    the close that failed is a warning."""
    app = create_app(settings)

    async def ends_the_connection_once_answered(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_then_end(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                # The policy sets' read left the session's connection in its transaction.
                ended = await other_backend(sessions, "state = 'idle in transaction'")
                async with sessions() as session:
                    await session.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": ended})

        await app(scope, receive, send_then_end)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=ends_the_connection_once_answered)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            # A route that reads to its answer (one that ends in a worker thread gives its
            # connection back before: app/api/json_answers.py).
            response = await client.get("/v1/policy-sets", headers=auth)
            state: ApiState = app.state.api
            in_use = state.sessions.kw["bind"].pool.checkedout()

    assert response.status_code == 200, response.text
    assert [
        record.levelname for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR
    ] == []
    assert "a session closed on a connection the database had ended" in caplog.text
    assert in_use == 0  # the ended connection was given up, not kept out of the pool


async def other_backend(sessions: Sessions, where: str) -> int | None:
    """The process id of another backend of this test's database of which `where` (a condition
    on pg_stat_activity) holds, if one does."""
    async with sessions() as session:
        pid: int | None = await session.scalar(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                f" AND pid <> pg_backend_pid() AND {where} LIMIT 1"
            )
        )
    return pid


async def test_a_job_runs_the_ablations_and_limits_it_asked_for_and_shows_them(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    persona = "Hunt for harm the others missed."
    config = {
        "decompose_intents": False,
        "refine": False,
        "max_rounds": 2,
        "max_turns": 1,
        "limits": {"thoughts_per_turn": 3, "kept_thoughts": 5, "max_drops": 4},
        "deliberators": [{"instructions": persona}, {}],
    }
    job = await submit(api, auth, ["How do I sharpen a knife?"], config=config)
    await run_worker_burst(settings)

    shown = (await api.get(f"/v1/jobs/{job['id']}", headers=auth)).json()["config"]
    assert {k: shown[k] for k in ("decompose_intents", "refine", "max_rounds", "max_turns", "limits")} == {
        k: v for k, v in config.items() if k != "deliberators"
    }
    assert [d["instructions"] for d in shown["roles"]["deliberators"]] == [persona, ""]
    detail = (
        await api.get(f"/v1/items/{(await items_of(api, auth, job['id']))[0]['id']}", headers=auth)
    ).json()
    assert [(t["stage"], t["round"], t["agent"]) for t in detail["turns"]] == [
        ("seed", 0, 0),
        ("deliberation", 1, 1),
    ]
    cot = detail["cot"]
    assert [t["sources"] for t in cot["refined_thoughts"]] == [
        [n] for n in range(1, len(cot["thoughts"]) + 1)
    ]


async def test_limits_over_the_servers_caps_are_refused_and_nothing_is_created(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    before = (await api.get("/v1/jobs", headers=auth)).json()["data"]

    response = await api.post(
        "/v1/jobs", json={"prompts": ["a"], "config": {"limits": {"thoughts_per_turn": 11}}}, headers=auth
    )

    assert response.status_code == 422
    assert "thoughts_per_turn" in response.text
    assert (await api.get("/v1/jobs", headers=auth)).json()["data"] == before


async def test_the_api_keeps_as_many_database_connections_as_its_setting_says(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"api_db_connections": 3}))
    async with app.router.lifespan_context(app):
        state: ApiState = app.state.api
        engine = state.sessions.kw["bind"]

        assert engine.sync_engine.pool.size() == 3
