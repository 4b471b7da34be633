"""How many tokens a request can take of an endpoint's context, without a tokenizer.

The estimate is deliberately high: a UTF-8 byte-level BPE token averages about four bytes of
English and a CJK character is three bytes and about one token, so a token per three bytes
over-counts English and roughly matches CJK. Chat templates add a few tokens per message,
and some servers (OpenAI's structured outputs) put the JSON schema in the prompt. A server
needs room for the prompt and for `max_tokens` of reply, so both count.

`largest_requests` works out, before a job runs, the largest first request each role can
send: fixed instructions, policies and prompt, plus every earlier reply the role reads at
its full `max_tokens`, plus its own `max_tokens`. Re-asks can need more (they show the bad
reply again, or double max_tokens); the client checks each request before sending it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.deliberation.config import GuardConfig, GuardStyle, Mode, PipelineConfig, RoleConfig
from app.deliberation.policies import PolicySet
from app.deliberation.prompting import messages_for
from app.deliberation.schemas import BY_NAME

BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 8  # role markers and separators of a chat template, per message
# The labels the engine puts around a reply it shows another agent ("[T12] (round 3,
# agent 2) ", numbered steps, "Try 2. Belief: ..."), per reply.
REPLY_LABEL_TOKENS = 64


def estimate_tokens(text: str) -> int:
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


def request_tokens(
    messages: Sequence[Mapping[str, str]], schema: Mapping[str, Any] | None, max_tokens: int
) -> int:
    """The estimated context a chat completion needs: its messages, its schema, its reply."""
    prompt = sum(MESSAGE_OVERHEAD_TOKENS + estimate_tokens(m["content"]) for m in messages)
    return prompt + (estimate_tokens(json.dumps(schema)) if schema else 0) + max_tokens


@dataclass(frozen=True)
class RequestBudget:
    """The largest request one role can send, and where it goes."""

    role: str  # as in the turns: "intent", "deliberator-2", "grader", "judge"
    endpoint: str
    tokens: int


@dataclass(frozen=True)
class _Job:
    """The text every request of one job shares, and its reply budget."""

    policies: PolicySet
    prompt: str
    max_tokens: int

    def budget(
        self,
        role: str,
        config: RoleConfig,
        schema_name: str | None,
        messages: list[dict[str, str]],
        replies_read: int,
    ) -> RequestBudget:
        """`messages` holds the fixed text, every earlier reply left out; each of the
        `replies_read` replies adds at most max_tokens and its labels."""
        schema = BY_NAME[schema_name] if schema_name else None
        replies = replies_read * (self.max_tokens + REPLY_LABEL_TOKENS)
        return RequestBudget(
            role, config.endpoint, request_tokens(messages, schema, self.max_tokens) + replies
        )

    def messages(self, stage: str, **values: object) -> list[dict[str, str]]:
        return messages_for(stage, self.policies, prompt=self.prompt, **values)


def largest_requests(config: PipelineConfig, policies: PolicySet, prompt: str) -> list[RequestBudget]:
    """The largest first request of every role of a job, for its longest `prompt`, in the
    order the roles speak."""
    job = _Job(policies, prompt, config.max_tokens)
    if config.mode is Mode.ZERO_SHOT:
        budgets = [job.budget("zero-shot", config.seed, "zero_shot_cot", job.messages("zero_shot"), 0)]
    else:
        budgets = _aidsafe_budgets(job, config)
    if config.grading is not None:  # the item's sample, or (pairs) a rejected one
        grade = job.messages("grade", sample="")
        budgets.append(job.budget("grader", config.grading.grader, "quality_scores", grade, 1))
    if config.pairs is not None:
        pairs = config.pairs
        # The last try reads every earlier one: its belief, rejected sample and guard rationale.
        whisper = job.messages("whisper", history="")
        rejected = job.messages("zero_shot", user_template="rejected.user", belief="")
        budgets += [
            job.budget("whisperer", pairs.whisperer, "whisper_belief", whisper, 3 * (pairs.max_tries - 1)),
            job.budget("generator", pairs.generator, "rejected_cot", rejected, 1),
            _guard_budget(job, pairs.guard),
        ]
    return budgets


def _aidsafe_budgets(job: _Job, config: PipelineConfig) -> list[RequestBudget]:
    agents, rounds = len(config.deliberators), config.max_rounds
    carried = {"intents": "", "thoughts": "", "response": ""}
    intent = job.messages("intent")
    seed = job.messages("seed", intents="")
    refine = job.messages("refine", **carried)
    budgets = [
        job.budget("intent", config.intent, "intent_decomposition", intent, 0),
        job.budget("seed", config.seed, "seed_cot", seed, 1),
    ]
    for agent, deliberator in enumerate(config.deliberators, start=1):
        # An agent's last turn reads the intents, the seed and every turn before it.
        turn = job.messages(
            "deliberation", **carried, agent=agent, agents=agents, round=rounds, max_rounds=rounds
        )
        read = 2 + (rounds - 1) * agents + agent - 1
        budgets.append(job.budget(f"deliberator-{agent}", deliberator, "deliberation_turn", turn, read))
    budgets.append(job.budget("refiner", config.refiner, "refined_cot", refine, 2 + rounds * agents))
    return budgets


def _guard_budget(job: _Job, guard: GuardConfig) -> RequestBudget:
    if guard.style is GuardStyle.LLAMA_GUARD:  # the prompt and the sample, in its own chat template
        conversation = [{"role": "user", "content": job.prompt}, {"role": "assistant", "content": ""}]
        return job.budget("guard", guard.role, None, conversation, 1)
    return job.budget("guard", guard.role, "guard_verdict", job.messages("guard", sample=""), 1)


def judge_request(
    judge: RoleConfig, policies: PolicySet, prompt: str, sample_max_tokens: tuple[int, int], max_tokens: int
) -> RequestBudget:
    """The largest request of a comparison's judge: two samples, each the last reply of a
    job with the given `max_tokens`."""
    messages = messages_for("judge", policies, prompt=prompt, first="", second="")
    samples = sum(tokens + REPLY_LABEL_TOKENS for tokens in sample_max_tokens)
    tokens = request_tokens(messages, BY_NAME["pairwise_judgement"], max_tokens) + samples
    return RequestBudget("judge", judge.endpoint, tokens)
