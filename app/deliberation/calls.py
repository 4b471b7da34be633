"""One stage call, resumable: reuse the turn stored under its key, or ask the LLM, judge the
reply and record the turn before returning. Bad output gets a bounded number of re-asks."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

from app.deliberation import parsing, schemas
from app.deliberation.config import RoleConfig
from app.deliberation.policies import PolicySet
from app.deliberation.ports import ChatRequest, LLMClient, Turn, TurnKey, TurnLog, TurnOutcome
from app.deliberation.prompting import render
from app.deliberation.results import Failed

Normalize = Callable[[Any], dict[str, Any]]


class StageFailed(Exception):
    """A stage gave no usable output. The item's own stages end the item with `failure`;
    the optional stages (grading, pairs) record it and let the item complete."""

    def __init__(self, failure: Failed, turn: Turn) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.turn = turn  # the last try, e.g. the refusal text


@dataclass
class Caller:
    item_id: UUID
    policies: PolicySet
    llm: LLMClient
    log: TurnLog
    max_tokens: int
    max_reasks: int
    replayed: dict[TurnKey, Turn] = field(default_factory=dict)

    async def ask(
        self,
        key: TurnKey,
        role: str,
        role_config: RoleConfig,
        schema_name: str | None,
        messages: list[dict[str, str]],
        normalize: Normalize,
        *,
        reasks: bool = True,
    ) -> dict[str, Any]:
        """The normalized output of one stage call, or StageFailed.

        A malformed reply is shown back with what was wrong. A truncated one is not (it is
        long and useless); the re-ask asks for brevity and allows twice the tokens.
        `schema_name` None asks for plain text, read by `normalize` itself; such callers
        (classifiers with their own chat template) pass reasks=False.
        """
        original, max_tokens = messages, self.max_tokens
        tries = self.max_reasks + 1 if reasks else 1
        for attempt in range(tries):
            attempt_key = replace(key, attempt=attempt)
            turn = self.replayed.get(attempt_key) or await self._call(
                attempt_key, role, role_config, schema_name, messages, normalize, max_tokens
            )
            if turn.outcome is TurnOutcome.OK:
                assert turn.parsed is not None
                return turn.parsed
            if turn.outcome is TurnOutcome.REFUSED:
                failure = Failed(
                    "agent_refused", f"the {role} agent refused to reason: {turn.error}", key.stage
                )
                raise StageFailed(failure, turn)
            if turn.outcome is TurnOutcome.TRUNCATED:
                max_tokens *= 2
                messages = [*original, {"role": "user", "content": render("reask.truncated")}]
            else:
                messages = [
                    *messages,
                    {"role": "assistant", "content": turn.raw_output},
                    {"role": "user", "content": render("reask.malformed", error=turn.error or "")},
                ]
        failure = Failed(
            "unparseable_output",
            f"the {role} agent gave no usable output in {tries} tries; "
            f"last problem: {turn.outcome.value}: {turn.error}",
            key.stage,
        )
        raise StageFailed(failure, turn)

    async def _call(
        self,
        key: TurnKey,
        role: str,
        role_config: RoleConfig,
        schema_name: str | None,
        messages: list[dict[str, str]],
        normalize: Normalize,
        max_tokens: int,
    ) -> Turn:
        request = ChatRequest(
            role=role,
            endpoint=role_config.endpoint,
            model=role_config.model,
            messages=messages,
            schema_name=schema_name,
            schema=schemas.BY_NAME[schema_name] if schema_name else None,
            temperature=role_config.temperature,
            max_tokens=max_tokens,
        )
        started = time.perf_counter()
        reply = await self.llm.chat(request)
        outcome, parsed, error = parsing.judge_reply(reply, normalize, plain_text=schema_name is None)
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
            latency_ms=reply.latency_ms or (time.perf_counter() - started) * 1000,
        )
        return await self.log.record(turn)


def _request_hash(request: ChatRequest) -> str:
    body = [request.model, request.messages, request.schema_name, request.temperature, request.max_tokens]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
