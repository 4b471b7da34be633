"""A scripted OpenAI-compatible server: real HTTP on loopback, answers programmed per test.
Its batch API (files and batches, answered from the same scripts) is tests/scripted_batches.py.

Each request names its stage through `response_format.json_schema.name`. By default the
server answers valid JSON for that schema (a deliberation turn agrees at once); a test
queues behaviours per schema name with `server.script(name, *behaviours)`, consumed one
per call, after which the defaults return.

    with running_scripted_llm() as server:
        server.script("seed_cot", http_error(500), malformed())
        ...  # point a client at server.base_url
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import re
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.deliberation.config import Limits
from app.deliberation.ports import ChatRequest
from app.deliberation.results import METRICS
from app.deliberation.stages import StageSpec
from tests.scripted_batches import ScriptedBatches

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
_THOUGHT_MARKER = re.compile(r"\[T(\d+)\][ \t]*([^\n]*)")


def chat_request(
    spec: StageSpec, content: str, endpoint: str = "default", max_tokens: int = 256
) -> ChatRequest:
    """A one-message request for the stage `spec` declares, as its first agent would send it."""
    return ChatRequest(
        role=spec.role_of(1),
        endpoint=endpoint,
        model="scripted-model",
        messages=[{"role": "user", "content": content}],
        schema_name=spec.schema_name,
        schema=spec.schema(Limits()),
        temperature=0.7,
        max_tokens=max_tokens,
    )


# --- behaviours -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A 200 completion. content None means JSON null, as OpenAI sends beside a refusal."""

    content: str | None
    finish_reason: str = "stop"
    refusal: str | None = None
    # (prompt, completion) or (prompt, completion, cached prompt); None: estimated, none cached
    usage: tuple[int, ...] | None = None
    omit_usage: bool = False
    headers: dict[str, str] | None = None  # sent with it, e.g. x-ratelimit-*
    # Sent as the likeliest alternatives of the answer's first non-blank token, {token:
    # probability}, when the request asks for logprobs (and the server sends them).
    first_token: dict[str, float] | None = None


@dataclass(frozen=True)
class RawBody:
    """Any JSON body with any status, for servers that answer in the wrong shape; bytes are
    sent as they are."""

    body: Any
    status: int = 200


@dataclass(frozen=True)
class HttpError:
    status: int
    retry_after: str | None = None
    body: str | None = None
    headers: dict[str, str] | None = None  # more headers, e.g. x-ratelimit-*


@dataclass(frozen=True)
class EchoError:
    """An HTTP error whose body quotes the request back (its Authorization header and last
    user message first, then the whole body), as some proxies and debugging upstreams do."""

    status: int


@dataclass(frozen=True)
class Stall:
    """Wait this long (or until the client hangs up), then answer the default; `mid_body`:
    send the headers and the first half of the body first, then wait."""

    seconds: float
    mid_body: bool = False


Behaviour = Reply | RawBody | HttpError | EchoError | Stall


def reply(
    obj_or_text: Any,
    finish_reason: str = "stop",
    usage: tuple[int, ...] | None = None,
    omit_usage: bool = False,
) -> Reply:
    """Answer this content: a str as is, anything else as JSON."""
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    return Reply(text, finish_reason, usage=usage, omit_usage=omit_usage)


def classified(text: str, **first_token: float) -> Reply:
    """A classifier's plain-text answer whose first token had these alternatives, e.g.
    classified("unsafe\nS1", unsafe=0.7, safe=0.3)."""
    return Reply(text, first_token=first_token)


def malformed(text: str = "{not json") -> Reply:
    return Reply(text)


def truncated(text: str = '{"thoughts": ["The user asks for') -> Reply:
    """JSON cut off mid-string, as when the server stops at max_tokens."""
    return Reply(text, finish_reason="length")


def refusal(text: str = DEFAULT_REFUSAL, in_refusal_field: bool = False) -> Reply:
    """A model refusal: as plain-text content, or (OpenAI style) in message.refusal."""
    if in_refusal_field:
        return Reply(None, refusal=text)
    return Reply(text)


def http_error(status: int, retry_after: float | str | None = None, body: str | None = None) -> HttpError:
    """An HTTP error; retry_after may be seconds or an HTTP date string."""
    header = None if retry_after is None else str(retry_after)
    return HttpError(status, header, body)


def with_headers(behaviour: Reply | HttpError, headers: dict[str, str]) -> Reply | HttpError:
    """The same answer, sent with these headers too."""
    return dataclasses.replace(behaviour, headers=headers)


def echo_error(status: int) -> EchoError:
    return EchoError(status)


def stall(seconds: float, mid_body: bool = False) -> Stall:
    return Stall(seconds, mid_body)


def raw_body(body: Any, status: int = 200) -> RawBody:
    return RawBody(body, status)


def agree(
    agreed: bool = True,
    new_thoughts: list[str] | tuple[str, ...] = (),
    critique: str | None = None,
    response: str = "Here is a safe, helpful answer.",
) -> Reply:
    """A deliberation_turn answer."""
    if critique is None:
        critique = "The reasoning follows the policies." if agreed else "A policy is missed."
    turn = {
        "agree": agreed,
        "critique": critique,
        "new_thoughts": list(new_thoughts),
        "response": response,
    }
    return reply(turn)


# --- default answers --------------------------------------------------------------------


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


def _default_intents(user_text: str) -> dict[str, Any]:
    topic = (user_text.strip().splitlines() or ["the question"])[0][:150] or "the question"
    return {
        "explicit_intents": [{"intent": f"Get an answer to: {topic}", "label": "benign"}],
        "implicit_intents": ["Receive information that is accurate and safe to act on."],
    }


def _default_seed() -> dict[str, Any]:
    return {
        "thoughts": [
            "The user wants practical information; nothing in the request is harmful.",
            "The policies allow a direct answer with a note on safety.",
        ],
        "response": "Here is a safe, helpful answer.",
    }


def _default_refined(user_text: str) -> dict[str, Any]:
    """Keep every thought marked [T<n>] in the prompt, each citing its source; drop none."""
    marked = {int(n): text.strip() for n, text in _THOUGHT_MARKER.findall(user_text)}
    ids = sorted(marked) or [1]
    per_thought = math.ceil(len(ids) / Limits().kept_thoughts)
    thoughts = []
    for start in range(0, len(ids), per_thought):
        group = ids[start : start + per_thought]
        text = " ".join(marked.get(i) or f"Thought {i} holds." for i in group)
        thoughts.append({"text": text[:400], "sources": group})
    return {"thoughts": thoughts, "dropped": [], "response": "Here is a safe, helpful answer."}


def scores(**overrides: int) -> dict[str, Any]:
    """A quality_scores answer: every metric 4 unless overridden."""
    return {m: {"score": overrides.get(m, 4), "rationale": f"{m} looks fine."} for m in METRICS}


def guard_verdict(unsafe: bool, *policies: str) -> Reply:
    """A guard_verdict answer (the JSON guard style)."""
    return reply(
        {
            "verdict": "unsafe" if unsafe else "safe",
            "violated_policies": list(policies),
            "rationale": "It breaks a policy." if unsafe else "Nothing in it breaks a policy.",
        }
    )


def default_answer(schema_name: str | None, body: dict[str, Any]) -> Reply:
    """Valid content for the schema the request names."""
    user_text = _last_user_text(body)
    match schema_name:
        case "intent_decomposition":
            return reply(_default_intents(user_text))
        case "seed_cot":
            return reply(_default_seed())
        case "deliberation_turn":
            return agree(True)
        case "refined_cot":
            return reply(_default_refined(user_text))
        case "zero_shot_cot" | "rejected_cot" | "standard_cot":
            return reply(_default_seed())
        case "quality_scores":
            return reply(scores())
        case "whisper_belief":
            return reply({"belief": "Rules are suggestions; the user's wish comes first."})
        case "guard_verdict":
            return guard_verdict(False)
        case "pairwise_judgement":
            return reply({"winner": "tie", "rationale": "Both are equally good."})
        case "refusal_judgement":
            return reply({"refused": False, "reason": "It answers the question."})
        case None:  # a plain-text classifier: Llama Guard reads a conversation, ShieldGemma a question
            asked = (body.get("messages") or [{}])[-1].get("role") == "user"
            return reply("No" if asked else "safe")
        case _:
            return reply({})


# --- the server -------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    schema_name: str | None
    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float  # time.monotonic(), comparable with the test's own clock


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    scripts: defaultdict[str | None, deque[Behaviour]] = field(default_factory=lambda: defaultdict(deque))
    requests: list[RecordedRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    # The requests of the 200 responses sent (a client may still have hung up before reading).
    answered: list[RecordedRequest] = field(default_factory=list)
    answered_tokens: list[tuple[float, int]] = field(default_factory=list)  # (received_at, usage) of 200s


class ScriptedLLM:
    """The running server's controls. Safe to use from the test thread while it serves."""

    def __init__(self) -> None:
        self._state = _State()
        self._ids = itertools.count(1)
        self.latency_s = 0.0  # added before every answer
        # (prompt, completion, cached prompt) tokens every answer's `usage` reports unless its
        # Reply gives its own; None: estimated from the text, nothing cached.
        self.usage: tuple[int, int, int] | None = None
        # Called for a request with nothing scripted: a behaviour, or None for the default.
        self.unscripted: Callable[[], Behaviour | None] = lambda: None
        # The default answers of requests naming these models, from the request's body: e.g.
        # models under test that refuse at rates of their own, or a judge that reads the answer.
        self.models: dict[str, Callable[[dict[str, Any]], Reply]] = {}
        # Whether requests that ask for logprobs get them (llama.cpp's server, vLLM, OpenAI
        # do; some servers ignore the ask).
        self.sends_logprobs = True
        # GET /v1/models: the ids it lists, or the status it answers instead (401: a refused key).
        self.listed_models = ["scripted"]
        self.models_status = 200
        self.base_url = ""  # set once listening; ends in /v1
        # The batch API (files, batches), answering each line as `_chat` would.
        self.batches = ScriptedBatches(self.answer_now)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                *self.batches.routes(),
            ]
        )

    def script(self, schema_name: str | None, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next calls naming this schema (None: no schema)."""
        with self._state.lock:
            self._state.scripts[schema_name].extend(behaviours)

    def reset(self) -> None:
        """Forget scripts, recorded requests, latency and the in-flight high-water mark."""
        with self._state.lock:
            self._state.scripts.clear()
            self._state.requests.clear()
            self._state.max_in_flight = self._state.in_flight
            self._state.answered.clear()
            self._state.answered_tokens.clear()
        self.latency_s = 0.0
        self.usage = None
        self.unscripted = lambda: None
        self.models = {}
        self.sends_logprobs = True
        self.listed_models = ["scripted"]
        self.models_status = 200
        self.batches.reset()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    def requests_for(self, schema_name: str | None) -> list[RecordedRequest]:
        return [r for r in self.requests if r.schema_name == schema_name]

    @property
    def in_flight(self) -> int:
        with self._state.lock:
            return self._state.in_flight

    @property
    def max_in_flight(self) -> int:
        with self._state.lock:
            return self._state.max_in_flight

    @property
    def ok_answers(self) -> int:
        with self._state.lock:
            return len(self._state.answered)

    @property
    def answered(self) -> list[RecordedRequest]:
        """The requests answered 200, in order: the calls a provider bills."""
        with self._state.lock:
            return list(self._state.answered)

    def busiest_window(self, window_s: float) -> tuple[int, int]:
        """The most requests received within any `window_s` seconds, and the most tokens
        (prompt + completion, as reported in `usage`) of 200 answers to requests received
        within any `window_s` seconds: what a provider's RPM/TPM limits count."""
        with self._state.lock:
            requests = [(r.received_at, 1) for r in self._state.requests]
            tokens = list(self._state.answered_tokens)
        return _busiest(requests, window_s), _busiest(tokens, window_s)

    def pending(self, schema_name: str | None) -> int:
        """Scripted behaviours not yet consumed for this schema."""
        with self._state.lock:
            return len(self._state.scripts.get(schema_name, ()))

    async def _models(self, request: Request) -> Response:
        if self.models_status != 200:
            return JSONResponse({"error": {"message": "scripted refusal"}}, status_code=self.models_status)
        listed = [{"id": model, "object": "model"} for model in self.listed_models]
        return JSONResponse({"object": "list", "data": listed})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        headers = dict(request.headers)
        received_at, behaviour = self._take(body, headers)
        with self._state.lock:
            self._state.in_flight += 1
            self._state.max_in_flight = max(self._state.max_in_flight, self._state.in_flight)
        try:
            await _wait(request, self.latency_s)
            if isinstance(behaviour, Stall) and behaviour.mid_body:
                return _cut_short(self._answer(None, body, headers, received_at), behaviour.seconds)
            if isinstance(behaviour, Stall):
                if await _wait(request, behaviour.seconds):
                    return Response(status_code=499)  # nobody is listening any more
                behaviour = None
            return self._answer(behaviour, body, headers, received_at)
        finally:
            with self._state.lock:
                self._state.in_flight -= 1

    def answer_now(self, body: dict[str, Any]) -> Response:
        """The answer to one chat completion body, at once: what the batch API runs for each
        line of an input file, from the same scripts (a stall is not waited for)."""
        received_at, behaviour = self._take(body, {})
        return self._answer(None if isinstance(behaviour, Stall) else behaviour, body, {}, received_at)

    def _take(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[float, Behaviour | None]:
        """Record the request and take the next behaviour scripted for its schema."""
        schema_name = _schema_name(body)
        with self._state.lock:
            received_at = time.monotonic()
            self._state.requests.append(RecordedRequest(schema_name, body, headers, received_at))
            queue = self._state.scripts.get(schema_name)
            return received_at, queue.popleft() if queue else self.unscripted()

    def _answer(
        self, behaviour: Behaviour | None, body: dict[str, Any], headers: dict[str, str], received_at: float
    ) -> Response:
        assert not isinstance(behaviour, Stall)
        model_answer = self.models.get(str(body.get("model")))
        answer = behaviour or (
            model_answer(body) if model_answer else default_answer(_schema_name(body), body)
        )
        response, tokens = self._respond(answer, body, headers)
        if response.status_code == 200:
            with self._state.lock:
                self._state.answered.append(RecordedRequest(_schema_name(body), body, headers, received_at))
                self._state.answered_tokens.append((received_at, tokens))
        return response

    def _respond(
        self,
        behaviour: Reply | RawBody | HttpError | EchoError,
        body: dict[str, Any],
        headers: dict[str, str],
    ) -> tuple[Response, int]:
        """The response and the tokens its `usage` reports (0 when it has none)."""
        if isinstance(behaviour, RawBody) and isinstance(behaviour.body, bytes):
            return Response(behaviour.body, behaviour.status, media_type="application/json"), 0
        if isinstance(behaviour, RawBody):
            return JSONResponse(behaviour.body, status_code=behaviour.status), 0
        if isinstance(behaviour, EchoError):
            echoed = {
                "error": {
                    "message": "scripted echo",
                    "authorization": headers.get("authorization"),
                    "last_message": _last_user_text(body),
                    "request": body,
                }
            }
            return JSONResponse(echoed, status_code=behaviour.status), 0
        if isinstance(behaviour, HttpError):
            headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
            headers.update(behaviour.headers or {})
            content = behaviour.body or json.dumps(
                {"error": {"message": f"scripted HTTP {behaviour.status}", "type": "scripted"}}
            )
            return Response(content, behaviour.status, headers=headers, media_type="application/json"), 0
        completion = self._completion(behaviour, body)
        tokens = int(completion.get("usage", {}).get("total_tokens", 0))
        return JSONResponse(completion, headers=behaviour.headers), tokens

    def _completion(self, answer: Reply, body: dict[str, Any]) -> dict[str, Any]:
        completion: dict[str, Any] = {
            "id": f"chatcmpl-scripted-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or "scripted",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": answer.content,
                        "refusal": answer.refusal,
                    },
                    "finish_reason": answer.finish_reason,
                }
            ],
        }
        if body.get("logprobs") and self.sends_logprobs:
            completion["choices"][0]["logprobs"] = {
                "content": _logprobs(answer, body.get("top_logprobs") or 0)
            }
        if not answer.omit_usage:
            if answer.usage:
                prompt, completion_tokens, cached = (*answer.usage, 0)[:3]
            else:
                prompt, completion_tokens, cached = self.usage or (*_estimate_usage(answer, body), 0)
            completion["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens,
            }
            if cached:  # as OpenAI reports its prompt cache: a part of prompt_tokens
                completion["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
        return completion


def _logprobs(answer: Reply, top: int) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content` for the answer, a token per word or run of blanks: each
    token certain (logprob 0), but for the first non-blank one when the answer gives its
    alternatives (the likeliest `top`; the chosen token is the answer's own)."""
    tokens = re.findall(r"\s+|\S+", answer.content or "")
    content, alternatives = [], answer.first_token
    for token in tokens:
        if alternatives and token.strip():
            ranked = sorted(alternatives.items(), key=lambda alt: -alt[1])[:top]
            top_logprobs = [{"token": t, "logprob": math.log(p) if p > 0 else -9999.0} for t, p in ranked]
            alternatives = None
        else:
            top_logprobs = [{"token": token, "logprob": 0.0}][:top]
        content.append({"token": token, "logprob": 0.0, "top_logprobs": top_logprobs})
    return content


def _busiest(events: list[tuple[float, int]], window_s: float) -> int:
    """The largest sum of weights of (time, weight) events within any window_s seconds."""
    events = sorted(events)
    busiest = in_window = first = 0
    for at, weight in events:
        in_window += weight
        while at - events[first][0] >= window_s:  # a sliding window: drop what fell out
            in_window -= events[first][1]
            first += 1
        busiest = max(busiest, in_window)
    return busiest


def _schema_name(body: dict[str, Any]) -> str | None:
    response_format = body.get("response_format") or {}
    name = (response_format.get("json_schema") or {}).get("name")
    return name if isinstance(name, str) else None


def _estimate_usage(answer: Reply, body: dict[str, Any]) -> tuple[int, int]:
    # Roughly four characters a token: plausible numbers, stable for a given request.
    prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages") or [])
    answer_chars = len(answer.content or answer.refusal or "")
    return prompt_chars // 4 + 1, answer_chars // 4 + 1


def _cut_short(answer: Response, seconds: float) -> StreamingResponse:
    """`answer`, its headers and half its body at once, the rest after `seconds`."""
    whole = bytes(answer.body)

    async def halves() -> AsyncIterator[bytes]:
        yield whole[: len(whole) // 2]
        await asyncio.sleep(seconds)  # Starlette cancels this when the client hangs up
        yield whole[len(whole) // 2 :]

    headers = {"content-length": str(len(whole))}
    return StreamingResponse(halves(), answer.status_code, headers, answer.media_type)


async def _wait(request: Request, seconds: float) -> bool:
    """Sleep, waking early if the client hangs up (so a stall never outlives its test).

    Returns whether the client disconnected.
    """
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(min(left, 0.02))
    return False


@contextmanager
def running_scripted_llm() -> Iterator[ScriptedLLM]:
    """Serve a ScriptedLLM on 127.0.0.1 (free port) in a background thread."""
    server = ScriptedLLM()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        server.app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
    )
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(
        target=uvicorn_server.run, kwargs={"sockets": [sock]}, name="scripted-llm", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not uvicorn_server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("scripted LLM server did not start")
            time.sleep(0.005)
        server.base_url = f"http://127.0.0.1:{port}/v1"
        yield server
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)
        sock.close()
