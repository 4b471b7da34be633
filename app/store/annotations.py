"""Human reviews from labeling tools as rows: the CoTs they review, their versions and
retractions, and what they mean for exports (app.labeling.imports checks them first)."""

from __future__ import annotations

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

from app.store.models import Annotation, Cot, Job

# The annotator of a retraction: tools do not say who deleted an annotation.
RETRACTED_BY = "deleted in the tool"


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


_ADD_VERSIONS = (
    pg_insert(Annotation).on_conflict_do_nothing(constraint="uq_annotations_version").returning(Annotation.id)
)


async def add_versions(session: AsyncSession, rows: list[dict[str, Any]]) -> int:
    """Insert annotation versions (rows of Annotation's columns); returns how many were new. A
    version already stored (same owner, item, source, annotation id and time) is left as it
    was, never rewritten."""
    return len((await session.execute(_ADD_VERSIONS, rows)).all())


async def retract(
    session: AsyncSession,
    *,
    owner_key_id: UUID,
    source: str,
    external_id: str,
    raw: dict[str, Any],
    webhook_id: UUID | None,
) -> int:
    """Append a retraction to each current annotation of the owner's with this tool id;
    returns how many were withdrawn.

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
            literal(raw, JSONB),
        )
        .where(
            versions.owner_key_id == owner_key_id,
            versions.source == source,
            versions.external_id == external_id,
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


class ReviewedCot(NamedTuple):
    """What a review is checked against and stored with: its CoT's job, thoughts and response."""

    job_id: UUID
    thought_count: int
    response: str


async def reviewed_cots(
    session: AsyncSession, item_ids: set[UUID], owner_key_id: UUID, job_id: UUID | None
) -> dict[UUID, ReviewedCot]:
    """The CoTs of these items that are the owner's (and of `job_id`, when given), by item."""
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
    return {item_id: ReviewedCot(*cot) for item_id, *cot in await session.execute(query)}
