"""How many tokens a request can take of an endpoint's context, without a tokenizer.

The estimate is deliberately high: a UTF-8 byte-level BPE token averages about four bytes of
English and a CJK character is three bytes and about one token, so a token per three bytes
over-counts English and roughly matches CJK. Chat templates add a few tokens per message,
and some servers (OpenAI's structured outputs) put the JSON schema in the prompt. A server
needs room for the prompt and for `max_tokens` of reply, so both count.

`largest_requests` works out, before a job runs, the largest first request each role can
send: fixed instructions, policies and prompt, plus every earlier reply the role reads at
its full `max_tokens`, plus its own `max_tokens`. A reply read is counted as the client will
count it when it is sent on (`reply_tokens`): a model's tokens of English run about four
bytes, so `max_tokens` of them are a third more at three bytes a token. Re-asks can need more
(they show the bad reply again, or double max_tokens); the client checks each request before
sending it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from app.deliberation.config import EvaluationConfig, Evaluators, Limits, Mode, PipelineConfig, RoleConfig
from app.deliberation.policies import PolicySet
from app.deliberation.prompting import PromptSet
from app.deliberation.quality import sample_text
from app.deliberation.results import Sample
from app.deliberation.stages import (
    DECLARED,
    DELIBERATION,
    GRADE,
    GUARDS,
    INTENT,
    JUDGE,
    NOT_DECOMPOSED,
    REFINE,
    REFUSAL,
    REJECTED,
    RESPOND,
    SEED,
    WHISPER,
    WHISPER_AIMS,
    ZERO_SHOT,
    StageSpec,
)

BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 8  # role markers and separators of a chat template, per message
# What a model's reply token averages in English (3.7-4.5 bytes for today's BPE vocabularies).
REPLY_BYTES_PER_TOKEN = 4
# The labels the engine puts around a reply it shows another agent: per reply ("Try 2.
# Belief: ", headings), and per thought ("[T123] (round 10, agent 3) " and its line end).
REPLY_LABEL_TOKENS = 16
THOUGHT_LABEL_TOKENS = 10
# The least max_tokens worth sending (a job's smallest): a request the limit leaves less room
# for is refused rather than sent to be cut off.
MIN_REPLY_TOKENS = 64


def estimate_tokens(text: str) -> int:
    return bytes_tokens(len(text.encode()))


def bytes_tokens(size: int) -> int:
    """The estimated tokens of a text of `size` UTF-8 bytes."""
    return -(-size // BYTES_PER_TOKEN)


def request_tokens(
    messages: Sequence[Mapping[str, str]], schema: Mapping[str, Any] | None, max_tokens: int
) -> int:
    """The estimated context a chat completion needs: its messages, its schema, its reply."""
    prompt = sum(MESSAGE_OVERHEAD_TOKENS + estimate_tokens(m["content"]) for m in messages)
    return prompt + (estimate_tokens(json.dumps(schema)) if schema else 0) + max_tokens


def reply_tokens(max_tokens: int, limits: Limits) -> int:
    """The most a reply of `max_tokens` counts for, shown to another role with its labels."""
    text = bytes_tokens(max_tokens * REPLY_BYTES_PER_TOKEN)
    return text + REPLY_LABEL_TOKENS + limits.thoughts_per_turn * THOUGHT_LABEL_TOKENS


def sample_replies(config: PipelineConfig) -> int:
    """How many replies the CoT an item ends with (its sample: what its grader reads) is
    written in: the refiner's, or the zero-shot call's; with no refiner, every thought of the
    seed and of each turn, and the last response."""
    if config.mode is Mode.ZERO_SHOT or config.refine:
        return 1
    return 1 + config.turn_budget()


def sample_thoughts(config: PipelineConfig) -> int:
    """The most thoughts the CoT an item ends with can hold: the refiner keeps at most
    `kept_thoughts`; any other CoT is every thought of the replies it is written in, each
    listing at most `thoughts_per_turn` (the seed's, and each turn's new ones)."""
    if config.mode is Mode.AIDSAFE and config.refine:
        return config.limits.kept_thoughts
    return sample_replies(config) * config.limits.thoughts_per_turn


def sample_tokens(config: PipelineConfig) -> int:
    """The most the CoT an item of a job run with `config` ends with counts for, shown to
    another role (its grader, a comparison's judge): its replies, with their labels."""
    return sample_replies(config) * reply_tokens(config.max_tokens, config.limits)


def least_reply_tokens(max_tokens: int) -> int:
    """The least room for its reply a request asking for `max_tokens` is sent with: the client
    lowers a max_tokens over what the limit leaves (fitted), down to this, and refuses below."""
    return min(max_tokens, MIN_REPLY_TOKENS)


@dataclass(frozen=True)
class RequestBudget:
    """The largest request one role can send, and where it goes."""

    role: str  # as in the turns: "intent", "deliberator-2", "grader", "judge"
    endpoint: str
    tokens: int  # its prompt and its max_tokens together
    max_tokens: int
    falls_back: bool = False  # refused, it is sent again to the job's fallback (StageSpec.falls_back)

    @property
    def prompt_tokens(self) -> int:
        return self.tokens - self.max_tokens

    @property
    def least_tokens(self) -> int:
        """Its prompt and the least room for the reply it can be sent with."""
        return self.prompt_tokens + least_reply_tokens(self.max_tokens)


@dataclass(frozen=True)
class _Job:
    """The text every request of one job shares, and its reply budget."""

    policies: PolicySet
    wording: PromptSet
    prompt: str
    max_tokens: int
    limits: Limits

    def budget(
        self, spec: StageSpec, config: RoleConfig, replies_read: int, agent: int = 0, **values: object
    ) -> RequestBudget:
        """The stage's request with every earlier reply it shows left out of `values` (as
        ""); each of the `replies_read` replies adds at most reply_tokens."""
        messages = spec.messages(
            self.policies,
            self.wording,
            self.limits,
            config.instructions,
            prompt=self.prompt,
            agent=agent,
            **values,
        )
        replies = replies_read * reply_tokens(self.max_tokens, self.limits)
        tokens = request_tokens(messages, spec.schema(self.limits), self.max_tokens) + replies
        return RequestBudget(spec.role_of(agent), config.endpoint, tokens, self.max_tokens, spec.falls_back)


def largest_requests(
    config: PipelineConfig, policies: PolicySet, wording: PromptSet, prompt: str
) -> list[RequestBudget]:
    """The largest first request of every role of a job, for its longest `prompt`, in the
    order the roles speak."""
    job = _Job(policies, wording, prompt, config.max_tokens, config.limits)
    if config.mode is Mode.ZERO_SHOT:
        budgets = [job.budget(ZERO_SHOT, config.seed, 0)]
    else:
        budgets = _aidsafe_budgets(job, config)
    if config.grading is not None:  # the item's sample, or (pairs) a rejected one: one reply
        budgets.append(job.budget(GRADE, config.grading.grader, sample_replies(config), sample=""))
    if config.pairs is not None:
        pairs = config.pairs
        # The last try reads every earlier one: its belief, rejected sample and guard rationale.
        # Standard sampling (the baseline) sends the generator's request without the belief.
        budgets += [
            job.budget(
                WHISPER,
                pairs.whisperer,
                3 * (pairs.max_tries - 1),
                history="",
                violations=WHISPER_AIMS[pairs.guard.style],
            ),
            job.budget(REJECTED, pairs.generator, 1, belief=""),
            job.budget(GUARDS[pairs.guard.style], pairs.guard.role, 1, sample=""),
        ]
    if (fallback := config.fallback) is not None:  # it is sent the same requests, on its endpoint
        budgets += [
            replace(b, role=f"{b.role} (fallback)", endpoint=fallback.endpoint, falls_back=False)
            for b in budgets
            if b.falls_back
        ]
    return budgets


def _aidsafe_budgets(job: _Job, config: PipelineConfig) -> list[RequestBudget]:
    agents, turns = len(config.deliberators), config.turn_budget()
    budgets = [job.budget(INTENT, config.intent, 0)] if config.decompose_intents else []
    intents = int(config.decompose_intents)  # replies read before the seed's
    shown = "" if config.decompose_intents else NOT_DECOMPOSED  # the intents' text, if not a reply
    budgets.append(job.budget(SEED, config.seed, intents, intents=shown))
    for agent, deliberator in enumerate(config.deliberators[:turns], start=1):
        # An agent's last turn reads the intents, the seed and every turn before it.
        last_turn = agent + (turns - agent) // agents * agents
        budgets.append(
            job.budget(
                DELIBERATION,
                deliberator,
                intents + last_turn,
                agent,
                intents=shown,
                thoughts="",
                response="",
                agents=agents,
                round=config.max_rounds,
                max_rounds=config.max_rounds,
            )
        )
    if config.refine:
        budgets.append(
            job.budget(REFINE, config.refiner, intents + 1 + turns, intents=shown, thoughts="", response="")
        )
    return budgets


def judge_request(
    judge: RoleConfig,
    policies: PolicySet,
    wording: PromptSet,
    prompt: str,
    samples: tuple[int, int],
    max_tokens: int,
) -> RequestBudget:
    """The largest request of a comparison's judge: two samples, each counting for at most
    as many tokens as `samples` says (sample_tokens of the job that wrote it)."""
    limits = Limits()
    messages = JUDGE.messages(
        policies, wording, limits, judge.instructions, prompt=prompt, first="", second=""
    )
    tokens = request_tokens(messages, JUDGE.schema(limits), max_tokens) + sum(samples)
    return RequestBudget(JUDGE.role, judge.endpoint, tokens, max_tokens)


def stage_floors(wording: PromptSet, max_tokens: int) -> dict[str, int]:
    """The smallest request each stage worded by `wording` can send: no policy text, an
    empty prompt and values, a reply of `max_tokens`. An endpoint whose context is below a
    stage's floor can never be sent that stage. The templates must be valid (prompt_sets)."""
    nothing, limits = PolicySet("", "", ""), Limits()
    floors = {}
    for spec in DECLARED:
        if spec.templates is not None:
            values = dict.fromkeys((*spec.inputs, *spec.extras), "")
            messages = spec.messages(nothing, wording, limits, prompt="", **values)
            floors[spec.stage.value] = request_tokens(messages, spec.schema(limits), max_tokens)
    return floors


def evaluation_requests(
    config: EvaluationConfig, policies: PolicySet, wording: PromptSet, prompt: str
) -> list[RequestBudget]:
    """The largest request of each role of a model evaluation item, for its longest `prompt`:
    the target's (its system prompt and the prompt), and each judge's, which reads the
    target's answer at its full `max_tokens`."""
    job = _Job(policies, wording, prompt, config.max_tokens, Limits())
    return [
        job.budget(RESPOND, config.target, 0),
        job.budget(GUARDS[config.safety.style], config.safety.role, 1, sample=""),
        job.budget(REFUSAL, config.refusal_judge, 1, answer=""),
    ]


def sample_evaluation_requests(
    evaluators: Evaluators, policies: PolicySet, wording: PromptSet, prompt: str, sample: Sample
) -> list[RequestBudget]:
    """The request of the grader and of the guard, if asked, about one sample: each reads it
    whole. (The judge's also reads the other set's sample: `sample_judge_request`.)"""
    job, shown = _Job(policies, wording, prompt, evaluators.max_tokens, Limits()), sample_text(sample)
    budgets = []
    if evaluators.grader is not None:
        budgets.append(job.budget(GRADE, evaluators.grader, 0, sample=shown))
    if (guard := evaluators.guard) is not None:
        budgets.append(job.budget(GUARDS[guard.style], guard.role, 0, sample=shown))
    return budgets


def sample_judge_request(
    judge: RoleConfig,
    policies: PolicySet,
    wording: PromptSet,
    prompt: str,
    sample: Sample,
    other_bytes: int,
    max_tokens: int,
) -> RequestBudget:
    """The judge's request about one sample: it also reads the other set's sample of the
    prompt, shown as `sample_text` of `other_bytes` UTF-8 bytes. Counted apart from the rest
    of its message, the other sample is estimated a token high at most, never low."""
    job = _Job(policies, wording, prompt, max_tokens, Limits())
    budget = job.budget(JUDGE, judge, 0, first="", second=sample_text(sample))
    return replace(budget, tokens=budget.tokens + bytes_tokens(other_bytes))
