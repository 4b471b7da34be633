"""An annotation's identity is (owner, item, source, the tool's id): Label Studio numbers
annotations from 1 in every instance, so no import by one key, or from one tool instance,
may change which of another's reviews counts."""

from __future__ import annotations

import copy
from typing import Any

import httpx
from sqlalchemy import select

from app.config import Settings
from app.store.db import Sessions
from app.store.models import Annotation, Job
from tests.test_labeling import PROMPTS, approved, fixture, graded_job, import_file, item_ids

Headers = dict[str, str]


def reviewed(item_id: str, annotation_id: int, verdict: str, updated_at: str) -> dict[str, Any]:
    """A Label Studio export task with one annotation of the given verdict."""
    [task] = copy.deepcopy(fixture("label_studio_export.json", [item_id])[:1])
    annotation = task["annotations"][0]
    annotation.update(id=annotation_id, updated_at=updated_at, created_at=updated_at)
    annotation["result"] = [
        {"type": "choices", "value": {"choices": [verdict]}, "to_name": "response", "from_name": "verdict"}
    ]
    return dict(task)


async def test_another_keys_annotation_with_the_same_id_changes_nothing_of_mine(
    api: httpx.AsyncClient, auth: Headers, other: Headers, settings: Settings, sessions: Sessions
) -> None:
    mine = await graded_job(api, auth, settings, PROMPTS[:1])
    [my_item] = await item_ids(api, auth, mine)
    theirs = await graded_job(api, other, settings, PROMPTS[1:2])
    [their_item] = await item_ids(api, other, theirs)
    # One reviewer accepts my CoT, another rejects it: not approved.
    await import_file(
        api,
        auth,
        mine,
        "label-studio",
        [
            reviewed(my_item, 1, "reject", "2026-11-20T10:00:00Z"),
            reviewed(my_item, 2, "accept", "2026-11-20T10:00:00Z"),
        ],
    )

    # Their Label Studio also has an annotation 1: same id, the same time and a later one.
    report = await import_file(
        api,
        other,
        theirs,
        "label-studio",
        [
            reviewed(their_item, 1, "accept", "2026-11-20T10:00:00Z"),
            reviewed(their_item, 1, "accept", "2026-11-20T11:00:00Z"),
        ],
    )

    assert (report["imported"], report["duplicates"]) == (2, 0)
    assert await approved(sessions, mine) == set()
    assert await approved(sessions, theirs) == {their_item}
    async with sessions() as session:
        owners = await session.execute(
            select(Annotation.owner_key_id, Job.owner_key_id).join(Job, Job.id == Annotation.job_id)
        )
        pairs = list(owners)
    assert len(pairs) == 4 and all(row_owner == job_owner for row_owner, job_owner in pairs)


async def test_a_second_instance_annotation_with_the_same_id_on_another_item_changes_nothing(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings, PROMPTS[:2])
    first_item, second_item = await item_ids(api, auth, job_id)
    await import_file(
        api,
        auth,
        job_id,
        "label-studio",
        [
            reviewed(first_item, 1, "reject", "2026-11-20T10:00:00Z"),
            reviewed(first_item, 2, "accept", "2026-11-20T10:00:00Z"),
        ],
    )

    # Another Label Studio instance's annotation 1, later, on the other item.
    await import_file(
        api, auth, job_id, "label-studio", [reviewed(second_item, 1, "accept", "2026-11-20T11:00:00Z")]
    )

    assert await approved(sessions, job_id) == {second_item}


async def test_an_argilla_response_and_a_label_studio_annotation_with_the_same_id_are_different_reviews(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    [item_id] = await item_ids(api, auth, job_id)
    await import_file(
        api, auth, job_id, "label-studio", [reviewed(item_id, 7, "reject", "2026-11-20T10:00:00Z")]
    )
    page = fixture("argilla_records.json", [item_id])
    record = page["items"][0]
    page["items"] = [record]
    record["responses"] = [r for r in record["responses"] if r["status"] == "submitted"][:1]
    record["responses"][0]["id"] = "7"
    record["responses"][0]["updated_at"] = "2026-11-20T12:00:00"

    await import_file(api, auth, job_id, "argilla", page)

    assert await approved(sessions, job_id) == set()  # Label Studio's reject still counts
