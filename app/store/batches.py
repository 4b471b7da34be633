"""Batch delivery's rows: the requests a batch job's items make, and the provider batches of
its waves.

The engine stays as it is, pure and sequential per item. A batch job's items get
`BatchedLLM` as their LLM client: asked for a call, it looks up the request under the turn's
key; answered, it returns the stored answer, which the engine then judges and records as a
turn exactly as it would an online reply (same parsing, re-asks, agreement stops, refusal
fallback); not yet, it stores the request (once: the key is unique) and raises
AwaitingBatch, and the worker parks the item as `awaiting_batch`. Once no item of the job is
queued or running, its pending requests form the next wave: one or more batches per
endpoint, cut at the provider's limits (workers/waves.py sends, polls and collects them).
Collected answers are stored on their requests, and the parked items are queued again: they
replay their stored turns, read their answer, and go on to their next call.

Every id a provider gives (input file, batch) is stored before it is used, and a worker
holds a batch by a lease, so any worker resumes a batch whose worker died. The lease is a
token (`lease_id`) every write of its holder names: once another worker took the batch over,
the old holder's writes change nothing and raise LeaseLost. An answer is
stored once (only a request still `submitted` in that batch takes it) and becomes a turn
once (the turn log's unique key). A request its batch did not answer (expired, cancelled,
a server error) is pending again and goes in the next wave, up to
`batch_max_submissions` times; then, or when the provider refuses it, its item fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import ColumnElement, Row, and_, case, exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import BatchConfig, EndpointConfig
from app.costs import call_cost, priced
from app.deliberation.ports import ChatReply, ChatRequest, LLMClient, LLMRequestRejected, TurnKey
from app.llm.batch_api import input_line
from app.llm.client import UnreadableCompletion, chat_payload, completion_reply, fitted
from app.plan import GenerationPlan, JobPlan, Unanswered
from app.storable import replace_unstorable
from app.store import items, quality
from app.store.db import Sessions
from app.store.endings import Ending
from app.store.items import Claim
from app.store.models import (
    Batch,
    BatchRequest,
    BatchRequestStatus,
    BatchStatus,
    Item,
    ItemStatus,
    Job,
    TurnRow,
)
from app.threads import in_thread

AWAITING = Ending(ItemStatus.AWAITING_BATCH, None, "waiting for its batch's answer")
_UNANSWERED = (BatchRequestStatus.PENDING, BatchRequestStatus.SUBMITTED)


class AwaitingBatch(Exception):
    """The item's next call is filed for a batch: park the item until it is answered."""


class BatchedLLM:
    """The LLMClient of one claimed item of a batch job (see the module's docstring)."""

    def __init__(
        self,
        sessions: Sessions,
        claim: Claim,
        endpoints: dict[str, EndpointConfig],
        online: LLMClient,
        max_request_tokens: int,
    ) -> None:
        """max_request_tokens: the setting llm_max_request_tokens, as the online client's."""
        self._sessions, self._claim, self._endpoints, self._online = sessions, claim, endpoints, online
        self._max_request_tokens = max_request_tokens
        # The turns this item's run asked online (their cost is at the online price).
        self.sent_online: set[TurnKey] = set()

    async def chat(self, request: ChatRequest) -> ChatReply:
        """The stored answer to the request; AwaitingBatch if there is none yet (the request
        is stored); LLMRequestRejected if the provider refused it or it went unanswered too
        often; the `online` client's reply if its batch left it unanswered and the job sends
        those online; LLMRequestTooLarge, unsent, as the online client."""
        assert request.key is not None, "a batch job's requests name their turn"
        filed = await self._filed(request.key)
        if filed is None:
            endpoint = self._endpoints.get(request.endpoint)
            if endpoint is None:
                unknown = f"unknown LLM endpoint {request.endpoint!r}"
                raise LLMRequestRejected(unknown, unknown)
            fitting = fitted(request, endpoint, self._max_request_tokens)
            await self._file(request.key, request.endpoint, chat_payload(fitting, endpoint))
            raise AwaitingBatch(f"item {self._claim.item_id}: {request.key} filed")
        status, answer, error = filed
        if status == BatchRequestStatus.ANSWERED:
            return completion_reply(answer, request.model, 0.0, request.logprobs)
        if status == BatchRequestStatus.ONLINE:
            reply = await self._online.chat(request)
            self.sent_online.add(request.key)
            return reply
        if status in (BatchRequestStatus.REJECTED, BatchRequestStatus.FAILED):
            summary = (
                f"the batch API of the LLM endpoint {request.endpoint!r} rejected the request"
                if status == BatchRequestStatus.REJECTED
                else f"the LLM endpoint {request.endpoint!r} left the request unanswered in every batch"
            )
            raise LLMRequestRejected(error or summary, summary)
        raise AwaitingBatch(f"item {self._claim.item_id}: {request.key} still in a batch")

    async def _filed(self, key: TurnKey) -> tuple[str, Any, str | None] | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(BatchRequest.status, BatchRequest.answer, BatchRequest.error).where(
                        BatchRequest.item_id == self._claim.item_id,
                        BatchRequest.stage == key.stage.value,
                        BatchRequest.round == key.round,
                        BatchRequest.agent == key.agent,
                        BatchRequest.attempt == key.attempt,
                    )
                )
            ).one_or_none()
        return None if row is None else (row.status, row.answer, row.error)

    async def _file(self, key: TurnKey, endpoint: str, body: dict[str, Any]) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                insert(BatchRequest)
                .values(
                    item_id=self._claim.item_id,
                    job_id=self._claim.job_id,
                    stage=key.stage.value,
                    round=key.round,
                    agent=key.agent,
                    attempt=key.attempt,
                    endpoint=endpoint,
                    body=body,
                    status=BatchRequestStatus.PENDING,
                    submissions=0,
                )
                .on_conflict_do_nothing()
            )


# --- waves --------------------------------------------------------------------------------


async def form_waves(sessions: Sessions, endpoints: dict[str, EndpointConfig]) -> int:
    """Put the pending requests of every job none of whose items is queued or running into
    its next wave's batches (status preparing); the number of batches made."""
    async with sessions() as session:
        job_ids = (
            await session.scalars(
                select(BatchRequest.job_id)
                .join(Job, Job.id == BatchRequest.job_id)
                .where(BatchRequest.status == BatchRequestStatus.PENDING, Job.cancelled_at.is_(None))
                .distinct()
            )
        ).all()
    made = 0
    for job_id in job_ids:
        made += await _form_wave(sessions, job_id, endpoints)
    return made


async def _form_wave(sessions: Sessions, job_id: UUID, endpoints: dict[str, EndpointConfig]) -> int:
    async with sessions.begin() as session:
        # NO KEY UPDATE: turn inserts (key share) go on; a second worker forming waves skips the job.
        job = (
            await session.execute(
                select(Job.owner_key_id)
                .where(Job.id == job_id, Job.cancelled_at.is_(None))
                .with_for_update(key_share=True, skip_locked=True)
            )
        ).one_or_none()
        busy = select(Item.id).where(
            Item.job_id == job_id, Item.status.in_((ItemStatus.QUEUED, ItemStatus.RUNNING))
        )
        if job is None or await session.scalar(select(busy.exists())):
            return 0
        pending = (
            await session.execute(
                select(BatchRequest.id, BatchRequest.endpoint, BatchRequest.body)
                .where(BatchRequest.job_id == job_id, BatchRequest.status == BatchRequestStatus.PENDING)
                .order_by(BatchRequest.id)
            )
        ).all()
        if not pending:
            return 0
        sized = await _sized(pending)
        wave = 1 + (
            await session.scalar(select(func.coalesce(func.max(Batch.wave), 0)).where(Batch.job_id == job_id))
            or 0
        )
        by_endpoint: dict[str, list[tuple[int, int]]] = {}
        for row, request in zip(pending, sized, strict=True):
            by_endpoint.setdefault(row.endpoint, []).append(request)
        made = 0
        for endpoint, requests in sorted(by_endpoint.items()):
            if endpoint not in endpoints:
                # Taken out of the configuration since they were filed: they fail their items,
                # as a new call to it does (BatchedLLM.chat). A KeyError here failed every
                # round, and with it every batch job's waves, for ever.
                await session.execute(
                    update(BatchRequest)
                    .where(BatchRequest.id.in_([request_id for request_id, _ in requests]))
                    .values(
                        status=BatchRequestStatus.REJECTED,
                        error=f"unknown LLM endpoint {endpoint!r}",
                        answered_at=func.now(),
                    )
                )
                continue
            limits = endpoints[endpoint].batch or BatchConfig()
            for part in split(requests, limits.max_requests, limits.max_file_bytes):
                batch_id = await _open_batch(session, job_id, job.owner_key_id, wave, endpoint, part)
                await session.execute(
                    update(BatchRequest)
                    .where(BatchRequest.id.in_([request_id for request_id, _ in part]))
                    .values(
                        status=BatchRequestStatus.SUBMITTED,
                        batch_id=batch_id,
                        submissions=BatchRequest.submissions + 1,
                    )
                )
                made += 1
        return made


async def _open_batch(
    session: AsyncSession,
    job_id: UUID,
    owner_key_id: UUID,
    wave: int,
    endpoint: str,
    part: list[tuple[int, int]],
) -> UUID:
    """A new batch (preparing) of the wave for these (request id, line bytes); its id."""
    batch = Batch(
        job_id=job_id,
        owner_key_id=owner_key_id,
        wave=wave,
        endpoint=endpoint,
        status=BatchStatus.PREPARING,
        requests=len(part),
        bytes=sum(size for _, size in part),
    )
    session.add(batch)
    await session.flush()
    return batch.id


async def _sized(rows: Sequence[Any]) -> list[tuple[int, int]]:
    """(request id, its input line's bytes) of rows with an id and a body, sized off the loop."""
    return await in_thread(lambda: [(r.id, len(input_line(str(r.id), r.body))) for r in rows])


def split(requests: list[tuple[int, int]], max_requests: int, max_bytes: int) -> list[list[tuple[int, int]]]:
    """(request id, line bytes) in order, cut into runs of at most max_requests lines and
    max_bytes bytes (a line larger than max_bytes alone goes alone, for the provider to judge)."""
    parts: list[list[tuple[int, int]]] = [[]]
    size = 0
    for request in requests:
        if parts[-1] and (len(parts[-1]) >= max_requests or size + request[1] > max_bytes):
            parts.append([])
            size = 0
        parts[-1].append(request)
        size += request[1]
    return [part for part in parts if part]


# --- a batch's life, as a worker leads it ---------------------------------------------------


class LeaseLost(Exception):
    """Another worker took the batch over (its holder's lease had run out): the holder stops
    and writes nothing more on it."""


@dataclass(frozen=True)
class Held:
    """A batch a worker holds by its lease."""

    id: UUID
    job_id: UUID
    endpoint: str
    status: BatchStatus
    input_file_id: str | None
    provider_batch_id: str | None
    create_unsent: bool  # its create was certainly not sent yet: no provider batch to look for
    job_cancelled: bool
    unanswered: Unanswered  # the job's choice for the requests the batch leaves unanswered
    created_at: datetime
    lease_id: UUID  # the lease's token (see the module's docstring)
    lease_s: float  # how long the lease lasts from its last renewal
    read_file_ids: frozenset[str]  # its files whose lines are stored (see keep_read)
    # Taken for lost and cancelled: the batch as the provider showed it since (its status and
    # files; see cancel_sent). None: not cancelled as lost.
    cancel_seen: dict[str, Any] | None


async def take_due(sessions: Sessions, lease_s: float, limit: int = 20) -> list[Held]:
    """Lease the open batches due for work (new, or due a poll) that no live lease holds,
    each under a new token."""
    due = (
        select(Batch.id)
        .where(
            Batch.finished_at.is_(None),
            Batch.next_poll_at <= func.now(),
            or_(Batch.lease_until.is_(None), Batch.lease_until < func.now()),
        )
        .order_by(Batch.next_poll_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    async with sessions.begin() as session:
        rows = (
            await session.execute(
                update(Batch)
                .where(Batch.id.in_(due), Batch.job_id == Job.id)
                .values(lease_until=func.now() + timedelta(seconds=lease_s), lease_id=func.gen_random_uuid())
                .returning(
                    Batch.id,
                    Batch.job_id,
                    Batch.endpoint,
                    Batch.status,
                    Batch.input_file_id,
                    Batch.provider_batch_id,
                    Batch.create_unsent,
                    Job.cancelled_at.is_not(None),
                    Job.plan,
                    Batch.created_at,
                    Batch.lease_id,
                    Batch.output_file_id,  # named on an open batch once read (see keep_read)
                    Batch.error_file_id,
                    Batch.cancel_sent_at.is_not(None),
                    Batch.cancel_seen,
                )
            )
        ).all()
    return [
        Held(
            *r[:3],
            BatchStatus(r[3]),
            r[4],
            r[5],
            r[6],
            r[7],
            _unanswered(r[8]),
            r[9],
            r[10],
            lease_s,
            frozenset(str(file_id) for file_id in (r.output_file_id, r.error_file_id) if file_id),
            (r.cancel_seen or {}) if r[13] else None,
        )
        for r in rows
    ]


def _unanswered(plan: JobPlan) -> Unanswered:
    return "online" if isinstance(plan, GenerationPlan) and plan.sends_online() else "next_wave"


async def input_requests(sessions: Sessions, batch_id: UUID) -> list[tuple[str, dict[str, Any]]]:
    """(custom_id, body) of the batch's requests: its input file's lines."""
    async with sessions() as session:
        rows = await session.execute(
            select(BatchRequest.id, BatchRequest.body)
            .where(BatchRequest.batch_id == batch_id, BatchRequest.status == BatchRequestStatus.SUBMITTED)
            .order_by(BatchRequest.id)
        )
        return [(str(r.id), r.body) for r in rows]


async def renew(sessions: Sessions, held: Held) -> None:
    """Hold the batch for the lease's length from now, before a call to its provider (see
    workers/waves.py); LeaseLost if another worker took it over."""
    async with sessions.begin() as session:
        await _write_held(session, held)


async def uploaded(sessions: Sessions, held: Held, input_file_id: str) -> Held:
    """Store the uploaded input file's id: the batch is to be created, and its create was
    certainly not sent yet."""
    held = await advance(
        sessions, held, 0, status=BatchStatus.UPLOADED, input_file_id=input_file_id, create_unsent=True
    )
    return replace(held, create_unsent=True)


async def creating(sessions: Sessions, held: Held) -> None:
    """Renew, and record that the create is being sent: from now a holder looks for the
    provider batch before it creates one. The search before it, if any, answered: the
    refusals counted before (see `refused`) are over."""
    async with sessions.begin() as session:
        await _write_held(session, held, create_unsent=False, **ANSWERED)


# The provider answered: the refusals counted before (see `refused`) are over.
ANSWERED: dict[str, Any] = {"refusals": 0, "refused_since": None}
# Besides the period: a batch looked at again only after a long pause (every worker down)
# is not taken for gone on one or two answers.
GONE_AFTER_REFUSALS = 3


async def advance(sessions: Sessions, held: Held, poll_in_s: float, **values: Any) -> Held:
    """Write what the worker learnt from the provider's answer (`values`: ids, the provider's
    status and counts, a new status) on the batch, and when to look at it next: the batch as
    it is now. LeaseLost if another worker took it over (nothing is written)."""
    async with sessions.begin() as session:
        row = await _write_held(
            session, held, **values, **ANSWERED, next_poll_at=func.now() + timedelta(seconds=poll_in_s)
        )
    return replace(
        held,
        status=BatchStatus(row.status),
        input_file_id=row.input_file_id,
        provider_batch_id=row.provider_batch_id,
    )


async def refused(sessions: Sessions, held: Held, poll_in_s: float, gone_after_s: float) -> bool:
    """Count a poll at which the provider refused the batch, or one of its files (a 4xx but a
    401 or 403, at its retrieve or download): whether it has now refused it long enough to be
    taken for gone, at GONE_AFTER_REFUSALS polls in a row or more, over `gone_after_s` or more
    since the first. Until then it is looked at again in `poll_in_s`: some proxies answer 404
    (or another 4xx) for a while before a batch or file is there, and taken for gone at the
    first, the batch's requests were bought again. LeaseLost if another worker took it over
    (nothing is written)."""
    async with sessions.begin() as session:
        await _write_held(
            session,
            held,
            refusals=Batch.refusals + 1,
            refused_since=func.coalesce(Batch.refused_since, func.now()),
            next_poll_at=func.now() + timedelta(seconds=poll_in_s),
        )
        settled = and_(
            Batch.refusals >= GONE_AFTER_REFUSALS,
            Batch.refused_since <= func.now() - timedelta(seconds=gone_after_s),
        )
        return bool(await session.scalar(select(settled).where(Batch.id == held.id)))


async def cancel_sent(
    sessions: Sessions, held: Held, seen: dict[str, Any], poll_in_s: float, wait_s: float
) -> bool:
    """Record that the batch, taken for lost, was cancelled (when, the first time) and what
    the provider has shown of it since (`seen`: its status and files; {}: nothing), to be
    looked at again in `poll_in_s`: whether `wait_s` or more have passed since the cancel
    was sent. OpenAI's cancel answers `cancelling`, its files named only once it has ended;
    and a download of those files that failed was followed by a second cancel. LeaseLost
    if another worker took it over (nothing is written)."""
    async with sessions.begin() as session:
        await _write_held(
            session,
            held,
            cancel_sent_at=func.coalesce(Batch.cancel_sent_at, func.now()),
            cancel_seen=seen,
            next_poll_at=func.now() + timedelta(seconds=poll_in_s),
        )
        waited = Batch.cancel_sent_at <= func.now() - timedelta(seconds=wait_s)
        return bool(await session.scalar(select(waited).where(Batch.id == held.id)))


async def release(sessions: Sessions, held: Held, poll_in_s: float | None = None) -> None:
    """Let go of the batch's lease (and, given `poll_in_s`, look at it again no sooner): any
    worker may take it when it is next due. Nothing, if another worker took it over."""
    later = {} if poll_in_s is None else {"next_poll_at": func.now() + timedelta(seconds=poll_in_s)}
    async with sessions.begin() as session:
        await session.execute(
            update(Batch).where(_mine(held)).values(lease_until=None, lease_id=None, **later)
        )


_HeldRow = Row[str, str | None, str | None, UUID, int]  # status, the ids, owner_key_id, wave


def _mine(held: Held) -> ColumnElement[bool]:
    """The batch, while the lease its holder took is still the batch's lease."""
    return and_(Batch.id == held.id, Batch.lease_id == held.lease_id)


async def _write_held(session: AsyncSession, held: Held, **values: Any) -> _HeldRow:
    """Write `values` on the held batch and renew its lease; LeaseLost if another worker
    took it over. Every write of a holder goes through here."""
    written = await session.execute(
        update(Batch)
        .where(_mine(held))
        .values(**values, lease_until=func.now() + timedelta(seconds=held.lease_s))
        .returning(Batch.status, Batch.input_file_id, Batch.provider_batch_id, Batch.owner_key_id, Batch.wave)
    )
    row = written.first()
    if row is None:
        raise LeaseLost(f"batch {held.id}: another worker took it over")
    return row


@dataclass(frozen=True)
class Outcome:
    """What a finished batch said of each request: answers, and refusals by custom_id."""

    answers: dict[int, dict[str, Any]]
    rejected: dict[int, str]


async def collect(
    sessions: Sessions, held: Held, final: BatchStatus, outcome: Outcome, max_submissions: int, **values: Any
) -> int:
    """End the batch as `final` and store its outcome in one transaction: each answer on its
    request if still submitted in this batch (so stored once; the request's body, never sent
    again, blanked), refusals likewise; its other requests online if the job sends those
    online, else pending again, or failed after `max_submissions`. The number of requests
    sent again (online or in the next wave). LeaseLost if another worker took the batch over
    (nothing is written)."""
    async with sessions.begin() as session:
        await _write_held(session, held, **values, status=final, finished_at=func.now())
        mine = await _store(session, held, outcome)
        if held.unanswered == "online":
            online = await session.execute(
                update(BatchRequest)
                .where(mine)
                .values(status=BatchRequestStatus.ONLINE, error=f"unanswered by its batch ({final.value})")
                .returning(BatchRequest.id)
            )
            return len(online.all())
        unanswered = f"unanswered in {max_submissions} batches; last: {final.value}"
        statuses = await session.scalars(
            update(BatchRequest)
            .where(mine)
            .values(
                status=case(
                    (BatchRequest.submissions >= max_submissions, BatchRequestStatus.FAILED),
                    else_=BatchRequestStatus.PENDING,
                ),
                error=case((BatchRequest.submissions >= max_submissions, unanswered), else_=None),
            )
            .returning(BatchRequest.status)
        )
        return sum(status == BatchRequestStatus.PENDING for status in statuses)


async def keep_read(sessions: Sessions, held: Held, outcome: Outcome, file_ids: dict[str, str]) -> None:
    """Store the outcome of the ended batch's files read while its other file is refused, and
    name them on the batch (`file_ids`: output_file_id, error_file_id): its next polls ask
    only for the refused file, and the items answered go on meanwhile. Downloaded again at
    every poll instead, a large output file was fetched for as long as the other was
    refused. The refusals count on: every poll asks for each file not read yet, so the one
    refused now was refused at each poll they count. LeaseLost if another worker took the
    batch over (nothing is written)."""
    async with sessions.begin() as session:
        await _write_held(session, held, **file_ids)
        await _store(session, held, outcome)


async def _store(session: AsyncSession, held: Held, outcome: Outcome) -> ColumnElement[bool]:
    """Store the outcome on the batch's requests still submitted in it (so each once: the
    request's body, never sent again, blanked); which requests are still submitted in it."""
    mine = and_(BatchRequest.batch_id == held.id, BatchRequest.status == BatchRequestStatus.SUBMITTED)
    for request_id, answer in outcome.answers.items():
        await session.execute(
            update(BatchRequest)
            .where(mine, BatchRequest.id == request_id)
            # As an online reply's turn is: a NUL (or a lone surrogate) would fail the
            # update, and the batch's every poll after it, for ever.
            .values(
                status=BatchRequestStatus.ANSWERED,
                answer=replace_unstorable(answer),
                body={},
                answered_at=func.now(),
            )
        )
    for request_id, error in outcome.rejected.items():
        await session.execute(
            update(BatchRequest)
            .where(mine, BatchRequest.id == request_id)
            .values(
                status=BatchRequestStatus.REJECTED,
                error=replace_unstorable(error),
                answered_at=func.now(),
            )
        )
    return mine


async def split_refused(sessions: Sessions, held: Held, detail: str) -> int:
    """The provider refused the batch's file whole (too large, invalid; at upload or in the
    batch's validation): end the batch as refused and, if it has several requests, split
    them into two new batches of the same wave (so a file over a limit we did not know gets
    under it, and a bad line ends up alone); a lone request is refused. The number of
    batches made (0 or 2). LeaseLost if another worker took the batch over (nothing is
    written)."""
    async with sessions.begin() as session:
        batch = await _write_held(
            session, held, status=BatchStatus.REFUSED, error=detail, finished_at=func.now()
        )
        requests = (
            await session.execute(
                select(BatchRequest.id, BatchRequest.body)
                .where(BatchRequest.batch_id == held.id, BatchRequest.status == BatchRequestStatus.SUBMITTED)
                .order_by(BatchRequest.id)
            )
        ).all()
        if len(requests) <= 1:
            await _reject_waiting(session, held, detail)
            return 0
        sized = await _sized(requests)
        halves = (sized[: len(sized) // 2], sized[len(sized) // 2 :])
        for half in halves:
            batch_id = await _open_batch(
                session, held.job_id, batch.owner_key_id, batch.wave, held.endpoint, half
            )
            await session.execute(
                update(BatchRequest)
                .where(BatchRequest.id.in_([request_id for request_id, _ in half]))
                .values(batch_id=batch_id)
            )
        return len(halves)


async def abandon(sessions: Sessions, held: Held, detail: str) -> None:
    """End the batch as lost without sending its requests again: its provider batch may
    exist, unseen (the provider refused the search for it), and sent again they would be
    bought twice. Its requests still waiting are rejected with `detail`, failing their items.
    LeaseLost if another worker took the batch over (nothing is written)."""
    async with sessions.begin() as session:
        await _write_held(session, held, status=BatchStatus.LOST, error=detail, finished_at=func.now())
        await _reject_waiting(session, held, detail)


async def _reject_waiting(session: AsyncSession, held: Held, detail: str) -> None:
    await session.execute(
        update(BatchRequest)
        .where(BatchRequest.batch_id == held.id, BatchRequest.status == BatchRequestStatus.SUBMITTED)
        .values(status=BatchRequestStatus.REJECTED, error=detail, answered_at=func.now())
    )


async def requeue_answered(sessions: Sessions) -> items.ByOwner:
    """Queue again the parked items of every batch job that wait for no request any more
    (answered, refused, failed), or whose job was cancelled: the (item id, enqueue counter)
    pairs to enqueue after commit, by their job's owner key (each key's share in line)."""
    waiting = select(BatchRequest.id).where(
        BatchRequest.item_id == Item.id, BatchRequest.status.in_(_UNANSWERED)
    )
    async with sessions.begin() as session:
        rows = await session.execute(
            update(Item)
            .where(Item.job_id == Job.id, Item.status == ItemStatus.AWAITING_BATCH, ~exists(waiting))
            .values(
                status=ItemStatus.QUEUED,
                error_message=None,
                updated_at=func.now(),
                enqueues=Item.enqueues + 1,  # a fresh arq job id
            )
            .returning(Item.id, Item.enqueues, Job.owner_key_id)
        )
        return items.by_owner(rows)


def readable(answer: Any) -> bool:
    """Whether a batch output line's body is a chat completion the item can read."""
    try:
        completion_reply(answer, "", 0.0)
    except UnreadableCompletion:
        return False
    return True


async def wave_in(session: AsyncSession, job_id: UUID, plan: GenerationPlan) -> dict[str, Any] | None:
    """A batch job's progress for its status: the current wave, its batches (the provider's
    status and counts), its requests by status, and its saving; None before its first request."""
    wave = await session.scalar(select(func.max(Batch.wave)).where(Batch.job_id == job_id))
    counts = dict(
        (
            await session.execute(
                select(BatchRequest.status, func.count())
                .where(BatchRequest.job_id == job_id)
                .group_by(BatchRequest.status)
            )
        ).all()
    )
    if wave is None and not counts:
        return None
    batches: Sequence[Batch] = (
        await session.scalars(
            select(Batch).where(Batch.job_id == job_id, Batch.wave == wave).order_by(Batch.created_at)
        )
    ).all()
    return {
        "wave": wave or 0,
        "batches": [
            {
                "endpoint": b.endpoint,
                "status": b.status,
                "provider_status": b.provider_status,
                "requests": b.requests,
                "request_counts": b.request_counts,
            }
            for b in batches
        ],
        "requests": {status.value: counts.get(status.value, 0) for status in BatchRequestStatus},
        "saving": await _saving(session, job_id, plan),
    }


async def _saving(session: AsyncSession, job_id: UUID, plan: GenerationPlan) -> dict[str, float] | None:
    """What the job's calls so far cost, what the same tokens would have cost online, and
    the difference; None unless every endpoint it uses is priced both ways."""
    if not priced(plan) or not plan.endpoints() <= plan.online_prices.keys():
        return None
    by_endpoint = await session.execute(
        select(TurnRow.endpoint, *quality.usage_columns())
        .where(TurnRow.job_id == job_id)
        .group_by(TurnRow.endpoint)
    )
    cost = online = 0.0
    for endpoint, _calls, prompt, cached, completion, spent in by_endpoint:
        online += call_cost(plan.online_prices[endpoint], prompt, cached, completion) or 0.0
        cost += spent
    return {"cost_usd": cost, "online_cost_usd": online, "saving_usd": online - cost}
