"""Hedged LLM requests: the policy's arithmetic, and the client against the scripted server
sending a second copy of a hung request, keeping the first answer, cancelling the other,
staying within the shared cap and the hedge budget."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from app.config import EndpointConfig
from app.deliberation.ports import ChatRequest, LLMRequestRejected
from app.deliberation.stages import SEED
from app.llm.client import OpenAICompatibleClient
from app.llm.hedging import BURST, MIN_SAMPLES, RECOMPUTE_EVERY, HedgePolicy
from app.llm.limits import EndpointLimiter
from tests.conftest import eventually
from tests.scripted_llm import ScriptedLLM, chat_request, http_error, stall

TIMEOUT_S = 20.0  # far longer than any hedged call here takes: only a hedge answers in time
HEDGE_AFTER_S = 0.05


def seed_request() -> ChatRequest:
    return chat_request(SEED, "How do I store bleach safely?")


def nothing_in_flight(scripted_llm: ScriptedLLM) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return scripted_llm.in_flight == 0

    return check


def hedges(outcome: str) -> float:
    labels = {"endpoint": "default", "role": seed_request().role, "outcome": outcome}
    return REGISTRY.get_sample_value("aidsafe_llm_hedges_total", labels) or 0.0


def warmed(policy: HedgePolicy, seconds: float = 0.01) -> HedgePolicy:
    """The policy after enough quick replies of the seed request's endpoint and role."""
    for _ in range(MIN_SAMPLES):
        policy.observe("default", seed_request().role, seconds)
    return policy


def hedging_client(scripted_llm: ScriptedLLM, policy: HedgePolicy) -> OpenAICompatibleClient:
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url)}
    return OpenAICompatibleClient(
        endpoints, timeout_s=TIMEOUT_S, max_retries=1, backoff_base_s=0.01, hedging=policy
    )


# The policy


def test_no_delay_until_enough_replies_are_timed() -> None:
    policy = HedgePolicy(factor=3, min_delay_s=0.0, budget=0.05)
    for _ in range(MIN_SAMPLES - 1):
        policy.observe("default", "seed", 0.2)
    assert policy.delay_s("default", "seed", 10) is None
    assert not policy.knows("default", "seed")

    policy.observe("default", "seed", 0.2)

    assert policy.knows("default", "seed")
    assert policy.delay_s("default", "seed", 10) == pytest.approx(0.6)
    assert policy.delay_s("default", "other_role", 10) is None
    assert policy.delay_s("other_endpoint", "seed", 10) is None


def test_delay_is_factor_times_the_95th_percentile_and_at_least_the_floor() -> None:
    policy = HedgePolicy(factor=2, min_delay_s=0.1, budget=0.05)
    for ms in range(1, 101):  # 1..100 ms: the 95th percentile is 95 ms
        policy.observe("default", "seed", ms / 1000)

    assert policy.delay_s("default", "seed", 10) == pytest.approx(0.19)
    assert HedgePolicy(2, 0.5, 0.05).delay_s("default", "seed", 10) is None
    floored = HedgePolicy(factor=2, min_delay_s=0.5, budget=0.05)
    for _ in range(MIN_SAMPLES):
        floored.observe("default", "seed", 0.01)
    assert floored.delay_s("default", "seed", 10) == 0.5


def test_no_hedge_when_the_delay_reaches_the_timeout_or_the_factor_is_zero() -> None:
    role = seed_request().role  # warmed with 10 ms replies: a factor of 3 gives 30 ms
    assert warmed(HedgePolicy(factor=3, min_delay_s=0, budget=1)).delay_s("default", role, 0.03) is None
    assert warmed(HedgePolicy(factor=3, min_delay_s=0, budget=1)).delay_s("default", role, 0.031) is not None
    assert warmed(HedgePolicy(factor=0, min_delay_s=0, budget=1)).delay_s("default", role, 10) is None


def test_percentile_follows_the_recent_replies() -> None:
    policy = warmed(HedgePolicy(factor=1, min_delay_s=0, budget=1), seconds=0.01)
    role = seed_request().role
    for _ in range(300):  # the endpoint got slower: old samples age out
        policy.observe("default", role, 0.5)
    assert policy.delay_s("default", role, 10) == pytest.approx(0.5)


def test_percentile_is_recomputed_every_few_replies_not_on_each() -> None:
    policy = warmed(HedgePolicy(factor=1, min_delay_s=0, budget=1), seconds=0.01)
    role = seed_request().role
    for _ in range(RECOMPUTE_EVERY - 1):
        policy.observe("default", role, 5.0)
    assert policy.delay_s("default", role, 10) == pytest.approx(0.01)  # not yet: the old one

    policy.observe("default", role, 5.0)

    assert policy.delay_s("default", role, 10) == pytest.approx(5.0)  # 10 of 30 slow: past p95


def test_budget_allows_a_burst_then_the_earned_share() -> None:
    policy = HedgePolicy(factor=3, min_delay_s=0, budget=0.1)
    assert [policy.spend() for _ in range(int(BURST))] == [True] * int(BURST)
    assert not policy.spend()

    for _ in range(9):
        policy.sent()  # each request sent earns a tenth of a hedge
    assert not policy.spend()
    policy.sent()
    assert policy.spend()
    assert not policy.spend()


def test_a_refund_gives_back_the_one_hedge_spent_and_never_more_than_the_burst() -> None:
    policy = HedgePolicy(factor=3, min_delay_s=0, budget=0)
    assert all(policy.spend() for _ in range(int(BURST)))

    policy.refund()  # a hedge spent, then not sent (the breaker had it)

    assert policy.spend()
    assert not policy.spend()
    full = HedgePolicy(factor=3, min_delay_s=0, budget=0)
    full.refund()
    assert sum(full.spend() for _ in range(int(BURST) + 1)) == BURST


# The client


async def test_hung_request_is_hedged_and_the_copy_answers(scripted_llm: ScriptedLLM) -> None:
    policy = warmed(HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0.05))
    scripted_llm.script("seed_cot", stall(60))
    sent_before = hedges("sent")

    async with hedging_client(scripted_llm, policy) as client:
        started = time.monotonic()
        answer = await client.chat(seed_request())
        elapsed = time.monotonic() - started

    assert '"thoughts"' in answer.content
    assert elapsed < TIMEOUT_S / 2  # not the timeout and a retry: the copy answered
    assert len(scripted_llm.requests_for("seed_cot")) == 2
    assert hedges("sent") == sent_before + 1
    # The hung copy was cancelled: its connection closed, the server stopped waiting on it.
    await eventually(nothing_in_flight(scripted_llm), timeout_s=5, what="the losing copy to end")


async def test_a_request_sent_before_any_delay_is_hedged_once_its_role_gives_one(
    scripted_llm: ScriptedLLM,
) -> None:
    """A job's first items all send their first call before any reply is back, so no delay is
    known when it is sent: one that hangs is hedged once the other replies give a delay,
    not left to its timeout."""
    policy = HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0.05)
    scripted_llm.script("seed_cot", stall(60))
    sent_before = hedges("sent")

    async with hedging_client(scripted_llm, policy) as client:
        started = time.monotonic()
        call = asyncio.create_task(client.chat(seed_request()))
        await eventually(lambda: _sent(scripted_llm, 1), timeout_s=5, what="the first copy to be sent")
        await asyncio.sleep(3 * HEDGE_AFTER_S)  # it runs on with no delay known: not hedged yet
        assert len(scripted_llm.requests_for("seed_cot")) == 1
        warmed(policy)  # the rest of the first wave answers
        answer = await call
        elapsed = time.monotonic() - started

    assert '"thoughts"' in answer.content
    assert elapsed < TIMEOUT_S / 2
    assert len(scripted_llm.requests_for("seed_cot")) == 2
    assert hedges("sent") == sent_before + 1
    await eventually(nothing_in_flight(scripted_llm), timeout_s=5, what="the losing copy to end")


async def test_a_delay_learnt_while_the_request_runs_is_waited_for_in_full(scripted_llm: ScriptedLLM) -> None:
    """The replies that give a delay say 1 s: a request sent before them is hedged once it
    has run 1 s, not at the look that learns the delay."""
    policy = HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0.05)
    scripted_llm.script("seed_cot", stall(60))

    async with hedging_client(scripted_llm, policy) as client:
        started = time.monotonic()
        call = asyncio.create_task(client.chat(seed_request()))
        await eventually(lambda: _sent(scripted_llm, 1), timeout_s=5, what="the first copy to be sent")
        warmed(policy, seconds=1.0)
        await asyncio.sleep(0.5)
        assert len(scripted_llm.requests_for("seed_cot")) == 1
        await call
        elapsed = time.monotonic() - started

    first, hedge = scripted_llm.requests_for("seed_cot")
    assert hedge.received_at - first.received_at >= 0.9
    assert elapsed < TIMEOUT_S / 2


async def test_no_hedge_while_no_reply_was_timed(scripted_llm: ScriptedLLM) -> None:
    policy = HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=1)
    scripted_llm.script("seed_cot", stall(0.5))
    sent_before, skipped_before = hedges("sent"), hedges("no_budget")

    async with hedging_client(scripted_llm, policy) as client:
        await client.chat(seed_request())

    assert len(scripted_llm.requests_for("seed_cot")) == 1
    assert (hedges("sent"), hedges("no_budget")) == (sent_before, skipped_before)  # never came due


async def _sent(scripted_llm: ScriptedLLM, count: int) -> bool:
    return len(scripted_llm.requests_for("seed_cot")) >= count


async def test_first_copy_wins_when_it_answers_before_the_hedge(scripted_llm: ScriptedLLM) -> None:
    """A slow first copy that answers while the hedge is still running is the one kept, and
    the hedge is cancelled: one reply, two requests, nothing left in flight."""
    policy = warmed(HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0.05))
    scripted_llm.script("seed_cot", stall(0.3), stall(60))

    async with hedging_client(scripted_llm, policy) as client:
        answer = await client.chat(seed_request())

    assert '"thoughts"' in answer.content
    assert len(scripted_llm.requests_for("seed_cot")) == 2
    await eventually(nothing_in_flight(scripted_llm), timeout_s=5, what="the losing copy to end")


async def test_quick_requests_are_never_hedged(scripted_llm: ScriptedLLM) -> None:
    policy = warmed(HedgePolicy(factor=3, min_delay_s=1.0, budget=1))

    async with hedging_client(scripted_llm, policy) as client:
        for _ in range(5):
            await client.chat(seed_request())

    assert len(scripted_llm.requests_for("seed_cot")) == 5


async def test_no_hedge_once_the_budget_is_spent(scripted_llm: ScriptedLLM) -> None:
    policy = warmed(HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0))
    while policy.spend():
        pass
    scripted_llm.script("seed_cot", stall(0.5))
    skipped_before = hedges("no_budget")

    async with hedging_client(scripted_llm, policy) as client:
        await client.chat(seed_request())

    assert len(scripted_llm.requests_for("seed_cot")) == 1
    assert hedges("no_budget") == skipped_before + 1


async def test_a_failed_first_copy_waits_for_the_hedge(scripted_llm: ScriptedLLM) -> None:
    """The first copy fails (503) after the hedge was sent: the hedge's answer is the reply,
    with no retry."""
    policy = warmed(HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0.05))
    scripted_llm.latency_s = 0.5  # the first copy runs past the hedge delay before it fails
    scripted_llm.script("seed_cot", http_error(503))

    async with hedging_client(scripted_llm, policy) as client:
        answer = await client.chat(seed_request())

    assert '"thoughts"' in answer.content
    assert len(scripted_llm.requests_for("seed_cot")) == 2


async def test_a_failed_hedge_ends_the_attempt_and_the_retry_goes_out(scripted_llm: ScriptedLLM) -> None:
    """The first copy hangs and its hedge fails (503): the retry is sent after its backoff,
    not after the hung copy's timeout, and the hung copy is cancelled."""
    policy = warmed(HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0.05))
    scripted_llm.script("seed_cot", stall(60), http_error(503))

    async with hedging_client(scripted_llm, policy) as client:
        started = time.monotonic()
        answer = await client.chat(seed_request())
        elapsed = time.monotonic() - started

    assert '"thoughts"' in answer.content
    assert elapsed < TIMEOUT_S / 2
    assert len(scripted_llm.requests_for("seed_cot")) == 3
    await eventually(nothing_in_flight(scripted_llm), timeout_s=5, what="the hung copy to end")


async def test_a_refusal_of_the_request_wins_over_a_transient_fault(scripted_llm: ScriptedLLM) -> None:
    """Both copies fail, the first refused (400), the hedge with a 503: the refusal says the
    request itself is wrong, which a retry cannot fix, so it is raised and nothing is retried."""
    policy = warmed(HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0.05))
    scripted_llm.latency_s = 0.5  # each copy runs past the hedge delay before it fails
    scripted_llm.script("seed_cot", http_error(400), http_error(503))

    async with hedging_client(scripted_llm, policy) as client:
        with pytest.raises(LLMRequestRejected):
            await client.chat(seed_request())

    assert len(scripted_llm.requests_for("seed_cot")) == 2


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url("redis://127.0.0.1:6379/0")
    yield client
    keys = [key async for key in client.scan_iter(match="test:hedging:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_a_hedge_takes_a_slot_of_the_shared_cap(scripted_llm: ScriptedLLM, redis: Redis) -> None:
    """At a cap of one, the hedge waits for the hung copy's slot: it is sent only once the
    first copy has timed out and given its slot back, and answers."""
    policy = warmed(HedgePolicy(factor=1, min_delay_s=HEDGE_AFTER_S, budget=0.05))
    scripted_llm.script("seed_cot", stall(60))
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url, max_concurrency=1)}
    limiter = EndpointLimiter(redis, f"test:hedging:{uuid.uuid4().hex}")

    async with OpenAICompatibleClient(
        endpoints, limiter, timeout_s=0.5, max_retries=1, backoff_base_s=0.01, hedging=policy
    ) as client:
        answer = await client.chat(seed_request())

    assert '"thoughts"' in answer.content
    first, hedge = scripted_llm.requests_for("seed_cot")
    # Sent when the first copy's 0.5 s timeout freed the slot (timed by the client from just
    # before it sent, so a little less at the server), not at the 0.05 s hedge delay.
    assert hedge.received_at - first.received_at > 0.4
