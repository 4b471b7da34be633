"""Duplicate prompts within a job: reported at submission and on the job, and skipped with
`"duplicates": "skip"` (items keep their prompt's position). The real API on real Postgres
and Redis; the worker against the scripted LLM where CoTs and exports are needed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import event, inspect

from app.api.schemas import JobIn
from app.config import Settings
from app.duplicates import find, normalised
from app.store.db import Sessions
from app.store.models import Job
from tests.conftest import new_key, run_worker_burst
from tests.test_api import all_pages, error_of, items_of, row_counts, submit
from tests.test_viewer import logged_in

Headers = dict[str, str]
# Position:  0      1        2      3           4          5
PROMPTS = ["Hi", "Other", "Hi", " hi\t", "Straße", "STRASSE"]
NO_DUPLICATES = {"count": 0, "groups": []}


def report(handling: str, submitted: int, exact: Any, normal: Any, skipped: list[int]) -> dict[str, Any]:
    """A job's `duplicates` as the API shows it."""
    return dict(handling=handling, submitted=submitted, exact=exact, normalised=normal, skipped=skipped)


EXACT = {"count": 1, "groups": [{"first": 0, "repeats": [2]}]}
NORMALISED = {"count": 3, "groups": [{"first": 0, "repeats": [2, 3]}, {"first": 4, "repeats": [5]}]}


# --- the normal form ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I cook rice?", "how do i COOK rice?"),  # case
        ("Straße", "STRASSE"),  # casefolding, not just lowercasing
        ("  cook\t\trice \n now ", "cook rice now"),  # whitespace runs, ends
        ("cook\u00a0rice\u3000now", "cook rice now"),  # Unicode spaces (no-break, ideographic)
        ("ｃｏｏｋ ｒｉｃｅ", "cook rice"),  # full-width forms (NFKC)
        ("ﬁne", "fine"),  # a ligature (NFKC)
        ("e\u0301", "\u00e9"),  # combining accent and precomposed letter
    ],
)
def test_normalised_duplicates_share_one_form(a: str, b: str) -> None:
    assert a != b
    assert normalised(a) == normalised(b)


@pytest.mark.parametrize(("a", "b"), [("cook rice", "cookrice"), ("rice.", "rice"), ("e", "é")])
def test_other_differences_are_not_normalised_away(a: str, b: str) -> None:
    assert normalised(a) != normalised(b)


def test_groups_name_first_occurrences_and_their_repeats_in_order() -> None:
    found = find(["b", "a", "b", "a", "b", "c"], "keep")

    assert found.exact.model_dump() == {
        "count": 3,
        "groups": [{"first": 0, "repeats": [2, 4]}, {"first": 1, "repeats": [3]}],
    }
    assert found.skipped == []


# --- at submission and on the job ---------------------------------------------------------


async def test_submit_reports_exact_and_normalised_duplicates_and_keeps_every_prompt(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    job = await submit(api, auth, PROMPTS)

    expected = report("keep", 6, EXACT, NORMALISED, [])
    assert job["duplicates"] == expected
    assert job["counts"]["total"] == 6
    items = await items_of(api, auth, job["id"])
    assert [(i["position"], i["prompt"]) for i in items] == list(enumerate(PROMPTS))
    shown = await api.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert shown.json()["duplicates"] == expected


async def test_a_job_without_duplicates_reports_none_and_is_as_before(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    job = await submit(api, auth, ["a", "b", "c"])

    assert job["duplicates"] == report("keep", 3, NO_DUPLICATES, NO_DUPLICATES, [])
    items = await items_of(api, auth, job["id"])
    assert [(i["position"], i["prompt"]) for i in items] == [(0, "a"), (1, "b"), (2, "c")]


async def test_skip_makes_items_only_for_first_occurrences_at_their_own_positions(
    api: httpx.AsyncClient, auth: Headers, redis: Redis, settings: Settings
) -> None:
    body = {"items": [{"prompt": p, "metadata": {"row": n}} for n, p in enumerate(PROMPTS)]}
    response = await api.post("/v1/jobs", json={**body, "duplicates": "skip"}, headers=auth)
    assert response.status_code == 202, response.text
    job = response.json()

    assert job["duplicates"] == report("skip", 6, EXACT, NORMALISED, [2, 3, 5])
    assert job["counts"]["total"] == 3
    items = await items_of(api, auth, job["id"])
    assert [(i["position"], i["prompt"], i["metadata"]) for i in items] == [
        (0, "Hi", {"row": 0}),
        (1, "Other", {"row": 1}),
        (4, "Straße", {"row": 4}),
    ]
    assert await redis.zcard(settings.queue_name) == 3
    shown = await api.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert shown.json()["duplicates"] == job["duplicates"]


async def test_skipped_jobs_cots_and_exports_keep_the_prompt_positions(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings
) -> None:
    scoped = await new_key(sessions, "red-team", ("hazardous:read",))
    job = await submit(api, scoped, PROMPTS, duplicates="skip")
    await run_worker_burst(settings)

    shown = (await api.get(f"/v1/jobs/{job['id']}", headers=scoped)).json()
    assert shown["status"] == "completed", shown
    pages = await all_pages(api, scoped, f"/v1/jobs/{job['id']}/cots", limit=2)
    cots = [cot for page in pages for cot in page]
    assert [(c["position"], c["prompt"]) for c in cots] == [(0, "Hi"), (1, "Other"), (4, "Straße")]
    exported = await api.get(f"/v1/jobs/{job['id']}/export", params={"format": "jsonl"}, headers=scoped)
    assert exported.status_code == 200, exported.text
    rows = [json.loads(line) for line in exported.text.splitlines()]
    assert [(r["position"], r["prompt"]) for r in rows] == [(0, "Hi"), (1, "Other"), (4, "Straße")]


async def test_the_largest_job_is_checked_whole(api: httpx.AsyncClient, auth: Headers) -> None:
    # 2,500 texts, each four times: twice as written, twice in another case and spacing.
    prompts = [f"Prompt {n // 4}" if n % 2 else f"prompt  {n // 4} " for n in range(10_000)]

    job = await submit(api, auth, prompts, duplicates="skip")

    duplicates = job["duplicates"]
    assert (duplicates["exact"]["count"], duplicates["normalised"]["count"]) == (5_000, 7_500)
    assert len(duplicates["skipped"]) == 7_500
    assert job["counts"]["total"] == 2_500


# --- replays ---------------------------------------------------------------------------------


async def test_a_replay_answers_the_first_jobs_report_and_makes_nothing(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    headers = {**auth, "Idempotency-Key": "dupes-1"}
    body = {"prompts": PROMPTS, "duplicates": "skip"}
    first = await api.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202, first.text

    again = await api.post("/v1/jobs", json=body, headers=headers)

    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["duplicates"] == first.json()["duplicates"]
    assert await row_counts(sessions) == (1, 3)


async def test_another_handling_under_the_same_key_is_a_conflict(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    headers = {**auth, "Idempotency-Key": "dupes-2"}
    assert (await api.post("/v1/jobs", json={"prompts": PROMPTS}, headers=headers)).status_code == 202

    response = await api.post("/v1/jobs", json={"prompts": PROMPTS, "duplicates": "skip"}, headers=headers)

    error_of(response, 409, "idempotency_conflict")
    assert await row_counts(sessions) == (1, 6)


async def test_keep_spelled_out_is_the_same_request_as_left_out(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    headers = {**auth, "Idempotency-Key": "dupes-3"}
    first = await api.post("/v1/jobs", json={"prompts": PROMPTS}, headers=headers)

    again = await api.post("/v1/jobs", json={"prompts": PROMPTS, "duplicates": "keep"}, headers=headers)

    assert (first.status_code, again.status_code) == (202, 200), again.text
    # The hash a body without the option had before it existed: keys in use still replay.
    assert "duplicates" not in JobIn(prompts=PROMPTS).model_dump_json()


# --- the OpenAPI document ------------------------------------------------------------------


async def test_openapi_documents_the_option_and_the_report(api: httpx.AsyncClient) -> None:
    document = (await api.get("/openapi.json")).json()
    post = document["paths"]["/v1/jobs"]["post"]
    option = post["requestBody"]["content"]["application/json"]["schema"]["properties"]["duplicates"]
    assert (option["enum"], option["default"]) == (["keep", "skip"], "keep")
    schemas = document["components"]["schemas"]
    for shown in ("JobOut", "SubmittedJobOut"):
        field = schemas[shown]["properties"]["duplicates"]
        assert {"$ref": "#/components/schemas/DuplicatesOut"} in field["anyOf"], field
    required = set(schemas["DuplicatesOut"]["required"])
    assert required == {"handling", "submitted", "exact", "normalised", "skipped"}
    assert set(schemas["DuplicateKind"]["properties"]) == {"count", "groups"}
    assert set(schemas["DuplicateGroup"]["properties"]) == {"first", "repeats"}


# --- read only where shown ---------------------------------------------------------------------


@contextmanager
def reports_read() -> Iterator[list[bool]]:
    """Inside, whether each job read from the database came with its duplicates report."""
    read: list[bool] = []

    def note(job: Job, *_: object) -> None:
        read.append("duplicates" not in inspect(job).unloaded)

    for name in ("load", "refresh"):
        event.listen(Job, name, note)
    try:
        yield read
    finally:
        for name in ("load", "refresh"):
            event.remove(Job, name, note)


async def test_only_the_routes_showing_a_jobs_duplicates_report_read_it(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """The report is some 20,000 values for 10,000 prompts in pairs, and every route naming the
    job decoded it on the event loop (3-5 ms), shown or not. The job's own answers show it."""
    job = await submit(api, auth, PROMPTS)
    expected = report("keep", 6, EXACT, NORMALISED, [])
    [item, *_] = await items_of(api, auth, job["id"])
    url = f"/v1/jobs/{job['id']}"
    requests = [
        ("GET", url, None),  # read afresh: a first poll
        ("GET", f"{url}/items", None),
        ("GET", f"{url}/cots", None),
        ("GET", f"{url}/preference-pairs", None),
        ("GET", f"{url}/report", None),
        ("GET", f"{url}/callbacks", None),
        ("GET", f"{url}/reviews/summary", None),
        ("GET", f"{url}/label-studio/config", None),
        ("GET", f"/v1/items/{item['id']}", None),
        ("PATCH", url, {"label": "relabelled"}),
        ("POST", f"{url}/cancel", None),
        ("GET", f"{url}/events", None),  # a cancelled job's: a snapshot, then done
        ("GET", f"{url}/export?format=jsonl", None),
        ("GET", f"/view/jobs/{job['id']}", None),
        ("DELETE", url, None),
    ]
    await logged_in(api, auth)
    reads, shown = {}, {}

    for method, path, body in requests:
        with reports_read() as read:
            response = await api.request(method, path, json=body, headers=auth)
        assert response.status_code < 300, (method, path, response.text)
        reads[method, path] = any(read)
        answer = response.json() if response.headers["content-type"] == "application/json" else {}
        shown[method, path] = answer.get("duplicates") == expected

    assert reads == shown
    assert [request for request, is_shown in shown.items() if is_shown] == [
        ("GET", url),
        ("PATCH", url),
        ("POST", f"{url}/cancel"),
    ]
