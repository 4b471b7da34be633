"""Presets (presets/*.yaml) against the real API and Postgres: listed and shown, a job started
from one with overrides (the stored plan has both), pinning a version, an unknown preset, a
bad preset file stopping the server, and every shipped preset resolving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text

from app.config import Settings
from app.deliberation.policies import content_version
from app.main import create_app
from app.plan import GenerationPlan, JobConfigIn, PresetRef, read_plan, resolve
from app.presets import InvalidPresets, load
from app.store.db import Sessions
from tests.test_api import error_of, row_counts, submit

Headers = dict[str, str]
SHIPPED = Settings().presets_dir
NAMES = ["paper", "quick", "thorough"]


async def stored_plan(sessions: Sessions, job_id: str) -> dict[str, Any]:
    """The job's plan as its row holds it: JSON, not read back typed."""
    async with sessions() as session:
        plan: dict[str, Any] = await session.scalar(
            text("SELECT plan FROM jobs WHERE id = :id"), {"id": job_id}
        )
    return plan


async def presets_of(api: httpx.AsyncClient, auth: Headers) -> dict[str, dict[str, Any]]:
    response = await api.get("/v1/presets", headers=auth)
    assert response.status_code == 200, response.text
    return {preset["name"]: preset for preset in response.json()}


def test_every_shipped_preset_resolves_against_the_default_settings() -> None:
    settings = Settings()
    shipped = load(SHIPPED, settings)

    assert [preset.name for preset in shipped.all()] == NAMES
    plans = {
        p.name: resolve(JobConfigIn.model_validate(p.config), settings, p.ref).pipeline()
        for p in shipped.all()
    }
    paper, quick, thorough = plans["paper"], plans["quick"], plans["thorough"]
    roles = [paper.intent, paper.seed, *paper.deliberators, paper.refiner]
    assert len(paper.deliberators) == 2 and len({(r.endpoint, r.model) for r in roles}) == 1
    assert (paper.decompose_intents, paper.refine, paper.grading) == (True, True, None)
    assert (len(quick.deliberators), quick.max_rounds) == (1, 1)
    personas = [role.instructions for role in thorough.deliberators]
    assert len(set(personas)) == 3 and all(personas)
    assert "refusal" in personas[0] and "harm" in personas[1]
    assert thorough.grading is not None and thorough.max_rounds > paper.max_rounds


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "description: d\nconfig: {agents: 99}\n",
            r"bad\.yaml: not a preset \(config\.agents: .*less than or equal to 8",
        ),
        ("description: d\nconfig: {rounds: 2}\n", r"config\.rounds: Extra inputs are not permitted"),
        ("config: {}\n", r"description: Field required"),
        ("description: d\nconfig: {defaults: {endpoint: gpu}}\n", r"unknown endpoint 'gpu'"),
        ("description: [unclosed\n", r"bad\.yaml: not YAML"),
    ],
)
async def test_a_preset_that_is_not_a_job_config_stops_the_server(
    settings: Settings, tmp_path: Path, text: str, problem: str
) -> None:
    (tmp_path / "good.yaml").write_text("description: fine\nconfig: {agents: 1}\n", encoding="utf-8")
    (tmp_path / "bad.yaml").write_text(text, encoding="utf-8")
    app = create_app(settings.model_copy(update={"presets_dir": tmp_path}))

    with pytest.raises(InvalidPresets, match=problem):
        async with app.router.lifespan_context(app):
            pass


async def test_a_missing_presets_directory_stops_the_server_naming_the_setting(
    settings: Settings, tmp_path: Path
) -> None:
    """Started by `uvicorn app.main:app`, not `aidsafe-api`: the traceback's last line says
    which setting to fix."""
    app = create_app(settings.model_copy(update={"presets_dir": tmp_path / "nowhere"}))
    with pytest.raises(
        InvalidPresets, match=r"^AIDSAFE_PRESETS_DIR: the presets directory .*nowhere does not exist$"
    ):
        async with app.router.lifespan_context(app):
            pass


async def test_presets_are_listed_and_shown_with_their_content_version(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    listed = await presets_of(api, auth)

    assert list(listed) == NAMES
    paper = listed["paper"]
    assert set(paper) == {"name", "version", "description", "notes", "config"}
    assert paper["config"]["agents"] == 2 and "paper" in paper["notes"]
    assert paper["version"] == content_version([paper["config"]])
    assert len({preset["version"] for preset in listed.values()}) == 3
    shown = await api.get("/v1/presets/paper", headers=auth)
    assert (shown.status_code, shown.json()) == (200, paper)
    missing = error_of(await api.get("/v1/presets/fast", headers=auth), 404, "not_found")
    assert "paper, quick, thorough" in missing["message"]
    error_of(await api.get("/v1/presets"), 401, "unauthorized")
    readme = (SHIPPED.parent / "README.md").read_text(encoding="utf-8")
    assert f'"preset_version": "{listed["thorough"]["version"]}"' in readme  # its example is current


async def test_a_job_starts_from_a_preset_and_its_config_overrides_any_field(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    thorough = (await presets_of(api, auth))["thorough"]
    overrides = {
        "max_rounds": 2,
        "limits": {"kept_thoughts": 8},
        "defaults": {"endpoint": "second"},
        "grading": {"thresholds": {"relevance": 4}},
    }

    job = await submit(api, auth, ["How do I sharpen a knife?"], preset="thorough", config=overrides)

    plan = await stored_plan(sessions, job["id"])
    assert job["config"] == plan
    assert plan["preset"] == {"name": "thorough", "version": thorough["version"]}
    assert (plan["max_rounds"], plan["max_tokens"]) == (2, 1024)  # overridden, the preset's
    assert plan["limits"] == {"thoughts_per_turn": 6, "kept_thoughts": 8, "max_drops": 24}
    deliberators = plan["roles"]["deliberators"]
    assert [d["instructions"] for d in deliberators] == [
        d["instructions"] for d in thorough["config"]["deliberators"]
    ]
    assert {d["endpoint"] for d in deliberators} == {"second"}  # `defaults` merged into the preset's
    assert plan["roles"]["refiner"]["temperature"] == 0.2
    thresholds = plan["grading"]["thresholds"]
    assert (thresholds["relevance"], thresholds["cot_policy_faithfulness"]) == (4, 4)
    read = read_plan(plan)
    assert isinstance(read, GenerationPlan) and read.preset is not None


async def test_a_list_in_the_config_replaces_the_presets(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job = await submit(
        api,
        auth,
        ["a"],
        preset="thorough",
        config={"agents": 1, "deliberators": [{"instructions": "Be brief."}], "grading": None},
    )

    plan = await stored_plan(sessions, job["id"])
    assert [d["instructions"] for d in plan["roles"]["deliberators"]] == ["Be brief."]
    assert plan["grading"] is None and plan["max_tokens"] == 1024


async def test_every_shipped_preset_makes_a_job(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    for name, preset in (await presets_of(api, auth)).items():
        job = await submit(api, auth, ["a"], preset=name)

        ref = PresetRef(name=name, version=preset["version"])
        expected = resolve(JobConfigIn.model_validate(preset["config"]), settings, ref)
        assert await stored_plan(sessions, job["id"]) == expected.model_dump(mode="json")


async def test_a_job_without_a_preset_stores_the_plan_it_always_did(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job = await submit(api, auth, ["a"], config={"agents": 1})

    plan = await stored_plan(sessions, job["id"])
    read = read_plan(plan)
    assert "preset" not in plan and isinstance(read, GenerationPlan) and read.preset is None


async def test_a_pinned_preset_version_must_be_the_servers(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    version = (await presets_of(api, auth))["quick"]["version"]

    pinned = await submit(api, auth, ["a"], preset="quick", preset_version=version)
    assert pinned["config"]["preset"] == {"name": "quick", "version": version}
    stale = await api.post(
        "/v1/jobs", json={"prompts": ["a"], "preset": "quick", "preset_version": "0" * 16}, headers=auth
    )
    error = error_of(stale, 422, "preset_version_mismatch")
    assert error["details"] == {"preset": "quick", "version": version, "requested": "0" * 16}
    alone = await api.post("/v1/jobs", json={"prompts": ["a"], "preset_version": version}, headers=auth)
    error_of(alone, 422, "invalid_config")
    assert await row_counts(sessions) == (1, 1)


async def test_an_unknown_preset_is_refused_naming_the_known_ones_and_creates_nothing(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, redis: Redis
) -> None:
    response = await api.post(
        "/v1/jobs", json={"prompts": ["a"], "preset": "fast", "config": {"agents": 1}}, headers=auth
    )

    error = error_of(response, 422, "unknown_preset")
    assert error["details"] == {"known": NAMES} and "paper, quick, thorough" in error["message"]
    assert await row_counts(sessions) == (0, 0)
    assert await redis.zcard(settings.queue_name) == 0


async def test_the_preset_is_part_of_an_idempotent_request(api: httpx.AsyncClient, auth: Headers) -> None:
    headers = {**auth, "Idempotency-Key": "k"}
    first = await api.post("/v1/jobs", json={"prompts": ["a"], "preset": "quick"}, headers=headers)
    replay = await api.post("/v1/jobs", json={"prompts": ["a"], "preset": "quick"}, headers=headers)
    other = await api.post("/v1/jobs", json={"prompts": ["a"], "preset": "paper"}, headers=headers)

    assert (first.status_code, replay.status_code, replay.json()["id"]) == (202, 200, first.json()["id"])
    error_of(other, 409, "idempotency_conflict")
