"""Claims as the crash-safety core sees them (app.store.items): an item is claimed once, its
lease is renewed by its claim alone, a sweep takes back only lost claims and gives new arq
jobs only to the queued items it checked, a claim's tries are bounded by its limits, and a
completion is written once. Direct calls on real Postgres, no worker: fast enough to run
once a mutant (bench/MUTATION-items.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from sqlalchemy import Interval, func, select, type_coerce, update

from app.deliberation.results import (
    Completed,
    Evaluated,
    Grade,
    GuardVerdict,
    JudgedAnswer,
    RefusalVerdict,
    Thought,
)
from app.store import items, model_evaluations
from app.store.db import Sessions
from app.store.endings import CANCELLED, COMPLETED, handed_back
from app.store.models import (
    CallbackDelivery,
    Cot,
    Item,
    Job,
    ModelAnswer,
    PairCandidate,
    PolicySetRow,
    PreferencePair,
    PromptSetRow,
    SampleEvaluation,
)
from tests.conftest import eventually, new_key
from tests.test_api import Headers, items_of, other_backend, submit
from tests.test_endings import LIMITS, REJECTED, expire_lease, stored
from tests.test_model_evaluation_api import benchmark_prompts, evaluation_body, submit_evaluation
from tests.test_prompt_sets import CUSTOM_SEED_USER, register
from tests.test_quality_api import a_grade, completed, kept_pair
from tests.test_sample_evaluations import one_graded_and_guarded_sample

SHUTDOWN = handed_back("worker shut down", counts_as_failure=False)


async def queued_items(api: httpx.AsyncClient, auth: Headers, sessions: Sessions, count: int) -> list[UUID]:
    job = await submit(api, auth, [f"Why is the sea salty, part {n}?" for n in range(count)])
    async with sessions() as session:
        ids = await session.scalars(
            select(Item.id).where(Item.job_id == UUID(job["id"])).order_by(Item.position)
        )
        return list(ids)


async def claimed(sessions: Sessions, item_id: UUID, holder: UUID | None = None) -> items.Claim:
    claim = await items.claim(sessions, item_id, LIMITS, holder)
    assert claim is not None
    return claim


async def lease_left(sessions: Sessions, item_id: UUID) -> timedelta:
    async with sessions() as session:
        left = await session.scalar(
            select(type_coerce(Item.lease_until - func.now(), Interval)).where(Item.id == item_id)
        )
    assert left is not None
    return left


async def set_item(sessions: Sessions, item_id: UUID, **values: Any) -> None:
    async with sessions.begin() as session:
        await session.execute(update(Item).where(Item.id == item_id).values(values))


async def test_a_queued_item_is_claimed_once_for_its_holder_and_a_second_claim_gets_nothing(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    item_id, _ = await queued_items(api, auth, sessions, 2)
    holder = uuid4()

    claim = await claimed(sessions, item_id, holder)

    assert (claim.item_id, claim.attempt, claim.position) == (item_id, 1, 0)
    assert await items.claim(sessions, item_id, LIMITS, uuid4()) is None, "claimed twice"
    item = await stored(sessions, item_id)
    assert (item.status, item.attempts, item.claimed_by) == ("running", 1, holder)
    assert abs(await lease_left(sessions, item_id) - timedelta(seconds=LIMITS.lease_s)) < timedelta(seconds=5)


async def test_an_expired_lease_taken_over_gives_the_new_holder_a_full_lease(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    await claimed(sessions, item_id, uuid4())
    await expire_lease(sessions, item_id)
    holder = uuid4()

    taken = await claimed(sessions, item_id, holder)

    assert taken.attempt == 2
    item = await stored(sessions, item_id)
    assert (item.status, item.attempts, item.failures, item.claimed_by) == ("running", 2, 1, holder)
    assert abs(await lease_left(sessions, item_id) - timedelta(seconds=LIMITS.lease_s)) < timedelta(seconds=5)


async def test_a_renewal_extends_the_lease_by_its_length_from_now(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    claim = await claimed(sessions, item_id)

    await items.renew(sessions, claim, 600)

    assert abs(await lease_left(sessions, item_id) - timedelta(seconds=600)) < timedelta(seconds=5)


async def test_a_renewal_by_a_claim_taken_over_is_refused_and_leaves_the_new_lease(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    lost = await claimed(sessions, item_id)
    await expire_lease(sessions, item_id)
    await claimed(sessions, item_id)  # another worker's now

    with pytest.raises(items.ClaimLost) as refused:
        await items.renew(sessions, lost, 600)

    assert not isinstance(refused.value, items.JobCancelled)
    assert await lease_left(sessions, item_id) < timedelta(seconds=LIMITS.lease_s + 5)


async def test_a_renewal_of_a_claim_that_ended_is_refused(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # Same attempt counter, but the item is queued again: no lease to renew.
    [item_id] = await queued_items(api, auth, sessions, 1)
    claim = await claimed(sessions, item_id)
    assert await items.end(sessions, claim, SHUTDOWN)

    with pytest.raises(items.ClaimLost):
        await items.renew(sessions, claim, 600)

    assert (await stored(sessions, item_id)).lease_until is None


async def test_a_renewal_after_its_job_was_cancelled_raises_job_cancelled(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    claim = await claimed(sessions, item_id)
    assert (await api.post(f"/v1/jobs/{claim.job_id}/cancel", headers=auth)).status_code == 200

    with pytest.raises(items.JobCancelled):
        await items.renew(sessions, claim, 600)


async def test_a_sweep_takes_back_the_claims_of_dead_workers_and_expired_leases_and_nothing_else(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    live_id, silent_id, expired_id, queued_id, ended_id = await queued_items(api, auth, sessions, 5)
    live, dead = uuid4(), uuid4()
    await claimed(sessions, live_id, live)
    await claimed(sessions, silent_id, dead)
    await claimed(sessions, expired_id, live)
    await expire_lease(sessions, expired_id)
    # Queued with a past lease, as an older release left it: not a claim to take back.
    await set_item(sessions, queued_id, lease_until=func.now() - timedelta(hours=1))
    ended = await claimed(sessions, ended_id, dead)
    assert await items.end(sessions, ended, SHUTDOWN)
    await set_item(sessions, ended_id, claimed_by=dead, lease_until=func.now() - timedelta(hours=1))

    taken = await items.take_lost_claims(sessions, [dead])

    assert sorted(taken) == sorted([(silent_id, 2), (expired_id, 2)])
    for item_id, why in [(silent_id, "heartbeat stopped"), (expired_id, "lease expired")]:
        item = await stored(sessions, item_id)
        assert (item.status, item.failures, item.error_message, item.enqueues) == (
            "queued",
            1,
            f"worker lost ({why})",
            2,
        )
        assert (item.lease_until, item.claimed_by) == (None, None)
    kept = await stored(sessions, live_id)
    assert (kept.status, kept.failures, kept.enqueues, kept.claimed_by) == ("running", 0, 1, live)
    for item_id in (queued_id, ended_id):
        item = await stored(sessions, item_id)
        assert (item.status, item.failures, item.enqueues) == ("queued", 0, 1)
    assert await items.take_lost_claims(sessions, [dead]) == [], "taken twice"


async def test_a_sweep_takes_at_most_its_limit_of_each_kind_and_the_next_takes_the_rest(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    ids = await queued_items(api, auth, sessions, 4)
    dead = uuid4()
    for item_id in ids[:2]:
        await claimed(sessions, item_id, dead)
    for item_id in ids[2:]:
        await claimed(sessions, item_id)
        await expire_lease(sessions, item_id)

    first = await items.take_lost_claims(sessions, [dead], limit=1)
    second = await items.take_lost_claims(sessions, [dead], limit=1)

    assert len(first) == len(second) == 2
    assert sorted(item_id for item_id, _ in first + second) == sorted(ids)


async def test_a_sweep_passes_over_an_item_another_transaction_holds_and_takes_it_next_time(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # A worker's transaction on its item (a turn being written, its ending) must not stall the
    # sweep of every other lost item behind it.
    held_id, free_id = await queued_items(api, auth, sessions, 2)
    for item_id in (held_id, free_id):
        await claimed(sessions, item_id)
        await expire_lease(sessions, item_id)

    async with sessions.begin() as holder:
        await holder.execute(select(Item.id).where(Item.id == held_id).with_for_update())
        taken = await asyncio.wait_for(items.take_lost_claims(sessions), timeout=5)
    assert taken == [(free_id, 2)]

    assert await items.take_lost_claims(sessions) == [(held_id, 2)]


async def test_the_holders_of_running_items_are_listed_once_each(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    ids = await queued_items(api, auth, sessions, 5)
    busy, gone = uuid4(), uuid4()
    await claimed(sessions, ids[0], busy)
    await claimed(sessions, ids[1], busy)
    await claimed(sessions, ids[2])  # a claim without a holder: its lease alone keeps it
    await set_item(sessions, ids[3], claimed_by=gone)  # queued: no one holds it

    assert await items.running_holders(sessions) == [busy]


@pytest.mark.parametrize(
    ("attempts", "outage_claims", "failures", "ending"),
    [
        (LIMITS.max_claims - 1, 0, LIMITS.max_failures - 1, None),
        (
            LIMITS.max_claims,
            0,
            0,
            ("too_many_attempts", f"gave up after {LIMITS.max_claims} attempts; last: "),
        ),
        (LIMITS.max_claims + 3, 4, 0, None),  # outages do not count
        (0, 0, LIMITS.max_failures, ("too_many_failures", f"{LIMITS.max_failures} failed attempts; last: ")),
    ],
    ids=["one_try_left", "claims_spent", "outage_claims_not_counted", "failures_spent"],
)
async def test_an_item_whose_tries_are_spent_fails_instead_of_being_claimed(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    attempts: int,
    outage_claims: int,
    failures: int,
    ending: tuple[str, str] | None,
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    await set_item(
        sessions,
        item_id,
        attempts=attempts,
        outage_claims=outage_claims,
        failures=failures,
        error_message="the endpoint is down",
        operator_error="upstream: 503",
        # Queued with a past lease, as an older release left it: no lease to take over, no
        # lost worker to count.
        lease_until=func.now() - timedelta(hours=1),
    )

    claim = await items.claim(sessions, item_id, LIMITS)

    item = await stored(sessions, item_id)
    if ending is None:
        assert claim is not None and claim.attempt == attempts + 1
        assert item.status == "running"
        return
    code, message = ending
    assert claim is None
    assert (item.status, item.error_code, item.error_message, item.operator_error) == (
        "failed",
        code,
        message + "the endpoint is down",
        "upstream: 503",
    )
    assert item.attempts == attempts and item.finished_at is not None


async def test_an_item_failed_for_spent_tries_with_no_error_recorded_says_the_last_was_unknown(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    await set_item(sessions, item_id, attempts=LIMITS.max_claims)

    assert await items.claim(sessions, item_id, LIMITS) is None

    item = await stored(sessions, item_id)
    assert (item.status, item.error_message) == (
        "failed",
        f"gave up after {LIMITS.max_claims} attempts; last: unknown",
    )


async def test_a_lease_taken_over_counts_its_outage_claims_out_of_its_tries(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    await claimed(sessions, item_id)
    # Nine claims lost to outages and one to come: within max_claims (10) once outages are left out.
    await set_item(sessions, item_id, attempts=LIMITS.max_claims + 1, outage_claims=LIMITS.max_claims - 1)
    await expire_lease(sessions, item_id)

    taken = await items.claim(sessions, item_id, LIMITS)

    assert taken is not None and taken.attempt == LIMITS.max_claims + 2
    assert (await stored(sessions, item_id)).status == "running"


def a_completion(response: str) -> Completed:
    return Completed(
        intents={"explicit_intents": ["x"], "implicit_intents": []},
        thoughts=[Thought(1, "t", "seed", 0, 0)],
        refined_thoughts=[{"text": "t", "sources": [1]}],
        dropped=[],
        unaccounted=[],
        response=response,
        rounds_used=1,
        agreed=True,
        agreed_by={"round": 1, "agent": 0},
    )


async def test_a_completion_is_written_once_and_not_by_a_claim_taken_over(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    first_id, second_id = await queued_items(api, auth, sessions, 2)
    claim = await claimed(sessions, first_id)
    lost = await claimed(sessions, second_id)
    await expire_lease(sessions, second_id)
    await claimed(sessions, second_id)

    assert await items.complete(sessions, claim, a_completion("first")) is not None
    assert await items.complete(sessions, claim, a_completion("replayed")) is None
    assert await items.complete(sessions, lost, a_completion("late")) is None

    async with sessions() as session:
        cots = (await session.execute(select(Cot.item_id, Cot.response))).all()
    assert [tuple(cot) for cot in cots] == [(first_id, "first")]
    assert (await stored(sessions, first_id)).status == "completed"
    assert (await stored(sessions, second_id)).status == "running"


async def test_an_ending_by_a_claim_taken_over_writes_nothing(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    lost = await claimed(sessions, item_id)
    await expire_lease(sessions, item_id)
    holder = uuid4()
    await claimed(sessions, item_id, holder)

    assert await items.end(sessions, lost, SHUTDOWN) is None

    item = await stored(sessions, item_id)
    assert (item.status, item.attempts, item.claimed_by, item.error_message) == (
        "running",
        2,
        holder,
        "worker lost (lease expired)",
    )


async def test_a_claim_of_an_item_that_does_not_exist_gets_nothing(sessions: Sessions) -> None:
    assert await items.claim(sessions, uuid4(), LIMITS) is None


async def test_a_claim_that_waited_for_its_items_hand_back_takes_it_without_counting_a_lost_worker(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # The hand-back commits between the claim's two statements: the one-statement claim saw
    # the item running, the general one waits for the item's lock and finds it queued again.
    [item_id] = await queued_items(api, auth, sessions, 1)
    first = await claimed(sessions, item_id)
    holder = uuid4()
    async with sessions.begin() as session:
        assert await items.write_ending(session, first, SHUTDOWN)
        claiming = asyncio.create_task(items.claim(sessions, item_id, LIMITS, holder))
        await eventually(lambda: other_backend(sessions, "wait_event_type = 'Lock'"), 10, "the claim to wait")

    taken = await claiming

    assert taken is not None and (taken.item_id, taken.attempt) == (item_id, 2)
    item = await stored(sessions, item_id)
    assert (item.status, item.attempts, item.failures, item.claimed_by, item.error_message) == (
        "running",
        2,
        0,
        holder,
        "worker shut down",
    )
    assert abs(await lease_left(sessions, item_id) - timedelta(seconds=LIMITS.lease_s)) < timedelta(seconds=5)


@pytest.mark.parametrize("taken_over", [False, True], ids=["queued", "lease_taken_over"])
async def test_a_claim_carries_its_jobs_plan_and_pinned_prompt_set(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, taken_over: bool
) -> None:
    registered = await register(api, auth, seed__user=CUSTOM_SEED_USER)
    assert registered.status_code == 201, registered.text
    pinned = {"name": "house", "version": registered.json()["version"]}
    job = await submit(api, auth, ["Why is the sea salty?"], prompt_set=pinned)
    [item] = await items_of(api, auth, job["id"])
    item_id = UUID(item["id"])
    claim = await claimed(sessions, item_id)
    if taken_over:
        await expire_lease(sessions, item_id)
        claim = await claimed(sessions, item_id)

    async with sessions() as session:
        submitted = await session.get(Job, UUID(job["id"]))
    assert submitted is not None
    assert (claim.item_id, claim.job_id, claim.prompt, claim.plan) == (
        item_id,
        submitted.id,
        "Why is the sea salty?",
        submitted.plan,
    )
    assert (claim.prompt_set.id, claim.policy_set.id) == (
        UUID(registered.json()["id"]),
        submitted.policy_set_id,
    )


async def pinned_to_sets_never_read(sessions: Sessions, item_id: UUID) -> tuple[UUID, UUID]:
    """The item's job pinned to copies of its policy and prompt sets under new ids, which
    no process has read yet (as a worker's first claim of a job finds them): their ids."""
    async with sessions.begin() as session:
        job = await session.scalar(select(Job).join(Item, Item.job_id == Job.id).where(Item.id == item_id))
        assert job is not None and job.prompt_set_id is not None
        policy = await session.get(PolicySetRow, job.policy_set_id)
        prompt = await session.get(PromptSetRow, job.prompt_set_id)
        assert policy is not None and prompt is not None
        copies = (
            PolicySetRow(
                owner_key_id=policy.owner_key_id, name=policy.name, version="copy", policies=policy.policies
            ),
            PromptSetRow(
                owner_key_id=prompt.owner_key_id, name=prompt.name, version="copy", templates=prompt.templates
            ),
        )
        session.add_all(copies)
        await session.flush()
        job.policy_set_id, job.prompt_set_id = copies[0].id, copies[1].id
        return copies[0].id, copies[1].id


@pytest.mark.parametrize("taken_over", [False, True], ids=["queued", "lease_taken_over"])
async def test_a_claim_reads_the_sets_its_process_never_read_from_the_database(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, taken_over: bool
) -> None:
    # A process keeps the sets it read (registered_sets.ById): the API's process read the
    # job's at submission, but a worker's first claim of a job reads them in its session.
    [item_id] = await queued_items(api, auth, sessions, 1)
    if taken_over:
        await claimed(sessions, item_id)
        await expire_lease(sessions, item_id)
    policy_set_id, prompt_set_id = await pinned_to_sets_never_read(sessions, item_id)

    claim = await claimed(sessions, item_id)

    assert (claim.policy_set.id, claim.prompt_set.id) == (policy_set_id, prompt_set_id)
    assert (claim.policy_set.version, claim.prompt_set.version) == ("copy", "copy")


@pytest.mark.parametrize("taken_over", [False, True], ids=["queued", "lease_taken_over"])
async def test_a_claim_carries_both_limits_of_its_jobs_budget(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, taken_over: bool
) -> None:
    """The worker checks the item's first LLM call against the claim's budget (later ones
    against what its stored turns read): a limit lost here lets each item of a spent job
    start a call."""
    [item_id] = await queued_items(api, auth, sessions, 1)
    async with sessions.begin() as session:  # both limits, as a priced job's budget has them
        await session.execute(
            update(Job)
            .where(Job.id == select(Item.job_id).where(Item.id == item_id).scalar_subquery())
            .values(budget_max_cost_usd=0.25, budget_max_tokens=50_000)
        )
    claim = await claimed(sessions, item_id)
    if taken_over:
        await expire_lease(sessions, item_id)
        claim = await claimed(sessions, item_id)

    assert claim.budget is not None
    assert (claim.budget.max_cost_usd, claim.budget.max_tokens) == (0.25, 50_000)


async def notifying(sessions: Sessions, item_id: UUID) -> UUID:
    """The item's job given a callback URL, as a submission naming one: the job's id."""
    async with sessions.begin() as session:
        job_id = await session.scalar(select(Item.job_id).where(Item.id == item_id))
        await session.execute(
            update(Job).where(Job.id == job_id).values(callback_url="http://127.0.0.1:9/hook")
        )
    assert job_id is not None
    return job_id


async def deliveries(sessions: Sessions, job_id: UUID) -> int:
    async with sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(CallbackDelivery).where(CallbackDelivery.job_id == job_id)
        )
    return count or 0


async def failed_by_its_worker(sessions: Sessions, item_id: UUID) -> None:
    assert await items.end(sessions, await claimed(sessions, item_id), REJECTED) == REJECTED


async def failed_at_its_claim_for_spent_tries(sessions: Sessions, item_id: UUID) -> None:
    await set_item(sessions, item_id, attempts=LIMITS.max_claims)
    assert await items.claim(sessions, item_id, LIMITS) is None
    assert (await stored(sessions, item_id)).status == "failed"


async def completed_by_its_worker(sessions: Sessions, item_id: UUID) -> None:
    assert await items.complete(sessions, await claimed(sessions, item_id), a_completion("done")) == COMPLETED


ItemEnd = Callable[[Sessions, UUID], Awaitable[None]]


@pytest.mark.parametrize(
    ("first_end", "last_end"),
    [
        (failed_at_its_claim_for_spent_tries, failed_by_its_worker),
        (failed_by_its_worker, failed_at_its_claim_for_spent_tries),
        (completed_by_its_worker, completed_by_its_worker),
    ],
    ids=["last_failed_by_its_worker", "last_failed_at_its_claim", "last_completed"],
)
async def test_the_ending_that_finishes_a_notifying_job_writes_its_delivery(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, first_end: ItemEnd, last_end: ItemEnd
) -> None:
    first_id, last_id = await queued_items(api, auth, sessions, 2)
    job_id = await notifying(sessions, first_id)

    await first_end(sessions, first_id)
    assert await deliveries(sessions, job_id) == 0, "delivered with an item left to run"
    await last_end(sessions, last_id)

    assert await deliveries(sessions, job_id) == 1


async def test_a_completion_written_after_its_jobs_cancel_stands(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    claim = await claimed(sessions, item_id)
    assert (await api.post(f"/v1/jobs/{claim.job_id}/cancel", headers=auth)).status_code == 200

    async with sessions.begin() as session:
        assert await items.write_ending(session, claim, COMPLETED) == COMPLETED

    item = await stored(sessions, item_id)
    assert (item.status, item.stage) == ("completed", "done")


async def test_a_fault_after_its_jobs_cancel_ends_the_item_cancelled_while_other_jobs_run(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    [other_id] = await queued_items(api, auth, sessions, 1)  # another job's, not cancelled
    claim, other = await claimed(sessions, item_id), await claimed(sessions, other_id)
    assert (await api.post(f"/v1/jobs/{claim.job_id}/cancel", headers=auth)).status_code == 200

    assert await items.end(sessions, claim, REJECTED) == CANCELLED
    assert await items.end(sessions, other, REJECTED) == REJECTED

    item = await stored(sessions, item_id)
    assert (item.status, item.error_code, item.error_message) == ("cancelled", None, None)
    assert (await stored(sessions, other_id)).error_code == REJECTED.error_code


async def test_a_completion_with_a_preference_pair_stores_the_pair_with_the_chosen_scores_and_its_candidates(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [item_id] = await queued_items(api, auth, sessions, 1)
    claim = await claimed(sessions, item_id)
    grade, pair = a_grade(), kept_pair()

    assert await items.complete(sessions, claim, completed(grade, pair)) == COMPLETED

    async with sessions() as session:
        stored_pair = await session.scalar(select(PreferencePair).where(PreferencePair.item_id == item_id))
        candidates = (
            await session.execute(
                select(PairCandidate.method, PairCandidate.number).where(PairCandidate.item_id == item_id)
            )
        ).all()
    assert stored_pair is not None and (stored_pair.paired, stored_pair.chosen_scores) == (True, grade.scores)
    assert [tuple(c) for c in candidates] == [(c.method, c.number) for c in pair.candidates()]
    assert (await stored(sessions, item_id)).status == "completed"


async def test_a_sample_evaluations_completion_stores_why_the_grader_gave_no_scores(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    item_id = await one_graded_and_guarded_sample(api, auth, sessions)
    claim = await claimed(sessions, item_id)
    unread = Grade(None, error="the grader's answer was no JSON")
    verdict = GuardVerdict(unsafe=True, categories=["fraud-deception"])

    assert await items.complete_evaluated(sessions, claim, Evaluated(unread, verdict, None)) == COMPLETED

    async with sessions() as session:
        result = await session.scalar(select(SampleEvaluation).where(SampleEvaluation.item_id == item_id))
    # The samples page shows it: without it a grade that failed reads as one never asked for.
    assert result is not None and (result.scores, result.grade_error) == (None, unread.error)
    assert result.guard is not None and result.guard["categories"] == ["fraud-deception"]
    assert (result.winner, result.votes) == (None, None)


async def test_a_model_answers_verdicts_are_written_once_with_its_completion_on_its_own_row(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # The report counts these verdicts: a completion that wrote them on another item's row,
    # or wrote them again on a replay, would count an answer wrongly.
    body = evaluation_body([{"name": "b", "prompts": benchmark_prompts(1)}], "m1")
    job_id = UUID((await submit_evaluation(api, auth, body))["id"])
    async with sessions() as session:
        answered, unanswered = (
            await session.scalars(select(Item.id).where(Item.job_id == job_id).order_by(Item.position))
        ).all()
    claim = await claimed(sessions, answered)
    unsafe = JudgedAnswer("stop", GuardVerdict(unsafe=True), RefusalVerdict(refused=False))

    assert await model_evaluations.complete(sessions, claim, unsafe) == COMPLETED
    replayed = JudgedAnswer("length", GuardVerdict(unsafe=False), RefusalVerdict(refused=True))
    assert await model_evaluations.complete(sessions, claim, replayed) is None

    async with sessions() as session:
        answers = await session.scalars(select(ModelAnswer).where(ModelAnswer.job_id == job_id))
        verdicts = {a.item_id: (a.finish_reason, a.unsafe, a.refused, bool(a.judged_at)) for a in answers}
    assert verdicts == {answered: ("stop", True, False, True), unanswered: (None, None, None, False)}
    assert [(await stored(sessions, i)).status for i in (answered, unanswered)] == ["completed", "queued"]


async def test_a_lease_taken_over_does_not_wait_for_a_transaction_changing_its_job(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # The general claim locks the item's row alone: a change to the job (a PATCH, a budget)
    # must not hold up its takeovers, nor the claims of one job's items wait on one another.
    [item_id] = await queued_items(api, auth, sessions, 1)
    lost = await claimed(sessions, item_id)
    await expire_lease(sessions, item_id)

    async with sessions.begin() as change:
        await change.execute(update(Job).where(Job.id == lost.job_id).values(label="renamed"))
        taken = await asyncio.wait_for(items.claim(sessions, item_id, LIMITS), timeout=5)

    assert taken is not None and taken.attempt == 2


async def checked_ago(sessions: Sessions, item_id: UUID) -> timedelta:
    """How long ago the item was last written (a claim, an ending, a sweep's check)."""
    async with sessions() as session:
        ago = await session.scalar(
            select(type_coerce(func.now() - Item.updated_at, Interval)).where(Item.id == item_id)
        )
    assert ago is not None
    return ago


async def test_the_queued_items_past_the_grace_are_found_oldest_first_up_to_the_limit(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # What the sweep checks for a lost arq job: a running or ended item is a claim's, and a
    # fresh one's arq job may still be on its way.
    old, older, fresh, running, ended = await queued_items(api, auth, sessions, 5)
    # Written in the other order, so that a read in the table's order returns them wrong.
    await set_item(sessions, old, updated_at=func.now() - timedelta(hours=2))
    await set_item(sessions, older, updated_at=func.now() - timedelta(hours=3), enqueues=3)
    await claimed(sessions, running)
    assert await items.end(sessions, await claimed(sessions, ended), REJECTED)
    for item_id in (running, ended):
        await set_item(sessions, item_id, updated_at=func.now() - timedelta(hours=4))

    assert await items.queued_unclaimed(sessions, grace_s=60) == [(older, 3), (old, 1)]
    assert await items.queued_unclaimed(sessions, grace_s=60, limit=1) == [(older, 3)]
    assert await items.queued_unclaimed(sessions, grace_s=3 * 3600 - 60) == [(older, 3)]


async def test_a_queued_item_a_dead_worker_took_is_taken_back_only_under_the_arq_job_it_took(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # A counter moved on (the item re-enqueued since) or a claim made means another arq job
    # or a worker has the item now: taking it back again would run it twice.
    taken, moved_on, running, other = await queued_items(api, auth, sessions, 4)
    for item_id in (taken, moved_on, other):
        await set_item(sessions, item_id, updated_at=func.now() - timedelta(hours=1))
    await set_item(sessions, moved_on, enqueues=2)
    await claimed(sessions, running)

    assert await items.take_back_unclaimed(sessions, [(taken, 1), (moved_on, 1), (running, 1)]) == [
        (taken, 2)
    ]

    # Checked now: the same sweep's grace check must not renumber it a second time.
    assert await checked_ago(sessions, taken) < timedelta(minutes=1)
    for item_id, status, enqueues in [(moved_on, "queued", 2), (running, "running", 1), (other, "queued", 1)]:
        item = await stored(sessions, item_id)
        assert (item.status, item.enqueues, item.failures) == (status, enqueues, 0)
    assert await items.take_back_unclaimed(sessions, []) == []


async def test_a_check_marks_queued_items_checked_and_leaves_a_running_claims_start(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    # A running item's updated_at is its claim's start, from which an outage's clock counts
    # its wait in the queue (items._outage_start).
    queued, running, unchecked = await queued_items(api, auth, sessions, 3)
    await claimed(sessions, running)
    for item_id in (queued, running, unchecked):
        await set_item(sessions, item_id, updated_at=func.now() - timedelta(hours=1))

    await items.touch(sessions, [queued, running])

    assert await checked_ago(sessions, queued) < timedelta(minutes=1)
    for item_id in (running, unchecked):
        assert await checked_ago(sessions, item_id) > timedelta(minutes=59)
    assert (await stored(sessions, queued)).enqueues == 1


async def test_queued_items_whose_arq_jobs_are_lost_get_new_ones_grouped_by_their_jobs_owner(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    [mine, running, unasked] = await queued_items(api, auth, sessions, 3)
    [theirs] = await queued_items(api, await new_key(sessions, "bob"), sessions, 1)
    await claimed(sessions, running)
    for item_id in (mine, theirs, unasked):
        await set_item(sessions, item_id, updated_at=func.now() - timedelta(hours=1))
    async with sessions() as session:
        rows = await session.execute(select(Item.id, Job.owner_key_id).join(Job))
        owner = {row.id: row.owner_key_id for row in rows}

    renumbered = await items.renumber(sessions, [mine, theirs, running])

    assert renumbered == {owner[mine]: [(mine, 2)], owner[theirs]: [(theirs, 2)]}
    assert owner[mine] != owner[theirs]
    for item_id in (mine, theirs):
        assert await checked_ago(sessions, item_id) < timedelta(minutes=1)
    for item_id, status in [(running, "running"), (unasked, "queued")]:
        item = await stored(sessions, item_id)
        assert (item.status, item.enqueues) == (status, 1)
    assert await checked_ago(sessions, unasked) > timedelta(minutes=59)
    assert await items.renumber(sessions, []) == {}
