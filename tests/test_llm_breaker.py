"""The endpoint circuit breaker: an endpoint that keeps failing as a down one does is not
tried again for a while, its callers told at once; other endpoints go on; a probe closes it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from app.config import EndpointConfig
from app.deliberation.ports import ChatReply, ChatRequest, LLMUnavailable
from app.deliberation.stages import SEED
from app.llm.breaker import FAILURES_TO_OPEN, EndpointBreaker
from app.llm.client import OpenAICompatibleClient
from app.llm.hedging import BURST, MIN_SAMPLES, HedgePolicy
from tests.scripted_llm import ScriptedLLM, chat_request, http_error
from tests.test_metrics import sample

ATTEMPTS_PER_CALL = FAILURES_TO_OPEN // 2
OPEN_S = 0.5


@pytest.fixture
async def client(scripted_llm: ScriptedLLM, second_llm: ScriptedLLM) -> AsyncIterator[OpenAICompatibleClient]:
    endpoints = {
        "down": EndpointConfig(base_url=scripted_llm.base_url),
        "healthy": EndpointConfig(base_url=second_llm.base_url),
    }
    async with breaking_client(endpoints, EndpointBreaker(open_s=OPEN_S)) as client:
        yield client


def breaking_client(
    endpoints: dict[str, EndpointConfig], breaker: EndpointBreaker, hedging: HedgePolicy | None = None
) -> OpenAICompatibleClient:
    """A client whose calls each make ATTEMPTS_PER_CALL attempts, quickly."""
    return OpenAICompatibleClient(
        endpoints,
        timeout_s=2.0,
        max_retries=ATTEMPTS_PER_CALL - 1,
        backoff_base_s=0.001,
        backoff_max_s=0.002,
        hedging=hedging,
        breaker=breaker,
    )


def seed(endpoint: str) -> ChatRequest:
    return chat_request(SEED, "How do I store bleach safely?", endpoint)


async def fail_until_open(client: OpenAICompatibleClient, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script("seed_cot", *[http_error(503)] * FAILURES_TO_OPEN)
    for _ in range(FAILURES_TO_OPEN // ATTEMPTS_PER_CALL):
        with pytest.raises(LLMUnavailable):
            await client.chat(seed("down"))


async def test_an_endpoint_down_is_not_tried_again_and_its_caller_is_told_when_it_will_be(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    await fail_until_open(client, scripted_llm)

    started = time.monotonic()
    with pytest.raises(LLMUnavailable) as refused:
        await client.chat(seed("down"))

    assert time.monotonic() - started < 0.1, "a refused call waits for nothing"
    assert len(scripted_llm.requests) == FAILURES_TO_OPEN, "nothing was sent once it opened"
    assert 0 < refused.value.retry_in_s <= OPEN_S
    assert refused.value.summary == "the LLM endpoint 'down' is down"


async def test_each_refused_attempt_is_counted_for_the_operator(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    labels = {"endpoint": "down", "role": seed("down").role}
    refused_before = sample("aidsafe_llm_breaker_refusals_total", **labels)
    await fail_until_open(client, scripted_llm)

    for _ in range(3):
        with pytest.raises(LLMUnavailable):
            await client.chat(seed("down"))

    assert sample("aidsafe_llm_breaker_refusals_total", **labels) - refused_before == 3


async def test_another_endpoint_is_served_while_one_is_down(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    await fail_until_open(client, scripted_llm)

    await client.chat(seed("healthy"))

    assert len(second_llm.requests) == 1


async def test_one_probe_goes_when_the_pause_is_over_and_its_answer_closes_the_breaker(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    await fail_until_open(client, scripted_llm)
    await asyncio.sleep(OPEN_S)
    scripted_llm.latency_s = 0.3

    probe = asyncio.create_task(client.chat(seed("down")))
    await asyncio.sleep(0.1)
    with pytest.raises(LLMUnavailable):  # the probe is out: the others still wait
        await client.chat(seed("down"))
    await probe
    await client.chat(seed("down"))

    assert len(scripted_llm.requests) == FAILURES_TO_OPEN + 2


async def test_a_failed_probe_opens_it_again(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    await fail_until_open(client, scripted_llm)
    await asyncio.sleep(OPEN_S)
    scripted_llm.script("seed_cot", http_error(503))

    with pytest.raises(LLMUnavailable) as refused:
        await client.chat(seed("down"))

    assert len(scripted_llm.requests) == FAILURES_TO_OPEN + 1, "after the probe failed, none went"
    assert refused.value.retry_in_s > OPEN_S / 2


def hedged_after_quick_replies(budget: float) -> HedgePolicy:
    """Quick replies before the outage: a request is hedged after 0.2 s."""
    hedging = HedgePolicy(factor=1, min_delay_s=0.2, budget=budget)
    for _ in range(MIN_SAMPLES):
        hedging.observe("down", seed("down").role, 0.01)
    return hedging


async def probe_answered_past_the_hedging_delay(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> ChatReply:
    """The breaker opened, then the probe's answer, slower than the hedging delay: when the
    probe's hedge comes due, the breaker refuses it (the probe is out)."""
    await fail_until_open(client, scripted_llm)
    await asyncio.sleep(OPEN_S)
    scripted_llm.latency_s = 0.6  # back, slower than the hedging delay
    return await client.chat(seed("down"))


async def answered_probe_past_the_hedging_delay(
    scripted_llm: ScriptedLLM,
) -> tuple[ChatReply, EndpointBreaker]:
    breaker = EndpointBreaker(open_s=OPEN_S)
    endpoints = {"down": EndpointConfig(base_url=scripted_llm.base_url)}
    async with breaking_client(endpoints, breaker, hedged_after_quick_replies(budget=1)) as client:
        return await probe_answered_past_the_hedging_delay(client, scripted_llm), breaker


async def test_a_probe_that_runs_past_the_hedging_delay_is_waited_for_and_closes_the_breaker(
    scripted_llm: ScriptedLLM,
) -> None:
    """The probe's hedge is refused, unsent: the probe is out. That refusal ended the attempt
    and cancelled the probe, which closed nothing, so against an endpoint back but slower
    than the hedging delay every probe was cut short and the breaker never closed."""
    answer, breaker = await answered_probe_past_the_hedging_delay(scripted_llm)

    assert '"thoughts"' in answer.content
    assert len(scripted_llm.requests) == FAILURES_TO_OPEN + 1, "the probe alone was sent"
    assert breaker.refused_for_s("down") == 0, "its answer closed the breaker"


async def test_a_hedge_the_breaker_refuses_is_counted_as_such_not_as_a_refused_attempt_nor_a_sent_hedge(
    scripted_llm: ScriptedLLM,
) -> None:
    # The refusals counted the probe's refused hedge: an attempt refused, though its attempt
    # was out (and answered), and a hedge sent, though none was.
    labels = {"endpoint": "down", "role": seed("down").role}

    def counts() -> tuple[float, ...]:
        return (
            sample("aidsafe_llm_breaker_refusals_total", **labels),
            *(sample("aidsafe_llm_hedges_total", **labels, outcome=o) for o in ("sent", "breaker_open")),
        )

    before = counts()
    await answered_probe_past_the_hedging_delay(scripted_llm)

    refused, sent, breaker_open = (after - then for after, then in zip(counts(), before, strict=True))
    assert (refused, sent, breaker_open) == (0, 0, 1)


async def test_a_hedge_the_breaker_refuses_leaves_its_budget_to_the_next_request_that_runs_long(
    scripted_llm: ScriptedLLM,
) -> None:
    """The refused hedge, never sent, spent a hedge of the budget all the same: the next
    request past the hedging delay went unhedged, though none had been sent."""
    hedging = hedged_after_quick_replies(budget=0)  # none earned: the burst's alone
    for _ in range(int(BURST) - 1):
        assert hedging.spend()  # one hedge left
    endpoints = {"down": EndpointConfig(base_url=scripted_llm.base_url)}
    async with breaking_client(endpoints, EndpointBreaker(open_s=OPEN_S), hedging) as client:
        await probe_answered_past_the_hedging_delay(client, scripted_llm)  # its hedge refused
        sent = len(scripted_llm.requests)
        await client.chat(seed("down"))  # past the hedging delay too, the breaker closed

    assert len(scripted_llm.requests) == sent + 2, "the request and its hedge"


def test_failures_between_answers_never_open_it() -> None:
    breaker = EndpointBreaker(open_s=60)
    for _ in range(100):
        breaker.ended("e", "ok")  # counts from none again: not from one, nor from where it was
        for _ in range(FAILURES_TO_OPEN - 1):
            breaker.ended("e", "server_error")
        assert breaker.refused_for_s("e") == 0


@pytest.mark.parametrize("answered", ["rate_limited", "bad_body", "rejected"])
def test_an_answer_of_any_kind_shows_the_endpoint_up(answered: str) -> None:
    breaker = EndpointBreaker(open_s=60)
    for _ in range(FAILURES_TO_OPEN - 1):
        breaker.ended("e", "timeout")
    breaker.ended("e", answered)
    breaker.ended("e", "connection")

    assert breaker.refused_for_s("e") == 0


def test_attempts_without_a_verdict_count_for_nothing_but_let_the_next_probe() -> None:
    breaker = EndpointBreaker(open_s=0.01)
    for _ in range(FAILURES_TO_OPEN):
        breaker.ended("e", "timeout")
    time.sleep(0.01)
    assert breaker.refused_for_s("e") == 0  # the probe
    assert breaker.refused_for_s("e") > 0  # the probe is out

    breaker.ended("e", "cancelled")

    assert breaker.refused_for_s("e") == 0  # another probe
