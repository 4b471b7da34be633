"""Every route the app serves, asked by another key with the owner's ids, in its path and in
its body: the answer is the one an id nobody has gets, and nothing of the owner's changes.

Routes come from the app's router, so a new one is probed as it is added; one whose ids the
probe cannot fill fails the test, to be taught here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi.routing import iter_route_contexts
from sqlalchemy import event

from app.config import Settings
from app.main import create_app
from app.store.db import Sessions
from app.store.models import Item, Job, PolicySetRow, PromptSetRow, Webhook
from tests.conftest import new_key, run_worker_burst
from tests.test_api import error_of, items_of, submit
from tests.test_labeling import fixture

Headers = dict[str, str]
_PATH_PARAM = re.compile(r"\{(\w+)\}")
NOBODYS = "00000000-0000-4000-8000-000000000000"
# Path parameters that name no tenant's row.
SHARED = {"name": "viewer.css", "preset_name": "paper", "plot": "scores"}


# The body each route that takes one is sent: valid, so that the id decides the answer.
BODIES: dict[tuple[str, str], Any] = {
    ("PATCH", "/v1/jobs/{job_id}"): {"label": "taken", "metadata": {"by": "another key"}},
    ("POST", "/v1/jobs/{job_id}/annotations/label-studio"): [],
    ("POST", "/v1/jobs/{job_id}/annotations/argilla"): [],
}
# Asked with no API key: the webhook's secret decides (tests/test_webhooks.py).
KEYLESS = {("POST", "/v1/webhooks/label-studio/{webhook_id}")}


async def owners_world(api: httpx.AsyncClient, owner: Headers, settings: Settings) -> dict[str, str]:
    """The owner's rows of every kind, by the path parameter that names each."""
    jobs = [(await submit(api, owner, ["How do I store rice?"], config={"grading": {}}))["id"] for _ in "ab"]
    await run_worker_burst(settings)
    [item] = await items_of(api, owner, jobs[0])
    comparison = await api.post(
        "/v1/comparisons", json={"baseline_job_id": jobs[0], "candidate_job_id": jobs[1]}, headers=owner
    )
    evaluation = await api.post(
        "/v1/sample-evaluations",
        json={"samples": [{"prompt": "p", "response": "r"}], "grade": {}},
        headers=owner,
    )
    webhook = await api.post("/v1/webhooks", json={"name": "owner's"}, headers=owner)
    policies = [{"id": "kitchen", "title": "Kitchen", "scope": "Cooking."}]
    policy_set = await api.post(
        "/v1/policy-sets", json={"name": "owners", "policies": policies}, headers=owner
    )
    built_in = (await api.get("/v1/prompt-sets", headers=owner)).json()[0]
    prompt_set = await api.post(
        "/v1/prompt-sets",
        json={"name": "owners", "base": {"name": built_in["name"]}, "templates": {}},
        headers=owner,
    )
    made = [comparison, evaluation, webhook, policy_set, prompt_set]
    assert all(r.status_code in (200, 201, 202) for r in made), [r.text for r in made]
    await run_worker_burst(settings)
    return {
        "job_id": jobs[0],
        "item_id": item["id"],
        "comparison_id": comparison.json()["id"],
        "evaluation_id": evaluation.json()["id"],
        "webhook_id": webhook.json()["id"],
        "policy_set_id": policy_set.json()["id"],
        "prompt_set_id": prompt_set.json()["id"],
    }


def routes(settings: Settings) -> list[tuple[str, str, list[str]]]:
    """(method, path, its parameters that name a tenant's row) of every route naming one."""
    found = []
    for context in iter_route_contexts(create_app(settings).routes):
        path = context.path
        assert path is not None
        names = [name for name in _PATH_PARAM.findall(path) if name not in SHARED]
        for method in sorted((context.methods or set()) - {"HEAD"}):
            if names:
                found.append((method, path, names))
    return found


async def asked(
    api: httpx.AsyncClient, headers: Headers, method: str, path: str, ids: dict[str, str]
) -> httpx.Response:
    body = BODIES.get((method, path))
    url = _PATH_PARAM.sub(lambda m: SHARED.get(m.group(1)) or ids[m.group(1)], path)
    if "/sample-evaluations/{job_id}" in path:
        url = url.replace(ids["job_id"], ids["evaluation_id"], 1)
    return await api.request(method, url, json=body, headers=headers)


async def test_another_keys_ids_in_every_route_are_answered_as_nobodys_and_change_nothing(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings
) -> None:
    owner, other = await new_key(sessions, "owner"), await new_key(sessions, "other")
    world = await owners_world(api, owner, settings)
    before = {path: (await api.get(path, headers=owner)).json() for path in _owner_reads(world)}
    login = await api.post("/view/login", data={"api_key": other["Authorization"].removeprefix("Bearer ")})
    assert login.status_code == 303

    unteachable = [p for _, p, names in routes(settings) for n in names if n not in world]
    assert not unteachable, f"teach the tenancy probe the ids of {unteachable}"
    answers = {}
    # None of the owner's rows is even read: read, then checked, it answered a 404 later than
    # an id nobody has (its job's plan and reports decoded), which told that it was there.
    with rows_read() as read:
        for method, path, _ in routes(settings):
            if (method, path) in KEYLESS:
                continue
            nobodys = {name: NOBODYS for name in world}
            theirs = await asked(api, other, method, path, world)
            unknown = await asked(api, other, method, path, nobodys)
            answers[(method, path)] = (theirs.status_code, unknown.status_code)
            assert theirs.status_code == unknown.status_code, (method, path, theirs.text)
            assert theirs.status_code == 404, (method, path, theirs.text)
            # The answer names only the ids it was asked about, never more of the owner's rows.
            shown = [value for value in world.values() if value not in theirs.url.path]
            assert not [value for value in shown if value in theirs.text], (method, path, theirs.text)

        assert len(answers) >= 30, answers  # every id-bearing route was asked
        # Ids of the owner's in bodies: another key's jobs to compare or judge against.
        jobs = world["job_id"], world["comparison_id"]
        own_job = (await submit(api, other, ["How do I store rice?"]))["id"]
        named = [
            ("/v1/comparisons", {"baseline_job_id": own_job, "candidate_job_id": jobs[0]}),
            ("/v1/comparisons", {"baseline_job_id": jobs[0], "candidate_job_id": jobs[1]}),
            (
                "/v1/sample-evaluations",
                {"samples": [{"prompt": "p", "response": "r"}], "judge": {"job_id": jobs[0]}},
            ),
        ]
        for url, body in named:
            response = await api.post(url, json=body, headers=other)
            assert response.status_code == 404, (url, response.text)
    assert not read & set(world.values()), [name for name, value in world.items() if value in read]
    await run_worker_burst(settings)
    # And items to review.
    export = fixture("label_studio_export.json", [world["item_id"]] * 3)
    review = await api.post(f"/v1/jobs/{own_job}/annotations/label-studio", json=export, headers=other)
    assert error_of(review, 422, "unknown_items")["details"] == [world["item_id"]]

    assert {path: (await api.get(path, headers=owner)).json() for path in before} == before


@contextmanager
def rows_read() -> Iterator[set[str]]:
    """The ids of the tenants' rows (jobs, items, webhooks, policy and prompt sets) read as
    objects from the database inside."""
    read: set[str] = set()
    models = (Job, Item, Webhook, PolicySetRow, PromptSetRow)

    def note(row: Job | Item | Webhook | PolicySetRow | PromptSetRow, _context: object) -> None:
        read.add(str(row.id))

    for model in models:
        event.listen(model, "load", note)
    try:
        yield read
    finally:
        for model in models:
            event.remove(model, "load", note)


def _owner_reads(ids: dict[str, str]) -> list[str]:
    """What the owner reads back of each of its rows (their state after the probe)."""
    return [
        f"/v1/jobs/{ids['job_id']}",
        f"/v1/jobs/{ids['job_id']}/items",
        f"/v1/items/{ids['item_id']}/reviews",
        f"/v1/comparisons/{ids['comparison_id']}",
        f"/v1/sample-evaluations/{ids['evaluation_id']}",
        "/v1/webhooks",
        f"/v1/policy-sets/{ids['policy_set_id']}",
        f"/v1/prompt-sets/{ids['prompt_set_id']}",
    ]
