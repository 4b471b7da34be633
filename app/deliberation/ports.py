"""The two narrow ports the AIDSAFE engine talks through: an LLM client and a turn log.

Production wires an aiohttp client and a Postgres turn log; tests wire a scripted HTTP
server and, where a database is beside the point, an in-memory log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol
from uuid import UUID


@dataclass(frozen=True)
class ChatRequest:
    """One structured-output chat completion, as the engine asks for it."""

    role: str  # "intent", "seed", "deliberator-2", "refiner", "guard": for limits, metrics, logs
    endpoint: str  # name of a configured OpenAI-compatible endpoint
    model: str
    messages: list[dict[str, str]]
    schema_name: str | None  # None: plain text (classifiers such as Llama Guard)
    schema: dict[str, Any] | None
    temperature: float
    max_tokens: int
    # Ask for the probabilities of the reply's first tokens and their likeliest alternatives
    # (a classifier's answer is its first token); servers that cannot send them send none.
    logprobs: bool = False
    # The turn it asks for (None outside an item): a batch client files the request under it.
    key: TurnKey | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """One token of a reply as the server chose it, and its likeliest alternatives at that
    position (the chosen one among them): (token, natural log of its probability)."""

    token: str
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class ChatReply:
    """What came back: raw text plus what the server said about it."""

    content: str
    finish_reason: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    refusal: str | None = None  # OpenAI structured outputs put a model refusal here
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the server read from its prompt cache
    # The first tokens' probabilities, when the request asked and the server sent them.
    logprobs: tuple[TokenLogprobs, ...] | None = None


class LLMFault(Exception):
    """An LLM call the client could not complete.

    `str(fault)` is the detail for operators: it may quote the upstream's answer, and an
    upstream may echo the request (hazardous text) or its headers (the server's LLM key).
    `summary` is the short classification a tenant may read, made by our code from the
    endpoint's name and the HTTP status, never from upstream text.
    """

    default_summary = "the LLM call failed"

    def __init__(self, detail: str, summary: str | None = None) -> None:
        super().__init__(detail)
        self.summary = summary or self.default_summary


class LLMUnavailable(LLMFault):
    """The endpoint could not answer after the client's retries (429/5xx/timeouts).

    Transient by nature: the caller should retry the whole item later; every turn
    already recorded is kept, so nothing paid for is repeated.
    """

    default_summary = "the LLM endpoint gave no usable answer"

    def __init__(self, detail: str, summary: str | None = None, retry_in_s: float = 0.0) -> None:
        super().__init__(detail, summary)
        # The endpoint is not expected back sooner (its circuit breaker is open): no use
        # running the item again before.
        self.retry_in_s = retry_in_s


class LLMRequestRejected(LLMFault):
    """The endpoint refused the request itself (4xx other than 429): retrying will not help.

    Permanent by nature (bad model name, bad key, unknown endpoint): the caller should
    fail the item, with `code`, rather than retry it.
    """

    code = "llm_request_rejected"
    default_summary = "the LLM endpoint rejected the request"


class LLMRequestTooLarge(LLMRequestRejected):
    """The request was not sent: it may not fit the endpoint's context, or is over the server's
    cap on any request. Its message is ours (role, endpoint, sizes), so it is its own summary."""

    code = "request_too_large"


class Stage(StrEnum):
    INTENT = "intent"
    SEED = "seed"
    DELIBERATION = "deliberation"
    REFINE = "refine"
    ZERO_SHOT = "zero_shot"  # the baseline mode's single call
    GRADE = "grade"  # round 0: the item's CoT; round n: the rejected side of whisper try n
    WHISPER = "whisper"  # round n: the bad belief of try n
    REJECTED = "rejected"  # round n: the CoT written under that belief
    GUARD = "guard"  # round n: the guard's verdict on it
    JUDGE = "judge"  # comparison jobs: round 1 sees (a, b), round 2 sees (b, a)
    RESPOND = "respond"  # model evaluations: the model under test answers the prompt
    REFUSAL = "refusal"  # model evaluations: did that answer refuse or comply?


# Turns whose text may carry hazardous content: the whispered beliefs, the CoTs written
# under them, a model under test's answers (to harmful prompts, by design), and what the
# guard, the grader and the refusal judge said about those. Only keys with the hazardous
# scope read them.
HAZARDOUS_STAGES = frozenset({Stage.WHISPER, Stage.REJECTED, Stage.GUARD, Stage.RESPOND, Stage.REFUSAL})


def is_hazardous(stage: str, round: int) -> bool:
    return stage in HAZARDOUS_STAGES or (stage == Stage.GRADE and round > 0)


# Llama Guard names what it finds S1, S2, ...: codes, not text.
_LLAMA_GUARD_CODE = re.compile(r"S\d{1,2}")


def is_known_category(category: str, policy_ids: frozenset[str]) -> bool:
    """Whether a guard's category names a policy of the job's set or is a Llama Guard code:
    not hazardous. Any other category is the guard's own text about a rejected sample."""
    return category in policy_ids or _LLAMA_GUARD_CODE.fullmatch(category) is not None


def guard_flags(verdict: dict[str, Any], policy_ids: frozenset[str]) -> dict[str, Any]:
    """What any reader may see of a stored guard verdict: whether it found the sample unsafe,
    how sure (a classifier's probability, and what decided), and its known categories; not
    its rationale or error, which may quote the sample."""
    return {
        "unsafe": verdict["unsafe"],
        "categories": [c for c in verdict["categories"] if is_known_category(c, policy_ids)],
        "rationale": None,
        "error": None,
        # Verdicts stored before classifiers read logprobs have none of these.
        "unsafe_probability": verdict.get("unsafe_probability"),
        "decided_by": verdict.get("decided_by", "text"),
        "logprobs_missing": verdict.get("logprobs_missing"),
    }


class TurnOutcome(StrEnum):
    OK = "ok"
    MALFORMED = "malformed"  # not JSON, or JSON that breaks the schema
    TRUNCATED = "truncated"  # the server stopped at max_tokens
    REFUSED = "refused"  # the agent declined the reasoning task itself


# A stage's agent refused, so the job's fallback role was asked the same request: its ask
# and re-asks are numbered from here, under the same (stage, round, agent), so a replay
# finds both the refusal and the fallback's answer. Above any job's re-asks.
FALLBACK_ATTEMPT = 100


@dataclass(frozen=True)
class TurnKey:
    """Identifies one LLM call of an item; a replay never records the same key twice."""

    stage: Stage
    round: int = 0
    agent: int = 0
    attempt: int = 0  # 0 for the first ask, 1.. for re-asks after bad output; see FALLBACK_ATTEMPT


@dataclass(frozen=True)
class Turn:
    """One agent turn: the request, the raw reply, and what the engine made of it."""

    item_id: UUID
    key: TurnKey
    role: str
    endpoint: str
    model: str
    request_hash: str
    raw_output: str
    outcome: TurnOutcome
    parsed: dict[str, Any] | None = None
    error: str | None = None
    agreed: bool | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    cached_prompt_tokens: int = 0


class LLMClient(Protocol):
    async def chat(self, request: ChatRequest) -> ChatReply:
        """Send one chat completion. Raises LLMUnavailable when retries are spent."""
        ...


class TurnLog(Protocol):
    async def done(self, item_id: UUID) -> list[Turn]:
        """Every turn already recorded for the item, in any order."""
        ...

    async def record(self, turn: Turn) -> Turn:
        """Store a turn and return it as stored. Idempotent on (item, key): if the key is
        already stored, nothing is written and the stored turn is returned."""
        ...
