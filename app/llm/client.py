"""The production LLMClient: structured-output chat completions over OpenAI-compatible HTTP.

Transient faults (429, 5xx, connection errors, timeouts, a 200 with a body of the wrong
shape) are retried with exponential backoff and full jitter, honouring Retry-After; when
retries run out the caller gets LLMUnavailable. What the endpoint says about its limits
(429s, Retry-After on a 429 or 503, OpenAI's x-ratelimit-remaining-* at 0 with their
x-ratelimit-reset-*) goes to the shared limiter, which adapts its cap and pauses the
endpoint for every worker (app/llm/limits.py). A refusal of the request itself (other
4xx) is permanent and raises LLMRequestRejected at once. Both carry the upstream's answer
for operators and a summary in our own words for tenants (see LLMFault). An attempt that
runs far past the endpoint's recent latency is hedged: a second copy is sent and the first
answer wins (app/llm/hedging.py). An endpoint whose attempts keep failing as a down one's do
is not tried again for a while: the caller gets LLMUnavailable at once (app/llm/breaker.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from redis.exceptions import RedisError

from app.config import DEFAULT_MAX_REQUEST_TOKENS, EndpointConfig
from app.deliberation.budget import (
    BYTES_PER_TOKEN,
    MESSAGE_OVERHEAD_TOKENS,
    least_reply_tokens,
    request_tokens,
)
from app.deliberation.ports import (
    ChatReply,
    ChatRequest,
    LLMRequestRejected,
    LLMRequestTooLarge,
    LLMUnavailable,
    TokenLogprobs,
)
from app.llm.breaker import EndpointBreaker
from app.llm.hedging import HedgePolicy
from app.llm.limits import EndpointLimiter, Slot
from app.llm.rates import EndpointRates, Reservation
from app.metrics import LLM_BREAKER_REFUSALS, LLM_HEDGES, LLM_REQUEST_SECONDS, LLM_TOKENS

logger = logging.getLogger(__name__)

# A limiter lease must outlast the longest legitimate attempt, or a slow request loses
# its slot to another worker while still running.
LEASE_MARGIN_S = 15.0
_ERROR_BODY_CHARS = 500
# Alternatives asked per token when a request wants logprobs (OpenAI allows up to 20), and
# the reply's tokens kept: a classifier answers in its first ones.
TOP_LOGPROBS = 10
LOGPROB_TOKENS_KEPT = 8


def _outcome_of(fault: Exception) -> str:
    return fault.kind if isinstance(fault, _TransientFault) else "rejected"


class _EndpointDown(Exception):
    """An attempt refused, unsent, by the open circuit breaker of its endpoint."""

    def __init__(self, refused_for_s: float) -> None:
        super().__init__(f"circuit breaker open for {refused_for_s:.1f} s more")
        self.refused_for_s = refused_for_s


class _TransientFault(Exception):
    """One failed attempt that another attempt may fix. The message is the detail for
    operators; `summary` classifies it for tenants, as LLMFault.summary does."""

    def __init__(
        self, detail: str, summary: str, retry_after_s: float | None = None, kind: str = "bad_body"
    ) -> None:
        super().__init__(detail)
        self.summary = summary
        self.retry_after_s = retry_after_s
        self.kind = kind  # for metrics: rate_limited, server_error, timeout, connection, bad_body


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's)
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class OpenAICompatibleClient:
    """LLMClient over one shared aiohttp session; close it with aclose() or `async with`.

    aiohttp rather than httpx: on the simulated LLM an httpx request cost about 3 ms of
    CPU and an aiohttp one about 0.4 ms, and the workers spend most of their CPU here.
    """

    def __init__(
        self,
        endpoints: dict[str, EndpointConfig],
        limiter: EndpointLimiter | None = None,
        *,
        rates: EndpointRates | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,  # as the setting llm_backoff_base_s
        backoff_max_s: float = 30.0,
        hedging: HedgePolicy | None = None,
        breaker: EndpointBreaker | None = None,
        max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        """
        endpoints: OpenAI-compatible servers by name; requests name one of them.
        limiter: caps simultaneous attempts per endpoint (at its max_concurrency, cut when
            a sustained share of answers is 429) and pauses an endpoint that asks for it;
            None means no cap beyond the server's own.
        rates: enforces each endpoint's requests_per_minute / tokens_per_minute, if set.
        timeout_s: limit on one HTTP attempt, start to last byte.
        max_retries: attempts after the first before giving up with LLMUnavailable.
        backoff_base_s, backoff_max_s: full-jitter exponential backoff between attempts.
        hedging: when to send a second copy of an attempt that runs long; None: never.
        breaker: refuses attempts at an endpoint that keeps failing as a down one does
            (chat raises LLMUnavailable at once); None: every attempt is sent.
        max_request_tokens: the setting llm_max_request_tokens, every endpoint's ceiling.
        """
        self._endpoints = endpoints
        self._limiter = limiter
        self._rates = rates
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._hedging = hedging
        self._breaker = breaker
        self._max_request_tokens = max_request_tokens
        self._session: aiohttp.ClientSession | None = None  # made on first use, in the event loop

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No connection cap of its own: the endpoint limiter is the cap.
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )
        return self._session

    async def aclose(self) -> None:
        """Close the HTTP session and give back the limiter's kept slots."""
        if self._limiter is not None:
            await self._limiter.aclose()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> OpenAICompatibleClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def chat(self, request: ChatRequest) -> ChatReply:
        """Send one chat completion with the request's JSON schema as response_format.

        Raises LLMRequestRejected for an unknown endpoint or a 4xx other than 429,
        LLMRequestTooLarge (unsent) for a request whose prompt leaves the reply too little of
        the endpoint's max_context_tokens or max_request_tokens, whichever is less (a
        max_tokens over what it leaves is lowered to it),
        and LLMUnavailable once max_retries retries of transient faults are spent, or at once
        when the endpoint's breaker is open (its retry_in_s: until it is tried again).
        """
        endpoint = self._endpoints.get(request.endpoint)
        if endpoint is None:
            unknown = f"unknown LLM endpoint {request.endpoint!r}"
            raise LLMRequestRejected(unknown, unknown)
        request = fitted(request, endpoint, self._max_request_tokens)
        # A plain loop, not tenacity: its machinery around each attempt cost a worker 5 % of
        # its CPU at hundreds of calls a second (bench/RESULTS.md, issue 12 target 4).
        attempt = 1
        while True:
            try:
                return await self._hedged(request, endpoint)
            except _EndpointDown as down:
                raise LLMUnavailable(
                    f"endpoint {request.endpoint!r} ({request.role}) is taken for down after "
                    f"attempt {attempt}: {down}",
                    f"the LLM endpoint {request.endpoint!r} is down",
                    retry_in_s=down.refused_for_s,
                ) from None
            except _TransientFault as fault:
                if attempt > self._max_retries:
                    raise LLMUnavailable(
                        f"endpoint {request.endpoint!r} ({request.role}) gave no usable answer in "
                        f"{attempt} attempts; last fault: {fault}",
                        f"{fault.summary} ({attempt} attempts)",
                    ) from fault
                wait_s = self._wait_before_retry(attempt, fault)
                logger.warning(
                    "retrying %s (%s) in %.2f s: attempt %d failed (%s): %s",
                    *(request.endpoint, request.role, wait_s, attempt, fault.kind, fault),
                )
            await asyncio.sleep(wait_s)
            attempt += 1

    def _wait_before_retry(self, attempt: int, fault: _TransientFault) -> float:
        # Full jitter: uniform in [0, the ceiling].
        wait = random.uniform(0, backoff_ceiling_s(self._backoff_base_s, self._backoff_max_s, attempt))
        if fault.retry_after_s is not None:
            wait = max(wait, fault.retry_after_s)
        return wait

    async def _hedged(self, request: ChatRequest, endpoint: EndpointConfig) -> ChatReply:
        """One attempt, and a second copy of it if the first runs past the hedging policy's
        delay (timed from its POST, not its wait for a slot): the first answer wins and the
        other copy is cancelled. Fails only when every copy sent has failed."""
        if (refused_for_s := self._refused_for_s(request.endpoint)) > 0:
            LLM_BREAKER_REFUSALS.labels(request.endpoint, request.role).inc()
            raise _EndpointDown(refused_for_s)
        hedging = self._hedging
        if hedging is None:
            return await self._attempt(request, endpoint)
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()  # the first copy ended, or a hedge is due
        timer: asyncio.TimerHandle | None = None  # the next look at the first copy

        def woken(*_: object) -> None:
            if not wake.done():
                wake.set_result(None)

        def posted() -> None:
            hedging.sent()
            look(loop.time())

        def look(posted_at: float) -> None:
            """Hedge now if the request has run past the delay known now, else look again
            when it would (by the delay known then), or later while none is known yet."""
            nonlocal timer
            if wake.done():  # the first copy ended, a hedge came due, or the caller gave up
                return
            elapsed = loop.time() - posted_at
            if hedging.knows(request.endpoint, request.role):
                delay = hedging.delay_s(request.endpoint, request.role, self._timeout_s)
                if delay is None:
                    return
                if elapsed >= delay:
                    woken()
                    return
                wait = delay - elapsed
            elif elapsed + hedging.look_again_s < self._timeout_s:
                wait = hedging.look_again_s
            else:
                return
            timer = loop.call_later(wait, look, posted_at)

        first = asyncio.create_task(self._attempt(request, endpoint, posted))
        first.add_done_callback(woken)
        copies = [first]
        try:
            await wake
            if first.done():  # nearly always: answered before a hedge was due
                return first.result()
            # Budget first: the breaker may take the hedge for its probe, which must then go.
            if not hedging.spend():
                outcome = "no_budget"
            elif self._refused_for_s(request.endpoint) > 0:
                # The first copy may be the probe, which only its own end can close the
                # breaker with: it is waited for alone, and the hedge, never sent, costs nothing.
                hedging.refund()
                outcome = "breaker_open"
            else:
                outcome = "sent"
                copies.append(asyncio.create_task(self._attempt(request, endpoint)))
            LLM_HEDGES.labels(request.endpoint, request.role, outcome).inc()
            return await _first_answer(copies)
        finally:
            if timer is not None:
                timer.cancel()
            if len(copies) > 1 or not first.done():
                for copy in copies:
                    copy.cancel()  # a no-op on those done; a copy's slot is released as it ends
                await asyncio.gather(*copies, return_exceptions=True)
            elif not first.cancelled():
                first.exception()  # read, if this was cancelled before it could be raised

    def _refused_for_s(self, endpoint: str) -> float:
        """The breaker's word on sending a copy to `endpoint` now (EndpointBreaker.refused_for_s):
        asked once per copy, just before it is sent, as a 0 may make it the probe."""
        return 0.0 if self._breaker is None else self._breaker.refused_for_s(endpoint)

    async def _attempt(
        self, request: ChatRequest, endpoint: EndpointConfig, posted: Callable[[], None] | None = None
    ) -> ChatReply:
        """One copy of an attempt, the breaker having let it go."""
        labels = (request.endpoint, request.role)
        started, outcome = time.monotonic(), "ok"
        try:
            reply = await self._attempt_in_slot(request, endpoint, posted)
        except RedisError as error:  # the shared cap is unreachable for a moment: retry
            outcome = "limiter"
            raise _TransientFault(
                f"limiter: {type(error).__name__}: {error}",
                "the endpoint limiter was unreachable",
                kind=outcome,
            ) from error
        except (_TransientFault, LLMRequestRejected) as fault:
            outcome = _outcome_of(fault)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            LLM_REQUEST_SECONDS.labels(*labels, outcome).observe(time.monotonic() - started)
            if self._breaker is not None:
                self._breaker.ended(request.endpoint, outcome)
        LLM_TOKENS.labels(*labels, "prompt").inc(reply.prompt_tokens)
        LLM_TOKENS.labels(*labels, "completion").inc(reply.completion_tokens)
        return reply

    async def _attempt_in_slot(
        self, request: ChatRequest, endpoint: EndpointConfig, posted: Callable[[], None] | None
    ) -> ChatReply:
        reservation = await self._reserve(request, endpoint)
        async with self._slot(request, endpoint) as slot:
            if posted is not None:
                posted()
            started = time.monotonic()
            answer = await self._post(request, endpoint)
            latency_s = time.monotonic() - started
            retry_after = _retry_after_s(answer.headers.get("Retry-After"), endpoint.retry_after_max_s)
            # For the release, which adapts the cap and pauses the endpoint for everyone.
            slot.succeeded = answer.status < 400
            # Told to slow down: a 429, or a 503 saying when to come back (overloaded).
            slot.rate_limited = answer.status == 429 or (answer.status == 503 and retry_after is not None)
            slot.retry_after_s = (retry_after or 0.0) if slot.rate_limited else 0.0
            slot.pause_s = _spent_s(answer.headers, endpoint.retry_after_max_s)
        _raise_for_status(answer, request.endpoint, retry_after)
        reply = _parse_reply(answer, request, latency_s * 1000)
        if self._hedging is not None:
            self._hedging.observe(request.endpoint, request.role, latency_s)
        if reservation is not None and self._rates is not None:
            try:
                await self._rates.settle(reservation, reply.prompt_tokens + reply.completion_tokens)
            except RedisError:
                # The answer is paid for: keep it rather than buy it again. Its estimate stays
                # in the tokens window, in place of what it used, until the window passes it.
                logger.warning("could not settle a rate reservation on %r", request.endpoint, exc_info=True)
        return reply

    async def _post(self, request: ChatRequest, endpoint: EndpointConfig) -> _Answer:
        """One HTTP attempt, read to the end; transport faults become _TransientFault."""
        try:
            # The session's total timeout bounds the whole attempt, connecting and reading included.
            async with self._http().post(
                f"{endpoint.base_url.rstrip('/')}/chat/completions",
                data=orjson.dumps(chat_payload(request, endpoint)),  # a tenth of json.dumps' CPU
                headers=_headers(endpoint),
            ) as response:
                body = await response.read()
                return _Answer(response.status, response.headers, body)
        except aiohttp.InvalidURL as error:
            raise LLMRequestRejected(
                f"bad base_url for {request.endpoint!r}: {error}",
                f"the LLM endpoint {request.endpoint!r} has an invalid base_url (a server setting)",
            ) from error
        except TimeoutError as error:
            detail = str(error) or f"no complete answer within {self._timeout_s} s"
            summary = f"the LLM endpoint {request.endpoint!r} timed out"
            raise _TransientFault(f"Timeout: {detail}", summary, kind="timeout") from error
        except aiohttp.ClientConnectorError as error:
            summary = f"could not connect to the LLM endpoint {request.endpoint!r}"
            raise _TransientFault(f"ConnectError: {error}", summary, kind="connection") from error
        except aiohttp.ClientError as error:  # reset, closed early, bad framing
            summary = f"the connection to the LLM endpoint {request.endpoint!r} failed"
            raise _TransientFault(f"{type(error).__name__}: {error}", summary, kind="connection") from error

    async def _reserve(self, request: ChatRequest, endpoint: EndpointConfig) -> Reservation | None:
        if self._rates is None or not (endpoint.requests_per_minute or endpoint.tokens_per_minute):
            return None
        # Before the answer only an estimate exists: ~4 characters a token, plus the ceiling.
        estimate = sum(len(m["content"]) for m in request.messages) // 4 + request.max_tokens
        return await self._rates.reserve(
            request.endpoint, endpoint.requests_per_minute, endpoint.tokens_per_minute, estimate
        )

    def _slot(self, request: ChatRequest, endpoint: EndpointConfig) -> AbstractAsyncContextManager[Slot]:
        if self._limiter is None:
            return nullcontext(Slot())
        lease_s = self._timeout_s + LEASE_MARGIN_S
        return self._limiter.slot(request.endpoint, endpoint.max_concurrency, lease_s)


async def _first_answer(copies: list[asyncio.Task[ChatReply]]) -> ChatReply:
    """The first reply of these copies of one attempt: the first sent, then its hedge if it
    ran long. A fault of the first copy waits for the hedge; a fault of the hedge ends the
    attempt, for the first copy has already run past the hedging delay and is probably hung:
    the retry, after its backoff, comes sooner than that copy's timeout. The fault raised is
    a refusal of the request if one was refused (another attempt cannot fix that), else the
    last one."""
    faults: list[BaseException] = []
    pending = set(copies)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for copy in done:
            fault = copy.exception()
            if fault is None:
                return copy.result()
            faults.append(fault)
        if copies[-1] in done:
            break
    raise next((f for f in faults if not isinstance(f, _TransientFault)), faults[-1])


def fitted(request: ChatRequest, endpoint: EndpointConfig, max_request_tokens: int) -> ChatRequest:
    """The request, with max_tokens lowered to what the endpoint's max_context_tokens, or the
    server's max_request_tokens if less, leaves if it asks for more (a re-ask after truncation
    doubles it); refused, unsent, when the prompt leaves less than least_reply_tokens."""
    context = endpoint.max_context_tokens
    if context is not None and context <= max_request_tokens:
        limit, limit_named = context, f"its max_context_tokens of {context:,}"
    else:
        limit = max_request_tokens
        limit_named = f"the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS of {limit:,}"
    characters = sum(len(m["content"]) for m in request.messages)
    # Not counted when a bound on the count fits: every call's encode and schema dump cost
    # 12 µs, 1 % of the machine's CPU per call at cap 256 (bench/RESULTS.md, target 4).
    if _most_prompt_tokens(request, characters) + request.max_tokens <= limit:
        return request
    # Each character is a byte at least: a prompt with this many is over the limit before its
    # bytes are counted, which would encode all of it (megabytes, on the event loop).
    least_prompt = characters // BYTES_PER_TOKEN
    prompt = least_prompt if least_prompt > limit else request_tokens(request.messages, request.schema, 0)
    room = limit - prompt
    if room >= request.max_tokens:
        return request
    if room < least_reply_tokens(request.max_tokens):
        too_large = (
            f"role '{request.role}' would send endpoint '{request.endpoint}' a request of about "
            f"{prompt + request.max_tokens:,} tokens with max_tokens, over {limit_named}; not sent"
        )
        raise LLMRequestTooLarge(too_large, too_large)
    return dataclasses.replace(request, max_tokens=room)


def _most_prompt_tokens(request: ChatRequest, characters: int) -> int:
    """At least request_tokens(request.messages, request.schema, 0), `characters` the
    messages' total, in about a tenth of its time: 4 bytes a character, a token of rounding
    and MESSAGE_OVERHEAD_TOKENS a message, and 6 bytes for each of the schema's in compact
    UTF-8 (orjson), as json.dumps writes it at most (\\u007f for DEL; 3 for other characters,
    2 for a separator)."""
    messages = len(request.messages) * (MESSAGE_OVERHEAD_TOKENS + 1)
    schema = -(-6 * len(orjson.dumps(request.schema)) // BYTES_PER_TOKEN) if request.schema else 0
    return 4 * characters // BYTES_PER_TOKEN + messages + schema


def chat_payload(request: ChatRequest, endpoint: EndpointConfig) -> dict[str, Any]:
    """The chat completion request's JSON body, online or as a batch line's `body`."""
    payload: dict[str, Any] = {
        "model": request.model,
        "messages": request.messages,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    if request.logprobs:
        payload |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
    if request.schema is None:  # a plain-text classifier (Llama Guard): its template rules
        return payload
    if endpoint.response_format == "json_object":
        # llama-cpp-python's server: JSON mode with the schema compiled into a grammar
        payload["response_format"] = {"type": "json_object", "schema": request.schema}
    else:
        payload["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": request.schema_name, "schema": request.schema, "strict": True},
        }
    return payload


def _headers(endpoint: EndpointConfig) -> dict[str, str]:
    if endpoint.api_key:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {endpoint.api_key}"}
    return {"Content-Type": "application/json"}


_RETRYABLE = {408, 409, 425, 429}  # timeout, conflict, too early, rate limited


def _raise_for_status(answer: _Answer, endpoint_name: str, retry_after_s: float | None) -> None:
    """The status alone classifies a failure for tenants: the body may echo the request
    and its headers, so only the detail for operators quotes it."""
    status = answer.status
    if status < 400:
        return
    detail = f"HTTP {status}: {answer.text[:_ERROR_BODY_CHARS]}"
    if status in _RETRYABLE or status >= 500:
        kind = "rate_limited" if status == 429 else "server_error"
        summary = f"the LLM endpoint {endpoint_name!r} answered HTTP {status}"
        raise _TransientFault(detail, summary, retry_after_s, kind)
    raise LLMRequestRejected(
        detail, f"the LLM endpoint {endpoint_name!r} rejected the request (HTTP {status})"
    )


def backoff_ceiling_s(base_s: float, max_s: float, attempt: int) -> float:
    """The longest wait before retrying after failed attempt number `attempt` (1: the first):
    `base_s`, doubling with each attempt, at most `max_s`."""
    return min(max_s, base_s * 2.0 ** (attempt - 1))


def _retry_after_s(value: str | None, max_s: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), at most
    max_s; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return min(max(0.0, float(value)), max_s)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; obsolete formats may omit it
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), max_s)


def _spent_s(headers: Mapping[str, str], max_s: float) -> float:
    """How long every request to this endpoint should wait because a budget the endpoint
    reports (x-ratelimit-remaining-requests or -tokens) is spent: the longest of their
    x-ratelimit-reset-*, at most max_s; 0 when none is spent. Unreadable headers are ignored."""
    waits = [
        _duration_s(headers.get(f"x-ratelimit-reset-{budget}"))
        for budget in ("requests", "tokens")
        if headers.get(f"x-ratelimit-remaining-{budget}", "").strip() == "0"
    ]
    return min(max((w for w in waits if w is not None), default=0.0), max_s)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration_s(value: str | None) -> float | None:
    """Seconds in an x-ratelimit-reset-* header: OpenAI's "1s", "6m0s", "250ms", "1h2m3.5s",
    or a bare number of seconds."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or "".join(n + unit for n, unit in parts) != value:
            return None
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit] for n, unit in parts)
    return seconds if seconds >= 0 and seconds != float("inf") else None


class UnreadableCompletion(ValueError):
    """A body that is not a chat completion."""


def _parse_reply(answer: _Answer, request: ChatRequest, latency_ms: float) -> ChatReply:
    # A 200 of the wrong shape is a proxy or server hiccup, not an answer: retry it.
    try:
        return completion_reply(_decoded(answer.body), request.model, latency_ms, request.logprobs)
    except (ValueError, UnreadableCompletion) as error:
        raise _TransientFault(
            f"unexpected 200 body ({error}): {answer.text[:_ERROR_BODY_CHARS]}",
            f"the LLM endpoint {request.endpoint!r} answered HTTP 200 without a chat completion",
        ) from error


def _decoded(body: bytes) -> Any:
    """The JSON body, by orjson (a quarter of json's CPU); what orjson refuses and json reads (a
    lone surrogate, NaN) is read as before, by json. (orjson reads an integer past 64 bits as a
    float, json as an int: no count in a reply is that large.)"""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def completion_reply(body: Any, model: str, latency_ms: float, logprobs: bool = False) -> ChatReply:
    """The reply in a chat completion's decoded JSON body (online, or a batch output line's);
    `model`: the one asked for, if the body names none; `logprobs`: whether they were asked
    for. UnreadableCompletion if it is not one."""
    try:
        choice = body["choices"][0]
        message = choice["message"]
        content = message.get("content")
        refusal = message.get("refusal")
        finish_reason = choice.get("finish_reason")
        usage = body.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        model = body.get("model") or model
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as error:
        raise UnreadableCompletion(f"{type(error).__name__}: {error}") from error
    if not all(isinstance(v, str | None) for v in (content, refusal, finish_reason, model)):
        raise UnreadableCompletion(f"unexpected field types: {repr(body)[:_ERROR_BODY_CHARS]}")
    return ChatReply(
        content=content or "",
        finish_reason=finish_reason,
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=latency_ms,
        refusal=refusal,
        cached_prompt_tokens=_cached_tokens(usage),
        logprobs=_logprobs(choice) if logprobs else None,
    )


def _cached_tokens(usage: dict[str, Any]) -> int:
    """`usage.prompt_tokens_details.cached_tokens` (OpenAI, vLLM); 0 when absent or not a
    count: a server that says nothing about its cache is billed at the input price."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached > 0 else 0


def _logprobs(choice: dict[str, Any]) -> tuple[TokenLogprobs, ...] | None:
    """`choices[0].logprobs.content` (OpenAI, vLLM, llama.cpp's server): the first tokens with
    their top alternatives. None when absent or not of that shape: the probabilities are an
    extra a classifier reads if it can, and its text answer stands without them."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    try:
        return tuple(
            TokenLogprobs(
                _token(entry["token"]),
                tuple((_token(alt["token"]), _logprob(alt["logprob"])) for alt in entry["top_logprobs"]),
            )
            for entry in content[:LOGPROB_TOKENS_KEPT]
        )
    except (KeyError, TypeError, ValueError):
        return None


def _token(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a token is not a string")
    return value


def _logprob(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value <= 0:  # NaN too
        raise ValueError("a logprob is not a number at most 0")
    return float(value)
