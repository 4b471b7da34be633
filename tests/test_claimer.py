"""Claims asked for together are taken in one statement (items.Claimer), and each caller gets
what a claim of its item alone would have given: its claim, or the general claim's answer for
an item the batch may not take (locked, cancelled, its lease expired)."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import httpx
from sqlalchemy import select, text, update

from app.store import items
from app.store.db import Sessions
from app.store.models import Item, ItemStatus, Job
from tests.test_endings import stored
from tests.test_turn_writer import item_locked

LIMITS = items.Limits(lease_s=60, max_claims=10, max_failures=5)


async def queued_items(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, count: int
) -> list[UUID]:
    prompts = [f"Why is the sky blue, part {n}?" for n in range(count)]
    response = await api.post("/v1/jobs", json={"prompts": prompts}, headers=auth)
    assert response.status_code == 202, response.text
    async with sessions() as session:
        job_id = UUID(response.json()["id"])
        return list(
            (
                await session.scalars(select(Item.id).where(Item.job_id == job_id).order_by(Item.position))
            ).all()
        )


async def test_claims_asked_for_together_are_taken_in_one_statement_each_its_own(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    ids = await queued_items(api, auth, sessions, 5)
    holder = uuid4()
    claimer = items.Claimer(sessions, LIMITS, holder)

    claims = await asyncio.gather(*(claimer.claim(item_id) for item_id in ids))

    assert claimer.statements == 1
    assert [claim.item_id if claim else None for claim in claims] == ids
    assert [claim.position if claim else None for claim in claims] == list(range(5))
    assert [claim.prompt if claim else None for claim in claims] == [
        f"Why is the sky blue, part {n}?" for n in range(5)
    ]
    for item_id in ids:
        item = await stored(sessions, item_id)
        assert (item.status, item.attempts, item.claimed_by) == (ItemStatus.RUNNING, 1, holder)
        assert item.lease_until is not None and item.lease_until > item.updated_at
    # Claimed: a second ask finds nothing to do, as a lone claim would.
    assert await claimer.claim(ids[0]) is None


async def test_an_item_another_transaction_holds_is_claimed_alone_once_free_and_holds_back_no_other(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    locked, *others = await queued_items(api, auth, sessions, 3)
    claimer = items.Claimer(sessions, LIMITS, uuid4())
    async with sessions.begin() as blocker:  # a cancellation, the sweeper: it holds the item row
        await item_locked(blocker, locked)
        waiting = asyncio.create_task(claimer.claim(locked))
        # Within a few seconds: a batch that waited for the lock would wait for the blocker.
        claims = await asyncio.wait_for(asyncio.gather(*(claimer.claim(item_id) for item_id in others)), 10)
        assert [claim.item_id if claim else None for claim in claims] == others
        assert claimer.statements == 1, "the locked item went with the others, and was skipped"
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the locked item's claim waits for the lock, alone"
        assert (await stored(sessions, locked)).status == ItemStatus.QUEUED
    claim = await waiting
    assert claim is not None and claim.item_id == locked and claim.attempt == 1


async def test_items_the_batch_may_not_take_get_the_general_claims_answer(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    queued, expired, spent, failing = await queued_items(api, auth, sessions, 4)
    async with sessions.begin() as session:  # a dead worker's item, and two with no tries left
        await session.execute(
            update(Item)
            .where(Item.id == expired)
            .values(status=ItemStatus.RUNNING, attempts=1, lease_until=Item.created_at)
        )
        await session.execute(update(Item).where(Item.id == spent).values(attempts=LIMITS.max_claims))
        await session.execute(update(Item).where(Item.id == failing).values(failures=LIMITS.max_failures))
    claimer = items.Claimer(sessions, LIMITS, uuid4())

    claims = await asyncio.gather(*(claimer.claim(item_id) for item_id in (queued, expired, spent, failing)))

    assert claims[0] is not None and claims[0].attempt == 1
    assert claims[1] is not None and claims[1].attempt == 2  # taken over, as a lone claim does
    assert (await stored(sessions, expired)).failures == 1  # the lost worker counted
    assert claims[2] is None
    item = await stored(sessions, spent)
    assert (item.status, item.error_code) == (ItemStatus.FAILED, "too_many_attempts")
    assert claims[3] is None
    item = await stored(sessions, failing)
    assert (item.status, item.error_code) == (ItemStatus.FAILED, "too_many_failures")


async def test_the_items_of_a_cancelled_job_are_settled_not_claimed(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    ids = await queued_items(api, auth, sessions, 2)
    async with sessions() as session:
        job_id = (await session.scalars(select(Item.job_id).where(Item.id == ids[0]))).one()
    # Cancelled between the enqueue and the claim: the cancel left the items queued for the
    # claim to end (as a cancel racing a worker's start does).
    async with sessions.begin() as session:
        await session.execute(update(Job).where(Job.id == job_id).values(cancelled_at=Job.created_at))
    claimer = items.Claimer(sessions, LIMITS, uuid4())

    assert await asyncio.gather(*(claimer.claim(item_id) for item_id in ids)) == [None, None]
    for item_id in ids:
        assert (await stored(sessions, item_id)).status == ItemStatus.CANCELLED


async def test_an_item_asked_for_twice_in_one_batch_is_claimed_once(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    # Two arq jobs of one item (a re-enqueue beside the first) can start in the same poll.
    [item_id] = await queued_items(api, auth, sessions, 1)
    claimer = items.Claimer(sessions, LIMITS, uuid4())

    claims = await asyncio.gather(claimer.claim(item_id), claimer.claim(item_id))

    assert claimer.statements == 1
    assert sorted(claim is None for claim in claims) == [False, True]
    assert (await stored(sessions, item_id)).attempts == 1


async def test_a_batch_takes_at_most_max_items(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    ids = await queued_items(api, auth, sessions, 5)
    claimer = items.Claimer(sessions, LIMITS, uuid4(), max_items=2)

    claims = await asyncio.gather(*(claimer.claim(item_id) for item_id in ids))

    assert claimer.statements == 3
    assert [claim.position if claim else None for claim in claims] == list(range(5))


async def test_an_item_claimed_for_a_caller_cancelled_meanwhile_is_given_back_at_once(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    claimer = items.Claimer(sessions, LIMITS, uuid4())
    async with sessions.begin() as blocker:  # holds the statement in flight
        await blocker.execute(text("LOCK TABLE items IN EXCLUSIVE MODE"))
        caller = asyncio.create_task(claimer.claim(item_id))
        await asyncio.sleep(0.3)
        caller.cancel()  # the worker shutting down
        await asyncio.sleep(0.1)
    assert caller.cancelled()
    for _ in range(50):  # the statement ends once the lock goes, then the item goes back
        item = await stored(sessions, item_id)
        if item.status == ItemStatus.QUEUED and item.attempts == 1:
            break
        await asyncio.sleep(0.1)
    assert (item.status, item.attempts, item.claimed_by, item.failures) == (ItemStatus.QUEUED, 1, None, 0)
