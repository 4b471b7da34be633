"""One stage call, resumable: reuse the turn stored under its key, or ask the LLM, judge the
reply and record the turn before returning. Bad output gets a bounded number of re-asks."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from json.encoder import encode_basestring_ascii
from typing import Any
from uuid import UUID

from app.deliberation import parsing
from app.deliberation.config import Limits, RoleConfig
from app.deliberation.policies import PolicySet
from app.deliberation.ports import (
    FALLBACK_ATTEMPT,
    ChatRequest,
    LLMClient,
    Turn,
    TurnKey,
    TurnLog,
    TurnOutcome,
)
from app.deliberation.prompting import PromptSet
from app.deliberation.results import Failed
from app.deliberation.stages import Normalize, StageSpec


class StageFailed(Exception):
    """A stage gave no usable output. The item's own stages end the item with `failure`;
    the optional stages (grading, pairs) record it and let the item complete."""

    def __init__(self, failure: Failed, turn: Turn) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.turn = turn  # the last try, e.g. the refusal text


@dataclass
class Caller:
    """Asks the stages of one item: `prompt` and the policies are in every request, worded
    in the words of the prompt set `wording`."""

    item_id: UUID
    prompt: str
    policies: PolicySet
    wording: PromptSet
    llm: LLMClient
    log: TurnLog
    max_tokens: int
    max_reasks: int
    limits: Limits
    # Asked the same request when an agent refuses a stage that falls back (StageSpec.falls_back).
    fallback: RoleConfig | None = None
    replayed: dict[TurnKey, Turn] = field(default_factory=dict)
    # The stages the fallback answered after a refusal: {"stage", "round", "agent", "model"}.
    fell_back: list[dict[str, Any]] = field(default_factory=list)

    async def call(
        self,
        spec: StageSpec,
        role_config: RoleConfig,
        *,
        round: int = 0,
        agent: int = 0,
        normalize_with: Mapping[str, object] | None = None,
        **values: object,
    ) -> dict[str, Any]:
        """The normalized output of the stage's turn (round, agent), or StageFailed.

        `values` fill the stage's user template, beside the prompt, the round and the agent;
        `normalize_with` are what the stage's normalizer needs besides the reply. If the
        agent refuses a stage that falls back, the same request goes to `fallback`'s endpoint
        and model (numbered from FALLBACK_ATTEMPT), and the stage is listed in `fell_back`.
        """
        key = TurnKey(spec.stage, round, agent)
        role = spec.role_of(agent)
        # A JSON reply is kept to the job's limits, as its schema is built from them.
        limits = {} if spec.plain_text else {"limits": self.limits}
        normalize = partial(spec.normalize, **limits, **(normalize_with or {}))
        messages = spec.messages(
            self.policies,
            self.wording,
            self.limits,
            role_config.instructions,
            prompt=self.prompt,
            round=round,
            agent=agent,
            **values,
        )
        try:
            turn = await self._ask(spec, key, f"the {role} agent", role_config, messages, normalize)
        except StageFailed as failed:
            fallback = self.fallback
            if fallback is None or not spec.falls_back or failed.failure.code != "agent_refused":
                raise
            stand_in = replace(
                role_config,
                endpoint=fallback.endpoint,
                model=fallback.model,
                temperature=fallback.temperature,
            )
            key = replace(key, attempt=FALLBACK_ATTEMPT)
            who = f"the fallback {fallback.model} (as {role})"
            turn = await self._ask(spec, key, who, stand_in, messages, normalize)
            self.fell_back.append(
                {"stage": key.stage.value, "round": round, "agent": agent, "model": turn.model}
            )
        assert turn.parsed is not None
        return turn.parsed

    async def _ask(
        self,
        spec: StageSpec,
        key: TurnKey,
        who: str,
        role_config: RoleConfig,
        original: list[dict[str, str]],
        normalize: Normalize,
    ) -> Turn:
        """The first OK turn of one agent, re-asked from `key`'s attempt on, or StageFailed.

        A malformed reply is shown back with what was wrong. A truncated one is not (it is
        long and useless); the re-ask asks for brevity and allows twice the tokens. A
        plain-text reply is not re-asked, nor is a refusal.
        """
        role = spec.role_of(key.agent)
        messages, max_tokens = original, self.max_tokens
        tries = 1 if spec.plain_text else self.max_reasks + 1
        for attempt in range(key.attempt, key.attempt + tries):
            attempt_key = replace(key, attempt=attempt)
            turn = self.replayed.get(attempt_key) or await self._call(
                attempt_key, role, role_config, spec, messages, normalize, max_tokens
            )
            if turn.outcome is TurnOutcome.OK:
                return turn
            if turn.outcome is TurnOutcome.REFUSED:
                failure = Failed("agent_refused", f"{who} refused to reason: {turn.error}", key.stage)
                raise StageFailed(failure, turn)
            if turn.outcome is TurnOutcome.TRUNCATED:
                max_tokens *= 2
                messages = [*original, {"role": "user", "content": self.wording.render("reask.truncated")}]
            else:
                messages = [
                    *messages,
                    {"role": "assistant", "content": turn.raw_output},
                    {
                        "role": "user",
                        "content": self.wording.render("reask.malformed", error=turn.error or ""),
                    },
                ]
        failure = Failed(
            "unparseable_output",
            f"{who} gave no usable output in {tries} tries; last problem: {turn.outcome.value}: {turn.error}",
            key.stage,
        )
        raise StageFailed(failure, turn)

    async def _call(
        self,
        key: TurnKey,
        role: str,
        role_config: RoleConfig,
        spec: StageSpec,
        messages: list[dict[str, str]],
        normalize: Normalize,
        max_tokens: int,
    ) -> Turn:
        request = ChatRequest(
            role=role,
            endpoint=role_config.endpoint,
            model=role_config.model,
            messages=messages,
            schema_name=spec.schema_name,
            schema=spec.schema(self.limits),
            temperature=role_config.temperature,
            max_tokens=max_tokens,
            logprobs=spec.logprobs,
            key=key,
        )
        started = time.perf_counter()
        reply = await self.llm.chat(request)
        if spec.logprobs:
            normalize = partial(normalize, logprobs=reply.logprobs)
        outcome, parsed, error = parsing.judge_reply(
            reply, normalize, plain_text=spec.plain_text, under_test=spec.under_test
        )
        turn = Turn(
            item_id=self.item_id,
            key=key,
            role=role,
            endpoint=role_config.endpoint,
            model=reply.model or role_config.model,
            request_hash=_request_hash(request),
            raw_output=reply.content,
            outcome=outcome,
            parsed=parsed,
            error=error,
            agreed=parsed.get("agree") if parsed is not None and "agree" in parsed else None,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            cached_prompt_tokens=reply.cached_prompt_tokens,
            latency_ms=reply.latency_ms or (time.perf_counter() - started) * 1000,
        )
        return await self.log.record(turn)


def _request_hash(request: ChatRequest) -> str:
    """The sha256 of `json.dumps([model, messages, schema_name, temperature, max_tokens],
    sort_keys=True)`, as every stored turn has it, written out here so that a leading system
    message (policies and instructions: kilobytes, the same for many calls) is encoded and
    hashed once: the hash of the body up to its end is kept, and copied for each call."""
    rest = ", ".join(_scalar(v) for v in (request.schema_name, request.temperature, request.max_tokens))
    first, *others = request.messages or [{}]
    if (
        first.keys() == {"content", "role"}
        and first["role"] == "system"
        and isinstance(first["content"], str)
    ):
        hashed = _hashed_up_to_system_message(request.model, first["content"]).copy()
        hashed.update("".join(f", {_message(message)}" for message in others).encode())
        hashed.update(f"], {rest}]".encode())
        return hashed.hexdigest()
    messages = ", ".join(_message(message) for message in request.messages)
    return hashlib.sha256(f"[{_scalar(request.model)}, [{messages}], {rest}]".encode()).hexdigest()


@lru_cache(maxsize=64, typed=True)
def _hashed_up_to_system_message(model: str, system: str) -> hashlib._Hash:
    body = f'[{_scalar(model)}, [{{"content": {_scalar(system)}, "role": "system"}}'
    return hashlib.sha256(body.encode())


def _scalar(value: object) -> str:
    """json.dumps(value), without its few microseconds of setup per call for the usual scalars."""
    if type(value) is str:
        return encode_basestring_ascii(value)
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value, sort_keys=True)


def _message(message: dict[str, str]) -> str:
    fields = (f"{_scalar(key)}: {_scalar(message[key])}" for key in sorted(message))
    return "{" + ", ".join(fields) + "}"
