"""Reviews read from a labeling tool into the store: checked against the owner's CoTs, then
kept in the caller's transaction, all or none."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import ServiceError
from app.labeling.reviews import Parsed, Review, Skipped
from app.store.annotations import Deletion, ReviewedCot, add_versions, retract, reviewed_cots

INSERT_BATCH = 200
# Reading an import walks every annotation and keeps a copy of each, so its bodies are capped
# lower than others (a Label Studio export of some 300 tasks fits): each object it makes may be
# walked by a garbage collection that holds the GIL, and so the event loop.
MAX_IMPORT_VALUES = 50_000


class UnknownItems(ServiceError):
    status = 422
    code = "unknown_items"


@dataclass(frozen=True)
class ImportReport:
    imported: int  # rows added
    duplicates: int  # versions already stored (a re-import), or repeated within the request
    retracted: int  # annotations withdrawn because they were deleted in the tool
    skipped: list[Skipped]  # left out on purpose, each with its reason


async def record_reviews(
    session: AsyncSession,
    parsed: Parsed,
    *,
    owner_key_id: UUID,
    job_id: UUID | None = None,
    webhook_id: UUID | None = None,
) -> ImportReport:
    """Store the reviews and retractions of a request in the caller's transaction, all or none.

    Every review must name a completed item of the owner's (of `job_id`, when given) and
    thoughts its CoT has; otherwise UnknownItems or InvalidAnnotations, and nothing is
    written. A version already stored (same owner, item, source, annotation id and time) is
    counted as a duplicate, never rewritten: an edit in the tool has a new time and adds a row.
    `webhook_id` names the webhook that delivered the request (None: a file import).
    """
    parsed.checked()
    cots = await reviewed_cots(session, {r.item_id for r in parsed.reviews}, owner_key_id, job_id)
    missing = sorted({str(r.item_id) for r in parsed.reviews if r.item_id not in cots})
    if missing:
        where = "in this job" if job_id else "in your jobs"
        raise UnknownItems(
            f"{len(missing)} item(s) have no CoT {where}, nothing was imported: {missing[0]}", missing
        )
    for review in parsed.reviews:
        count = cots[review.item_id].thought_count
        for number in review.flagged_thoughts:
            if number > count:
                parsed.problems.append(
                    f"annotation {review.external_id}: flags thought {number}, the CoT has {count}"
                )
    parsed.checked()
    rows = [_row(review, cots[review.item_id], owner_key_id, webhook_id) for review in parsed.reviews]
    inserted = 0
    # A batch at a time, yielding between them: building the parameters of a whole import at
    # once held the event loop (and every other request) for up to 0.2 s.
    for start in range(0, len(rows), INSERT_BATCH):
        inserted += await add_versions(session, rows[start : start + INSERT_BATCH])
        await asyncio.sleep(0)
    skipped = list(parsed.skipped)
    deletions: dict[tuple[str, str], Deletion] = {}
    for r in parsed.retractions:  # the first mention of each annotation withdraws it
        deletions.setdefault((r.source, r.external_id), Deletion(r.source, r.external_id, r.raw))
    withdrawn = await retract(
        session, owner_key_id=owner_key_id, deletions=list(deletions.values()), webhook_id=webhook_id
    )
    found, mentioned = set(withdrawn), set[tuple[str, str]]()
    for retraction in parsed.retractions:
        named = (retraction.source, retraction.external_id)
        if named not in found or named in mentioned:
            skipped.append(Skipped(retraction.external_id, "deleted, but no current review has this id"))
        mentioned.add(named)
    return ImportReport(inserted, len(rows) - inserted, len(withdrawn), skipped)


def _row(review: Review, cot: ReviewedCot, owner_key_id: UUID, webhook_id: UUID | None) -> dict[str, Any]:
    """The review as a row of the annotations table."""
    return {
        "owner_key_id": owner_key_id,
        "item_id": review.item_id,
        "job_id": cot.job_id,
        "source": review.source,
        "external_id": review.external_id[:200],
        "webhook_id": webhook_id,
        "annotator": review.annotator[:200],
        "annotated_at": review.annotated_at,
        "verdict": review.verdict,
        "edited_response": review.edited_response(cot.response),
        "policy_faithfulness": review.policy_faithfulness,
        "flagged_thoughts": review.flagged_thoughts,
        "comment": review.comment,
        "raw": review.raw,
    }
