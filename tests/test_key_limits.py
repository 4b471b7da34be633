"""What one API key may pile up (app/store/key_limits.py): open jobs of every submit route,
live webhooks, policy and prompt set versions. At a cap a new one is refused (409
limit_reached, nothing stored); a replay of what was accepted is still answered; room frees
as jobs end and webhooks are revoked; other keys are not counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select, text

from app.config import Settings
from app.store.db import Sessions
from tests.conftest import api_client, eventually, new_key, served
from tests.test_api import KITCHEN_POLICIES, error_of
from tests.test_cli import aidsafe
from tests.test_idempotency import Submit, stored, submitted  # noqa: F401 (a fixture)
from tests.test_prompt_sets import CUSTOM_SEED_USER, templates

Headers = dict[str, str]
CAP = 2


CAPS = {"max_open_jobs_per_key": CAP, "max_webhooks_per_key": CAP, "max_set_versions_per_key": CAP}


@pytest.fixture
async def capped(settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    """The API with every per-key cap at CAP."""
    async with api_client(settings.model_copy(update=CAPS)) as client:
        yield client


@pytest.fixture
async def capped_elsewhere(settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    """A second API process with the same caps: a process's requests of one key take turns
    before they reach Postgres (app/api/key_turns.py), two processes' meet only there."""
    async with api_client(settings.model_copy(update=CAPS)) as client:
        yield client


def refused_at_cap(response: httpx.Response, limit: str, setting: str) -> None:
    error = error_of(response, 409, "limit_reached")
    assert error["details"] == {"limit": limit, "setting": setting, "max": CAP}
    assert setting in error["message"], error["message"]


async def test_each_submit_route_is_refused_at_the_open_jobs_cap_and_replays_are_still_answered(
    capped: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    redis: Redis,
    settings: Settings,
    submitted: Submit,  # noqa: F811 (the fixture)
) -> None:
    accepted = [await submitted.send(capped, {**auth, "Idempotency-Key": f"k{n}"}) for n in range(CAP)]
    assert [r.status_code for r in accepted] == [202] * CAP, accepted[-1].text
    before = await stored(sessions, redis, settings)

    over = await submitted.send(capped, {**auth, "Idempotency-Key": "over"})
    refused_at_cap(over, "open_jobs", "AIDSAFE_MAX_OPEN_JOBS_PER_KEY")
    assert await stored(sessions, redis, settings) == before  # no job, no items, nothing queued

    again = await submitted.send(capped, {**auth, "Idempotency-Key": "k0"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == accepted[0].json()["id"]

    other = await new_key(sessions, "bob")  # a comparison of alice's jobs would be a 404: a job
    assert (await capped.post("/v1/jobs", json={"prompts": ["a"]}, headers=other)).status_code == 202

    cancelled = await capped.post(f"/v1/jobs/{accepted[0].json()['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200, cancelled.text
    assert (await submitted.send(capped, {**auth, "Idempotency-Key": "over"})).status_code == 202


async def test_jobs_of_every_mode_count_together(capped: httpx.AsyncClient, auth: Headers) -> None:
    evaluation = {"guard": {}, "samples": [{"prompt": "Hi", "response": "Hello."}]}
    for _ in range(CAP):
        assert (await capped.post("/v1/sample-evaluations", json=evaluation, headers=auth)).status_code == 202
    job = await capped.post("/v1/jobs", json={"prompts": ["a"]}, headers=auth)
    refused_at_cap(job, "open_jobs", "AIDSAFE_MAX_OPEN_JOBS_PER_KEY")


async def test_concurrent_submissions_of_one_key_take_the_last_place_once(
    capped: httpx.AsyncClient, capped_elsewhere: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    assert (await capped.post("/v1/jobs", json={"prompts": ["a"]}, headers=auth)).status_code == 202
    requests = [({"prompts": [f"p{n}"]}, auth) for n in range(2)]
    answers = await at_once([capped, capped_elsewhere], sessions, requests)
    assert sorted(r.status_code for r in answers) == [202, 409], [r.text for r in answers]
    assert len((await capped.get("/v1/jobs", headers=auth)).json()["data"]) == CAP


async def test_a_replay_sent_while_its_request_is_under_way_is_answered_at_the_last_place(
    capped: httpx.AsyncClient, capped_elsewhere: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    assert (await capped.post("/v1/jobs", json={"prompts": ["a"]}, headers=auth)).status_code == 202
    retried = ({"prompts": ["b"]}, {**auth, "Idempotency-Key": "retried"})
    answers = await at_once([capped, capped_elsewhere], sessions, [retried, retried])
    assert sorted(r.status_code for r in answers) == [200, 202], [r.text for r in answers]
    assert answers[0].json()["id"] == answers[1].json()["id"]


async def at_once(
    apis: list[httpx.AsyncClient], sessions: Sessions, requests: list[tuple[dict[str, Any], Headers]]
) -> list[httpx.Response]:
    """POST the jobs together, each to its own API process and held at its items' COPY (after
    its count and its job row) until all wait in Postgres: none has committed when another
    counts, unless they take turns on the key's row."""
    async with sessions() as blocker:
        await blocker.execute(text("LOCK TABLE items IN SHARE MODE"))
        posts = [
            asyncio.create_task(api.post("/v1/jobs", json=b, headers=h))
            for api, (b, h) in zip(apis, requests, strict=True)
        ]
        await eventually(lambda: waiting_for_locks(sessions, len(requests)), what="the submissions waiting")
        await blocker.rollback()
    return list(await asyncio.gather(*posts))


async def waiting_for_locks(sessions: Sessions, count: int) -> bool:
    """Whether `count` statements of this test's database wait for a lock."""
    return await lock_waiters(sessions) == count


async def lock_waiters(sessions: Sessions) -> int:
    """How many statements of this test's database wait for a lock."""
    waiting = (
        select(func.count())
        .where(text("datname = current_database() AND wait_event_type = 'Lock'"))
        .select_from(text("pg_stat_activity"))
    )
    async with sessions() as session:
        return await session.scalar(waiting) or 0


async def test_webhooks_are_refused_at_the_cap_until_one_is_revoked(
    capped: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    made = [await capped.post("/v1/webhooks", json={"name": f"ls{n}"}, headers=auth) for n in range(CAP)]
    assert [r.status_code for r in made] == [201] * CAP

    over = await capped.post("/v1/webhooks", json={"name": "over"}, headers=auth)
    refused_at_cap(over, "webhooks", "AIDSAFE_MAX_WEBHOOKS_PER_KEY")
    assert len((await capped.get("/v1/webhooks", headers=auth)).json()["data"]) == CAP

    other = await new_key(sessions, "bob")
    assert (await capped.post("/v1/webhooks", json={"name": "bob's"}, headers=other)).status_code == 201

    revoked = await capped.post(f"/v1/webhooks/{made[0].json()['id']}/revoke", headers=auth)
    assert revoked.status_code == 200, revoked.text
    assert (await capped.post("/v1/webhooks", json={"name": "over"}, headers=auth)).status_code == 201


def policy_set(n: int) -> dict[str, Any]:
    return {"name": "kitchen", "policies": [{**KITCHEN_POLICIES[0], "allowed": [f"recipe {n}"]}]}


def prompt_set(n: int) -> dict[str, Any]:
    return {"name": "house", "templates": templates(seed__user=f"{CUSTOM_SEED_USER} (version {n})")}


@pytest.mark.parametrize(
    ("path", "version", "limit"),
    [
        ("/v1/policy-sets", policy_set, "policy_set_versions"),
        ("/v1/prompt-sets", prompt_set, "prompt_set_versions"),
    ],
)
async def test_set_versions_are_refused_at_the_cap_and_known_content_is_still_answered(
    capped: httpx.AsyncClient, auth: Headers, sessions: Sessions, path: str, version: Any, limit: str
) -> None:
    made = [await capped.post(path, json=version(n), headers=auth) for n in range(CAP)]
    assert [r.status_code for r in made] == [201] * CAP, made[-1].text

    refused_at_cap(
        await capped.post(path, json=version(CAP), headers=auth), limit, "AIDSAFE_MAX_SET_VERSIONS_PER_KEY"
    )
    again = await capped.post(path, json=version(0), headers=auth)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == made[0].json()["id"]

    other = await new_key(sessions, "bob")
    assert (await capped.post(path, json=version(CAP), headers=other)).status_code == 201


async def test_the_cli_names_its_own_way_to_free_room(
    settings: Settings, sessions: Sessions, auth: Headers, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How do I sharpen a knife?"}\n', encoding="utf-8")
    caps = {"max_open_jobs_per_key": 1, "max_webhooks_per_key": 1}
    wide = 1000  # a refusal on a line of its own
    with served(settings.model_copy(update=caps)) as url:
        for command in (["submit", str(prompts), "--no-follow", "--no-show"], ["webhooks", "create", "ls"]):
            assert (await aidsafe(url, auth, *command, columns=wide))[0] == 0
        job_code, job = await aidsafe(
            url, auth, "submit", str(prompts), "--no-follow", "--no-show", columns=wide
        )
        webhook_code, webhook = await aidsafe(url, auth, "webhooks", "create", "ls", columns=wide)

    assert job_code == 1 and "409: limit_reached" in job and "AIDSAFE_MAX_OPEN_JOBS_PER_KEY" in job, job
    assert "(with the CLI: `aidsafe jobs list --status queued" in job and "`aidsafe jobs cancel ID`" in job
    assert webhook_code == 1 and "409: limit_reached" in webhook, webhook
    assert "(with the CLI: `aidsafe webhooks list` shows them; `aidsafe webhooks revoke ID`" in webhook
