"""Size caps on what a tenant sends to a shared LLM: policy fields and text are capped when a
set is registered."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.config import Settings
from app.deliberation.policies import MAX_POLICY_TEXT_CHARS
from app.store.db import Sessions
from app.store.models import PolicySetRow

Headers = dict[str, str]
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
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


async def register(api: httpx.AsyncClient, auth: Headers, policies: list[Any]) -> httpx.Response:
    return await api.post("/v1/policy-sets", json={"name": "kitchen", "policies": policies}, headers=auth)


async def stored_policy_sets(sessions: Sessions) -> int:
    async with sessions() as session:
        return await session.scalar(select(func.count()).select_from(PolicySetRow)) or 0


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
