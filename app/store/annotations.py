"""Human reviews from labeling tools, and what they mean for exports."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    and_,
    any_,
    bindparam,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.errors import ServiceError
from app.labeling.reviews import Parsed, Retraction, Review, Skipped
from app.store.models import Annotation, Cot, Job

# The annotator of a retraction: tools do not say who deleted an annotation.
RETRACTED_BY = "deleted in the tool"
INSERT_BATCH = 200


def _same_annotation(other: type[Annotation]) -> ColumnElement[bool]:
    """`other` is a version of the same annotation as Annotation: the tool's id counts only
    together with its owner and item (tools number annotations per instance)."""
    return and_(
        other.owner_key_id == Annotation.owner_key_id,
        other.item_id == Annotation.item_id,
        other.source == Annotation.source,
        other.external_id == Annotation.external_id,
    )


def _current() -> ColumnElement[bool]:
    """The latest version of each annotation (an edit in the tool adds a row, a deletion a
    retraction)."""
    newer = aliased(Annotation)
    return ~exists().where(_same_annotation(newer), newer.annotated_at > Annotation.annotated_at)


def human_approved() -> ColumnElement[bool]:
    """A condition on Cot: some reviewer accepts it and no reviewer (currently) rejects it.
    A retracted annotation has no verdict, so it does neither."""

    def any_current(verdict: str) -> ColumnElement[bool]:
        return exists(
            select(Annotation.id).where(
                Annotation.item_id == Cot.item_id, Annotation.verdict == verdict, _current()
            )
        )

    return and_(any_current("accept"), ~any_current("reject"))


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
    cots = await _cots_of(session, {r.item_id for r in parsed.reviews}, owner_key_id, job_id)
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
    statement = (
        pg_insert(Annotation)
        .on_conflict_do_nothing(constraint="uq_annotations_version")
        .returning(Annotation.id)
    )
    inserted = 0
    # A batch at a time, yielding between them: building the parameters of a whole import at
    # once held the event loop (and every other request) for up to 0.2 s.
    for start in range(0, len(rows), INSERT_BATCH):
        inserted += len((await session.execute(statement, rows[start : start + INSERT_BATCH])).all())
        await asyncio.sleep(0)
    skipped = list(parsed.skipped)
    retracted = 0
    for retraction in parsed.retractions:
        withdrawn = await _retract(session, retraction, owner_key_id, webhook_id)
        if withdrawn == 0:
            skipped.append(Skipped(retraction.external_id, "deleted, but no current review has this id"))
        retracted += withdrawn
    return ImportReport(inserted, len(rows) - inserted, retracted, skipped)


async def _retract(
    session: AsyncSession, retraction: Retraction, owner_key_id: UUID, webhook_id: UUID | None
) -> int:
    """Append a retraction to each current annotation of the owner's with this tool id.

    The deletion event names only the tool's id, not the item, so it reaches every item of
    the owner's where that id is current, except annotations another webhook delivered: a
    second tool instance, which numbers its annotations from 1 too, cannot withdraw them.
    The retraction is the annotation's newest version (at least a microsecond after the
    version it withdraws, whatever the tool's clock said)."""
    versions = aliased(Annotation)
    identity = (
        versions.owner_key_id,
        versions.item_id,
        versions.job_id,
        versions.source,
        versions.external_id,
    )
    newest_first = aggregate_order_by(versions.retracted, versions.annotated_at.desc())
    delivered_elsewhere = func.bool_or(
        and_(versions.webhook_id.is_not(None), versions.webhook_id.is_distinct_from(webhook_id))
    )
    delivered_here = func.bool_or(versions.webhook_id == webhook_id) if webhook_id else false()
    withdrawn = (
        select(
            func.gen_random_uuid(),
            *identity,
            literal(webhook_id, PG_UUID(as_uuid=True)),
            literal(RETRACTED_BY),
            func.greatest(func.now(), func.max(versions.annotated_at) + text("interval '1 microsecond'")),
            true(),
            literal([], JSONB),
            literal(retraction.raw, JSONB),
        )
        .where(
            versions.owner_key_id == owner_key_id,
            versions.source == retraction.source,
            versions.external_id == retraction.external_id,
        )
        .group_by(*identity)
        .having(
            ~func.array_agg(newest_first)[1],  # not withdrawn already
            or_(delivered_here, ~delivered_elsewhere),
        )
    )
    statement = insert(Annotation).from_select(
        [
            "id",
            "owner_key_id",
            "item_id",
            "job_id",
            "source",
            "external_id",
            "webhook_id",
            "annotator",
            "annotated_at",
            "retracted",
            "flagged_thoughts",
            "raw",
        ],
        withdrawn,
    )
    result = await session.execute(statement)
    return int(result.rowcount)  # type: ignore[attr-defined]


class _Reviewed(NamedTuple):
    """What a review is checked against and stored with: its CoT's job, thoughts and response."""

    job_id: UUID
    thought_count: int
    response: str


async def _cots_of(
    session: AsyncSession, item_ids: set[UUID], owner_key_id: UUID, job_id: UUID | None
) -> dict[UUID, _Reviewed]:
    if not item_ids:
        return {}
    ids = bindparam("item_ids", list(item_ids), type_=ARRAY(PG_UUID(as_uuid=True)))
    query = (
        select(Cot.item_id, Cot.job_id, func.jsonb_array_length(Cot.refined_thoughts), Cot.response)
        .join(Job, Job.id == Cot.job_id)
        .where(Cot.item_id == any_(ids), Job.owner_key_id == owner_key_id)
    )
    if job_id is not None:
        query = query.where(Cot.job_id == job_id)
    return {item_id: _Reviewed(*cot) for item_id, *cot in await session.execute(query)}


def _row(review: Review, cot: _Reviewed, owner_key_id: UUID, webhook_id: UUID | None) -> dict[str, Any]:
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
