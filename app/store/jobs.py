"""Jobs as the API sees them: submit, read, cancel, and page through items, CoTs and pairs."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal
from uuid import UUID, uuid4

from sqlalchemy import ColumnElement, func, inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from app.costs import Budget, priced
from app.deliberation.config import Mode
from app.deliberation.ports import Stage
from app.errors import InvalidCursor, NotFound
from app.idempotency import RequestHash
from app.plan import GenerationPlan, JobPlan
from app.store import batches, budgets, callbacks, key_limits, keys, page_sizes, quality
from app.store.db import copy_rows
from app.store.endings import CANCELLED, ending_values
from app.store.models import (
    FINISHED,
    UNFINISHED,
    WAITING,
    Cot,
    ImportedSample,
    Item,
    ItemStatus,
    Job,
    PreferencePair,
    SampleEvaluation,
    TurnRow,
)
from app.threads import in_thread

# Each submitting route keeps its own Idempotency-Key namespace (per API key): a key used for
# a job is still free for a comparison.
IdempotencyScope = Literal["jobs", "comparisons", "samples", "model_evaluation"]
# What a listing pages through: rows with an id, their job, and their item's position.
Listed = type[Item] | type[Cot] | type[PreferencePair]


@dataclass(frozen=True)
class NewItem:
    position: int  # the prompt's index in the submitted list (skipped duplicates leave gaps)
    prompt: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class NewCallback:
    """Where a new job's end is announced (an allowed URL), and the secret that signs it."""

    url: str
    secret: str


@dataclass(frozen=True)
class Labels:
    """The user's own name and free-form metadata for a job."""

    label: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class JobRequest:
    """What a submit request gives the job it makes, whatever the job's kind: its owner and
    labels, the request's Idempotency-Key and hash, the callback, and the owner's cap on open
    jobs."""

    owner_key_id: UUID
    labels: Labels
    idempotency_key: str | None
    request_hash: RequestHash
    callback: NewCallback | None
    max_open_jobs: int


async def submit(
    session: AsyncSession,
    request: JobRequest,
    *,
    policy_set_id: UUID,
    prompt_set_id: UUID,
    plan: GenerationPlan,
    items: Sequence[NewItem],
    duplicates: dict[str, Any],
    budget: Budget | None = None,
) -> tuple[Job, list[UUID]]:
    """Write the job and all its items in the caller's transaction.

    Returns (job, ids of the items created: empty for a replay); see `create`.
    """
    job, created = await create(
        session,
        request,
        policy_set_id=policy_set_id,
        prompt_set_id=prompt_set_id,
        plan=plan,
        item_count=len(items),
        idempotency_scope="jobs",
        duplicates=duplicates,
        budget=budget,
    )
    if not created:
        return job, []
    return job, await copy_items(session, job.id, items, stage=_first_stage(plan))


def _first_stage(plan: GenerationPlan) -> str:
    """The stage a job's items run first, what their progress shows until then: the zero-shot
    call, or the seed when intents are not decomposed, run no intent stage."""
    if plan.mode == Mode.ZERO_SHOT:
        return Stage.ZERO_SHOT.value
    return (Stage.INTENT if plan.decompose_intents else Stage.SEED).value


async def copy_items(
    session: AsyncSession, job_id: UUID, items: Sequence[NewItem], stage: str | None = None
) -> list[UUID]:
    """Write the job's items in the caller's transaction; their ids, in order. `stage`: the
    first stage they show (default: the column's, the intent stage)."""
    defaults = _ITEM_DEFAULTS | ({"stage": stage} if stage else {})
    # Made in a worker thread: a benchmark file's rows may hold thousands of metadata values
    # each, asked of up to eight targets, and encoding them here held the event loop for
    # seconds; 10,000 new ids alone held it for 20 ms.
    ids, records = await in_thread(_item_records, job_id, items, defaults)
    await copy_rows(
        session, Item.__tablename__, ["id", "job_id", "position", "prompt", "metadata", *defaults], records
    )
    return ids


def _item_records(
    job_id: UUID, items: Sequence[NewItem], defaults: dict[str, Any]
) -> tuple[list[UUID], list[tuple[Any, ...]]]:
    """New items' ids, and their rows as copy_items writes them."""
    ids = [uuid4() for _ in items]
    records = [
        (item_id, job_id, it.position, it.prompt, json.dumps(it.metadata), *defaults.values())
        for item_id, it in zip(ids, items, strict=True)
    ]
    return ids, records


async def create(
    session: AsyncSession,
    request: JobRequest,
    *,
    policy_set_id: UUID,
    prompt_set_id: UUID | None,
    plan: JobPlan,
    item_count: int,
    idempotency_scope: IdempotencyScope,
    duplicates: dict[str, Any] | None = None,
    budget: Budget | None = None,
) -> tuple[Job, bool]:
    """Write a job row without items in the caller's transaction; (job, True) if created.

    A repeated Idempotency-Key (in the same scope) with the same request returns the first
    job and False; with a different request it is a conflict, never a silent second job.
    A new job when the key has `request.max_open_jobs` open already is LimitReached (a replay
    is not).
    """
    # Held first: a replay sent while its first request is under way waits for that request's
    # commit, and finds its job, rather than being counted against the cap.
    await keys.hold(session, request.owner_key_id)
    if request.idempotency_key and (
        existing := await replayed(
            session, request.owner_key_id, idempotency_scope, request.idempotency_key, request.request_hash
        )
    ):
        return existing, False
    await key_limits.refuse_at_cap(
        session, key_limits.OPEN_JOBS, request.max_open_jobs, key_limits.open_jobs(request.owner_key_id)
    )
    job = Job(
        owner_key_id=request.owner_key_id,
        policy_set_id=policy_set_id,
        prompt_set_id=prompt_set_id,
        plan=plan,
        idempotency_key=request.idempotency_key,
        idempotency_scope=idempotency_scope,
        request_hash=request.request_hash.value,
        request_hash_may_be_legacy=False,
        item_count=item_count,
        callback_url=request.callback.url if request.callback else None,
        callback_secret=request.callback.secret if request.callback else None,
        label=request.labels.label,
        job_metadata=request.labels.metadata,
        duplicates=duplicates,
        budget_max_cost_usd=budget.max_cost_usd if budget else None,
        budget_max_tokens=budget.max_tokens if budget else None,
    )
    try:
        async with session.begin_nested():
            session.add(job)
            await session.flush()
    except IntegrityError:  # a concurrent POST with the same key won the race
        existing = await _by_idempotency_key(
            session, request.owner_key_id, idempotency_scope, request.idempotency_key or ""
        )
        if existing is None:
            raise
        return await _same_request(existing, request.request_hash), False
    return job, True


# A new item's other columns, as the model's defaults give them (COPY bypasses the ORM).
_ITEM_DEFAULTS = {
    column.name: column.default.arg
    for column in Item.__table__.columns
    if isinstance(column.default, ScalarElementColumnDefault)
}


async def replayed(
    session: AsyncSession,
    owner_key_id: UUID,
    scope: IdempotencyScope,
    idempotency_key: str,
    request_hash: RequestHash,
) -> Job | None:
    """The job an earlier request with this Idempotency-Key made in `scope`, if any;
    IdempotencyConflict if that request was another."""
    existing = await _by_idempotency_key(session, owner_key_id, scope, idempotency_key)
    return None if existing is None else await _same_request(existing, request_hash)


async def _by_idempotency_key(
    session: AsyncSession, owner_key_id: UUID, scope: IdempotencyScope, key: str
) -> Job | None:
    # With its duplicates report: a replay answers the job as its first request did.
    return await session.scalar(
        select(Job)
        .options(undefer(Job.duplicates))
        .where(Job.owner_key_id == owner_key_id, Job.idempotency_scope == scope, Job.idempotency_key == key)
    )


async def _same_request(job: Job, request_hash: RequestHash) -> Job:
    await request_hash.check_replay(job.request_hash, may_be_legacy=job.request_hash_may_be_legacy)
    return job


async def get_owned(
    session: AsyncSession, job_id: UUID, owner_key_id: UUID, *, with_duplicates: bool = False
) -> Job:
    """The job if this key owns it; another key's job is indistinguishable from none: the owner
    is in the statement, so another key's row is never read (read, then checked, its plan and
    duplicates report were decoded first, 3 ms of the event loop for 10,000 prompts in pairs:
    a 404 several times slower than a nobody's, telling that the job was there, and its size).
    Its duplicates report is read only `with_duplicates` (Job.duplicates)."""
    read = select(Job).where(Job.id == job_id, Job.owner_key_id == owner_key_id)
    if with_duplicates:
        read = read.options(undefer(Job.duplicates))
    return owned(await session.scalar(read), job_id, owner_key_id)


async def refresh_with_duplicates(session: AsyncSession, job: Job) -> None:
    """Read the job's row again (after the caller's commit), its duplicates report included,
    which a plain refresh leaves out (Job.duplicates)."""
    await session.refresh(job, _EVERY_COLUMN)


_EVERY_COLUMN = [column.key for column in inspect(Job).column_attrs]


async def hold(session: AsyncSession, job_id: UUID, *, to_change: bool = False) -> None:
    """Lock the job's row until the caller's transaction ends; NotFound if it is gone. A
    deletion locks it first (FOR UPDATE), so it either waits for the rows the caller adds that
    name the job (FOR KEY SHARE; or, `to_change`, for the caller's change of the row: FOR NO
    KEY UPDATE, which the inserts of the job's turns do not wait for) and then sees them, or
    has gone: never a foreign key's error half way. (Changing a column that a unique index
    covers would take FOR UPDATE after all, and wait for those inserts: no caller does.)"""
    held = select(Job.id).where(Job.id == job_id).with_for_update(read=not to_change, key_share=True)
    if await session.scalar(held) is None:
        raise NotFound(f"job {job_id} not found")


def owned(job: Job | None, job_id: UUID, owner_key_id: UUID) -> Job:
    """`job` (the row read for `job_id`) if this key owns it; NotFound otherwise."""
    if job is None or job.owner_key_id != owner_key_id:
        raise NotFound(f"job {job_id} not found")
    return job


async def summary(session: AsyncSession, job: Job) -> dict[str, Any]:
    """Status derived from the items, counts per status and per stage, token totals, refused
    turns per stage and model, and the quality and pairs figures when the job asked for
    grading or pairs."""
    by_status: dict[str, int] = {}
    by_stage: dict[str, dict[str, int]] = {}
    rows = await session.execute(
        select(Item.stage, Item.status, func.count())
        .where(Item.job_id == job.id)
        .group_by(Item.stage, Item.status)
    )
    for stage, status, count in rows:
        by_status[status] = by_status.get(status, 0) + count
        by_stage.setdefault(stage, {})[status] = count
    usage = (await session.execute(select(*quality.usage_columns()).where(TurnRow.job_id == job.id))).one()
    finished = sum(by_status.get(s, 0) for s in FINISHED)
    # Items waiting for a batch's answers are at work, as running ones are.
    active = sum(
        by_status.get(s, 0) for s in (ItemStatus.QUEUED, ItemStatus.RUNNING, ItemStatus.AWAITING_BATCH)
    )
    if finished == job.item_count:
        status = "cancelled" if job.cancelled_at else "completed"
    elif job.cancelled_at:
        status = "cancelling"
    elif by_status.get(ItemStatus.BUDGET_EXHAUSTED) and not active:
        status = "budget_exhausted"
    elif finished or any(by_status.get(s) for s in (ItemStatus.RUNNING, *WAITING)):
        status = "running"
    else:
        status = "queued"
    shown_usage = quality.usage(usage, priced(job.plan))
    summary: dict[str, Any] = {
        "status": status,
        "counts": {"total": job.item_count, "by_status": by_status, "by_stage": by_stage},
        "usage": shown_usage,
        "budget": budget_out(job, shown_usage),
        "refusals_by_stage": await quality.refusals_by_stage(session, job.id),
    }
    if isinstance(plan := job.plan, GenerationPlan):  # comparisons neither grade nor pair
        if plan.delivery == "batch":
            summary["batch"] = await batches.wave_in(session, job.id, plan)
        if plan.grading is not None:
            summary["quality"] = await quality.grading(session, job.id)
        if plan.pairs is not None:
            summary["pairs"] = await quality.pairs(session, job.id, plan.pairs.min_gap)
    return summary


async def report_read(session: AsyncSession, job: Job) -> Callable[[], dict[str, Any]]:
    """The summary, with the quality gate's thresholds and what CoTs missed, pair candidates'
    figures and usage by stage. Read now, completed by the callable with no more reads (the
    session may be closed meanwhile): the candidates' figures are CPU for a worker thread."""
    full = await summary(session, job)
    if isinstance(plan := job.plan, GenerationPlan) and (grading := plan.grading) is not None:
        full["quality"]["thresholds"] = dict(grading.thresholds)
        full["quality"]["below_threshold"] = await quality.below_threshold(
            session, job.id, grading.thresholds
        )
    full["usage_by_stage"] = await quality.usage_by_stage(session, job.id, priced(job.plan))
    candidates = await pair_candidates_read(session, job)
    if candidates is None:
        return lambda: full
    return lambda: full | {"pairs": full["pairs"] | {"candidates": candidates()}}


async def pair_candidates_read(session: AsyncSession, job: Job) -> Callable[[], dict[str, Any]] | None:
    """The figures of the job's pair candidates (quality.candidate_stats) per sampling method
    it used: the whisperer's, and standard sampling's with a baseline; None without pairs.
    Read now, computed by the callable with no more reads, in a worker thread."""
    if not isinstance(plan := job.plan, GenerationPlan) or (pairs := plan.pairs) is None:
        return None
    methods = ("whisper", "standard") if pairs.baseline else ("whisper",)
    return partial(quality.candidate_stats, await quality.candidate_rows(session, job.id), methods)


def budget_out(job: Job, usage: dict[str, Any]) -> dict[str, Any] | None:
    """The job's budget and whether its recorded calls (`usage`, the job's as shown) have
    reached it; None: no budget."""
    budget = Budget.of(job.budget_max_cost_usd, job.budget_max_tokens)
    if budget is None:
        return None
    tokens, cost = usage["prompt_tokens"] + usage["completion_tokens"], usage["cost_usd"]
    return {
        "max_cost_usd": budget.max_cost_usd,
        "max_tokens": budget.max_tokens,
        "spent_cost_usd": cost,
        "spent_tokens": tokens,
        "exhausted": budget.reached(tokens, cost or 0.0),
    }


async def cancel(session: AsyncSession, job: Job) -> None:
    """Queued items, and those waiting for budget or a batch, end as cancelled now; running ones
    stop at their worker's next check (a worker cancels the job's provider batches).
    A job with no queued or running item has finished: it is left as it is, not cancelled.
    NotFound if the job was deleted meanwhile. The caller refreshes `job` after committing."""
    # Held first: a deletion that committed after the caller read the job made this cancel's
    # callback delivery (of a finished job) violate its foreign key, and the refresh fail: 500s.
    await hold(session, job.id, to_change=True)
    unfinished = select(Item.id).where(Item.job_id == job.id, Item.status.in_(UNFINISHED)).exists()
    # `cancelled_at IS NULL`: of two concurrent cancels, the first time stays
    await session.execute(
        update(Job)
        .where(Job.id == job.id, Job.cancelled_at.is_(None), unfinished)
        .values(cancelled_at=func.now())
    )
    await session.execute(
        update(Item)
        .where(Item.job_id == job.id, Item.status.in_((ItemStatus.QUEUED, *WAITING)))
        .values(ending_values(CANCELLED))
    )
    if job.callback_url is not None:  # this may have ended its last items
        await callbacks.record_if_finished(session, job.id)


async def cancel_unfinished(session: AsyncSession, owner_key_id: UUID) -> int:
    """Cancel (as `cancel`) every job of the key with queued, running or waiting items; how
    many. The caller commits."""
    unfinished = select(Item.id).where(Item.job_id == Job.id, Item.status.in_(UNFINISHED)).exists()
    # Locked as they are read: a job deleted since is left out, not a NotFound from `cancel`.
    owned = list(
        await session.scalars(
            select(Job).where(Job.owner_key_id == owner_key_id, unfinished).with_for_update(key_share=True)
        )
    )
    for job in owned:
        await cancel(session, job)
    return len(owned)


def encode_cursor(row_id: UUID) -> str:
    return encode_cursor_bytes(row_id.bytes)


def decode_cursor(cursor: str) -> UUID:
    """The row id a cursor names; InvalidCursor if it cannot be one (the caller checks the
    row is in its listing)."""
    try:
        return UUID(bytes=decode_cursor_bytes(cursor))
    except ValueError as exc:  # not 16 bytes
        raise InvalidCursor("the cursor is not one this API returned") from exc


def encode_cursor_bytes(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def decode_cursor_bytes(cursor: str) -> bytes:
    """What `encode_cursor_bytes` encoded; InvalidCursor if the cursor is not its form."""
    try:
        return base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
    except ValueError as exc:  # not base64
        raise InvalidCursor("the cursor is not one this API returned") from exc


async def _start_after(session: AsyncSession, listing: Listed, job_id: UUID, cursor: str | None) -> int:
    """The position a page starts after: -1 without a cursor, else the position of the row it
    names. A cursor names the last row of the previous page by its id (checked here, not
    signed: no secret to share between API processes), so one naming no row of this job's
    listing is not a cursor the API returned: InvalidCursor."""
    if not cursor:
        return -1
    position = await session.scalar(
        select(listing.position).where(listing.id == decode_cursor(cursor), listing.job_id == job_id)
    )
    if position is None:
        raise InvalidCursor("the cursor is not one this API returned for this listing of this job")
    return position


async def page_items(
    session: AsyncSession, job_id: UUID, status: str | None, cursor: str | None, limit: int
) -> tuple[list[Item], str | None]:
    after = await _start_after(session, Item, job_id, cursor)
    filters = [Item.job_id == job_id, *([Item.status == status] if status else [])]
    rows, next_cursor = await _page(session, select(Item), filters, Item, after, limit)
    return [item for (item,) in rows], next_cursor


async def page_cots(
    session: AsyncSession, job_id: UUID, accepted: bool | None, cursor: str | None, limit: int
) -> tuple[list[tuple[Cot, Item]], str | None]:
    """CoTs in prompt order; `accepted` keeps only those the quality gate accepted (True)
    or rejected (False)."""
    after = await _start_after(session, Cot, job_id, cursor)
    read = select(Cot, Item).join(Item, Item.id == Cot.item_id)
    filters = [Cot.job_id == job_id, *([Cot.accepted.is_(accepted)] if accepted is not None else [])]
    rows, next_cursor = await _page(session, read, filters, Cot, after, limit)
    return [(cot, item) for cot, item in rows], next_cursor


async def page_pairs(
    session: AsyncSession,
    job: Job,
    *,
    kept: bool | None,
    min_gap: float | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[tuple[PreferencePair, Item, Cot, bool]], str | None]:
    """Preference pair attempts in prompt order, each with its item, chosen CoT and whether
    it is kept at `min_gap` (None: the job's). `kept` keeps only those kept (True) or not
    (False); a `min_gap` given keeps only pairs with at least that gap."""
    job_id = job.id
    after = await _start_after(session, PreferencePair, job_id, cursor)
    is_kept = quality.kept_at(pairs_min_gap(job.plan) if min_gap is None else min_gap)
    read = (
        select(PreferencePair, Item, Cot, is_kept)
        .join(Item, Item.id == PreferencePair.item_id)
        .join(Cot, Cot.item_id == PreferencePair.item_id)
    )
    filters = [PreferencePair.job_id == job_id]
    if kept is not None:
        filters.append(is_kept if kept else ~is_kept)
    if min_gap is not None:
        filters.append(PreferencePair.gap >= min_gap)
    rows, next_cursor = await _page(session, read, filters, PreferencePair, after, limit)
    return [(pair, item, cot, pair_kept) for pair, item, cot, pair_kept in rows], next_cursor


def pairs_min_gap(plan: JobPlan) -> float | None:
    """The `min_gap` readers keep a job's pairs at unless they give one: its plan's (None for
    a job without pairs, which has no pair to keep)."""
    if isinstance(plan, GenerationPlan) and plan.pairs is not None:
        return plan.pairs.min_gap
    return None


async def _page(
    session: AsyncSession,
    read: page_sizes.Read,
    filters: list[ColumnElement[bool]],
    listed: Listed,
    after: int,
    limit: int,
) -> tuple[list[tuple[Any, ...]], str | None]:
    """The page of the rows `read` (of `listed`, its first entity, joined to what they show)
    that `filters` keep, after position `after`, in position order: at most `limit` rows, and
    no more than PAGE_ROW_BYTES of them (app/store/page_sizes.py; a first row larger than that
    comes alone); with the cursor of the next page, None when no row is left out. One
    statement, so one snapshot: read in three, a row that stopped matching the filters between
    them was sized but left out, and a page could come back empty with a next_cursor."""
    candidates = (
        read.with_only_columns(listed.id, listed.position)
        .where(*filters, listed.position > after)
        .order_by(listed.position)
        .limit(limit + 1)
        .cte("candidates")
    )
    ids, fitting = page_sizes.on_page(read, listed.id, candidates, [candidates.c.position], limit)
    left_out = select(func.count()).select_from(candidates).scalar_subquery() > fitting
    query = read.add_columns(left_out).where(listed.id.in_(ids)).order_by(listed.position)
    rows = [tuple(row) for row in await session.execute(query)]
    if not rows:
        return [], None
    page = [row[:-1] for row in rows]
    return page, encode_cursor(page[-1][0].id) if rows[-1][-1] else None


async def page_samples(
    session: AsyncSession, job_id: UUID, cursor: str | None, limit: int
) -> tuple[list[tuple[Item, ImportedSample, SampleEvaluation | None]], str | None]:
    """A sample evaluation's items in order, each with its imported sample and its result
    (None until the item completes)."""
    after = await _start_after(session, Item, job_id, cursor)
    read = (
        select(Item, ImportedSample, SampleEvaluation)
        .join(ImportedSample, ImportedSample.item_id == Item.id)
        .outerjoin(SampleEvaluation, SampleEvaluation.item_id == Item.id)
    )
    rows, next_cursor = await _page(session, read, [Item.job_id == job_id], Item, after, limit)
    return [(item, sample, result) for item, sample, result in rows], next_cursor


async def get_item_owned(session: AsyncSession, item_id: UUID, owner_key_id: UUID) -> tuple[Item, Job]:
    """The item and its job if this key owns them; NotFound otherwise, another key's item read
    no more than one nobody has (as get_owned)."""
    owned_item = (
        select(Item, Job)
        .join(Job, Job.id == Item.job_id)
        .where(Item.id == item_id, Job.owner_key_id == owner_key_id)
    )
    row = (await session.execute(owned_item)).one_or_none()
    if row is None:
        raise NotFound(f"item {item_id} not found")
    return row[0], row[1]


async def item_turns(session: AsyncSession, item_id: UUID) -> list[TurnRow]:
    rows = await session.scalars(select(TurnRow).where(TurnRow.item_id == item_id).order_by(TurnRow.id))
    return list(rows)


async def item_cot(session: AsyncSession, item_id: UUID) -> Cot | None:
    return await session.scalar(select(Cot).where(Cot.item_id == item_id))


async def relabel(session: AsyncSession, job: Job, changes: dict[str, Any]) -> None:
    """Set the job's `label` and/or `metadata` (the keys of `changes`; others stay as they are).
    The caller commits."""
    columns = {"label": "label", "metadata": "job_metadata"}
    await hold(session, job.id, to_change=True)
    for name, value in changes.items():
        setattr(job, columns[name], value)
    await session.flush()


async def shortest_prompt(session: AsyncSession, job_id: UUID) -> str:
    """The job's shortest prompt (in bytes, as token estimates count): its cheapest first call."""
    prompt = await session.scalar(
        select(Item.prompt).where(Item.job_id == job_id).order_by(func.octet_length(Item.prompt)).limit(1)
    )
    return prompt or ""


async def set_budget(
    session: AsyncSession, spending: budgets.Spending, job: Job, budget: Budget | None
) -> list[tuple[UUID, int]]:
    """Replace the job's budget (None: no limit) and put the items that waited for it back in
    the queue if it is no longer spent: the (item id, enqueue counter) pairs to enqueue after
    the caller commits. The job's row stays locked until then (app/store/budgets.py). Its
    spending counters are dropped, to be rebuilt from its turns after the commit: turns
    recorded while it had no budget were not counted, nor are those recorded until then."""
    job.budget_max_cost_usd = budget.max_cost_usd if budget else None
    job.budget_max_tokens = budget.max_tokens if budget else None
    await session.flush()
    await spending.forget(job.id)
    return await budgets.settle_waiting(session, spending, job.id, budget_changed=True)
