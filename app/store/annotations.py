"""Human reviews from labeling tools as rows: the CoTs they review, their versions and
retractions, and what they mean for exports (app.labeling.imports checks them first)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, TypeVar
from uuid import UUID

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.selectable import LateralFromClause

from app.store import page_sizes, positions
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


def _any_current(verdict: str) -> ColumnElement[bool]:
    """A condition on Cot: some reviewer's current verdict is `verdict`. A retracted
    annotation has no verdict, so it has neither. Within the CoT's job, so its owner's (the
    owner is not in the export's cached statement), as `latest_edit`."""
    return exists(
        select(Annotation.id).where(
            Annotation.item_id == Cot.item_id,
            Annotation.job_id == Cot.job_id,
            Annotation.verdict == verdict,
            _current(),
        )
    )


def human_rejected() -> ColumnElement[bool]:
    """A condition on Cot: some reviewer (currently) rejects it."""
    return _any_current("reject")


def human_approved() -> ColumnElement[bool]:
    """A condition on Cot: some reviewer accepts it and no reviewer (currently) rejects it."""
    return and_(_any_current("accept"), ~human_rejected())


def latest_edit() -> LateralFromClause:
    """A lateral subquery on Cot: the newest response a reviewer edited among the current
    reviews of its item (columns edited_response, reviewer, source, annotation_id,
    edited_at), or no row. Join it with `outerjoin(latest_edit(), true())`."""
    return (
        select(
            Annotation.edited_response,
            Annotation.annotator.label("reviewer"),
            Annotation.source,
            Annotation.external_id.label("annotation_id"),
            Annotation.annotated_at.label("edited_at"),
        )
        .where(
            Annotation.item_id == Cot.item_id,
            Annotation.job_id == Cot.job_id,
            Annotation.edited_response.is_not(None),  # a retraction has none
            _current(),
        )
        .order_by(Annotation.annotated_at.desc(), Annotation.id.desc())
        .limit(1)
        .lateral("human_edit")
    )


# Reviews are read a batch at a time, so that other requests run between batches: an item
# may have tens of thousands (each annotation id a tool sends is a review of its own), and a
# job as many times more; 73,500 read at once held the event loop for seconds.
REVIEWS_READ_AT_A_TIME = 1_000
Read = TypeVar("Read", bound=tuple[Any, ...])


async def _in_batches(session: AsyncSession, query: Executable, row: Callable[..., Read]) -> list[Read]:
    """The rows of `query`, each made into `row`, read REVIEWS_READ_AT_A_TIME at a time."""
    result = await session.stream(query.execution_options(yield_per=REVIEWS_READ_AT_A_TIME))
    rows: list[Read] = []
    async for batch in result.partitions():
        rows.extend(row(*values) for values in batch)
    return rows


class ItemReview(NamedTuple):
    """A review of an item as it is read back: the columns shown, not what the tool sent."""

    id: UUID
    source: str
    external_id: str
    annotator: str
    verdict: str | None
    edited_response: str | None
    policy_faithfulness: int | None
    flagged_thoughts: list[int]
    comment: str | None
    annotated_at: datetime
    created_at: datetime
    webhook_id: UUID | None


def _item_reviews_now(item_id: UUID, owner_key_id: UUID) -> list[ColumnElement[bool]]:
    """The owner's reviews of the item that count now: the latest version of each
    annotation, unless withdrawn."""
    return [
        Annotation.item_id == item_id,
        Annotation.owner_key_id == owner_key_id,
        Annotation.retracted.is_(False),
        _current(),
    ]


async def item_verdicts(session: AsyncSession, item_id: UUID, owner_key_id: UUID) -> set[str | None]:
    """The verdicts, each once, of the owner's reviews of the item that count now, all of
    them (an item's decision is theirs, whichever page of its reviews is read)."""
    verdicts = select(Annotation.verdict).where(*_item_reviews_now(item_id, owner_key_id)).distinct()
    return set(await session.scalars(verdicts))


async def page_item_reviews(
    session: AsyncSession, item_id: UUID, owner_key_id: UUID, cursor: str | None, limit: int
) -> tuple[list[ItemReview], str | None]:
    """A page of the owner's reviews of the item that count now, oldest first, after the
    place `cursor` holds (app/store/positions.py): at most `limit`, and no more than
    PAGE_ROW_BYTES of their columns shown as JSON (a first review larger than that comes
    alone); with the cursor of the next page, None when no review is left out. One
    statement, so one snapshot."""
    shown = [getattr(Annotation, name) for name in ItemReview._fields]
    read = select(*shown)
    oldest_first = (Annotation.annotated_at, Annotation.id)
    kept = _item_reviews_now(item_id, owner_key_id)
    if cursor:
        kept.append(
            tuple_(*oldest_first) > tuple_(*positions.decode_position(positions.Listing.ITEM_REVIEWS, cursor))
        )
    candidates = select(*oldest_first).where(*kept).order_by(*oldest_first).limit(limit + 1).cte("candidates")
    row_bytes = func.octet_length(cast(func.json_build_array(*shown), Text))
    ids, fitting = page_sizes.on_page(
        read, Annotation.id, candidates, [candidates.c.annotated_at, candidates.c.id], limit, row_bytes
    )
    left_out = select(func.count()).select_from(candidates).scalar_subquery() > fitting
    query = read.add_columns(left_out).where(Annotation.id.in_(ids)).order_by(*oldest_first)
    rows = list(await session.execute(query))
    page = [ItemReview(*row[:-1]) for row in rows]
    if not rows or not rows[-1][-1]:
        return page, None
    return page, positions.encode_position(positions.Listing.ITEM_REVIEWS, page[-1].annotated_at, page[-1].id)


class CountedReview(NamedTuple):
    """A review that counts now, with what the grader's gate said of its CoT."""

    item_id: UUID
    gate_accepted: bool | None  # None: not graded
    reviewer: str  # the tool and its user: one person in two tools is two reviewers
    verdict: str | None
    edited: bool


async def job_reviews(session: AsyncSession, job_id: UUID, owner_key_id: UUID) -> list[CountedReview]:
    """The owner's reviews of the job's CoTs that count now, by item, a batch at a time."""
    query = (
        select(
            Annotation.item_id,
            Cot.accepted,
            func.concat(Annotation.source, ":", Annotation.annotator),
            Annotation.verdict,
            Annotation.edited_response.is_not(None),
        )
        .join(Cot, Cot.item_id == Annotation.item_id)
        .where(
            Cot.job_id == job_id,
            Annotation.job_id == job_id,
            Annotation.owner_key_id == owner_key_id,
            Annotation.retracted.is_(False),
            _current(),
        )
        .order_by(Annotation.item_id, Annotation.annotated_at)
    )
    return await _in_batches(session, query, CountedReview)


async def count_cots(session: AsyncSession, job_id: UUID) -> int:
    """The job's CoTs: its completed items, each one a reviewer can review."""
    return int(await session.scalar(select(func.count()).select_from(Cot).where(Cot.job_id == job_id)) or 0)


_ADD_VERSIONS = (
    pg_insert(Annotation).on_conflict_do_nothing(constraint="uq_annotations_version").returning(Annotation.id)
)


async def add_versions(session: AsyncSession, rows: list[dict[str, Any]]) -> int:
    """Insert annotation versions (rows of Annotation's columns); returns how many were new. A
    version already stored (same owner, item, source, annotation id and time) is left as it
    was, never rewritten."""
    return len((await session.execute(_ADD_VERSIONS, rows)).all())


class Deletion(NamedTuple):
    """An annotation deleted in the tool: the tool, its id of the annotation, what it sent."""

    source: str
    external_id: str
    raw: dict[str, Any]


async def retract(
    session: AsyncSession, *, owner_key_id: UUID, deletions: list[Deletion], webhook_id: UUID | None
) -> list[tuple[str, str]]:
    """Append a retraction to each current annotation of the owner's that a deletion names
    (name each annotation once); the source and tool id of each annotation withdrawn, one
    per retraction appended.

    A deletion event names only the tool's id, not the item, so it reaches every item of
    the owner's where that id is current, except annotations another webhook delivered: a
    second tool instance, which numbers its annotations from 1 too, cannot withdraw them.
    The retraction is the annotation's newest version (at least a microsecond after the
    version it withdraws, whatever the tool's clock said). One statement for them all: a
    statement per deletion made an event of 16,000 of them 45 s of Postgres."""
    if not deletions:
        return []
    # One owner's retractions take turns: Label Studio sends a delivery again when the first
    # timed out, maybe still under way, and both would find the annotation not withdrawn yet.
    # The second reads after the first's commit (READ COMMITTED), and finds it withdrawn.
    turn = f"retractions of {owner_key_id}"
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(turn, 0))))
    deleted = (
        func.unnest(
            bindparam("sources", [d.source for d in deletions], type_=ARRAY(Text)),
            bindparam("external_ids", [d.external_id for d in deletions], type_=ARRAY(Text)),
            bindparam("raws", [json.dumps(d.raw) for d in deletions], type_=ARRAY(Text)),
        )
        .table_valued("source", "external_id", "raw")
        .render_derived(name="deleted")
    )
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
            cast(deleted.c.raw, JSONB),
        )
        .join_from(
            versions,
            deleted,
            and_(versions.source == deleted.c.source, versions.external_id == deleted.c.external_id),
        )
        .where(versions.owner_key_id == owner_key_id)
        .group_by(*identity, deleted.c.raw)
        .having(
            ~func.array_agg(newest_first)[1],  # not withdrawn already
            or_(delivered_here, ~delivered_elsewhere),
        )
    )
    statement = (
        insert(Annotation)
        .from_select(
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
        .returning(Annotation.source, Annotation.external_id)
    )
    return [(source, external_id) for source, external_id in await session.execute(statement)]


class ReviewedCot(NamedTuple):
    """What a review is checked against and stored with: its CoT's job, thoughts and response."""

    job_id: UUID
    thought_count: int
    response: str


async def reviewed_cots(
    session: AsyncSession, item_ids: set[UUID], owner_key_id: UUID, job_id: UUID | None
) -> dict[UUID, ReviewedCot]:
    """The CoTs of these items that are the owner's (and of `job_id`, when given), by item.
    Their jobs' rows are held until the caller's transaction ends (as `jobs.hold` holds one),
    so a deletion of one waits for the reviews the caller adds, or went first."""
    if not item_ids:
        return {}
    ids = bindparam("item_ids", list(item_ids), type_=ARRAY(PG_UUID(as_uuid=True)))
    query = (
        select(Cot.item_id, Cot.job_id, func.jsonb_array_length(Cot.refined_thoughts), Cot.response)
        .join(Job, Job.id == Cot.job_id)
        .where(Cot.item_id == any_(ids), Job.owner_key_id == owner_key_id)
        .with_for_update(of=Job, read=True, key_share=True)
    )
    if job_id is not None:
        query = query.where(Cot.job_id == job_id)
    return {item_id: ReviewedCot(*cot) for item_id, *cot in await session.execute(query)}
