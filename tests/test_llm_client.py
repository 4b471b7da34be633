"""OpenAICompatibleClient against the scripted server: retries, limits of retrying, parsing."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from email.utils import formatdate

import pytest

from app.config import EndpointConfig
from app.deliberation.config import Limits
from app.deliberation.ports import ChatRequest, LLMRequestRejected, LLMUnavailable
from app.deliberation.stages import LLAMA_GUARD, SEED
from app.llm.client import LOGPROB_TOKENS_KEPT, TOP_LOGPROBS, OpenAICompatibleClient, backoff_ceiling_s
from tests.scripted_llm import (
    ScriptedLLM,
    chat_request,
    classified,
    http_error,
    raw_body,
    refusal,
    reply,
    stall,
)

MAX_RETRIES = 2
TIMEOUT_S = 0.3


@pytest.fixture
async def client(scripted_llm: ScriptedLLM) -> AsyncIterator[OpenAICompatibleClient]:
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url, api_key="sk-test")}
    async with OpenAICompatibleClient(
        endpoints,
        timeout_s=TIMEOUT_S,
        max_retries=MAX_RETRIES,
        backoff_base_s=0.01,
        backoff_max_s=0.02,
    ) as client:
        yield client


def closed_port() -> int:
    """A loopback port that was free a moment ago and has no listener now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed_request(endpoint: str = "default") -> ChatRequest:
    return chat_request(SEED, "How do I store bleach safely?", endpoint)


async def test_sends_schema_as_strict_response_format_with_bearer_key(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    await client.chat(seed_request())

    [sent] = scripted_llm.requests
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.body["model"] == "scripted-model"
    assert sent.body["max_tokens"] == 256
    assert sent.body["temperature"] == 0.7
    assert sent.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "seed_cot", "schema": SEED.schema(Limits()), "strict": True},
    }


async def test_the_client_itself_caps_no_requests_the_limiter_is_the_cap(scripted_llm: ScriptedLLM) -> None:
    """aiohttp's connector holds requests past 100 connections by default: at an endpoint cap
    of 256 (issue 12's benchmark), the rest would have queued inside the client, unseen."""
    scripted_llm.latency_s = 1.0
    endpoints = {"default": EndpointConfig(base_url=scripted_llm.base_url, api_key="sk-test")}

    async with OpenAICompatibleClient(endpoints, timeout_s=30, max_retries=0) as client:
        await asyncio.gather(*(client.chat(seed_request()) for _ in range(150)))

    assert scripted_llm.max_in_flight == 150


async def test_retries_server_error_then_succeeds(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", http_error(500))

    answer = await client.chat(seed_request())

    assert '"thoughts"' in answer.content
    assert answer.finish_reason == "stop"
    assert len(scripted_llm.requests) == 2


async def test_honours_retry_after_seconds_on_429(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", http_error(429, retry_after=1))

    started = time.monotonic()
    await client.chat(seed_request())

    first, second = scripted_llm.requests
    # Backoff alone would wait at most 0.02 s.
    assert second.received_at - first.received_at >= 1.0
    assert time.monotonic() - started >= 1.0


async def test_honours_retry_after_given_as_http_date(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    # HTTP dates have whole seconds, so "two seconds from now" means at least one.
    scripted_llm.script("seed_cot", http_error(503, retry_after=formatdate(time.time() + 2, usegmt=True)))

    await client.chat(seed_request())

    first, second = scripted_llm.requests
    assert second.received_at - first.received_at >= 0.9


@pytest.mark.parametrize("usegmt", [True, False])
async def test_a_retry_after_date_gone_by_waits_no_longer_than_backoff(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM, usegmt: bool
) -> None:
    # usegmt=False: "-0000", RFC 5322's unknown zone, which Python reads as a naive time (GMT).
    scripted_llm.script("seed_cot", http_error(503, retry_after=formatdate(time.time() - 60, usegmt=usegmt)))

    await client.chat(seed_request())

    first, second = scripted_llm.requests
    assert second.received_at - first.received_at < 0.5  # backoff alone: at most 0.02 s


@pytest.mark.parametrize("usegmt", [True, False])
async def test_a_retry_after_date_ahead_is_waited_for_in_either_zone_form(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM, usegmt: bool
) -> None:
    scripted_llm.script("seed_cot", http_error(429, retry_after=formatdate(time.time() + 2, usegmt=usegmt)))

    await client.chat(seed_request())

    first, second = scripted_llm.requests
    assert second.received_at - first.received_at >= 0.9  # whole seconds: "2 s from now" is over 1


async def test_a_retry_after_of_zero_seconds_retries_at_once(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", http_error(429, retry_after=0))

    await client.chat(seed_request())

    first, second = scripted_llm.requests
    assert second.received_at - first.received_at < 0.5


def test_backoff_starts_at_its_base_and_doubles_up_to_its_max() -> None:
    assert [backoff_ceiling_s(0.5, 30.0, attempt) for attempt in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


async def test_gives_up_with_llm_unavailable_after_max_retries(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", *[http_error(503)] * (MAX_RETRIES + 1))

    with pytest.raises(LLMUnavailable, match="503"):
        await client.chat(seed_request())

    assert len(scripted_llm.requests) == MAX_RETRIES + 1


async def test_request_stalled_past_timeout_is_retried(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", stall(5))

    answer = await client.chat(seed_request())

    assert '"thoughts"' in answer.content
    assert len(scripted_llm.requests) == 2


async def test_an_answer_stalled_half_way_through_its_body_is_retried(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """The timeout bounds the whole attempt, the body's reading included."""
    scripted_llm.script("seed_cot", stall(5, mid_body=True))

    started = time.monotonic()
    answer = await client.chat(seed_request())

    assert '"thoughts"' in answer.content
    assert len(scripted_llm.requests) == 2
    assert time.monotonic() - started < TIMEOUT_S + 2


async def test_requests_stalled_on_every_attempt_end_in_llm_unavailable(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", *[stall(5)] * (MAX_RETRIES + 1))

    started = time.monotonic()
    with pytest.raises(LLMUnavailable):
        await client.chat(seed_request())

    assert len(scripted_llm.requests) == MAX_RETRIES + 1
    assert time.monotonic() - started < (MAX_RETRIES + 1) * TIMEOUT_S + 1


async def test_bad_request_is_rejected_without_retry(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", http_error(400, body='{"error": {"message": "no such model"}}'))

    with pytest.raises(LLMRequestRejected, match="no such model"):
        await client.chat(seed_request())

    assert len(scripted_llm.requests) == 1


async def test_unknown_endpoint_is_rejected_without_a_request(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    with pytest.raises(LLMRequestRejected, match="nowhere"):
        await client.chat(seed_request(endpoint="nowhere"))

    assert scripted_llm.requests == []


async def test_ok_status_with_unexpected_body_is_retried(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", raw_body({"detail": "upstream warming up"}))

    answer = await client.chat(seed_request())

    assert '"thoughts"' in answer.content
    assert len(scripted_llm.requests) == 2


async def test_connection_refused_ends_in_llm_unavailable(scripted_llm: ScriptedLLM) -> None:
    endpoints = {"gone": EndpointConfig(base_url=f"http://127.0.0.1:{closed_port()}/v1")}
    async with OpenAICompatibleClient(
        endpoints, timeout_s=TIMEOUT_S, max_retries=1, backoff_base_s=0.01, backoff_max_s=0.01
    ) as client:
        with pytest.raises(LLMUnavailable, match="ConnectError"):
            await client.chat(seed_request(endpoint="gone"))


async def test_records_token_usage_and_latency(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.latency_s = 0.05
    scripted_llm.script("seed_cot", reply({"thoughts": ["t"], "response": "r"}, usage=(123, 45)))

    answer = await client.chat(seed_request())

    assert (answer.prompt_tokens, answer.completion_tokens) == (123, 45)
    assert answer.latency_ms >= 50
    assert answer.model == "scripted-model"


async def test_missing_usage_counts_as_zero_tokens(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", reply({"thoughts": ["t"], "response": "r"}, omit_usage=True))

    answer = await client.chat(seed_request())

    assert (answer.prompt_tokens, answer.completion_tokens, answer.cached_prompt_tokens) == (0, 0, 0)


async def test_cached_prompt_tokens_are_read_from_the_usage_details_and_a_bad_count_is_none(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    def answer(cached: object) -> dict[str, object]:
        return {
            "choices": [{"message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }

    scripted_llm.script("seed_cot", reply({"thoughts": ["t"], "response": "r"}, usage=(100, 5, 64)))
    assert (await client.chat(seed_request())).cached_prompt_tokens == 64
    for bad in (None, "64", True, -3, 6.5):
        scripted_llm.script("seed_cot", raw_body(answer(bad)))
        assert (await client.chat(seed_request())).cached_prompt_tokens == 0


async def test_the_reply_names_the_model_the_server_says_answered_else_the_one_asked_for(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """A provider resolves an alias to a dated model: the turn records the one that answered."""

    def answer(**model: str) -> dict[str, object]:
        choice = {"message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}
        return {"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 2}, **model}

    scripted_llm.script("seed_cot", raw_body(answer(model="scripted-model-2026-12-01")), raw_body(answer()))

    assert (await client.chat(seed_request())).model == "scripted-model-2026-12-01"
    assert (await client.chat(seed_request())).model == "scripted-model"


async def test_a_body_with_a_lone_surrogate_or_nan_is_read_as_json_reads_it(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """Valid for Python's json, refused by orjson: an answer, not a fault to retry."""
    body = (
        b'{"choices": [{"message": {"role": "assistant", "content": "a \\ud800 b"},'
        b' "finish_reason": "stop"}],'
        b' "usage": {"prompt_tokens": 7, "completion_tokens": 2, "score": NaN}}'
    )
    scripted_llm.script("seed_cot", raw_body(body))

    answer = await client.chat(seed_request())

    assert answer.content == "a \ud800 b"
    assert (answer.prompt_tokens, answer.completion_tokens) == (7, 2)
    assert len(scripted_llm.requests) == 1


async def test_a_token_count_too_large_for_an_integer_is_a_bad_body_retried(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    body = (
        b'{"choices": [{"message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}],'
        b' "usage": {"prompt_tokens": 1e400, "completion_tokens": 2}}'
    )
    scripted_llm.script("seed_cot", raw_body(body))

    answer = await client.chat(seed_request())

    assert '"thoughts"' in answer.content  # the default answer, to the retry
    assert len(scripted_llm.requests) == 2


async def test_refusal_field_is_surfaced_with_empty_content(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", refusal("I can't help with that.", in_refusal_field=True))

    answer = await client.chat(seed_request())

    assert answer.refusal == "I can't help with that."
    assert answer.content == ""


async def test_truncated_reply_is_returned_with_length_finish_reason(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    # Judging output is the engine's job: the client passes a cut-off reply through.
    scripted_llm.script("seed_cot", reply('{"thoughts": ["cut', finish_reason="length"))

    answer = await client.chat(seed_request())

    assert answer.finish_reason == "length"
    assert answer.content == '{"thoughts": ["cut'
    assert len(scripted_llm.requests) == 1


# --- logprobs ------------------------------------------------------------------------------


def classifier_request(logprobs: bool = True) -> ChatRequest:
    return replace(chat_request(LLAMA_GUARD, "Is this safe?"), logprobs=logprobs)


async def test_logprobs_are_asked_for_with_top_alternatives_and_read_per_token(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(None, classified("unsafe S1", unsafe=0.75, safe=0.25))

    answer = await client.chat(classifier_request())

    [sent] = scripted_llm.requests
    assert (sent.body["logprobs"], sent.body["top_logprobs"]) == (True, TOP_LOGPROBS)
    assert answer.logprobs is not None
    assert [position.token for position in answer.logprobs] == ["unsafe", " ", "S1"]
    first = answer.logprobs[0]
    assert [token for token, _ in first.top] == ["unsafe", "safe"]
    assert [math.exp(logprob) for _, logprob in first.top] == pytest.approx([0.75, 0.25])


async def test_a_request_without_logprobs_asks_for_none_and_reads_none(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(None, classified("safe", safe=1.0))

    answer = await client.chat(classifier_request(logprobs=False))

    [sent] = scripted_llm.requests
    assert "logprobs" not in sent.body and "top_logprobs" not in sent.body
    assert answer.logprobs is None


async def test_logprobs_of_another_shape_are_none_and_the_answer_stands(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    def answer(logprobs: object) -> dict[str, object]:
        choice = {
            "message": {"role": "assistant", "content": "safe"},
            "finish_reason": "stop",
            "logprobs": logprobs,
        }
        return {"choices": [choice]}

    def position(token: object = "safe", logprob: object = -0.1) -> dict[str, object]:
        return {"token": token, "logprob": logprob, "top_logprobs": [{"token": token, "logprob": logprob}]}

    shapes: list[object] = [
        None,
        "nope",
        {"content": None},
        {"content": []},
        {"content": [{"token": "safe"}]},  # no top_logprobs
        {"content": [position(token=7)]},
        {"content": [position(logprob="-0.1")]},
        {"content": [position(logprob=True)]},
        {"content": [position(logprob=0.5)]},  # a probability above 1
    ]
    for shape in shapes:
        scripted_llm.script(None, raw_body(answer(shape)))
        read = await client.chat(classifier_request())
        assert (read.content, read.logprobs) == ("safe", None), shape
    assert len(scripted_llm.requests) == len(shapes)  # none of them is retried


async def test_only_the_first_tokens_logprobs_are_kept(
    client: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(None, reply(" ".join(["word"] * 20)))

    answer = await client.chat(classifier_request())

    assert answer.logprobs is not None and len(answer.logprobs) == LOGPROB_TOKENS_KEPT
