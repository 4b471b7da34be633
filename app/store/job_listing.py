"""A key's jobs, newest first, a page at a time (GET /v1/jobs, GET /v1/comparisons): one
query per page, with each job's items counted per status and its status derived from them,
and one summing the page's jobs' turn costs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any
from uuid import UUID

from sqlalchemy import ColumnElement, Text, and_, case, cast, func, literal, select, true, tuple_, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from app.errors import InvalidCursor
from app.plan import JobPlan, read_plan
from app.store import quality
from app.store.jobs import decode_cursor, decode_cursor_bytes
from app.store.models import FINISHED, Item, ItemStatus, Job, JobStatus
from app.store.positions import Listing, encode_position, position_of

# The plan modes each listing shows (empty: every one).
_KINDS: dict[Listing, Sequence[str]] = {Listing.JOBS: (), Listing.COMPARISONS: ("comparison",)}
_ID_BYTES = 16  # an old-form cursor: a job's id


@dataclass(frozen=True)
class JobFilter:
    """What a listing keeps; an empty field keeps every job. Times are exclusive bounds."""

    statuses: Sequence[str] = ()  # derived job statuses (JobStatus)
    kinds: Sequence[str] = ()  # plan modes
    created_after: datetime | None = None
    created_before: datetime | None = None
    label: str | None = None  # exact match
    metadata: dict[str, Any] | None = None  # the job's metadata contains it (jsonb @>)


@dataclass(frozen=True)
class ListedJob:
    job: Job  # its plan unloaded: see `plan`
    plan_json: str
    status: JobStatus
    by_status: dict[str, int]  # items per status, statuses with none left out
    spent_usd: float  # its turns' costs summed (unpriced turns count nothing)

    @cached_property
    def plan(self) -> JobPlan:
        """The job's plan, decoded when first asked: where the page is shaped, in a worker
        thread (json_answer). A model evaluation's plan holds up to 8 system prompts of 20,000
        characters, and a page of 500 of them, decoded on the event loop as its rows came,
        held it for 34 ms of CPU (80 ms of wall clock)."""
        return read_plan(json.loads(self.plan_json))


def _mode() -> ColumnElement[str]:
    mode: ColumnElement[str] = type_coerce(Job.plan, JSONB)["mode"].astext
    return mode


# Each job's items per status, by the index on (job_id, status).
_COUNTS = (
    select(*(func.count().filter(Item.status == status).label(status) for status in ItemStatus))
    .where(Item.job_id == Job.id)
    .lateral("counts")
)


def _status() -> ColumnElement[str]:
    """The job's status as jobs.summary derives it (GET /v1/jobs/{id}), in SQL so a listing
    can filter on it: completed or cancelled when every item has finished, cancelling after
    a cancel, budget_exhausted when the unfinished items all wait for budget, running once an
    item started, queued before."""
    finished: ColumnElement[int] = literal(0)
    for status in FINISHED:
        finished = finished + _COUNTS.c[status]
    cancelled = Job.cancelled_at.is_not(None)
    # Items waiting for a batch's answers are at work, as running ones are.
    running = _COUNTS.c[ItemStatus.RUNNING] + _COUNTS.c[ItemStatus.AWAITING_BATCH]
    waiting = _COUNTS.c[ItemStatus.BUDGET_EXHAUSTED]
    return case(
        (finished == Job.item_count, case((cancelled, "cancelled"), else_="completed")),
        (cancelled, "cancelling"),
        ((waiting > 0) & (_COUNTS.c[ItemStatus.QUEUED] + running == 0), "budget_exhausted"),
        ((finished > 0) | (running > 0) | (waiting > 0), "running"),
        else_="queued",
    )


async def page(
    session: AsyncSession,
    owner_key_id: UUID,
    listing: Listing,
    keep: JobFilter,
    cursor: str | None,
    limit: int,
    with_metadata: bool = True,
) -> tuple[list[ListedJob], str | None]:
    """The key's jobs of `listing` (JOBS or COMPARISONS) that `keep` keeps, newest first,
    after the position `cursor` holds (see `decode_position`); without their metadata unless
    `with_metadata` (up to 8 KiB of JSON a job, decoded on the event loop as the rows come)."""
    only_kinds = _KINDS[listing]
    status = _status().label("status")
    # Not shown in a listing, and about 150 KB of JSON a job of 10,000 repeated prompts (its
    # duplicates report): a page of 500 read 73 MB, decoded on the event loop.
    unread = [Job.duplicates, Job.plan, *([] if with_metadata else [Job.job_metadata])]
    query = (
        select(Job, cast(Job.plan, Text), status, *(_COUNTS.c[s] for s in ItemStatus))
        .join(_COUNTS, true())
        .where(Job.owner_key_id == owner_key_id, *_conditions(only_kinds, keep, status.element))
        .options(*(defer(column, raiseload=True) for column in unread))
    )
    if cursor:
        resume_after = await _resume_after(session, owner_key_id, listing, cursor)
        # The same order as ORDER BY below; an aware datetime is bound as a timestamptz.
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(*resume_after))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = list(await session.execute(query))
    costs = await quality.spent_usd(session, [row[0].id for row in rows[:limit]])
    listed = [
        ListedJob(
            job, plan, status, {s: n for s, n in zip(ItemStatus, counts, strict=True) if n}, costs[job.id]
        )
        for job, plan, status, *counts in rows[:limit]
    ]
    if len(rows) <= limit:
        return listed, None
    return listed, encode_position(listing, listed[-1].job.created_at, listed[-1].job.id)


def _conditions(
    only_kinds: Sequence[str], keep: JobFilter, status: ColumnElement[str]
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if only_kinds:
        conditions.append(_mode().in_(only_kinds))
    if keep.kinds:
        conditions.append(_mode().in_(keep.kinds))
    if keep.statuses:
        conditions.append(status.in_(keep.statuses))
    if keep.created_after is not None:
        conditions.append(Job.created_at > keep.created_after)
    if keep.created_before is not None:
        conditions.append(Job.created_at < keep.created_before)
    if keep.label is not None:
        conditions.append(Job.label == keep.label)
    if keep.metadata is not None:
        conditions.append(Job.job_metadata.contains(keep.metadata))
    return conditions


def decode_position(listing: Listing, cursor: str) -> tuple[datetime, UUID] | UUID:
    """The (created_at, id) a cursor of `listing` holds (app/store/positions.py), or the job
    id alone of an old-form cursor (one issued before cursors held positions); InvalidCursor
    if it is neither, or another listing's."""
    data = decode_cursor_bytes(cursor)
    if len(data) == _ID_BYTES:
        return decode_cursor(cursor)
    return position_of(listing, data)


async def _resume_after(
    session: AsyncSession, owner_key_id: UUID, listing: Listing, cursor: str
) -> tuple[datetime, UUID]:
    """The position a page resumes after. A position is not checked against the rows: the
    query keeps the caller's own jobs of the listing, so a made-up one, or another key's,
    only moves within them (as `created_before` does) and shows nothing more. An old-form
    cursor's job is looked up, and must be one of this listing's: InvalidCursor if not (so
    also once it is deleted)."""
    position = decode_position(listing, cursor)
    if not isinstance(position, UUID):
        return position
    only_kinds = _KINDS[listing]
    row = (
        await session.execute(
            select(Job.created_at, Job.id).where(
                and_(Job.id == position, Job.owner_key_id == owner_key_id),
                *([_mode().in_(only_kinds)] if only_kinds else []),
            )
        )
    ).one_or_none()
    if row is None:
        raise InvalidCursor("the cursor is not one this API returned for this listing")
    return row.created_at, row.id
