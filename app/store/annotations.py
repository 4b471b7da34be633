"""Human reviews from labeling tools, and what they mean for exports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

from sqlalchemy import ARRAY, ColumnElement, and_, any_, bindparam, exists, func, select
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.errors import ServiceError
from app.labeling.reviews import Parsed, Review, Skipped
from app.store.models import Annotation, Cot


def _current() -> ColumnElement[bool]:
    """The latest version of each annotation (an edit in the tool adds a row)."""
    newer = aliased(Annotation)
    return ~exists().where(
        newer.source == Annotation.source,
        newer.external_id == Annotation.external_id,
        newer.annotated_at > Annotation.annotated_at,
    )


def human_approved() -> ColumnElement[bool]:
    """A condition on Cot: some reviewer accepts it and no reviewer (currently) rejects it."""

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
    skipped: list[Skipped]  # left out on purpose, each with its reason


async def record_reviews(session: AsyncSession, parsed: Parsed, job_id: UUID | None = None) -> ImportReport:
    """Store the reviews of a request in the caller's transaction, all or none.

    Every review must name a completed item (of `job_id`, when given) and thoughts its CoT
    has; otherwise UnknownItems or InvalidAnnotations, and nothing is written. A version
    already stored (same source, annotation id and time) is counted as a duplicate, never
    rewritten: an edit in the tool has a new time and adds a row.
    """
    parsed.checked()
    cots = await _cots_of(session, {r.item_id for r in parsed.reviews}, job_id)
    missing = sorted({str(r.item_id) for r in parsed.reviews if r.item_id not in cots})
    if missing:
        where = "in this job" if job_id else "in any job"
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
    rows = [_row(review, cots[review.item_id]) for review in parsed.reviews]
    inserted = 0
    if rows:
        statement = (
            pg_insert(Annotation)
            .on_conflict_do_nothing(index_elements=["source", "external_id", "annotated_at"])
            .returning(Annotation.id)
        )
        inserted = len((await session.execute(statement, rows)).all())
    return ImportReport(inserted, len(rows) - inserted, parsed.skipped)


class _Reviewed(NamedTuple):
    """What a review is checked against and stored with: its CoT's job, thoughts and response."""

    job_id: UUID
    thought_count: int
    response: str


async def _cots_of(session: AsyncSession, item_ids: set[UUID], job_id: UUID | None) -> dict[UUID, _Reviewed]:
    if not item_ids:
        return {}
    ids = bindparam("item_ids", list(item_ids), type_=ARRAY(PG_UUID(as_uuid=True)))
    query = select(
        Cot.item_id, Cot.job_id, func.jsonb_array_length(Cot.refined_thoughts), Cot.response
    ).where(Cot.item_id == any_(ids))
    if job_id is not None:
        query = query.where(Cot.job_id == job_id)
    return {item_id: _Reviewed(*cot) for item_id, *cot in await session.execute(query)}


def _row(review: Review, cot: _Reviewed) -> dict[str, Any]:
    return {
        "item_id": review.item_id,
        "job_id": cot.job_id,
        "source": review.source,
        "external_id": review.external_id[:200],
        "annotator": review.annotator[:200],
        "annotated_at": review.annotated_at,
        "verdict": review.verdict,
        "edited_response": review.edited_response(cot.response),
        "policy_faithfulness": review.policy_faithfulness,
        "flagged_thoughts": review.flagged_thoughts,
        "comment": review.comment,
        "raw": review.raw,
    }
