"""Label Studio webhooks: one per key and tool instance, each with its own secret. A delivery
reads the owner's items only, deletions withdraw reviews, and every refused delivery is kept
for the owner to read."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update

from app.api.failures import Failures
from app.config import Settings
from app.errors import NotFound
from app.main import create_app
from app.store import webhooks as store
from app.store.db import Sessions
from app.store.models import ApiKey, Item, Webhook, WebhookRejection
from app.store.page_sizes import PAGE_ROW_BYTES
from app.store.webhooks import KEPT_UNAUTHORIZED
from tests.conftest import eventually, longest_loop_pause
from tests.test_api import all_pages, error_of
from tests.test_cli import aidsafe
from tests.test_labeling import PROMPTS, approved, fixture, graded_job, item_ids, stored

Headers = dict[str, str]
HEADER = "X-Aidsafe-Webhook-Secret"


async def new_webhook(api: httpx.AsyncClient, auth: Headers, name: str = "ls-prod") -> dict[str, Any]:
    response = await api.post("/v1/webhooks", json={"name": name}, headers=auth)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def deliver(
    api: httpx.AsyncClient, webhook: dict[str, Any], event: Any, secret: str | None = None
) -> httpx.Response:
    path = httpx.URL(webhook["url"]).path
    headers = {HEADER: webhook["secret"] if secret is None else secret}
    return await api.post(path, json=event, headers=headers)


async def rejections(api: httpx.AsyncClient, auth: Headers, webhook: dict[str, Any]) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/webhooks/{webhook['id']}/rejections", headers=auth)
    assert response.status_code == 200, response.text
    return list(response.json())


def deletion(*annotation_ids: int) -> dict[str, Any]:
    """Label Studio's ANNOTATIONS_DELETED event: only the ids."""
    return {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": i} for i in annotation_ids],
        "project": {"id": 3},
    }


async def test_a_webhook_is_made_per_key_with_a_secret_shown_once(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    made = await new_webhook(api, auth)

    listed = (await api.get("/v1/webhooks", headers=auth)).json()["data"]

    assert made["secret"].startswith("aidsafe_whsec_") and made["secret_header"] == HEADER
    assert made["url"].endswith(f"/v1/webhooks/label-studio/{made['id']}")
    assert [w["id"] for w in listed] == [made["id"]] and "secret" not in listed[0]


async def posted(api: httpx.AsyncClient, auth: Headers, key: str, name: str = "ls-prod") -> httpx.Response:
    return await api.post("/v1/webhooks", json={"name": name}, headers={**auth, "Idempotency-Key": key})


async def test_a_webhook_posted_again_under_its_idempotency_key_is_answered_without_its_secret(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """A retry after a lost answer gets the webhook made, 200 not 201; the secret, kept only as
    a hash, is shown by the first answer alone."""
    first = await posted(api, auth, "ls-1")
    again = await posted(api, auth, "ls-1")

    assert (first.status_code, again.status_code) == (201, 200), again.text
    made, replayed = first.json(), again.json()
    assert made["secret"].startswith("aidsafe_whsec_") and replayed["secret"] is None
    assert {k: v for k, v in replayed.items() if k != "secret"} == {
        k: v for k, v in made.items() if k != "secret"
    }
    listed = (await api.get("/v1/webhooks", headers=auth)).json()["data"]
    assert [w["id"] for w in listed] == [made["id"]]


async def test_an_idempotency_key_sent_with_another_name_is_a_conflict_and_makes_nothing(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    made = (await posted(api, auth, "ls-1", "ls-prod")).json()

    error_of(await posted(api, auth, "ls-1", "ls-staging"), 409, "idempotency_conflict")

    listed = (await api.get("/v1/webhooks", headers=auth)).json()["data"]
    assert [w["id"] for w in listed] == [made["id"]]


async def test_a_webhooks_idempotency_key_never_matches_the_legacy_request_hash(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Webhooks took Idempotency-Keys (migration 0036) after jobs stopped storing the legacy
    hash (the body with every default filled in, app/idempotency.py), so none holds it and a
    replay never computes it. Shown by planting it: computed, it would match."""
    made = (await posted(api, auth, "ls-1")).json()
    legacy = hashlib.sha256(b'{"source":"label_studio","name":"ls-prod"}').hexdigest()
    async with sessions.begin() as session:
        await session.execute(
            update(Webhook).where(Webhook.id == UUID(made["id"])).values(request_hash=legacy)
        )

    error_of(await posted(api, auth, "ls-1"), 409, "idempotency_conflict")


async def test_an_idempotency_key_of_another_api_key_makes_a_webhook_of_its_own(
    api: httpx.AsyncClient, auth: Headers, other: Headers
) -> None:
    mine = await posted(api, auth, "ls-1")
    theirs = await posted(api, other, "ls-1")

    assert (mine.status_code, theirs.status_code) == (201, 201), theirs.text
    assert mine.json()["id"] != theirs.json()["id"] and theirs.json()["secret"]


async def test_a_replay_is_answered_at_the_cap_on_webhooks(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings
) -> None:
    made = (await posted(api, auth, "ls-1")).json()
    await add_webhooks(sessions, made, settings.max_webhooks_per_key - 1)

    again = await posted(api, auth, "ls-1")

    assert again.status_code == 200 and again.json()["id"] == made["id"], again.text
    error_of(await posted(api, auth, "ls-2"), 409, "limit_reached")


async def test_posts_sent_at_once_under_one_idempotency_key_make_one_webhook(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    answers = await asyncio.gather(*(posted(api, auth, "ls-1") for _ in range(5)))

    assert sorted(a.status_code for a in answers) == [200] * 4 + [201]
    assert len({a.json()["id"] for a in answers}) == 1
    assert [a.json()["secret"] is not None for a in answers].count(True) == 1


async def test_a_deleted_webhooks_idempotency_key_makes_a_new_webhook(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    made = (await posted(api, auth, "ls-1")).json()
    assert (await api.post(f"/v1/webhooks/{made['id']}/revoke", headers=auth)).status_code == 200
    assert (await api.delete(f"/v1/webhooks/{made['id']}", headers=auth)).status_code == 204

    again = await posted(api, auth, "ls-1")

    assert again.status_code == 201 and again.json()["id"] != made["id"] and again.json()["secret"]


async def test_a_field_the_route_does_not_take_is_refused_and_makes_nothing(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """As every other body: a misspelt field was ignored, and the webhook made without it."""
    response = await api.post("/v1/webhooks", json={"name": "ls-prod", "sorce": "label_studio"}, headers=auth)

    assert "sorce: Extra inputs are not permitted" in error_of(response, 422, "validation_error")["message"]
    assert (await api.get("/v1/webhooks", headers=auth)).json()["data"] == []


async def test_an_empty_idempotency_key_is_refused(api: httpx.AsyncClient, auth: Headers) -> None:
    error_of(await posted(api, auth, ""), 422, "validation_error")


async def add_webhooks(sessions: Sessions, owner_of: dict[str, Any], count: int) -> None:
    """`count` more webhooks of the owner of `owner_of`, made after it, as fast as SQL can."""
    async with sessions.begin() as session:
        owner = await session.scalar(select(Webhook.owner_key_id).where(Webhook.id == UUID(owner_of["id"])))
        await session.execute(
            text(
                "INSERT INTO webhooks (id, owner_key_id, source, name, secret_hash, created_at)"
                " SELECT gen_random_uuid(), :owner, 'label_studio', 'ls-' || n, md5(n::text),"
                " now() + n * interval '1 microsecond' FROM generate_series(1, :count) AS n"
            ),
            {"owner": owner, "count": count},
        )


async def test_a_keys_thousands_of_webhooks_are_listed_with_the_event_loop_free(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Revoked webhooks are kept and count against no cap (a key made and revoked some 140 a
    second): listed whole, 22,000 held every other request for 0.6 s. A page holds 500 at most."""
    made = await new_webhook(api, auth)
    await add_webhooks(sessions, made, 5000)

    pages: list[dict[str, Any]] = []
    for _ in range(11):  # 5,001 webhooks: ten pages of 500 and one of 1
        cursor = {"cursor": pages[-1]["next_cursor"]} if pages else {}
        response, paused = await longest_loop_pause(
            api.get("/v1/webhooks", params={"limit": 500, **cursor}, headers=auth),
            clock=time.thread_time,  # the loop thread's own CPU: other processes load the machine
        )
        assert response.status_code == 200, response.text
        assert paused < 0.1, f"the event loop was held {paused:.2f} s"
        pages.append(response.json())

    listed = [webhook for page in pages for webhook in page["data"]]
    assert [len(page["data"]) for page in pages] == [500] * 10 + [1] and pages[-1]["next_cursor"] is None
    assert len({w["id"] for w in listed}) == 5001 and listed[0]["url"] == made["url"]
    assert all(w["url"].endswith(f"/v1/webhooks/label-studio/{w['id']}") for w in listed)


async def test_a_keys_webhooks_are_listed_a_page_at_a_time_oldest_first(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    made = [await new_webhook(api, auth, f"ls-{n}") for n in range(5)]

    pages = await all_pages(api, auth, "/v1/webhooks", limit=2)
    default = (await api.get("/v1/webhooks", headers=auth)).json()

    assert [[w["name"] for w in page] for page in pages] == [["ls-0", "ls-1"], ["ls-2", "ls-3"], ["ls-4"]]
    assert [w["id"] for w in default["data"]] == [w["id"] for w in made] and default["next_cursor"] is None


async def test_a_webhook_page_holds_100_unless_asked_and_500_at_most(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    await add_webhooks(sessions, await new_webhook(api, auth), 600)

    default = (await api.get("/v1/webhooks", headers=auth)).json()

    assert len(default["data"]) == 100 and default["next_cursor"] is not None
    for limit in (0, 501):
        error_of(
            await api.get("/v1/webhooks", params={"limit": limit}, headers=auth), 422, "validation_error"
        )
    error_of(
        await api.get("/v1/webhooks", params={"cursor": "not a cursor"}, headers=auth), 400, "invalid_cursor"
    )


async def test_a_webhook_listing_pages_on_after_the_webhooks_it_listed_are_deleted(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    for n in range(4):
        await new_webhook(api, auth, f"ls-{n}")
    first = (await api.get("/v1/webhooks", params={"limit": 2}, headers=auth)).json()
    for webhook in first["data"]:
        await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)
        assert (await api.delete(f"/v1/webhooks/{webhook['id']}", headers=auth)).status_code == 204

    rest = await api.get("/v1/webhooks", params={"limit": 2, "cursor": first["next_cursor"]}, headers=auth)

    assert [w["name"] for w in rest.json()["data"]] == ["ls-2", "ls-3"]


@pytest.mark.parametrize("name", ["   ", "ls\nprod", "ls\x1b[31mprod", "ls\u2028prod"])
async def test_a_webhook_name_that_is_not_one_line_of_text_is_refused(
    api: httpx.AsyncClient, auth: Headers, name: str
) -> None:
    error_of(await api.post("/v1/webhooks", json={"name": name}, headers=auth), 422, "validation_error")

    assert (await api.get("/v1/webhooks", headers=auth)).json()["data"] == []


async def test_a_delivery_to_an_unknown_webhook_is_not_found(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/v1/webhooks/label-studio/00000000-0000-4000-8000-000000000009",
        json={"action": "ANNOTATION_CREATED"},
        headers={HEADER: "anything"},
    )

    error_of(response, 404, "not_found")


async def test_a_missing_or_wrong_secret_is_refused_and_logged_without_the_body(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    event = fixture("label_studio_webhook.json", await item_ids(api, auth, job_id))
    path = httpx.URL(webhook["url"]).path

    for headers in ({}, {HEADER: "wrong"}, auth):
        error_of(await api.post(path, json=event, headers=headers), 401, "unauthorized")

    assert await stored(sessions) == []
    logged = await rejections(api, auth, webhook)
    assert [(r["code"], r["body"]) for r in logged] == [("unauthorized", None)] * 3


async def test_created_and_updated_annotations_are_stored(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    [item_id] = await item_ids(api, auth, job_id)
    created = fixture("label_studio_webhook.json", [item_id])
    updated = copy.deepcopy(created)
    updated["action"] = "ANNOTATION_UPDATED"
    updated["annotation"]["updated_at"] = "2026-11-21T09:00:00.000000Z"
    updated["annotation"]["result"][0]["value"]["choices"] = ["reject"]

    reports = [(await deliver(api, webhook, event)).json() for event in (created, created, updated)]

    assert [(r["imported"], r["duplicates"]) for r in reports] == [(1, 0), (0, 1), (1, 0)]
    rows = await stored(sessions)
    assert [(str(r.item_id), r.external_id, r.verdict, r.annotator, str(r.webhook_id)) for r in rows] == [
        (item_id, "601", "accept", "3", webhook["id"]),
        (item_id, "601", "reject", "3", webhook["id"]),
    ]
    assert await approved(sessions, job_id) == set()


async def test_bulk_created_annotations_are_read_by_task(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:2])
    ids = await item_ids(api, auth, job_id)
    single = fixture("label_studio_webhook.json", ids)
    second_task = {**copy.deepcopy(single["task"]), "id": 105, "data": {"item_id": ids[1]}}
    second = {**copy.deepcopy(single["annotation"]), "id": 602, "task": 105}
    second["result"][0]["value"]["choices"] = ["reject"]
    bulk = {**single, "action": "ANNOTATIONS_CREATED", "annotation": [second, single["annotation"]]}
    bulk["task"] = [single["task"], second_task]

    response = await deliver(api, webhook, bulk)

    assert response.json()["imported"] == 2, response.text
    assert {(str(r.item_id), r.verdict) for r in await stored(sessions)} == {
        (ids[0], "accept"),
        (ids[1], "reject"),
    }


async def test_other_events_are_acknowledged_and_store_nothing(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    event = {"action": "TASKS_CREATED", "tasks": [{"id": 1, "data": {}}], "project": {"id": 3}}

    response = await deliver(api, webhook, event)

    assert response.status_code == 200, response.text
    assert response.json()["skipped"] == [
        {"annotation": None, "reason": "TASKS_CREATED is not an annotation event"}
    ]
    assert await stored(sessions) == []


async def test_another_keys_item_is_unknown_like_an_item_nobody_has_and_the_refusal_is_kept(
    api: httpx.AsyncClient, auth: Headers, other: Headers, settings: Settings, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    theirs = await graded_job(api, other, settings, PROMPTS[:1])
    [their_item] = await item_ids(api, other, theirs)
    nobodys = "00000000-0000-4000-8000-000000000002"

    answers = [
        await deliver(api, webhook, fixture("label_studio_webhook.json", [item_id]))
        for item_id in (their_item, nobodys)
    ]

    first, second = (error_of(answer, 422, "unknown_items") for answer in answers)
    assert first["message"].replace(their_item, nobodys) == second["message"]
    assert await stored(sessions) == []
    logged = await rejections(api, auth, webhook)
    assert [r["code"] for r in logged] == ["unknown_items", "unknown_items"]
    assert nobodys in (logged[0]["body"] or "") and their_item in (logged[1]["body"] or "")


async def test_a_revoked_webhook_refuses_deliveries(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    event = fixture("label_studio_webhook.json", await item_ids(api, auth, job_id))
    revoked = await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)

    response = await deliver(api, webhook, event)

    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert "revoked" in error_of(response, 401, "unauthorized")["message"]
    assert await stored(sessions) == []


async def test_a_webhook_of_a_revoked_key_refuses_deliveries(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    event = fixture("label_studio_webhook.json", await item_ids(api, auth, job_id))
    async with sessions.begin() as session:
        await session.execute(update(ApiKey).values(revoked_at=func.now()))  # the only key: the owner

    response = await deliver(api, webhook, event)

    assert "API key this webhook belongs to was revoked" in error_of(response, 401, "unauthorized")["message"]
    assert await stored(sessions) == []


async def test_a_keys_webhooks_and_rejections_are_its_own(
    api: httpx.AsyncClient, auth: Headers, other: Headers
) -> None:
    webhook = await new_webhook(api, auth)

    for method, url in (
        ("GET", f"/v1/webhooks/{webhook['id']}/rejections"),
        ("POST", f"/v1/webhooks/{webhook['id']}/revoke"),
    ):
        error_of(await api.request(method, url, headers=other), 404, "not_found")
    assert (await api.get("/v1/webhooks", headers=other)).json()["data"] == []


async def test_another_keys_revoked_webhook_is_not_found_for_deletion_and_stays(
    api: httpx.AsyncClient, auth: Headers, other: Headers
) -> None:
    webhook = await new_webhook(api, auth)
    await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)

    error_of(await api.delete(f"/v1/webhooks/{webhook['id']}", headers=other), 404, "not_found")

    assert [w["id"] for w in (await api.get("/v1/webhooks", headers=auth)).json()["data"]] == [webhook["id"]]


# --- deleting a revoked webhook -------------------------------------------------------------


async def webhook_rows(sessions: Sessions, webhook: dict[str, Any]) -> tuple[int, int]:
    """The webhook's rows and its rejections' rows in the database."""
    async with sessions() as session:
        found = await session.scalar(select(func.count()).where(Webhook.id == UUID(webhook["id"])))
        refused = await session.scalar(
            select(func.count()).where(WebhookRejection.webhook_id == UUID(webhook["id"]))
        )
    return int(found or 0), int(refused or 0)


async def test_a_revoked_webhook_is_deleted_with_the_deliveries_it_refused(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    webhook, kept = await new_webhook(api, auth, "old"), await new_webhook(api, auth, "kept")
    await deliver(api, webhook, {"action": "ANNOTATION_CREATED"}, secret="wrong")
    await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)
    await deliver(api, webhook, {"action": "ANNOTATION_CREATED"})  # refused: revoked
    assert await webhook_rows(sessions, webhook) == (1, 2)

    deleted = await api.delete(f"/v1/webhooks/{webhook['id']}", headers=auth)

    assert (deleted.status_code, deleted.content) == (204, b"")
    assert await webhook_rows(sessions, webhook) == (0, 0)
    assert [w["id"] for w in (await api.get("/v1/webhooks", headers=auth)).json()["data"]] == [kept["id"]]
    error_of(await api.get(f"/v1/webhooks/{webhook['id']}/rejections", headers=auth), 404, "not_found")
    error_of(await api.delete(f"/v1/webhooks/{webhook['id']}", headers=auth), 404, "not_found")


async def test_a_webhook_not_revoked_is_not_deleted(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)

    refused = await api.delete(f"/v1/webhooks/{webhook['id']}", headers=auth)

    assert "revoke" in error_of(refused, 409, "webhook_not_revoked")["message"]
    assert await webhook_rows(sessions, webhook) == (1, 0)


async def test_a_delivery_to_a_deleted_webhook_is_answered_as_one_to_an_unknown_webhook(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)
    await api.delete(f"/v1/webhooks/{webhook['id']}", headers=auth)
    unknown = {
        **webhook,
        "url": webhook["url"].replace(webhook["id"], "00000000-0000-4000-8000-000000000009"),
    }

    to_deleted = await deliver(api, webhook, {"action": "ANNOTATION_CREATED"})
    to_unknown = await deliver(api, unknown, {"action": "ANNOTATION_CREATED"})

    assert error_of(to_deleted, 404, "not_found") == error_of(to_unknown, 404, "not_found")
    assert await webhook_rows(sessions, webhook) == (0, 0)


async def approved_through_one_of_two(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """Two webhooks (two Label Studio instances) and a graded one-item job whose item the
    first one's delivery approved: (first, second, job id, item id)."""
    first, second = await new_webhook(api, auth, "instance A"), await new_webhook(api, auth, "instance B")
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    [item_id] = await item_ids(api, auth, job_id)
    await deliver(api, first, fixture("label_studio_webhook.json", [item_id]))
    return first, second, job_id, item_id


async def test_the_reviews_a_deleted_webhook_delivered_stay_and_another_ones_deletions_leave_them(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    first, second, job_id, item_id = await approved_through_one_of_two(api, auth, settings)
    await api.post(f"/v1/webhooks/{first['id']}/revoke", headers=auth)
    assert (await api.delete(f"/v1/webhooks/{first['id']}", headers=auth)).status_code == 204

    report = (await deliver(api, second, deletion(601))).json()

    assert report["retracted"] == 0
    assert await approved(sessions, job_id) == {item_id}
    reviews = (await api.get(f"/v1/items/{item_id}/reviews", headers=auth)).json()["reviews"]
    assert {r["webhook_id"] for r in reviews} == {first["id"]}


async def waits_on_a_lock(sessions: Sessions) -> bool:
    """Some session of this test's database waits for a row another holds."""
    async with sessions() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


async def test_a_deletion_waits_for_a_delivery_under_way(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A delivery found its webhook before it was revoked and is writing reviews: the deletion
    goes after it, not under it (it would delete the webhook its rows are being written for)."""
    webhook = await new_webhook(api, auth)
    await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)

    async with sessions() as delivery:
        await store.find(delivery, UUID(webhook["id"]), "label_studio")
        deleting = asyncio.ensure_future(api.delete(f"/v1/webhooks/{webhook['id']}", headers=auth))

        async def deleted_or_waiting() -> bool:
            return deleting.done() or await waits_on_a_lock(sessions)

        await eventually(deleted_or_waiting, what="the deletion to end or wait")
        assert not deleting.done(), deleting.result().text
        await delivery.commit()

    assert (await deleting).status_code == 204


async def test_a_refusal_recorded_after_its_webhook_was_deleted_keeps_nothing_and_is_not_found(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A delivery to a revoked webhook is refused, its transaction rolled back (and with it its
    hold on the webhook), and its refusal recorded in the next: a deletion in between leaves it
    no webhook to record against, and the delivery is answered as one to an unknown webhook."""
    webhook = await new_webhook(api, auth)
    await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)
    async with sessions() as delivery:
        await store.find(delivery, UUID(webhook["id"]), "label_studio")
        await delivery.rollback()
        assert (await api.delete(f"/v1/webhooks/{webhook['id']}", headers=auth)).status_code == 204

        with pytest.raises(NotFound):
            await store.record_rejection(delivery, UUID(webhook["id"]), "unauthorized", "revoked", None)
        await delivery.rollback()

    assert await webhook_rows(sessions, webhook) == (0, 0)


async def test_an_unreadable_delivery_is_refused_and_kept_with_its_body(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    webhook = await new_webhook(api, auth)
    path = httpx.URL(webhook["url"]).path

    headers = {HEADER: webhook["secret"], "Content-Type": "application/json"}

    not_json = await api.post(path, content=b"{not json", headers=headers)
    no_action = await api.post(path, content=b'{"annotation": {"id": 1}}', headers=headers)

    error_of(not_json, 400, "bad_request")
    error_of(no_action, 422, "validation_error")
    logged = await rejections(api, auth, webhook)
    assert [(r["code"], r["body"]) for r in logged] == [
        ("validation_error", '{"annotation": {"id": 1}}'),
        ("bad_request", "{not json"),
    ]


async def test_a_delivery_holding_a_nul_byte_is_refused_and_kept_with_its_body(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """PostgreSQL text cannot hold U+0000: the kept body shows it as U+FFFD, as it shows
    bytes that are not UTF-8."""
    webhook = await new_webhook(api, auth)
    path = httpx.URL(webhook["url"]).path
    headers = {HEADER: webhook["secret"], "Content-Type": "application/json"}

    response = await api.post(
        path, content=b'{"action": "ANNOTATION_CREATED", "x": "\x00\xff"}', headers=headers
    )

    error_of(response, 400, "bad_request")
    logged = await rejections(api, auth, webhook)
    assert [(r["code"], r["body"]) for r in logged] == [
        ("bad_request", '{"action": "ANNOTATION_CREATED", "x": "\ufffd\ufffd"}')
    ]


async def test_refusals_for_the_secret_do_not_push_out_the_owners_refused_bodies(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """Anyone who knows the URL can be refused for the secret; those refusals are kept apart,
    the newest KEPT_UNAUTHORIZED, and never evict an authenticated refusal's body."""
    webhook = await new_webhook(api, auth)
    path = httpx.URL(webhook["url"]).path
    headers = {HEADER: webhook["secret"], "Content-Type": "application/json"}
    error_of(await api.post(path, content=b"{not json", headers=headers), 400, "bad_request")

    for _ in range(KEPT_UNAUTHORIZED + 5):
        error_of(await api.post(path, json={}, headers={HEADER: "guess"}), 401, "unauthorized")

    logged = await rejections(api, auth, webhook)
    assert [r["code"] for r in logged] == ["unauthorized"] * KEPT_UNAUTHORIZED + ["bad_request"]
    assert logged[-1]["body"] == "{not json"


SKIPPED_EVENT = {"action": "TASKS_CREATED", "tasks": [], "project": {"id": 3}}


@asynccontextmanager
async def from_addresses(
    settings: Settings, *addresses: str, **overrides: Any
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One API (its settings with `overrides`), and a client of it from each address."""
    app = create_app(settings.model_copy(update=overrides))
    async with app.router.lifespan_context(app), AsyncExitStack() as clients:
        yield [
            await clients.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app, client=(address, 4321)), base_url="http://api"
                )
            )
            for address in addresses
        ]


async def test_an_address_past_its_wrong_secrets_is_refused_them_unstored_but_never_the_right_one(
    settings: Settings, auth: Headers
) -> None:
    """Else it could try secrets as fast as the API answers, each stored as a rejection. The
    right secret goes through: a guesser behind the tool's proxy must not cost it deliveries."""
    async with from_addresses(settings, "203.0.113.9", webhook_wrong_secrets_per_address=3) as (shared,):
        webhook = await new_webhook(shared, auth)
        for _ in range(3):
            error_of(await deliver(shared, webhook, SKIPPED_EVENT, "guess"), 401, "unauthorized")

        refused = await deliver(shared, webhook, SKIPPED_EVENT, "guess")
        right = await deliver(shared, webhook, SKIPPED_EVENT)

        error_of(refused, 429, "too_many_wrong_secrets")
        assert 1 <= int(refused.headers["Retry-After"]) <= settings.webhook_wrong_secrets_window_s
        assert right.status_code == 200, right.text
        assert [r["code"] for r in await rejections(shared, auth, webhook)] == ["unauthorized"] * 3


async def test_another_addresss_wrong_secrets_leave_the_tools_alone(
    settings: Settings, auth: Headers
) -> None:
    async with from_addresses(
        settings, "203.0.113.9", "198.51.100.7", webhook_wrong_secrets_per_address=3
    ) as (guesser, tool):
        webhook = await new_webhook(tool, auth)
        for _ in range(3):
            await deliver(guesser, webhook, SKIPPED_EVENT, "guess")
        error_of(await deliver(guesser, webhook, SKIPPED_EVENT, "guess"), 429, "too_many_wrong_secrets")

        error_of(await deliver(tool, webhook, SKIPPED_EVENT, "typo"), 401, "unauthorized")


async def test_an_ipv6_guessers_refusal_for_wrong_secrets_names_the_64_network_counted(
    settings: Settings, auth: Headers
) -> None:
    """Its neighbours' guesses counted towards it: "this address" would be untrue."""
    guessers = [f"2001:db8:0:20::{host:x}" for host in range(1, 5)]
    async with from_addresses(settings, *guessers, webhook_wrong_secrets_per_address=3) as clients:
        webhook = await new_webhook(clients[0], auth)
        for guesser in clients[:3]:
            error_of(await deliver(guesser, webhook, SKIPPED_EVENT, "guess"), 401, "unauthorized")
        refused = await deliver(clients[3], webhook, SKIPPED_EVENT, "guess")

    assert error_of(refused, 429, "too_many_wrong_secrets")["message"].startswith(
        "this address's /64 network (2001:db8:0:20::/64) sent this webhook 3 wrong secrets"
    )


async def test_an_address_refused_for_wrong_secrets_is_counted_anew_once_its_window_ends(
    settings: Settings, auth: Headers
) -> None:
    overrides = {"webhook_wrong_secrets_per_address": 1, "webhook_wrong_secrets_window_s": 1}
    async with from_addresses(settings, "203.0.113.9", **overrides) as (tool,):
        webhook = await new_webhook(tool, auth)
        error_of(await deliver(tool, webhook, SKIPPED_EVENT, "old secret"), 401, "unauthorized")
        error_of(await deliver(tool, webhook, SKIPPED_EVENT, "old secret"), 429, "too_many_wrong_secrets")

        await asyncio.sleep(1.1)
        error_of(await deliver(tool, webhook, SKIPPED_EVENT, "old secret"), 401, "unauthorized")


async def test_wrong_secrets_are_not_counted_while_redis_is_away_and_nothing_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis holds no record: Label Studio sends a refused delivery never again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = Redis(host="127.0.0.1", port=closed_port, socket_connect_timeout=1)
    wrong_secrets = Failures(unreachable, "aidsafe:test", "wrong secrets", limit=1, window_s=60)
    scope = f"webhook {uuid4()}"

    with caplog.at_level(logging.WARNING, logger="aidsafe.api"):
        counted = [await wrong_secrets.count("203.0.113.9", scope) for _ in range(2)]
    await unreachable.aclose()

    assert counted == [None, None]  # the second is not refused
    assert wrong_secrets.refused_for_s("203.0.113.9", scope) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"could not count the wrong secrets sent by 203.0.113.9 to {scope}"
    ] * 2
    assert all(record.exc_info for record in caplog.records)  # what Redis answered, for the operator


async def test_a_refusal_gives_the_whole_seconds_left_of_its_window_counted_under_the_prefix(
    redis: Redis, settings: Settings
) -> None:
    """Retry-After is the window's milliseconds left, rounded up: a tool that waits as long is
    counted anew. The count is under the deployment's prefix, as all its Redis keys are."""
    prefix, scope, hour = f"{settings.redis_key_prefix}:{uuid4()}", f"webhook {uuid4()}", 3600
    # An hour: a second's error in the window (ms from s) or in Retry-After (s from ms) shows.
    wrong_secrets = Failures(redis, prefix, "wrong secrets", limit=1, window_s=hour)

    assert await wrong_secrets.count("203.0.113.9", scope) is None
    assert await wrong_secrets.count("203.0.113.9", scope) == hour
    assert wrong_secrets.refused_for_s("203.0.113.9", scope) == hour
    assert len([key async for key in redis.scan_iter(f"{prefix}:*")]) == 1


async def test_an_address_reaching_its_most_wrong_secrets_is_logged_once_a_window(
    redis: Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong secrets sent at once are all counted before any is refused: counted past the
    limit, the address is still logged once, as the operator's one sign of it."""
    prefix, scope = f"{settings.redis_key_prefix}:{uuid4()}", f"webhook {uuid4()}"
    wrong_secrets = Failures(redis, prefix, "wrong secrets", limit=2, window_s=60)

    with caplog.at_level(logging.WARNING, logger="aidsafe.api"):
        for _ in range(4):
            await wrong_secrets.count("203.0.113.9", scope)

    assert [r.getMessage() for r in caplog.records] == [
        f"203.0.113.9 sent 2 wrong secrets to {scope} in 60 s; refusing more till the window ends"
    ]


async def test_a_listing_of_rejections_pages_by_their_size_as_json(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """A thousand kept bodies of a million characters each would be gigabytes in one answer,
    read and encoded on the event loop. Sized as stored, bodies of control characters (six
    bytes each in JSON) made pages of 12 MB."""
    webhook = await new_webhook(api, auth)
    path = httpx.URL(webhook["url"]).path
    headers = {HEADER: webhook["secret"], "Content-Type": "application/json"}
    bodies = ["€".encode() * (PAGE_ROW_BYTES // 3 + 1)]  # a body over a page comes alone
    bodies += [f"{n}".encode() + b"x" * 600_000 for n in range(3)]  # three to a page
    bodies += [f"{n}".encode() + b"\x01" * 300_000 for n in range(4)]  # 1.8 MB of JSON: one to a page
    for body in bodies:
        error_of(await api.post(path, content=body, headers=headers), 400, "bad_request")

    pages: list[list[dict[str, Any]]] = []
    before: dict[str, int] = {}
    while (
        response := await api.get(f"/v1/webhooks/{webhook['id']}/rejections", params=before, headers=auth)
    ).json():
        pages.append(response.json())
        assert len(response.content) <= PAGE_ROW_BYTES or len(pages[-1]) == 1
        before = {"before_id": pages[-1][-1]["id"]}

    assert [len(page) for page in pages] == [1, 1, 1, 1, 3, 1]
    assert [r["body"].encode() for page in pages for r in page] == bodies[::-1]


# --- deletions --------------------------------------------------------------------------------


async def test_deleting_an_annotation_retracts_it_and_the_cot_is_no_longer_approved(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    [item_id] = await item_ids(api, auth, job_id)
    await deliver(api, webhook, fixture("label_studio_webhook.json", [item_id]))
    assert await approved(sessions, job_id) == {item_id}

    report = (await deliver(api, webhook, deletion(601))).json()
    again = (await deliver(api, webhook, deletion(601))).json()

    assert (report["retracted"], report["skipped"]) == (1, [])
    assert again["retracted"] == 0 and again["skipped"][0]["annotation"] == "601"
    assert await approved(sessions, job_id) == set()
    versions = await stored(sessions)
    assert [(v.verdict, v.retracted) for v in versions] == [("accept", False), (None, True)]  # appended
    export = await api.get(
        f"/v1/jobs/{job_id}/export", params={"format": "label_studio", "human_approved": "true"}, headers=auth
    )
    assert export.json() == []


async def test_a_deletion_resent_while_the_first_is_under_way_is_stored_once(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """Label Studio sends a delivery again when the first times out, which may still be under
    way (here: waiting for the item's row): the annotation is withdrawn once, not twice."""
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    [item_id] = await item_ids(api, auth, job_id)
    await deliver(api, webhook, fixture("label_studio_webhook.json", [item_id]))

    async with sessions.begin() as holder:
        await holder.execute(select(Item.id).where(Item.id == UUID(item_id)).with_for_update())
        first = asyncio.ensure_future(deliver(api, webhook, deletion(601)))
        await eventually(lambda: waiting_on_locks(sessions, 1), what="the first delivery to wait")
        again = asyncio.ensure_future(deliver(api, webhook, deletion(601)))
        await eventually(lambda: waiting_on_locks(sessions, 2), what="the second delivery to wait")

    reports = [(await first).json(), (await again).json()]
    assert sorted(r["retracted"] for r in reports) == [0, 1]
    assert [(v.verdict, v.retracted) for v in await stored(sessions)] == [("accept", False), (None, True)]


async def waiting_on_locks(sessions: Sessions, count: int) -> bool:
    """At least `count` sessions of this test's database wait for a lock another holds."""
    async with sessions() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting >= count)


async def test_a_deletion_of_thousands_of_annotations_is_one_statement_not_one_per_annotation(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    """16,000 deleted ids (within the import's value cap) took 45 s of Postgres, a statement
    each, holding a connection of the API's pool: now one statement, in well under a second."""
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    [item_id] = await item_ids(api, auth, job_id)
    await deliver(api, webhook, fixture("label_studio_webhook.json", [item_id]))
    unknown = range(1, 16_000)

    started = time.monotonic()
    report = (await deliver(api, webhook, deletion(601, 601, *unknown))).json()
    elapsed = time.monotonic() - started

    assert report["retracted"] == 1
    assert [s["annotation"] for s in report["skipped"]] == ["601", *map(str, unknown)]  # the repeat too
    assert await approved(sessions, job_id) == set()
    assert elapsed < 10, elapsed


async def test_a_deleted_annotation_reimported_from_an_old_file_stays_retracted(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings)
    ids = await item_ids(api, auth, job_id)
    old_file = fixture("label_studio_export.json", ids)  # annotation 501 accepts ids[0]
    await api.post(f"/v1/jobs/{job_id}/annotations/label-studio", json=old_file, headers=auth)
    await deliver(api, webhook, deletion(501))

    again = await api.post(f"/v1/jobs/{job_id}/annotations/label-studio", json=old_file, headers=auth)

    assert again.json()["duplicates"] == 2
    assert await approved(sessions, job_id) == set()


async def test_a_deletion_from_another_instance_does_not_retract_this_ones_annotation(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    first, second, job_id, item_id = await approved_through_one_of_two(api, auth, settings)

    report = (await deliver(api, second, deletion(601))).json()

    assert report["retracted"] == 0
    assert await approved(sessions, job_id) == {item_id}


async def test_a_deletion_never_reaches_another_keys_annotation(
    api: httpx.AsyncClient, auth: Headers, other: Headers, settings: Settings, sessions: Sessions
) -> None:
    mine, theirs = await new_webhook(api, auth), await new_webhook(api, other)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    [item_id] = await item_ids(api, auth, job_id)
    await deliver(api, mine, fixture("label_studio_webhook.json", [item_id]))

    report = (await deliver(api, theirs, deletion(601))).json()

    assert report["retracted"] == 0
    assert await approved(sessions, job_id) == {item_id}


async def test_the_cli_makes_lists_and_revokes_webhooks_and_shows_refusals(
    live_api: str, auth: Headers
) -> None:
    code, made = await aidsafe(live_api, auth, "webhooks", "create", "ls-staging")
    assert code == 0, made
    secret = made.strip().splitlines()[-1]
    url = next(line.split()[-1] for line in made.splitlines() if "URL:" in line)
    webhook_id = url.rsplit("/", 1)[-1]
    code, none_yet = await aidsafe(live_api, auth, "webhooks", "rejections", webhook_id)
    assert code == 0 and "No refused deliveries." in none_yet, none_yet
    async with httpx.AsyncClient() as client:
        refused = await client.post(url, json={"action": "ANNOTATION_CREATED"}, headers={HEADER: "wrong"})
        accepted = await client.post(url, json={"action": "TASKS_CREATED"}, headers={HEADER: secret})
    assert (refused.status_code, accepted.status_code) == (401, 200)

    code, listing = await aidsafe(live_api, auth, "webhooks", "list")
    assert code == 0 and webhook_id in listing and "ls-staging" in listing and "revoked" not in listing
    code, refusals = await aidsafe(live_api, auth, "webhooks", "rejections", webhook_id)
    assert code == 0 and "unauthorized" in refusals and "no body" in refusals, refusals
    assert "No refused deliveries." not in refusals
    code, revoked = await aidsafe(live_api, auth, "webhooks", "revoke", webhook_id)
    assert code == 0 and "Revoked" in revoked
    _, listing = await aidsafe(live_api, auth, "webhooks", "list")
    assert "revoked" in listing


async def test_the_cli_prints_a_webhook_name_of_brackets_as_given_and_its_secret(
    live_api: str, auth: Headers
) -> None:
    """A name is the client's text, not console markup: "[/x]" made `create` raise after the
    webhook was made and before its secret, shown once, was printed, and every `list` after."""
    name = "[/x] ops [bold]"
    code, made = await aidsafe(live_api, auth, "webhooks", "create", name)
    assert code == 0, made
    secret = made.strip().splitlines()[-1]
    assert f"Created webhook {name} (id" in made and secret.startswith("aidsafe_whsec_"), made

    code, listing = await aidsafe(live_api, auth, "webhooks", "list")
    assert code == 0 and name in listing, listing
    webhook_id = listing.split()[0]
    code, revoked = await aidsafe(live_api, auth, "webhooks", "revoke", webhook_id)
    assert code == 0 and f"Revoked webhook {name} (" in revoked, revoked


async def test_the_cli_lists_every_page_of_webhooks_and_deletes_a_revoked_one(
    live_api: str, auth: Headers, sessions: Sessions
) -> None:
    code, made = await aidsafe(live_api, auth, "webhooks", "create", "ls-old")
    assert code == 0, made
    old_id = next(line.split()[-1] for line in made.splitlines() if "URL:" in line).rsplit("/", 1)[-1]
    await add_webhooks(sessions, {"id": old_id}, 600)  # more than a page of the CLI's
    code, live = await aidsafe(live_api, auth, "webhooks", "delete", old_id)
    assert code == 1 and "webhook_not_revoked" in live and f"webhooks revoke {old_id}` first" in live, live
    await aidsafe(live_api, auth, "webhooks", "revoke", old_id)

    code, deleted = await aidsafe(live_api, auth, "webhooks", "delete", old_id)
    _, listing = await aidsafe(live_api, auth, "webhooks", "list")

    assert code == 0 and f"Deleted webhook {old_id}." in deleted, deleted
    lines = listing.strip().splitlines()
    assert len(lines) == 600 and old_id not in listing and lines[-1].split()[1] == "ls-600", lines[-1]
