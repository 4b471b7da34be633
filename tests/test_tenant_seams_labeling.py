"""Owner checks of the labeling side (webhooks, reviews, policy and prompt sets) that no other
test held: each test here fails with one owner predicate dropped (bench/MUTATION-tenant-seams-
labeling.md names which) and passes with it."""

from __future__ import annotations

import httpx

from app.store import keys
from app.store.db import Sessions
from tests.conftest import new_key
from tests.test_annotation_identity import reviewed
from tests.test_labeling import approved, import_file, item_ids
from tests.test_prompt_sets import CUSTOM_SEED_USER, ONE_AGENT, register
from tests.test_quality_api import completed, finished_job
from tests.test_reviews import Stored, get_json, store_reviews
from tests.test_webhooks import deletion, deliver, new_webhook

Headers = dict[str, str]


async def test_another_keys_webhook_never_withdraws_a_review_imported_from_a_file(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A deletion names only the tool's annotation id; a file import's review has no webhook
    to tell it apart, so only the owner keeps another key's Label Studio from withdrawing it."""
    job_id = await finished_job(api, auth, sessions, [completed()])
    [item_id] = await item_ids(api, auth, job_id)
    await import_file(
        api, auth, job_id, "label-studio", [reviewed(item_id, 601, "accept", "2026-11-20T10:00:00Z")]
    )
    theirs = await new_webhook(api, await new_key(sessions, "bob"))

    report = (await deliver(api, theirs, deletion(601))).json()

    assert report["retracted"] == 0, report
    assert await approved(sessions, job_id) == {item_id}


async def test_another_keys_later_version_of_an_annotation_id_does_not_replace_mine(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """An annotation is (owner, item, source, the tool's id): a row of another tenant's with
    the same id on this item (no import writes one) is never read as a newer version."""
    job_id = await finished_job(api, auth, sessions, [completed()])
    async with sessions.begin() as session:
        other_key, _ = await keys.create_key(session, "bob", ())
    await store_reviews(sessions, job_id, [Stored(0, "ana", "accept", annotation="7")])
    await store_reviews(
        sessions, job_id, [Stored(0, "mallory", "reject", minutes=5, annotation="7")], owner=other_key.id
    )
    [item_id] = await item_ids(api, auth, job_id)

    mine = await get_json(api, auth, f"/v1/items/{item_id}/reviews")

    assert [r["reviewer"] for r in mine["reviews"]] == ["ana"] and mine["decision"] == "approved"


async def test_a_job_pins_the_builtin_set_not_another_keys_copy_of_it(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A key's set of the built-in name and templates has the built-in version: stored before
    the built-in row, it is still not the row another key's jobs pin."""
    copied = await register(api, auth, name="aidsafe-default")
    other = await new_key(sessions, "bob")

    job = await api.post("/v1/jobs", json={"prompts": ["Hi"], "config": ONE_AGENT}, headers=other)

    assert copied.status_code == 201, copied.text
    assert job.status_code == 202, job.text
    pinned = job.json()["prompt_set"]
    assert pinned["version"] == copied.json()["version"] and pinned["id"] != copied.json()["id"]
    assert (await api.get(f"/v1/prompt-sets/{pinned['id']}", headers=other)).json()["builtin"] is True


async def test_a_keys_own_set_of_the_builtin_name_comes_before_the_builtin_one(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    own = await register(api, auth, name="aidsafe-default", seed__user=CUSTOM_SEED_USER)
    listed = await api.get("/v1/prompt-sets", headers=auth)  # the built-in row, stored after

    job = await api.post("/v1/jobs", json={"prompts": ["Hi"], "config": ONE_AGENT}, headers=auth)

    assert (own.status_code, listed.status_code, job.status_code) == (201, 200, 202), job.text
    assert job.json()["prompt_set"]["id"] == own.json()["id"]
