"""A latency-simulating OpenAI-compatible server for benchmarks (one process, asyncio).

    python -m bench.sim_llm --port 9100 --latency-ms 200 --jitter-ms 20 --tokens-per-s 0 \
        --max-concurrency 0 --fault-5xx 0 --fault-429 0 --fault-stall 0 --fault-truncated 0 --seed 1 \
        --agree-prob 0 --rpm-limit 0 --rpm-burst-s 1

`POST /v1/chat/completions` answers valid JSON for the schema the request names in
`response_format.json_schema.name` (intent_decomposition, seed_cot, deliberation_turn,
refined_cot), after a simulated latency: latency-ms plus uniform jitter in
[-jitter-ms, +jitter-ms], plus completion tokens / tokens-per-s when that is > 0.
A deliberation turn agrees from the --agree-after'th turn of its prompt on (1: at once),
read from the "agent X of Y, in round R" line of the request. With --agree-prob P an earlier
turn agrees with probability P, drawn from a hash of the seed, the prompt and the turn, so a
retried turn answers the same and every run of a job deliberates the same number of turns.
With --rewrite a turn that disagrees rewrites the response whole, to one of two texts of 192
words in turn, as costly to diff as a revision gets on the viewer's item page
(bench/key_threads.py).

Faults are probabilities per request, drawn once from one seeded generator, in this
order: --fault-5xx (HTTP 503 after the latency), --fault-429 (at once, Retry-After: 1),
--fault-stall (nothing until the client hangs up or --stall-s pass, then a normal answer),
--fault-truncated (half the JSON, finish_reason "length"). With --max-concurrency N > 0 a request arriving
while N are in flight (still, HANG_UP_GRACE_S later: a hang-up sent just before it may be read
just after it) gets 429 and counts as a cap violation.

With --rpm-limit N > 0 the server is rate limited like a hosted API: a token bucket holding
N x --rpm-burst-s / 60 requests, refilled at N/60 a second; a request arriving at an empty
bucket gets 429 with Retry-After (whole seconds until a request is allowed again) and is
counted as rate_limited (it takes no token). --ratelimit-headers adds OpenAI's
x-ratelimit-limit-requests, x-ratelimit-remaining-requests and x-ratelimit-reset-requests
(time until the bucket is full, e.g. "1.2s") to every answer, and retry-after-ms to a 429.

`GET /stats` returns counters (requests, per schema, in flight, max in flight, time-averaged
in flight, faults, cap violations, simulated latency, tokens); `POST /stats/reset` zeroes
them. `GET /v1/models` lists one model.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MODEL_ID = "sim-llm"
# How long a request over the cap waits for a hang-up already sent to be read (_drops_below).
HANG_UP_GRACE_S = 0.02
_TURN_LINE = re.compile(r"You are agent (\d+) of (\d+), in round (\d+)")
_THOUGHT_MARKER = re.compile(r"\[T(\d+)\][ \t]*(?:\([^)]*\)[ \t]*)?([^\n]*)")
_BLOCK = r"{label}:\n<<<\n(.*?)\n>>>"
_MAX_REFINED_THOUGHTS = 12  # refined_cot's maxItems
_MAX_SOURCES = 8  # refined_cot's sources maxItems


@dataclass(frozen=True)
class SimConfig:
    latency_ms: float = 200.0
    jitter_ms: float = 20.0
    tokens_per_s: float = 0.0
    max_concurrency: int = 0
    fault_5xx: float = 0.0
    fault_429: float = 0.0
    fault_stall: float = 0.0
    fault_truncated: float = 0.0
    stall_s: float = 600.0
    agree_after: int = 1
    agree_prob: float = 0.0
    rewrite: bool = False
    rpm_limit: int = 0
    rpm_burst_s: float = 1.0
    ratelimit_headers: bool = False
    seed: int = 1


@dataclass
class SimStats:
    requests: int = 0  # every POST /v1/chat/completions, faults and cap refusals included
    answered: int = 0  # 200s (truncated answers included)
    # the same per user query (`user_query`): per item, as each item has its own prompt
    answered_by_query: Counter[str] = field(default_factory=Counter)
    by_schema: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    cap_violations: int = 0
    rate_limited: int = 0  # 429s of --rpm-limit
    # requests let through by the rate limit and refused by it, per second since the first
    admitted_by_second: list[int] = field(default_factory=list)
    rate_limited_by_second: list[int] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    simulated_latency_ms_sum: float = 0.0  # the sleeps the server chose, over every request that slept
    slept: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # in-flight integrated over time, for the time-averaged concurrency while busy
    in_flight_area_s: float = 0.0
    # the same per half second since the first request: where a run loses concurrency
    in_flight_area_by_half_second: list[float] = field(default_factory=list)
    last_change: float | None = None
    first_request: float | None = None
    last_response: float | None = None

    def change_in_flight(self, delta: int) -> None:
        now = time.monotonic()
        if self.last_change is not None:
            self.in_flight_area_s += self.in_flight * (now - self.last_change)
            if self.first_request is not None:
                self._charge_halves(max(self.last_change, self.first_request), now)
        self.last_change = now
        self.in_flight += delta
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _charge_halves(self, start: float, end: float) -> None:
        """Add in_flight x time over [start, end] to the half-second buckets it spans."""
        assert self.first_request is not None
        by_half = self.in_flight_area_by_half_second
        while start < end:
            bucket = int((start - self.first_request) / 0.5)
            if self.first_request + (bucket + 1) * 0.5 <= start:  # float rounding at a boundary
                bucket += 1
            bucket_end = min(end, self.first_request + (bucket + 1) * 0.5)
            by_half.extend([0.0] * (bucket + 1 - len(by_half)))
            by_half[bucket] += self.in_flight * (bucket_end - start)
            start = bucket_end

    def count_arrival(self, rate_limited: bool) -> None:
        assert self.first_request is not None
        second = int(time.monotonic() - self.first_request)
        series = self.rate_limited_by_second if rate_limited else self.admitted_by_second
        series.extend([0] * (second + 1 - len(series)))
        series[second] += 1

    def snapshot(self) -> dict[str, Any]:
        busy_s = (
            self.last_response - self.first_request
            if self.first_request is not None and self.last_response is not None
            else 0.0
        )
        return {
            "requests": self.requests,
            "answered": self.answered,
            "by_schema": dict(self.by_schema),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "mean_in_flight_while_busy": self.in_flight_area_s / busy_s if busy_s > 0 else 0.0,
            "mean_in_flight_by_half_second": [round(a / 0.5, 1) for a in self.in_flight_area_by_half_second],
            "busy_s": busy_s,
            "cap_violations": self.cap_violations,
            "rate_limited": self.rate_limited,
            "admitted_by_second": self.admitted_by_second,
            "rate_limited_by_second": self.rate_limited_by_second,
            "faults": dict(self.faults),
            "simulated_latency_ms_mean": self.simulated_latency_ms_sum / self.slept if self.slept else 0.0,
            "simulated_latency_ms_sum": self.simulated_latency_ms_sum,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


# --- answers --------------------------------------------------------------------------


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


def _block(text: str, label: str) -> str | None:
    found = re.search(_BLOCK.format(label=re.escape(label)), text, re.DOTALL)
    return found.group(1).strip() if found else None


def user_query(user_text: str) -> str:
    """The user query a request is about; for a prompt on its own, the prompt's."""
    query = _block(user_text, "User query") or user_text
    return " ".join(query.split())[:160] or "the question"


def _response_text(topic: str) -> str:
    return (
        f"Here is a practical answer to your question about {topic[:80]}. Start with the simplest "
        "option that fits what you have, check the result after the first step, and adjust. "
        "If anything involves heat, tools, chemicals or someone else's property, take the usual "
        "precautions and stay within the law. If you share more detail about your situation, "
        "I can tailor the steps further."
    )


def intents_answer(user_text: str) -> dict[str, Any]:
    topic = user_query(user_text)
    return {
        "explicit_intents": [
            f"Get an answer to: {topic[:120]}",
            "Get concrete steps that can be followed now.",
        ],
        "implicit_intents": [
            "Receive information that is accurate and safe to act on.",
            "Avoid approaches that waste time or cause harm to the user or others.",
        ],
    }


def seed_answer(user_text: str) -> dict[str, Any]:
    topic = user_query(user_text)
    return {
        "thoughts": [
            f"The user asks about {topic[:80]}; the explicit intent is practical help with it.",
            "Nothing in the wording points to harm to others, so the respect and helpfulness policy "
            "says a full, direct answer is expected; refusing would be a failure.",
            "The physical harm policy still asks for brief safety notes where the steps carry risk.",
            "The answer should be concrete, ordered, and short enough to act on.",
        ],
        "response": _response_text(topic),
    }


def _draw(seed: int, topic: str, turn_no: int) -> float:
    """A uniform number in [0, 1) fixed by the seed, the prompt and the turn."""
    digest = hashlib.blake2b(f"{seed}|{turn_no}|{topic}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# --rewrite's revisions: under 200 words, where the viewer matches every word however common.
_REWRITES = (("a " * 95 + "b ") * 2, ("b " + "a " * 95) * 2)


def deliberation_answer(
    user_text: str, agree_after: int, agree_prob: float = 0.0, seed: int = 1, rewrite: bool = False
) -> dict[str, Any]:
    turn = _TURN_LINE.search(user_text)
    agent, agents, round_no = (int(g) for g in turn.groups()) if turn else (1, 1, 1)
    turn_no = (round_no - 1) * agents + agent
    response = _block(user_text, "Current response") or _response_text(user_query(user_text))
    if turn_no >= agree_after or _draw(seed, user_query(user_text), turn_no) < agree_prob:
        return {
            "agree": True,
            "critique": "The thoughts cover every intent, apply the policies without needless refusal, "
            "and the response follows from them.",
            "new_thoughts": [],
            "response": response,
        }
    revised = (
        _REWRITES[turn_no % 2]
        if rewrite
        else response + " First try the simplest step; stop there if it works."
    )
    return {
        "agree": False,
        "critique": f"Round {round_no}, agent {agent}: the safety note is vague and one intent is thin.",
        "new_thoughts": [
            f"Agent {agent} in round {round_no}: the implicit intent of acting safely needs one concrete "
            "precaution named in the response.",
            f"Agent {agent} in round {round_no}: the steps should be ordered so the user can stop early "
            "if the first one works.",
        ],
        "response": revised,
    }


def refined_answer(user_text: str) -> dict[str, Any]:
    """Keep every thought marked [T<n>], merging neighbours so the schema's limits hold."""
    marked = {int(n): text.strip() for n, text in _THOUGHT_MARKER.findall(user_text)}
    ids = sorted(marked) or [1]
    per_thought = min(_MAX_SOURCES, -(-len(ids) // _MAX_REFINED_THOUGHTS))
    thoughts = []
    for start in range(0, min(len(ids), _MAX_REFINED_THOUGHTS * per_thought), per_thought):
        group = ids[start : start + per_thought]
        text = " ".join(marked.get(i) or f"Thought {i} holds." for i in group)
        thoughts.append({"text": text[:400], "sources": group})
    response = _block(user_text, "Last response") or _response_text(user_query(user_text))
    return {"thoughts": thoughts, "dropped": [], "response": response}


def answer_for(
    schema_name: str | None,
    body: dict[str, Any],
    agree_after: int,
    agree_prob: float = 0.0,
    seed: int = 1,
    rewrite: bool = False,
) -> dict[str, Any] | str:
    user_text = _last_user_text(body)
    match schema_name:
        case "intent_decomposition":
            return intents_answer(user_text)
        case "seed_cot":
            return seed_answer(user_text)
        case "deliberation_turn":
            return deliberation_answer(user_text, agree_after, agree_prob, seed, rewrite)
        case "refined_cot":
            return refined_answer(user_text)
        case None:
            return "OK."
        case _:
            return {}


def _schema_name(body: dict[str, Any]) -> str | None:
    response_format = body.get("response_format") or {}
    name = (response_format.get("json_schema") or {}).get("name")
    return name if isinstance(name, str) else None


def estimate_tokens(text: str) -> int:
    """About four characters a token (English, BPE): plausible and cheap."""
    return len(text) // 4 + 1


# --- the server -----------------------------------------------------------------------


class RequestBucket:
    """A hosted API's request rate limit: `per_minute` a minute, bursts of `burst_s` worth."""

    def __init__(self, per_minute: int, burst_s: float) -> None:
        self.rate = per_minute / 60
        self.size = max(1.0, self.rate * burst_s)
        self.tokens = self.size
        self.limit = per_minute
        self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.size, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait_s(self) -> float:
        """Until the next request is allowed."""
        return max(0.0, (1 - self.tokens) / self.rate)

    def headers(self) -> dict[str, str]:
        """OpenAI's request-limit headers: reset is the time until the bucket is full."""
        self._refill()
        return {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(int(self.tokens)),
            "x-ratelimit-reset-requests": f"{(self.size - self.tokens) / self.rate:.3f}s",
        }


class SimLLM:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self._rng = random.Random(config.seed)
        self._ids = 0
        self._bucket = RequestBucket(config.rpm_limit, config.rpm_burst_s) if config.rpm_limit else None
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/stats", self._stats, methods=["GET"]),
                Route("/stats/reset", self._reset, methods=["POST"]),
                Route("/stats/answers", self._answers, methods=["GET"]),
            ]
        )

    async def _models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "bench"}]}
        )

    async def _stats(self, request: Request) -> Response:
        return JSONResponse({"config": asdict(self.config), **self.stats.snapshot()})

    async def _answers(self, request: Request) -> Response:
        """Answers sent per user query: kept out of /stats, which runs poll (one per item)."""
        return JSONResponse(dict(self.stats.answered_by_query))

    async def _reset(self, request: Request) -> Response:
        in_flight = self.stats.in_flight
        self.stats = SimStats(in_flight=in_flight, max_in_flight=in_flight, last_change=time.monotonic())
        return JSONResponse({"reset": True})

    def _latency_s(self) -> float:
        jitter = (
            self._rng.uniform(-self.config.jitter_ms, self.config.jitter_ms) if self.config.jitter_ms else 0.0
        )
        return max(0.0, self.config.latency_ms + jitter) / 1000

    def _fault(self) -> str | None:
        draw = self._rng.random()
        for name, p in (
            ("5xx", self.config.fault_5xx),
            ("429", self.config.fault_429),
            ("stall", self.config.fault_stall),
            ("truncated", self.config.fault_truncated),
        ):
            if draw < p:
                return name
            draw -= p
        return None

    async def _chat(self, request: Request) -> Response:
        stats = self.stats
        stats.requests += 1
        if stats.first_request is None:
            stats.first_request = time.monotonic()
        bucket = self._bucket
        if bucket is not None:
            allowed = bucket.take()
            stats.count_arrival(rate_limited=not allowed)
            if not allowed:
                stats.rate_limited += 1
                wait_s = bucket.wait_s()
                refused = _error(429, "simulated requests-per-minute limit", str(max(1, math.ceil(wait_s))))
                if self.config.ratelimit_headers:
                    refused.headers.update(
                        {**bucket.headers(), "retry-after-ms": str(math.ceil(wait_s * 1000))}
                    )
                return refused
        cap = self.config.max_concurrency
        if cap and stats.in_flight >= cap and not await _drops_below(stats, cap):
            stats.cap_violations += 1
            return _error(429, "over the simulated concurrency cap", retry_after="1")
        stats.change_in_flight(+1)
        try:
            answer = await self._answer(request, stats)
        finally:
            stats.change_in_flight(-1)
            stats.last_response = time.monotonic()
        if bucket is not None and self.config.ratelimit_headers:
            answer.headers.update(bucket.headers())
        return answer

    async def _answer(self, request: Request, stats: SimStats) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "the body is not JSON")
        schema_name = _schema_name(body)
        stats.by_schema[schema_name or "none"] += 1
        fault = self._fault()
        if fault == "429":
            stats.faults[fault] += 1
            return _error(429, "simulated rate limit", retry_after="1")
        if fault == "stall":
            stats.faults[fault] += 1
            if await _hold_until_disconnect(request, self.config.stall_s):
                return Response(status_code=499)  # nobody is listening any more
        config = self.config
        answer = answer_for(
            schema_name, body, config.agree_after, config.agree_prob, config.seed, config.rewrite
        )
        content = answer if isinstance(answer, str) else json.dumps(answer)
        finish_reason = "stop"
        if fault == "truncated":
            content, finish_reason = content[: len(content) // 2], "length"
        prompt_tokens = sum(
            estimate_tokens(str(m.get("content", ""))) + 4 for m in body.get("messages") or []
        )
        completion_tokens = estimate_tokens(content)
        delay = self._latency_s()
        if self.config.tokens_per_s > 0:
            delay += completion_tokens / self.config.tokens_per_s
        stats.simulated_latency_ms_sum += delay * 1000
        stats.slept += 1
        if delay > 0:
            await asyncio.sleep(delay)
        if fault == "5xx":
            stats.faults[fault] += 1
            return _error(503, "simulated server error")
        if fault == "truncated":
            stats.faults[fault] += 1
        stats.answered += 1
        stats.answered_by_query[user_query(_last_user_text(body))] += 1
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        self._ids += 1
        completion = {
            "id": f"chatcmpl-sim-{self._ids}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or MODEL_ID,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return Response(json.dumps(completion), media_type="application/json")


def _error(status: int, message: str, retry_after: str | None = None) -> Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    body = json.dumps({"error": {"message": message, "type": "sim_llm", "code": status}})
    return Response(body, status, headers=headers, media_type="application/json")


async def _drops_below(stats: SimStats, cap: int) -> bool:
    """Whether in-flight requests drop below `cap` within HANG_UP_GRACE_S. A client that
    hangs up one request and sends the next on another connection may be read in either
    order when both arrive together; the hang-up is read within a loop turn or two, while a
    client really over the cap stays over it."""
    deadline = time.monotonic() + HANG_UP_GRACE_S
    while stats.in_flight >= cap:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.001)
    return True


async def _hold_until_disconnect(request: Request, seconds: float) -> bool:
    """Wait up to `seconds`; True if the client hung up meanwhile. Waits on the connection's
    own messages rather than polling: until the hang-up is seen the request counts as in
    flight, and a client that gave its slot to another request would show as over the cap."""
    try:
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return False
    return True


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, SimConfig]:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="0: no per-token time")
    parser.add_argument("--max-concurrency", type=int, default=0, help="0: no cap")
    parser.add_argument("--fault-5xx", type=float, default=0.0, help="probability per request")
    parser.add_argument("--fault-429", type=float, default=0.0, help="probability per request")
    parser.add_argument("--fault-stall", type=float, default=0.0, help="probability per request")
    parser.add_argument("--fault-truncated", type=float, default=0.0, help="probability per request")
    parser.add_argument("--stall-s", type=float, default=600.0, help="longest stall")
    parser.add_argument(
        "--agree-after", type=int, default=1, help="deliberation turn of a prompt that agrees"
    )
    parser.add_argument(
        "--agree-prob", type=float, default=0.0, help="chance that a turn before --agree-after agrees"
    )
    parser.add_argument(
        "--rewrite", action="store_true", help="a turn that disagrees rewrites the response whole"
    )
    parser.add_argument("--rpm-limit", type=int, default=0, help="requests a minute; 0: no limit")
    parser.add_argument("--rpm-burst-s", type=float, default=1.0, help="the rate limit's burst, in seconds")
    parser.add_argument(
        "--ratelimit-headers", action="store_true", help="send x-ratelimit-* (and retry-after-ms on 429)"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    config = SimConfig(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        tokens_per_s=args.tokens_per_s,
        max_concurrency=args.max_concurrency,
        fault_5xx=args.fault_5xx,
        fault_429=args.fault_429,
        fault_stall=args.fault_stall,
        fault_truncated=args.fault_truncated,
        stall_s=args.stall_s,
        agree_after=args.agree_after,
        agree_prob=args.agree_prob,
        rewrite=args.rewrite,
        rpm_limit=args.rpm_limit,
        rpm_burst_s=args.rpm_burst_s,
        ratelimit_headers=args.ratelimit_headers,
        seed=args.seed,
    )
    return args, config


def main(argv: list[str] | None = None) -> None:
    args, config = parse_args(argv)
    sim = SimLLM(config)
    uvicorn.run(
        sim.app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
        timeout_keep_alive=120,
    )


if __name__ == "__main__":
    main()
