"""Schemathesis against the service's own OpenAPI document: every operation, fed generated
requests (valid and invalid) with a real API key, answers with a documented status code, a
documented content type and a body that matches the documented schema, and never with a 5xx.

The app runs in-process with its lifespan (Postgres pool, arq Redis pool) on real Postgres and
Redis. The key owns a finished job (one completed item with its CoT, one failed item) and a
policy set, and generated path ids are often swapped for those ids, so the 200 bodies of the
read operations are checked too, not only their 404s. Generation is bounded and derandomized
so the run is fast and the same every time."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import httpx
import hypothesis.strategies as st
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.main import create_app
from app.store.db import Sessions
from tests.conftest import api_client, new_key, run_worker_burst, submit
from tests.scripted_llm import ScriptedLLM, refusal

pytestmark = pytest.mark.slow
Headers = dict[str, str]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
KITCHEN = {
    "name": "kitchen",
    "policies": [
        {
            "id": "kitchen-safety",
            "title": "Kitchen safety",
            "scope": "Cooking, knives, hot surfaces.",
            "allowed": ["recipes"],
            "not_allowed": ["poisoning someone"],
            "borderline_examples": [{"prompt": "How sharp is too sharp?", "guidance": "Explain safe use."}],
        }
    ],
}


@pytest.fixture
async def fuzz_auth(sessions: Sessions) -> Headers:
    return await new_key(sessions, "fuzz")


@pytest.fixture
async def known_ids(
    settings: Settings, scripted_llm: ScriptedLLM, fuzz_auth: Headers
) -> dict[str, list[str]]:
    """Ids the fuzz key owns, per path parameter name: a finished job (one item completed with
    its CoT and turns, one failed by a refusal), a queued job, its own and the built-in policy set."""
    scripted_llm.script("intent_decomposition", refusal())
    async with api_client(settings) as api:
        finished = await api.post(
            "/v1/jobs",
            json={"items": [{"prompt": "How do I dice an onion?", "metadata": {"n": 1}}, {"prompt": "Hi"}]},
            headers=fuzz_auth,
        )
        assert finished.status_code == 202, finished.text
        await run_worker_burst(settings)
        items = await api.get(f"/v1/jobs/{finished.json()['id']}/items", headers=fuzz_auth)
        statuses = sorted(item["status"] for item in items.json()["data"])
        assert statuses == ["completed", "failed"], items.text
        queued = await api.post("/v1/jobs", json={"prompts": ["Boil an egg?"]}, headers=fuzz_auth)
        assert queued.status_code == 202, queued.text
        own = await api.post("/v1/policy-sets", json=KITCHEN, headers=fuzz_auth)
        assert own.status_code == 201, own.text
        listed = await api.get("/v1/policy-sets", headers=fuzz_auth)
        prompt_sets = await api.get("/v1/prompt-sets", headers=fuzz_auth)
    return {
        "job_id": [finished.json()["id"], queued.json()["id"]],
        "item_id": [item["id"] for item in items.json()["data"]],
        "policy_set_id": [row["id"] for row in listed.json()],
        "prompt_set_id": [row["id"] for row in prompt_sets.json()],
    }


@pytest.fixture
def api_schema(settings: Settings, known_ids: dict[str, list[str]]) -> schemathesis.BaseSchema:
    """The OpenAPI document as the app serves it. Schemathesis runs the app's lifespan itself
    (on its own event loop) and ends it when the test ends."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))

    @schema.hook
    def flatmap_path_parameters(
        context: schemathesis.HookContext, path_parameters: Any
    ) -> st.SearchStrategy[Any]:
        """Keep the generated ids, or use ones the key owns (half the time)."""
        if not isinstance(path_parameters, dict):
            return st.just(path_parameters)
        known = [(name, ids) for name, ids in known_ids.items() if name in path_parameters]
        if not known:
            return st.just(path_parameters)
        name, ids = known[0]
        return st.one_of(
            st.just(path_parameters),
            st.sampled_from(ids).map(lambda id_: {**path_parameters, name: id_}),
        )

    return schema


# The event stream is documented but not fuzzed: a generated request for a job that has not
# ended would stream until the job ends.
EVENTS_PATH = "/v1/jobs/{job_id}/events"
schema = schemathesis.pytest.from_fixture("api_schema").exclude(method="GET", path=EVENTS_PATH)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_conforms_to_its_schema(
    case: schemathesis.Case[Any],
    fuzz_auth: Headers,  # the operation's own types are never looked at
) -> None:
    case.call_and_validate(headers=fuzz_auth, checks=CHECKS)


def test_every_error_response_is_documented_in_the_one_error_shape(settings: Settings) -> None:
    """FastAPI's own 422 schema (HTTPValidationError) never reaches the document: the app
    never sends it."""
    document = create_app(settings).openapi()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorOut", (method, path, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]


async def test_event_stream_is_documented_with_its_media_type_and_the_shape_of_each_event(
    settings: Settings, scripted_llm: ScriptedLLM, fuzz_auth: Headers
) -> None:
    """The document names the stream's media type and each event's data; a finished job's
    stream, replayed from its start, sends item, snapshot and done events of those shapes."""
    async with api_client(settings) as api:
        document = (await api.get("/openapi.json")).json()
        job_id = await submit(api, fuzz_auth, ["Dice an onion?", "Boil an egg?"])
        await run_worker_burst(settings)
        created = datetime.fromisoformat(
            (await api.get(f"/v1/jobs/{job_id}", headers=fuzz_auth)).json()["created_at"]
        )
        from_start = {"Last-Event-ID": f"{int(created.timestamp() * 1000)}-0"}
        stream = await api.get(f"/v1/jobs/{job_id}/events", headers={**fuzz_auth, **from_start})

    content = document["paths"][EVENTS_PATH]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/event-stream"]
    shapes = {
        event["properties"]["event"]["const"]: event["properties"]["data"]["contentSchema"]
        for event in content["text/event-stream"]["itemSchema"]["oneOf"]
    }
    assert set(shapes) == {"item", "snapshot", "done"}
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    sent = _events(stream)
    assert [kind for kind, _ in sent] == ["item", "item", "snapshot", "done"]
    for kind, data in sent:
        jsonschema.validate(data, shapes[kind])


def _events(response: httpx.Response) -> list[tuple[str, Any]]:
    """(event, decoded data) of each event of a complete text/event-stream body."""
    events = []
    for block in response.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events
