"""Reviews read back: GET /v1/items/{id}/reviews (what each reviewer said of an item, as it
counts now) and GET /v1/jobs/{id}/reviews/summary (counts, agreement with the grader's gate
and between reviewers), tenant by tenant, over HTTP, the Python client and the CLI.

The first test imports a Label Studio export of a job arq's real worker ran; the rest store
hand-built results (tests/test_quality_api.py) and reviews, so every figure is known."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import httpx
import pytest
from sqlalchemy import insert, select, text

import aidsafe
from app.config import Settings
from app.stats import proportion
from app.store import keys
from app.store.db import Sessions
from app.store.models import Annotation, Cot, Job
from app.store.page_sizes import PAGE_ROW_BYTES
from tests.conftest import least_loop_pause, longest_loop_pause
from tests.test_api import error_of
from tests.test_cli import aidsafe as run_cli
from tests.test_labeling import fixture, graded_job, import_file, item_ids
from tests.test_quality_api import a_grade, completed, finished_job

Headers = dict[str, str]
T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
# Of the loop's CPU, reading the reviews below: 0.12-0.18 s all at once; a batch at a time,
# 0.015-0.02 s with 10 processes on 2 cores (whose wall-clock pauses reached 0.1 s), and once
# 0.051 s late in CI's parallel run: hence the least of three reads. Checked again: the old
# code re-created, 0.107-0.113 s (2.1 times the bound at least); 3 ms now.
HELD_AT_MOST_S = 0.05


@dataclass(frozen=True)
class Stored:
    """A review version to store: on item `item` (its position), by `reviewer`."""

    item: int
    reviewer: str
    verdict: str | None = None
    minutes: int = 0  # after T0: the version's time
    edited_response: str | None = None
    annotation: str | None = None  # the tool's id; default: one annotation per (item, reviewer)
    retracted: bool = False
    comment: str | None = None


async def job_cots(sessions: Sessions, job_id: str) -> tuple[UUID, list[UUID]]:
    """The job's owner and its CoTs' item ids in prompt order."""
    async with sessions() as session:
        owner = await session.scalar(select(Job.owner_key_id).where(Job.id == UUID(job_id)))
        items = await session.scalars(
            select(Cot.item_id).where(Cot.job_id == UUID(job_id)).order_by(Cot.position)
        )
        assert owner is not None
        return owner, list(items)


async def store_reviews(
    sessions: Sessions, job_id: str, reviews: list[Stored], owner: UUID | None = None
) -> None:
    """Store review versions as an import would (of `owner`, by default the job's)."""
    job_owner, items = await job_cots(sessions, job_id)
    rows: list[dict[str, Any]] = [
        {
            "owner_key_id": owner or job_owner,
            "item_id": items[r.item],
            "job_id": UUID(job_id),
            "source": "label_studio",
            "external_id": r.annotation or f"{r.item}-{r.reviewer}",
            "annotator": r.reviewer,
            "annotated_at": T0 + timedelta(minutes=r.minutes),
            "retracted": r.retracted,
            "verdict": r.verdict,
            "edited_response": r.edited_response,
            "comment": r.comment,
            "raw": {},
        }
        for r in reviews
    ]
    async with sessions.begin() as session:
        await session.execute(insert(Annotation), rows)


async def get_json(api: httpx.AsyncClient, auth: Headers, url: str) -> Any:
    response = await api.get(url, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


# --- one item's reviews -------------------------------------------------------------------------


async def test_an_items_reviews_read_back_what_label_studio_sent(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job_id = await graded_job(api, auth, settings)
    ids = await item_ids(api, auth, job_id)
    await import_file(api, auth, job_id, "label-studio", fixture("label_studio_export.json", ids))

    rejected = await get_json(api, auth, f"/v1/items/{ids[1]}/reviews")
    unreviewed = await get_json(api, auth, f"/v1/items/{ids[2]}/reviews")

    (review,) = rejected["reviews"]
    assert review.pop("id") and review.pop("received_at")
    assert review == {
        "source": "label_studio",
        "annotation_id": "502",
        "reviewer": "2",
        "verdict": "reject",
        "edited": True,
        "edited_response": "No. Mixing them makes toxic fumes: use one at a time and air the room.",
        "policy_faithfulness": 2,
        "flagged_thoughts": [1],
        "comment": "The answer must warn about the fumes.",
        "reviewed_at": "2026-11-20T10:06:30Z",
        "webhook_id": None,
    }
    assert (rejected["item_id"], rejected["job_id"]) == (ids[1], job_id)
    assert (rejected["decision"], rejected["gate_accepted"]) == ("rejected", True)
    assert unreviewed["reviews"] == [] and unreviewed["decision"] is None


async def test_an_items_reviews_are_each_annotations_latest_version_without_withdrawn_ones(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()])
    await store_reviews(
        sessions,
        job_id,
        [
            Stored(0, "ana", "reject", minutes=0),
            Stored(0, "ana", "accept", minutes=5, edited_response="Better"),  # her edit of it
            Stored(0, "ben", "reject", minutes=1),
            Stored(0, "ben", None, minutes=2, retracted=True),  # deleted in the tool
        ],
    )
    (item,) = (await job_cots(sessions, job_id))[1]

    body = await get_json(api, auth, f"/v1/items/{item}/reviews")

    assert [(r["reviewer"], r["verdict"], r["edited_response"]) for r in body["reviews"]] == [
        ("ana", "accept", "Better")
    ]
    assert body["decision"] == "approved" and body["gate_accepted"] is None  # not graded


async def test_reviews_are_read_by_their_owner_only(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed(a_grade())])
    async with sessions.begin() as session:
        other_key, other_secret = await keys.create_key(session, "bob", ())
    other = {"Authorization": f"Bearer {other_secret}"}
    await store_reviews(sessions, job_id, [Stored(0, "ana", "accept")])
    # A row of another tenant's on this item (no import writes one): never read as this one's.
    await store_reviews(sessions, job_id, [Stored(0, "mallory", "reject")], owner=other_key.id)
    (item,) = (await job_cots(sessions, job_id))[1]

    mine = await get_json(api, auth, f"/v1/items/{item}/reviews")
    summary = await get_json(api, auth, f"/v1/jobs/{job_id}/reviews/summary")

    assert [r["reviewer"] for r in mine["reviews"]] == ["ana"] and mine["decision"] == "approved"
    assert (summary["reviews"]["total"], summary["items"]["approved"]) == (1, 1)
    error_of(await api.get(f"/v1/items/{item}/reviews", headers=other), 404, "not_found")
    error_of(await api.get(f"/v1/jobs/{job_id}/reviews/summary", headers=other), 404, "not_found")
    error_of(await api.get(f"/v1/items/{item}/reviews"), 401, "unauthorized")


async def store_many_reviews(sessions: Sessions, job_id: str, count: int, comment: str = "") -> UUID:
    """`count` reviewers' accepts of the job's first CoT, each its own annotation; its item id."""
    owner, (item, *_) = await job_cots(sessions, job_id)
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO annotations (id, owner_key_id, item_id, job_id, source, external_id,"
                " annotator, annotated_at, verdict, comment, flagged_thoughts, raw)"
                " SELECT gen_random_uuid(), :owner, :item, :job, 'label_studio', n::text, 'r' || n,"
                " :at, 'accept', NULLIF(:comment, ''), '[]', '{}' FROM generate_series(1, :count) AS n"
            ),
            {"owner": owner, "item": item, "job": UUID(job_id), "at": T0, "comment": comment, "count": count},
        )
        await session.execute(text("ANALYZE annotations"))  # as autovacuum would after imports this large
    return item


async def test_an_item_of_tens_of_thousands_of_reviews_is_read_a_page_at_a_time_with_the_event_loop_free(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Every annotation id a tool sends is a review of its own, so a key's imports may leave
    an item any number of them: 73,500 held every other request for 6 s, read and encoded on
    the event loop at once. A page holds 500 at most, and its decision is of them all."""
    job_id = await finished_job(api, auth, sessions, [completed()])
    item = await store_many_reviews(sessions, job_id, 10_000, comment="c" * 500)

    pages: list[dict[str, Any]] = []
    while not pages or pages[-1]["next_cursor"]:
        cursor = {"cursor": pages[-1]["next_cursor"]} if pages else {}
        response, paused = await longest_loop_pause(
            api.get(f"/v1/items/{item}/reviews", params={"limit": 500, **cursor}, headers=auth),
            clock=time.thread_time,  # the loop thread's own CPU: other processes load the machine
        )
        assert response.status_code == 200, response.text
        assert paused < 0.1, f"the event loop was held {paused:.2f} s"
        pages.append(response.json())
        assert len(pages) <= 20, "next_cursor never ends"

    assert [len(page["reviews"]) for page in pages] == [500] * 20
    assert len({review["id"] for page in pages for review in page["reviews"]}) == 10_000
    assert {page["decision"] for page in pages} == {"approved"}


async def test_an_items_reviews_come_a_page_at_a_time_oldest_first_with_the_decision_of_them_all(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()])
    reviewers = ["ana", "ben", "cy", "dee", "eve"]
    await store_reviews(
        sessions,
        job_id,
        [
            Stored(0, name, "reject" if name == "eve" else "accept", minutes=n)
            for n, name in enumerate(reviewers)
        ],
    )
    (item,) = (await job_cots(sessions, job_id))[1]

    pages: list[dict[str, Any]] = []
    while not pages or pages[-1]["next_cursor"]:
        cursor = {"cursor": pages[-1]["next_cursor"]} if pages else {}
        pages.append(await get_json(api, auth, f"/v1/items/{item}/reviews?limit=2&{urlencode(cursor)}"))
    default = await get_json(api, auth, f"/v1/items/{item}/reviews")

    assert [[r["reviewer"] for r in page["reviews"]] for page in pages] == [
        ["ana", "ben"],
        ["cy", "dee"],
        ["eve"],
    ]
    assert {page["decision"] for page in pages} == {"rejected"}  # eve's reject is on the last page
    assert [r["reviewer"] for r in default["reviews"]] == reviewers and default["next_cursor"] is None


async def test_a_page_of_reviews_stops_at_its_size_as_json(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A reviewer's edited response may be as long as the response: 500 of them made one answer."""
    job_id = await finished_job(api, auth, sessions, [completed()])
    long = "x" * (PAGE_ROW_BYTES // 3)
    await store_reviews(
        sessions, job_id, [Stored(0, f"r{n}", "accept", minutes=n, edited_response=long) for n in range(5)]
    )
    (item,) = (await job_cots(sessions, job_id))[1]

    first = await get_json(api, auth, f"/v1/items/{item}/reviews?limit=500")
    rest = await get_json(api, auth, f"/v1/items/{item}/reviews?limit=500&cursor={first['next_cursor']}")

    assert [[r["reviewer"] for r in page["reviews"]] for page in (first, rest)] == [
        ["r0", "r1"],
        ["r2", "r3"],
    ]
    assert rest["next_cursor"] is not None


async def test_an_items_reviews_refuse_a_limit_over_500_and_a_cursor_the_api_never_gave(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()])
    (item,) = (await job_cots(sessions, job_id))[1]

    error_of(await api.get(f"/v1/items/{item}/reviews?limit=501", headers=auth), 422, "validation_error")
    error_of(await api.get(f"/v1/items/{item}/reviews?cursor=nonsense", headers=auth), 400, "invalid_cursor")


async def test_a_job_of_a_hundred_thousand_reviews_is_summarised_with_the_event_loop_free(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Read at once, the 93,500 reviews of a job held every other request for 0.4 s."""
    job_id = await finished_job(api, auth, sessions, [completed()])
    await store_many_reviews(sessions, job_id, 100_000)

    response, paused = await least_loop_pause(
        lambda: api.get(f"/v1/jobs/{job_id}/reviews/summary", headers=auth)
    )

    assert response.status_code == 200, response.text
    assert response.json()["reviews"]["accepted"] == 100_000
    assert paused < HELD_AT_MOST_S, f"the event loop was held for {paused:.3f} s of CPU"


# --- a job's summary ------------------------------------------------------------------------------


async def test_the_summary_counts_reviews_and_measures_agreement_with_the_gate_and_between_reviewers(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    gate_accepts, gate_rejects = completed(a_grade()), completed(a_grade(relevance=2))
    results = [gate_accepts, gate_accepts, gate_accepts, gate_rejects, gate_rejects, completed()]
    job_id = await finished_job(api, auth, sessions, results)
    await store_reviews(
        sessions,
        job_id,
        [
            Stored(0, "a", "reject", minutes=0),  # superseded by her next version
            Stored(0, "a", "accept", minutes=1),
            Stored(0, "b", "accept"),
            Stored(1, "a", "accept"),
            Stored(1, "b", "reject"),
            Stored(2, "a", "accept", edited_response="Edited"),
            Stored(2, "c", comment="Fine, I think."),  # no verdict
            Stored(3, "a", "reject"),
            Stored(3, "b", "reject"),
            Stored(3, "z", "accept", minutes=0),
            Stored(3, "z", None, minutes=1, retracted=True),  # withdrawn: counts for nothing
            Stored(4, "a", "accept"),
            Stored(4, "b", "accept", edited_response="Edited too"),
            Stored(5, "a", "reject"),  # not graded: no gate to agree with
        ],
    )

    summary = await get_json(api, auth, f"/v1/jobs/{job_id}/reviews/summary")

    assert summary["job_id"] == job_id
    assert summary["reviews"] == {"total": 11, "accepted": 6, "rejected": 4, "no_verdict": 1, "edited": 2}
    assert summary["items"] == {"completed": 6, "reviewed": 6, "approved": 3, "rejected": 3, "edited": 2}
    assert summary["reviewers"] == 3
    # Items 0-4 (human, gate): approved/accept, rejected/accept, approved/accept,
    # rejected/reject, approved/reject: 3 of 5 match; Cohen (0.6 - 0.52) / 0.48.
    wilson = proportion(3, 5)
    grader = summary["grader"]
    assert grader["agreement"] == {"value": 0.6, "low": wilson.low, "high": wilson.high, "n": 5}
    assert grader["kappa"] == pytest.approx(1 / 6)
    assert (grader["both_accept"], grader["both_reject"]) == (2, 1)
    assert (grader["human_accepts_grader_rejects"], grader["human_rejects_grader_accepts"]) == (1, 1)
    # Items 0, 1, 3, 4 have two verdicts, from a and b each: 3 of 4 agree; Cohen 0.5.
    between = summary["between_reviewers"]
    assert between["agreement"]["value"] == 0.75 and between["agreement"]["n"] == 4
    assert between["agreement"]["low"] == pytest.approx(proportion(3, 4).low)
    assert (between["kappa"], between["kappa_method"], between["reviewers"]) == (0.5, "cohen", 2)


async def test_a_job_without_reviews_summarises_to_zeros_and_nothing_measured(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed(a_grade())])

    summary = await get_json(api, auth, f"/v1/jobs/{job_id}/reviews/summary")

    nothing = {"value": None, "low": None, "high": None, "n": 0}
    assert summary["reviews"] == {"total": 0, "accepted": 0, "rejected": 0, "no_verdict": 0, "edited": 0}
    assert summary["items"] == {"completed": 1, "reviewed": 0, "approved": 0, "rejected": 0, "edited": 0}
    assert summary["grader"]["agreement"] == nothing and summary["grader"]["kappa"] is None
    assert summary["between_reviewers"]["agreement"] == nothing
    assert summary["between_reviewers"]["kappa_method"] is None


# --- the Python client and the CLI ----------------------------------------------------------------


async def two_reviewed_items(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> tuple[str, list[UUID]]:
    job_id = await finished_job(api, auth, sessions, [completed(a_grade()), completed(a_grade(relevance=2))])
    await store_reviews(
        sessions,
        job_id,
        [
            Stored(0, "ana", "accept", edited_response="Ana's answer", comment="Clearer now."),
            Stored(0, "ben", "accept", minutes=1),
            Stored(1, "ana", "reject"),
            Stored(1, "ben", "accept"),
        ],
    )
    return job_id, (await job_cots(sessions, job_id))[1]


async def test_the_client_reads_an_items_reviews_and_the_summary_and_exports_edits(
    live_api: str, api: httpx.AsyncClient, auth: Headers, sessions: Sessions, tmp_path: Any
) -> None:
    job_id, items = await two_reviewed_items(api, auth, sessions)

    with aidsafe.Client(live_api, auth["Authorization"].removeprefix("Bearer ")) as client:
        reviewed = client.get_item_reviews(items[0])
        summary = client.get_review_summary(job_id)
        path = client.export(job_id, tmp_path / "sft.jsonl", format="trl_sft", cot="none", human_edits=True)
        kept = client.export(job_id, tmp_path / "kept.jsonl", format="trl_sft", exclude_human_rejected=True)

    assert [(r.reviewer, r.edited, r.edited_response) for r in reviewed.reviews] == [
        ("ana", True, "Ana's answer"),
        ("ben", False, None),
    ]
    assert reviewed.decision == "approved" and reviewed.gate_accepted is True
    assert (summary.items.approved, summary.items.rejected, summary.reviews.edited) == (1, 1, 1)
    assert summary.grader.agreement.value == 1.0 and summary.grader.agreement.n == 2
    assert summary.between_reviewers.kappa_method == "cohen"
    assert summary.between_reviewers.agreement == aidsafe.models.Interval(
        value=0.5, low=proportion(1, 2).low, high=proportion(1, 2).high, n=2
    )
    first = [json.loads(line) for line in path.read_text().splitlines()][0]
    assert first["messages"][-1]["content"] == "Ana's answer" and first["human_edit"]["reviewer"] == "ana"
    assert len(kept.read_text().splitlines()) == 1  # item 1 is rejected by ana


async def test_both_clients_read_an_items_reviews_a_page_at_a_time_and_walk_them_all(
    live_api: str, api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    _, items = await two_reviewed_items(api, auth, sessions)
    key = auth["Authorization"].removeprefix("Bearer ")

    with aidsafe.Client(live_api, key) as client:
        first = client.get_item_reviews(items[0], limit=1)
        walked = [r.reviewer for r in client.iter_item_reviews(items[0], limit=1)]
    async with aidsafe.AsyncClient(live_api, key) as async_client:
        walked_async = [r.reviewer async for r in async_client.iter_item_reviews(items[0], limit=1)]

    assert [r.reviewer for r in first.reviews] == ["ana"] and first.next_cursor is not None
    assert first.decision == "approved"
    assert walked == walked_async == ["ana", "ben"]


async def test_the_cli_prints_the_summary_and_an_items_reviews(
    live_api: str, api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id, items = await two_reviewed_items(api, auth, sessions)

    code, summary = await run_cli(live_api, auth, "reviews", "summary", job_id)
    await store_many_reviews(sessions, job_id, 600)  # more than a page of the CLI's
    item_code, item = await run_cli(live_api, auth, "reviews", "item", str(items[0]))

    assert code == 0, summary
    assert "Reviews: 4 by 2 reviewers: 3 accept, 1 reject, 0 no verdict; 1 edited the response." in summary
    assert "Items: 2 of 2 reviewed: 1 approved, 1 rejected, 1 with an edit." in summary
    assert "With the grader's gate: 100.0% [" in summary and "(n=2) agree" in summary
    assert "Between reviewers: 50.0% [" in summary and "(cohen)" in summary
    assert item_code == 0, item
    assert f"Item {items[0]}: approved." in item
    assert "label_studio:ana  accept" in item and "edited response: Ana's answer" in item
    assert "comment: Clearer now." in item and "label_studio:ben  accept" in item
    assert sum(" label_studio:r" in line for line in item.splitlines()) == 600
