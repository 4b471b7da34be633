"""GET /v1/jobs and GET /v1/comparisons list a key's own jobs newest first, a page at a time,
filtered, with their items counted per status; PATCH /v1/jobs/{id} sets a job's label and
metadata. Real app, Postgres and Redis; most jobs are written through the store (250 HTTP
submits would be most of the test's time), some are submitted and run through the API."""

from __future__ import annotations

import json
import struct
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

from app.config import Settings
from app.deliberation.config import Mode
from app.plan import JobConfigIn, resolve, resolve_comparison
from app.store import job_listing, keys, policy_sets, positions
from app.store.db import Sessions
from app.store.jobs import encode_cursor
from app.store.models import Item, Job
from app.store.positions import Listing
from tests.conftest import run_worker_burst
from tests.test_api import error_of, items_of

Headers = dict[str, str]
BASE = datetime(2026, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
# Item statuses, and whether the job was cancelled, that give each job status.
MADE_AS = {
    "queued": (("queued", "queued"), False),
    "running": (("running", "queued"), False),
    "completed": (("completed", "failed"), False),
    "cancelling": (("running", "cancelled"), True),
    "cancelled": (("completed", "cancelled"), True),
}
STATUSES = tuple(MADE_AS)
KINDS = ("aidsafe", "zero_shot", "comparison")


@dataclass(frozen=True)
class Owner:
    id: UUID
    headers: Headers


@dataclass(frozen=True)
class Made:
    """A job written straight to the store, and what a listing should show of it."""

    kind: str
    status: str
    created_at: datetime
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: UUID = field(default_factory=uuid4)


async def new_owner(sessions: Sessions, name: str) -> Owner:
    async with sessions.begin() as session:
        key, secret = await keys.create_key(session, name)
    return Owner(key.id, {"Authorization": f"Bearer {secret}"})


async def store_jobs(sessions: Sessions, settings: Settings, owner: Owner, made: Sequence[Made]) -> None:
    """Write the jobs (two items each, in the statuses of MADE_AS) in one transaction."""
    plans = {
        "aidsafe": resolve(JobConfigIn(), settings),
        "zero_shot": resolve(JobConfigIn(mode=Mode.ZERO_SHOT), settings),
        "comparison": resolve_comparison([None], settings, uuid4(), uuid4()),
    }
    async with sessions.begin() as session:
        policy_set = await policy_sets.resolve_for_job(session, owner.id, "aidsafe-default", None)
        for job in made:
            item_statuses, cancelled = MADE_AS[job.status]
            session.add(
                Job(
                    id=job.id,
                    owner_key_id=owner.id,
                    policy_set_id=policy_set.id,
                    plan=plans[job.kind],
                    request_hash="h",
                    item_count=len(item_statuses),
                    created_at=job.created_at,
                    cancelled_at=job.created_at if cancelled else None,
                    label=job.label,
                    job_metadata=job.metadata,
                )
            )
        await session.flush()
        session.add_all(
            Item(job_id=job.id, position=n, prompt=f"p{n}", status=status)
            for job in made
            for n, status in enumerate(MADE_AS[job.status][0])
        )


def newest_first(made: Sequence[Made]) -> list[str]:
    return [str(job.id) for job in sorted(made, key=lambda job: (job.created_at, job.id), reverse=True)]


async def every_page(
    api: httpx.AsyncClient, owner: Owner, path: str = "/v1/jobs", **params: Any
) -> list[dict[str, Any]]:
    """Every row of the listing (after `cursor`, if given), following next_cursor; each page
    at most `limit` rows."""
    rows: list[dict[str, Any]] = []
    cursor = params.pop("cursor", None)
    while True:
        response = await api.get(path, params={**params, "cursor": cursor}, headers=owner.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["data"]) <= params.get("limit", 100)
        rows += page["data"]
        if not (cursor := page["next_cursor"]):
            return rows


@pytest.fixture
async def alice(sessions: Sessions) -> Owner:
    return await new_owner(sessions, "alice")


@pytest.fixture
async def bob(sessions: Sessions) -> Owner:
    return await new_owner(sessions, "bob")


@pytest.fixture
async def many(sessions: Sessions, settings: Settings, alice: Owner, bob: Owner) -> list[Made]:
    """250 jobs of alice's, of every kind and status, a minute apart, labelled and with
    metadata; and bob's jobs interleaved in time, with the same labels and metadata."""
    made = [
        Made(
            kind=KINDS[n % 3],
            status=STATUSES[(n // 3) % 5],
            created_at=BASE + timedelta(minutes=n),
            label=f"batch-{n % 4}",
            metadata={"n": n, "parity": "odd" if n % 2 else "even", "source": {"name": f"s{n % 3}"}},
        )
        for n in range(250)
    ]
    await store_jobs(sessions, settings, alice, made)
    bobs = [
        Made("aidsafe", "queued", BASE + timedelta(minutes=n, seconds=30), "batch-0", {"parity": "even"})
        for n in range(30)
    ]
    await store_jobs(sessions, settings, bob, bobs)
    return made


# --- paging -------------------------------------------------------------------------------


async def test_250_jobs_page_newest_first_without_gaps_or_repeats(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    first = (await api.get("/v1/jobs", params={"limit": 100}, headers=alice.headers)).json()
    rows = await every_page(api, alice, limit=100)

    assert len(first["data"]) == 100 and first["next_cursor"]
    assert [row["id"] for row in rows] == newest_first(many)


async def test_jobs_created_in_one_instant_page_by_id(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, alice: Owner
) -> None:
    made = [Made("aidsafe", "queued", BASE) for _ in range(7)]
    await store_jobs(sessions, settings, alice, made)

    rows = await every_page(api, alice, limit=2)

    assert [row["id"] for row in rows] == newest_first(made)


async def test_each_row_counts_its_items_per_status(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, alice: Owner
) -> None:
    made = [Made("aidsafe", status, BASE + timedelta(minutes=n)) for n, status in enumerate(STATUSES)]
    await store_jobs(sessions, settings, alice, made)

    rows = {row["id"]: row for row in await every_page(api, alice)}

    for job in made:
        row = rows[str(job.id)]
        item_statuses = MADE_AS[job.status][0]
        assert row["counts"] == {
            "total": 2,
            "by_status": {s: item_statuses.count(s) for s in set(item_statuses)},
        }
        assert (row["kind"], row["status"]) == ("aidsafe", job.status)


async def test_a_rows_status_is_the_one_get_job_shows(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, alice: Owner
) -> None:
    made = [Made("zero_shot", status, BASE + timedelta(minutes=n)) for n, status in enumerate(STATUSES)]
    await store_jobs(sessions, settings, alice, made)

    for row in await every_page(api, alice):
        shown = (await api.get(f"/v1/jobs/{row['id']}", headers=alice.headers)).json()
        assert row["status"] == shown["status"]
        assert row["counts"]["by_status"] == shown["counts"]["by_status"]


# --- filters ------------------------------------------------------------------------------


def _where(made: Sequence[Made], keep: Any) -> list[str]:
    return newest_first([job for job in made if keep(job)])


async def test_status_filter_keeps_jobs_in_that_status_across_pages(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    for status in STATUSES:
        rows = await every_page(api, alice, status=status, limit=7)

        assert [row["id"] for row in rows] == _where(many, lambda job, status=status: job.status == status), (
            status
        )
        assert {row["status"] for row in rows} == {status}


async def test_status_filter_repeated_keeps_any_of_them(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    rows = await every_page(api, alice, status=["cancelling", "cancelled"], limit=50)

    assert [row["id"] for row in rows] == _where(many, lambda job: job.status.startswith("cancel"))


async def test_kind_filter_keeps_jobs_of_that_mode(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    for kind in KINDS:
        rows = await every_page(api, alice, kind=kind, limit=30)

        assert [row["id"] for row in rows] == _where(many, lambda job, kind=kind: job.kind == kind), kind
        assert {row["kind"] for row in rows} == {kind}


async def test_created_after_and_before_are_exclusive_bounds(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    after, before = BASE + timedelta(minutes=100), BASE + timedelta(minutes=120)
    rows = await every_page(
        api, alice, created_after=after.isoformat(), created_before=before.isoformat(), limit=6
    )

    assert [row["id"] for row in rows] == _where(many, lambda job: after < job.created_at < before)
    assert len(rows) == 19


async def test_created_after_reads_the_utc_offset(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    """The same instant written with another offset filters the same: an offset is read, not dropped."""
    moment = BASE + timedelta(minutes=240)

    utc_rows = await every_page(api, alice, created_after=moment.isoformat())
    tokyo_rows = await every_page(
        api, alice, created_after=moment.astimezone(timezone(timedelta(hours=10))).isoformat()
    )

    assert [row["id"] for row in tokyo_rows] == [row["id"] for row in utc_rows]
    assert len(utc_rows) == 9


async def test_label_filter_matches_the_label_exactly(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    rows = await every_page(api, alice, label="batch-2", limit=20)

    assert [row["id"] for row in rows] == _where(many, lambda job: job.label == "batch-2")
    assert not await every_page(api, alice, label="batch")


async def test_metadata_filter_keeps_jobs_whose_metadata_contains_the_object(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    cases = [
        ({"parity": "odd"}, lambda m: m["parity"] == "odd"),
        ({"n": 17}, lambda m: m["n"] == 17),
        ({"source": {"name": "s1"}}, lambda m: m["source"]["name"] == "s1"),
        ({"parity": "even", "source": {"name": "s0"}}, lambda m: m["n"] % 6 == 0),
    ]
    for wanted, keep in cases:
        rows = await every_page(api, alice, metadata=json.dumps(wanted), limit=40)

        assert [row["id"] for row in rows] == _where(many, lambda job, keep=keep: keep(job.metadata)), wanted
        assert rows


async def test_filters_combine(api: httpx.AsyncClient, alice: Owner, many: list[Made]) -> None:
    rows = await every_page(
        api,
        alice,
        kind=["aidsafe", "zero_shot"],
        status="completed",
        label="batch-1",
        metadata=json.dumps({"parity": "odd"}),
        created_before=(BASE + timedelta(minutes=200)).isoformat(),
        limit=3,
    )

    expected = _where(
        many,
        lambda job: (
            job.kind != "comparison"
            and job.status == "completed"
            and job.label == "batch-1"
            and job.metadata["parity"] == "odd"
            and job.created_at < BASE + timedelta(minutes=200)
        ),
    )
    assert [row["id"] for row in rows] == expected and expected


async def test_comparisons_listing_holds_comparisons_only(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    rows = await every_page(api, alice, "/v1/comparisons", status="queued", limit=9)

    expected = _where(many, lambda job: job.kind == "comparison" and job.status == "queued")
    assert [row["id"] for row in rows] == expected and expected
    assert all(row["baseline_job_id"] and row["candidate_job_id"] for row in rows)


# --- ownership and cursors ----------------------------------------------------------------


@pytest.mark.parametrize(("path", "kind"), [("/v1/jobs", "aidsafe"), ("/v1/comparisons", "comparison")])
async def test_deleting_each_job_as_it_is_listed_pages_through_every_one(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, alice: Owner, path: str, kind: str
) -> None:
    """The common cleanup: list a page, delete what it holds, follow next_cursor. The cursor
    names the page's last job, deleted by then. Jobs a microsecond apart, and two in one
    instant, would be skipped or repeated by a resume position rounded or ordered otherwise."""
    times = [
        BASE,
        BASE + MICROSECOND,
        BASE + MICROSECOND,
        BASE + 2 * MICROSECOND,
        BASE + timedelta(seconds=0.123457),
    ]
    made = [Made(kind, "cancelled", at) for at in times]
    await store_jobs(sessions, settings, alice, made)

    deleted, cursor = [], None
    while True:
        response = await api.get(path, params={"limit": 1, "cursor": cursor}, headers=alice.headers)
        assert response.status_code == 200, response.text
        for row in response.json()["data"]:
            assert (await api.delete(f"/v1/jobs/{row['id']}", headers=alice.headers)).status_code == 200
            deleted.append(row["id"])
        if not (cursor := response.json()["next_cursor"]):
            break

    assert deleted == newest_first(made)


async def test_another_keys_jobs_are_never_listed(
    api: httpx.AsyncClient, alice: Owner, bob: Owner, many: list[Made]
) -> None:
    alices = {str(job.id) for job in many}

    bobs_rows = await every_page(api, bob, limit=7)
    bobs_batch = await every_page(api, bob, label="batch-0", metadata='{"parity": "even"}')

    assert len(bobs_rows) == 30 and not alices & {row["id"] for row in bobs_rows}
    assert [row["id"] for row in bobs_batch] == [row["id"] for row in bobs_rows]
    assert {row["id"] for row in await every_page(api, alice, limit=500)} == alices


async def test_another_keys_cursor_only_moves_within_your_own_listing(
    api: httpx.AsyncClient, alice: Owner, bob: Owner, many: list[Made]
) -> None:
    """A cursor holds a position, not checked against the rows: another key's resumes the
    caller's own listing there."""
    bobs_newest = BASE + timedelta(minutes=29, seconds=30)
    bobs_cursor = (await api.get("/v1/jobs", params={"limit": 1}, headers=bob.headers)).json()["next_cursor"]

    from_bobs = await every_page(api, alice, cursor=bobs_cursor, limit=500)

    assert [row["id"] for row in from_bobs] == newest_first([j for j in many if j.created_at < bobs_newest])


@pytest.fixture
async def paths(api: httpx.AsyncClient, alice: Owner, many: list[Made]) -> dict[Listing, str]:
    """The listings whose cursors hold a place: two webhooks, an item without reviews."""
    for name in ("ls-1", "ls-2"):
        assert (await api.post("/v1/webhooks", json={"name": name}, headers=alice.headers)).status_code == 201
    item = (await items_of(api, alice.headers, str(many[0].id)))[0]["id"]
    return {
        Listing.JOBS: "/v1/jobs",
        Listing.COMPARISONS: "/v1/comparisons",
        Listing.WEBHOOKS: "/v1/webhooks",
        Listing.ITEM_REVIEWS: f"/v1/items/{item}/reviews",
    }


async def test_a_cursor_given_to_another_listing_is_refused_naming_the_listing_it_came_from(
    api: httpx.AsyncClient, alice: Owner, paths: dict[Listing, str]
) -> None:
    """A cursor holds a place in the rows of the listing that returned it: given to another,
    GET /v1/webhooks answered a job listing's with an empty page, and GET /v1/comparisons
    resumed at that job's time, as if they were its own."""
    cursors: dict[Listing, str] = {
        listing: (await api.get(path, params={"limit": 1}, headers=alice.headers)).json()["next_cursor"]
        for listing, path in paths.items()
        if listing is not Listing.ITEM_REVIEWS  # the item has no reviews to page through
    }
    cursors[Listing.ITEM_REVIEWS] = positions.encode_position(Listing.ITEM_REVIEWS, BASE, uuid4())

    for given_to, path in paths.items():
        for came_from, cursor in cursors.items():
            response = await api.get(path, params={"cursor": cursor}, headers=alice.headers)
            if came_from is given_to:
                assert response.status_code == 200, response.text
                continue
            error = error_of(response, 400, "invalid_cursor")
            assert error["message"] == (
                f"the cursor is one that {came_from.route} returned, not this listing: pass each "
                "listing only its own next_cursor"
            )


async def test_a_cursor_cut_short_is_refused_not_read_as_a_place_of_the_old_form(
    api: httpx.AsyncClient, alice: Owner, paths: dict[Listing, str]
) -> None:
    """Cut two characters short, a cursor that names its listing is 24 bytes, the old form's
    length: with listing bytes 1-4 it read as a place in the 45th to 89th century, so a job
    listing started again from the newest job (rows shown twice) and GET /v1/webhooks answered
    an empty page (as if at the end), each with a 200."""
    for listing, path in paths.items():
        cursor = positions.encode_position(listing, BASE, uuid4())
        assert (await api.get(path, params={"cursor": cursor}, headers=alice.headers)).status_code == 200
        cut = cursor[:-2]
        assert len(urlsafe_b64decode(cut + "=" * (-len(cut) % 4))) == 24  # the old form's length
        error_of(await api.get(path, params={"cursor": cut}, headers=alice.headers), 400, "invalid_cursor")


async def test_an_old_form_cursor_resumes_where_the_new_one_does(
    api: httpx.AsyncClient, alice: Owner, many: list[Made]
) -> None:
    """A cursor issued before cursors held positions (the job's id alone), or before they
    named their listing (the position alone), still pages on, so a client paging across an
    upgrade is not broken."""
    for path in ("/v1/jobs", "/v1/comparisons"):
        first = (await api.get(path, params={"limit": 3}, headers=alice.headers)).json()
        last = first["data"][-1]
        since_epoch = datetime.fromisoformat(last["created_at"]) - datetime(1970, 1, 1, tzinfo=UTC)
        unnamed = struct.pack(">q16s", since_epoch // MICROSECOND, UUID(last["id"]).bytes)

        by_new = await api.get(
            path, params={"limit": 3, "cursor": first["next_cursor"]}, headers=alice.headers
        )
        for old_form in (encode_cursor(UUID(last["id"])), urlsafe_b64encode(unnamed).decode()):
            by_old = await api.get(path, params={"limit": 3, "cursor": old_form}, headers=alice.headers)

            assert by_old.status_code == 200 and by_old.json() == by_new.json()


async def test_an_old_form_cursor_naming_no_job_of_the_listing_is_refused(
    api: httpx.AsyncClient, alice: Owner, bob: Owner, many: list[Made]
) -> None:
    bobs_job = (await api.get("/v1/jobs", params={"limit": 1}, headers=bob.headers)).json()["data"][0]["id"]
    alices_aidsafe_job = next(job.id for job in many if job.kind == "aidsafe")

    for path, job_id in [
        ("/v1/jobs", UUID(bobs_job)),
        ("/v1/comparisons", alices_aidsafe_job),
        ("/v1/jobs", uuid4()),
    ]:
        response = await api.get(path, params={"cursor": encode_cursor(job_id)}, headers=alice.headers)
        error_of(response, 400, "invalid_cursor")


@pytest.mark.parametrize(
    "created_at",
    [
        BASE,
        datetime(2026, 3, 29, 1, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),  # before the epoch
    ],
)
def test_a_position_round_trips_to_the_microsecond(created_at: datetime) -> None:
    job_id = uuid4()

    cursor = positions.encode_position(Listing.JOBS, created_at, job_id)

    assert job_listing.decode_position(Listing.JOBS, cursor) == (
        created_at,
        job_id,
    )


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"status": "finished"}, 422, "validation_error"),
        ({"kind": "deliberation"}, 422, "validation_error"),
        ({"created_after": "yesterday"}, 422, "validation_error"),
        ({"created_after": "2026-01-01T00:00:00"}, 422, "validation_error"),  # no UTC offset
        ({"created_before": "0001-01-01T00:00:00+05:00"}, 422, "validation_error"),  # before year 1 in UTC
        ({"label": ""}, 422, "validation_error"),
        ({"label": "x" * 101}, 422, "validation_error"),
        ({"label": "two\nlines"}, 422, "validation_error"),
        ({"label": "two\u2028lines"}, 422, "validation_error"),
        ({"label": "two\u0085lines"}, 422, "validation_error"),
        ({"label": "   "}, 422, "validation_error"),
        ({"metadata": "{not json"}, 422, "invalid_filter"),
        ({"metadata": '["a list"]'}, 422, "invalid_filter"),
        ({"metadata": '{"nul": "\\u0000"}'}, 422, "invalid_filter"),
        ({"metadata": "[" * 40 + "]" * 40}, 422, "invalid_filter"),
        ({"metadata": json.dumps({"k": "v" * 1000})}, 422, "validation_error"),
        ({"limit": 0}, 422, "validation_error"),
        ({"limit": 501}, 422, "validation_error"),
        ({"cursor": "not a cursor!"}, 400, "invalid_cursor"),
        ({"cursor": "AAAAAAAAAAAAAAAAAAAAAA"}, 400, "invalid_cursor"),  # old form: no such job
        ({"cursor": urlsafe_b64encode(bytes(20)).decode()}, 400, "invalid_cursor"),  # neither form's length
        (
            {"cursor": urlsafe_b64encode(struct.pack(">q16s", 2**63 - 1, bytes(16))).decode()},
            400,
            "invalid_cursor",
        ),
        (
            {"cursor": urlsafe_b64encode(struct.pack(">q16s", -(2**63), bytes(16))).decode()},
            400,
            "invalid_cursor",
        ),
    ],
)
async def test_bad_filter_values_are_refused_with_stable_codes(
    api: httpx.AsyncClient, alice: Owner, params: dict[str, Any], status: int, code: str
) -> None:
    for path in ("/v1/jobs", "/v1/comparisons"):
        if "kind" in params and path == "/v1/comparisons":
            continue  # the comparison listing has no kind filter: an unknown parameter is ignored
        error_of(await api.get(path, params=params, headers=alice.headers), status, code)


async def test_listing_needs_an_api_key(api: httpx.AsyncClient) -> None:
    for path in ("/v1/jobs", "/v1/comparisons"):
        error_of(await api.get(path), 401, "unauthorized")


# --- through the API: submit with a label, run, compare, relabel ---------------------------


async def test_jobs_and_comparisons_submitted_with_labels_are_listed_with_their_counts(
    api: httpx.AsyncClient, settings: Settings, alice: Owner
) -> None:
    submitted = []
    for n in range(2):
        body = {"prompts": ["Dice an onion?", "Boil an egg?"], "label": "api", "metadata": {"run": n}}
        response = await api.post("/v1/jobs", json=body, headers=alice.headers)
        assert response.status_code == 202, response.text
        assert (response.json()["label"], response.json()["metadata"]) == ("api", {"run": n})
        submitted.append(response.json()["id"])
    await run_worker_burst(settings)
    comparison = await api.post(
        "/v1/comparisons",
        json={
            "baseline_job_id": submitted[0],
            "candidate_job_id": submitted[1],
            "label": "ab",
            "metadata": {"judge": "default"},
        },
        headers=alice.headers,
    )
    assert comparison.status_code == 202, comparison.text
    assert (comparison.json()["label"], comparison.json()["metadata"]) == ("ab", {"judge": "default"})

    jobs = await every_page(api, alice, label="api")
    comparisons = await every_page(api, alice, "/v1/comparisons")

    assert [row["id"] for row in jobs] == submitted[::-1]
    assert [row["metadata"] for row in jobs] == [{"run": 1}, {"run": 0}]
    assert all(row["counts"] == {"total": 2, "by_status": {"completed": 2}} for row in jobs)
    assert all(row["status"] == "completed" and row["kind"] == "aidsafe" for row in jobs)
    [listed] = comparisons
    assert listed["id"] == comparison.json()["id"] and listed["label"] == "ab"
    assert (listed["baseline_job_id"], listed["candidate_job_id"]) == tuple(submitted)
    assert listed["counts"]["total"] == 2


async def test_a_submit_replayed_with_another_label_is_a_conflict(
    api: httpx.AsyncClient, alice: Owner
) -> None:
    headers = {**alice.headers, "Idempotency-Key": "k1"}
    first = await api.post("/v1/jobs", json={"prompts": ["a"], "label": "one"}, headers=headers)
    assert first.status_code == 202, first.text

    again = await api.post("/v1/jobs", json={"prompts": ["a"], "label": "one"}, headers=headers)
    other = await api.post("/v1/jobs", json={"prompts": ["a"], "label": "two"}, headers=headers)

    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    error_of(other, 409, "idempotency_conflict")


@pytest.mark.parametrize(
    "body",
    [
        {"label": ""},
        {"label": "x" * 101},
        {"label": "tab\there"},
        {"metadata": ["not", "an", "object"]},
        {"metadata": None},
        {"metadata": {"big": "x" * 8_200}},
        {"colour": "blue"},
    ],
)
async def test_a_bad_label_or_metadata_is_refused_at_submit_and_patch(
    api: httpx.AsyncClient, alice: Owner, body: dict[str, Any]
) -> None:
    job = await api.post("/v1/jobs", json={"prompts": ["a"]}, headers=alice.headers)

    error_of(
        await api.post("/v1/jobs", json={"prompts": ["a"], **body}, headers=alice.headers),
        422,
        "validation_error",
    )
    error_of(
        await api.patch(f"/v1/jobs/{job.json()['id']}", json=body, headers=alice.headers),
        422,
        "validation_error",
    )


async def test_patch_sets_label_and_metadata_and_leaves_out_fields_as_they_are(
    api: httpx.AsyncClient, alice: Owner
) -> None:
    made = await api.post("/v1/jobs", json={"prompts": ["a"], "label": "first"}, headers=alice.headers)
    job_id = made.json()["id"]
    await api.get(f"/v1/jobs/{job_id}", headers=alice.headers)  # a reading the API keeps a second

    relabelled = await api.patch(f"/v1/jobs/{job_id}", json={"label": "second"}, headers=alice.headers)
    remeta = await api.patch(f"/v1/jobs/{job_id}", json={"metadata": {"a": [1, 2]}}, headers=alice.headers)
    shown = (await api.get(f"/v1/jobs/{job_id}", headers=alice.headers)).json()
    [listed] = await every_page(api, alice, label="second")
    cleared = await api.patch(
        f"/v1/jobs/{job_id}", json={"label": None, "metadata": {}}, headers=alice.headers
    )

    assert relabelled.status_code == 200 and relabelled.json()["label"] == "second"
    assert relabelled.json()["metadata"] == {}
    assert (remeta.json()["label"], remeta.json()["metadata"]) == ("second", {"a": [1, 2]})
    assert (shown["label"], shown["metadata"]) == ("second", {"a": [1, 2]})
    assert (listed["id"], listed["metadata"]) == (job_id, {"a": [1, 2]})
    assert (cleared.json()["label"], cleared.json()["metadata"]) == (None, {})


async def test_patch_of_another_keys_job_is_not_found_and_changes_nothing(
    api: httpx.AsyncClient, alice: Owner, bob: Owner
) -> None:
    made = await api.post("/v1/jobs", json={"prompts": ["a"], "label": "mine"}, headers=alice.headers)
    job_id = made.json()["id"]

    error_of(
        await api.patch(f"/v1/jobs/{job_id}", json={"label": "theirs"}, headers=bob.headers), 404, "not_found"
    )
    error_of(
        await api.patch(f"/v1/jobs/{uuid4()}", json={"label": "x"}, headers=alice.headers), 404, "not_found"
    )
    error_of(await api.patch(f"/v1/jobs/{job_id}", json={"label": "x"}), 401, "unauthorized")
    assert (await api.get(f"/v1/jobs/{job_id}", headers=alice.headers)).json()["label"] == "mine"
