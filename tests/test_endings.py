"""An item's claim ends one of a few ways (app.store.endings), and each ending writes the
same columns wherever it is written: by the worker, by the next claim, by a cancel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from uuid import UUID

import httpx
import pytest
from sqlalchemy import func, select, update

from app.store import items
from app.store.db import Sessions
from app.store.endings import CANCELLED, Ending, failed, handed_back
from app.store.models import Item, TurnRow
from app.store.turn_log import PostgresTurnLog
from app.store.turn_writer import TurnWriter
from tests.test_api import Headers, items_of, submit
from tests.test_turn_log import a_turn

LIMITS = items.Limits(lease_s=60, max_claims=10, max_failures=5)
OUTAGE = handed_back("llm_unavailable: the endpoint is down", counts_as_failure=False, detail="upstream: 503")


async def claimed_item(api: httpx.AsyncClient, auth: Headers, sessions: Sessions) -> tuple[str, items.Claim]:
    job = await submit(api, auth, ["Explain how vaccines are tested."])
    claim = await items.claim(sessions, UUID((await items_of(api, auth, job["id"]))[0]["id"]), LIMITS)
    assert claim is not None
    return job["id"], claim


async def stored(sessions: Sessions, item_id: UUID) -> Item:
    async with sessions() as session:
        item = await session.get(Item, item_id)
    assert item is not None
    return item


async def test_a_queued_item_cancelled_with_its_job_no_longer_says_why_it_waited(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id, claim = await claimed_item(api, auth, sessions)
    assert await items.end(sessions, claim, OUTAGE)  # queued again, waiting for the LLM

    assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200

    [item] = await items_of(api, auth, job_id)
    assert (item["status"], item["error_code"], item["error_message"]) == ("cancelled", None, None)
    assert (await stored(sessions, claim.item_id)).operator_error is None


async def test_an_item_handed_back_after_its_job_was_cancelled_ends_cancelled_without_an_error(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id, claim = await claimed_item(api, auth, sessions)
    assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200
    assert await items.end(sessions, claim, OUTAGE)  # the running item stopped after the cancel

    assert await items.claim(sessions, claim.item_id, LIMITS) is None  # nothing left to run

    item = await stored(sessions, claim.item_id)
    assert (item.status, item.error_code, item.error_message, item.operator_error) == (
        "cancelled",
        None,
        None,
        None,
    )
    assert item.finished_at is not None and item.lease_until is None


async def expire_lease(sessions: Sessions, item_id: UUID) -> None:
    """Its worker stops renewing: the lease runs out."""
    async with sessions.begin() as session:
        item = await session.get(Item, item_id)
        assert item is not None
        item.lease_until = item.created_at


async def test_a_claim_that_takes_over_an_expired_lease_counts_the_lost_worker(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    _, lost = await claimed_item(api, auth, sessions)
    await expire_lease(sessions, lost.item_id)

    taken = await items.claim(sessions, lost.item_id, LIMITS)

    assert taken is not None and taken.attempt == lost.attempt + 1
    item = await stored(sessions, lost.item_id)
    assert (item.status, item.failures, item.error_message) == ("running", 1, "worker lost (lease expired)")
    assert item.lease_until is not None and item.lease_until > item.created_at


async def test_a_worker_lost_on_the_last_try_fails_the_item_with_that_loss_as_the_last_failure(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    _, lost = await claimed_item(api, auth, sessions)
    await expire_lease(sessions, lost.item_id)

    assert await items.claim(sessions, lost.item_id, items.Limits(60, max_claims=10, max_failures=1)) is None

    item = await stored(sessions, lost.item_id)
    assert (item.status, item.error_code, item.error_message, item.operator_error) == (
        "failed",
        "too_many_failures",
        "1 failed attempts; last: worker lost (lease expired)",
        None,
    )
    assert (item.failures, item.lease_until) == (1, None) and item.finished_at is not None


async def test_an_end_is_stamped_when_it_is_written_not_when_its_transaction_began(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # A progress stream reads the ends since its last check, less a margin (app/events.py): an
    # end stamped with the start of a transaction that waited for a lock longer than that would
    # commit behind the window, and the stream would never tell of it.
    _, claim = await claimed_item(api, auth, sessions)
    async with sessions.begin() as session:
        began = await session.scalar(select(func.now()))
        await session.execute(select(func.pg_sleep(0.3)))  # as a wait for the job's row
        assert await items.write_ending(session, claim, failed("refused", "the model refused"))

    finished_at = (await stored(sessions, claim.item_id)).finished_at
    assert began is not None and finished_at is not None and finished_at - began >= timedelta(seconds=0.3)


MAX_OUTAGE = timedelta(hours=1)
MAX_COUNTED_WAIT = timedelta(minutes=10)


async def end_in_outage(sessions: Sessions, claim: items.Claim) -> Ending | None:
    return await items.end_in_outage(
        sessions, claim, "the endpoint is down", "upstream: 503", MAX_OUTAGE, MAX_COUNTED_WAIT
    )


async def outage_began(
    sessions: Sessions, item_id: UUID, ago: timedelta, last_seen: timedelta = timedelta(0)
) -> None:
    """The LLM became unavailable to the item `ago`, and was last seen so `last_seen` ago."""
    async with sessions.begin() as session:
        await session.execute(
            update(Item)
            .where(Item.id == item_id)
            .values(llm_unavailable_since=func.now() - ago, llm_unavailable_seen_at=func.now() - last_seen)
        )


async def claimed_again(sessions: Sessions, item_id: UUID) -> items.Claim:
    claim = await items.claim(sessions, item_id, LIMITS)
    assert claim is not None
    return claim


@pytest.mark.parametrize(
    ("answered", "ended"),
    [
        (
            False,
            (
                "failed",
                "llm_unavailable",
                "the LLM was unavailable for more than 3600 s; last: the endpoint is down",
            ),
        ),
        (True, ("queued", None, "llm_unavailable: the endpoint is down")),
    ],
)
async def test_an_outage_fails_the_item_past_the_max_unless_it_got_an_answer_since_the_outage_began(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    answered: bool,
    ended: tuple[str, str | None, str],
) -> None:
    _, claim = await claimed_item(api, auth, sessions)
    assert await end_in_outage(sessions, claim)
    await outage_began(sessions, claim.item_id, 2 * MAX_OUTAGE)
    claim = await claimed_again(sessions, claim.item_id)
    if answered:  # its intent, then the endpoint went down again
        await PostgresTurnLog(TurnWriter(sessions), claim).record(a_turn(claim.item_id, "intents"))

    ending = await end_in_outage(sessions, claim)

    assert ending is not None and (ending.status, ending.error_code, ending.message) == ended
    item = await stored(sessions, claim.item_id)
    assert (item.status, item.error_code, item.error_message, item.operator_error) == (
        *ended,
        "upstream: 503",
    )
    assert item.llm_unavailable_since is not None
    started_again = item.updated_at - item.llm_unavailable_since < MAX_OUTAGE
    assert started_again == answered


async def test_an_item_put_back_another_way_between_outages_starts_their_clock_again(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # Parked for its budget, say, for longer than the max: the LLM was not what held it.
    _, claim = await claimed_item(api, auth, sessions)
    assert await end_in_outage(sessions, claim)
    await outage_began(sessions, claim.item_id, 2 * MAX_OUTAGE)
    claim = await claimed_again(sessions, claim.item_id)
    assert await items.end(sessions, claim, handed_back("worker shut down", counts_as_failure=False))
    item = await stored(sessions, claim.item_id)
    assert (item.llm_unavailable_since, item.error_message, item.failures) == (None, "worker shut down", 0)

    ending = await end_in_outage(sessions, await claimed_again(sessions, claim.item_id))

    assert ending is not None and ending.status == "queued"
    item = await stored(sessions, claim.item_id)
    assert (item.attempts, item.outage_claims, item.failures) == (3, 2, 0)


REJECTED = failed("llm_request_rejected", "the LLM endpoint rejected the request", "upstream: 400")


@pytest.mark.parametrize(
    "end_claim",
    [
        end_in_outage,  # one past the max: it would fail llm_unavailable
        lambda sessions, claim: items.end(sessions, claim, REJECTED),
        lambda sessions, claim: items.end(sessions, claim, OUTAGE),
    ],
    ids=["outage_past_the_max", "request_rejected", "handed_back"],
)
async def test_a_claim_that_outlived_its_jobs_cancel_ends_the_item_cancelled_whatever_its_fault(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    end_claim: Callable[[Sessions, items.Claim], Awaitable[Ending | None]],
) -> None:
    # A cancel ends queued items, and a running one at its worker's next check; but a claim
    # that ended first with a fault failed the item of a cancelled job.
    job_id, claim = await claimed_item(api, auth, sessions)
    await outage_began(sessions, claim.item_id, 2 * MAX_OUTAGE)
    assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200

    assert await end_claim(sessions, claim) == CANCELLED

    item = await stored(sessions, claim.item_id)
    assert (item.status, item.error_code, item.error_message, item.operator_error) == (
        "cancelled",
        None,
        None,
        None,
    )
    assert item.finished_at is not None
    assert (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("seen", "waited", "status"),
    [
        (timedelta(minutes=20), timedelta(minutes=5), "queued"),
        (timedelta(minutes=20), timedelta(hours=3), "queued"),
        (timedelta(minutes=58), timedelta(minutes=5), "failed"),
    ],
    ids=["a_back_off", "a_backlog", "a_back_off_past_the_max"],
)
async def test_an_outages_clock_counts_a_wait_in_the_queue_only_as_long_as_a_back_off_explains(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    seen: timedelta,
    waited: timedelta,
    status: str,
) -> None:
    # The clock ran in the queue: an item held up by a backlog longer than the max since its
    # last outage failed llm_unavailable at one blip on its next claim.
    _, claim = await claimed_item(api, auth, sessions)
    assert await end_in_outage(sessions, claim)
    # Seen unavailable for `seen` up to its last outage's hand-back, then it `waited`.
    await outage_began(sessions, claim.item_id, seen + waited, last_seen=waited)

    ending = await end_in_outage(sessions, await claimed_again(sessions, claim.item_id))

    assert ending is not None and ending.status == status
    item = await stored(sessions, claim.item_id)
    assert item.llm_unavailable_since is not None and item.llm_unavailable_seen_at == item.updated_at
    counted = item.updated_at - item.llm_unavailable_since
    assert abs(counted - (seen + min(waited, MAX_COUNTED_WAIT))) < timedelta(seconds=5)


async def test_an_item_an_older_release_put_back_mid_outage_counts_its_wait_from_the_outages_start(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # An older release wrote no last-seen mark: the run's start stands for it, so a backlog
    # since then counts only as long as a back-off explains, as for an item this release put
    # back; counted in full, one blip on its next claim failed it llm_unavailable.
    _, claim = await claimed_item(api, auth, sessions)
    assert await end_in_outage(sessions, claim)
    async with sessions.begin() as session:
        await session.execute(
            update(Item)
            .where(Item.id == claim.item_id)
            .values(llm_unavailable_since=func.now() - 2 * MAX_OUTAGE, llm_unavailable_seen_at=None)
        )

    ending = await end_in_outage(sessions, await claimed_again(sessions, claim.item_id))

    assert ending is not None and ending.status == "queued"
    item = await stored(sessions, claim.item_id)
    assert item.llm_unavailable_since is not None
    counted = item.updated_at - item.llm_unavailable_since
    assert abs(counted - MAX_COUNTED_WAIT) < timedelta(seconds=5)


async def test_only_an_answer_to_the_item_since_its_outage_began_starts_its_clock_again(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # An answer before the outage began, or to another item (another endpoint, a shorter
    # prompt), says nothing of whether the LLM answers this item now: an endpoint that never
    # does would keep it for ever.
    job = await submit(api, auth, ["Explain how vaccines are tested.", "Why is the sky blue?"])
    waiting_id, answered_id = (UUID(item["id"]) for item in await items_of(api, auth, job["id"]))
    claim = await claimed_again(sessions, waiting_id)
    await PostgresTurnLog(TurnWriter(sessions), claim).record(a_turn(waiting_id, "intents"))
    async with sessions.begin() as session:
        await session.execute(update(TurnRow).values(created_at=func.now() - 3 * MAX_OUTAGE))
    assert await end_in_outage(sessions, claim)
    await outage_began(sessions, waiting_id, 2 * MAX_OUTAGE)
    claim = await claimed_again(sessions, waiting_id)
    answered = await claimed_again(sessions, answered_id)
    await PostgresTurnLog(TurnWriter(sessions), answered).record(a_turn(answered_id, "intents"))

    ending = await end_in_outage(sessions, claim)

    assert ending is not None and (ending.status, ending.error_code) == ("failed", "llm_unavailable")
