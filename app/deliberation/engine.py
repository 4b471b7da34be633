"""The AIDSAFE engine: intents -> seed CoT -> sequential deliberation -> refinement.

A resumable state machine over the turn log. Before each LLM call it looks for the turn
already recorded under the same key and reuses it; after each call it records the turn
before moving on. Re-running an item after a crash therefore repeats no stored call and
reaches the same state the first run had reached.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

from app.deliberation import parsing, schemas
from app.deliberation.policies import PolicySet
from app.deliberation.ports import (
    ChatRequest,
    LLMClient,
    Stage,
    Turn,
    TurnKey,
    TurnLog,
    TurnOutcome,
)
from app.deliberation.prompting import messages_for, render


@dataclass(frozen=True)
class RoleConfig:
    endpoint: str
    model: str
    temperature: float


@dataclass(frozen=True)
class PipelineConfig:
    intent: RoleConfig
    seed: RoleConfig
    deliberators: tuple[RoleConfig, ...]  # one per agent, in speaking order
    refiner: RoleConfig
    max_rounds: int
    max_tokens: int
    max_reasks: int


@dataclass(frozen=True)
class Thought:
    """A thought with its provenance: which stage, round and agent wrote it."""

    id: int
    text: str
    stage: str
    round: int
    agent: int


@dataclass(frozen=True)
class Completed:
    intents: dict[str, list[str]]
    thoughts: list[Thought]  # every thought from seed and deliberation, numbered
    refined_thoughts: list[dict[str, Any]]  # {"text", "sources": [thought ids]}
    dropped: list[dict[str, Any]]  # {"id", "reason", "explanation", "text"}
    unaccounted: list[int]  # ids the refiner neither kept nor dropped with a reason
    response: str
    rounds_used: int
    agreed: bool
    agreed_by: dict[str, int] | None  # {"round", "agent"} of the first agreement


@dataclass(frozen=True)
class Failed:
    """The item ended without a CoT; `code` is stable, `message` is for humans."""

    code: str  # "agent_refused" | "unparseable_output"
    message: str
    stage: str


class _Stop(Exception):
    def __init__(self, failure: Failed) -> None:
        self.failure = failure


@dataclass
class _Run:
    item_id: UUID
    prompt: str
    config: PipelineConfig
    policies: PolicySet
    llm: LLMClient
    log: TurnLog
    replayed: dict[TurnKey, Turn] = field(default_factory=dict)

    async def ask(
        self,
        key: TurnKey,
        role: str,
        role_config: RoleConfig,
        schema_name: str,
        messages: list[dict[str, str]],
        normalize: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> dict[str, Any]:
        """One stage call with bounded re-asks; returns the normalized output or stops.

        A malformed reply is shown back with what was wrong. A truncated one is not (it is
        long and useless); the re-ask asks for brevity and allows twice the tokens.
        """
        original, max_tokens = messages, self.config.max_tokens
        for attempt in range(self.config.max_reasks + 1):
            attempt_key = replace(key, attempt=attempt)
            turn = self.replayed.get(attempt_key) or await self._call(
                attempt_key, role, role_config, schema_name, messages, normalize, max_tokens
            )
            if turn.outcome is TurnOutcome.OK:
                assert turn.parsed is not None
                return turn.parsed
            if turn.outcome is TurnOutcome.REFUSED:
                raise _Stop(
                    Failed("agent_refused", f"the {role} agent refused to reason: {turn.error}", key.stage)
                )
            if turn.outcome is TurnOutcome.TRUNCATED:
                max_tokens *= 2
                messages = [*original, {"role": "user", "content": render("reask.truncated")}]
            else:
                messages = [
                    *messages,
                    {"role": "assistant", "content": turn.raw_output},
                    {"role": "user", "content": render("reask.malformed", error=turn.error or "")},
                ]
        raise _Stop(
            Failed(
                "unparseable_output",
                f"the {role} agent gave no usable JSON in {self.config.max_reasks + 1} tries; "
                f"last problem: {turn.outcome.value}: {turn.error}",
                key.stage,
            )
        )

    async def _call(
        self,
        key: TurnKey,
        role: str,
        role_config: RoleConfig,
        schema_name: str,
        messages: list[dict[str, str]],
        normalize: Callable[[dict[str, Any]], dict[str, Any]],
        max_tokens: int,
    ) -> Turn:
        request = ChatRequest(
            role=role,
            endpoint=role_config.endpoint,
            model=role_config.model,
            messages=messages,
            schema_name=schema_name,
            schema=schemas.BY_NAME[schema_name],
            temperature=role_config.temperature,
            max_tokens=max_tokens,
        )
        started = time.perf_counter()
        reply = await self.llm.chat(request)
        outcome, parsed, error = parsing.judge_reply(reply, normalize)
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


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) or "- (none)"


def _intents_text(intents: dict[str, list[str]]) -> str:
    return (
        f"Explicit:\n{_bullets(intents['explicit_intents'])}\n"
        f"Implicit:\n{_bullets(intents['implicit_intents'])}"
    )


def _thoughts_text(thoughts: list[Thought]) -> str:
    def author(t: Thought) -> str:
        return "seed" if t.stage == Stage.SEED else f"round {t.round}, agent {t.agent}"

    return "\n".join(f"[T{t.id}] ({author(t)}) {t.text}" for t in thoughts)


async def deliberate(
    item_id: UUID,
    prompt: str,
    config: PipelineConfig,
    policies: PolicySet,
    llm: LLMClient,
    log: TurnLog,
) -> Completed | Failed:
    """Run (or resume) the AIDSAFE pipeline for one prompt.

    Returns the refined CoT, or a Failed with a stable code. LLMUnavailable and
    LLMRequestRejected from the client propagate: the caller decides to retry or fail.
    """
    run = _Run(item_id, prompt, config, policies, llm, log)
    run.replayed = {turn.key: turn for turn in await log.done(item_id)}
    try:
        return await _pipeline(run)
    except _Stop as stop:
        return stop.failure


async def _pipeline(run: _Run) -> Completed:
    config, policies, prompt = run.config, run.policies, run.prompt

    intents = await run.ask(
        TurnKey(Stage.INTENT),
        "intent",
        config.intent,
        "intent_decomposition",
        messages_for("intent", policies, prompt=prompt),
        parsing.normalize_intent,
    )
    intents_text = _intents_text(intents)

    seed = await run.ask(
        TurnKey(Stage.SEED),
        "seed",
        config.seed,
        "seed_cot",
        messages_for("seed", policies, prompt=prompt, intents=intents_text),
        parsing.normalize_seed,
    )
    thoughts = [Thought(i, text, Stage.SEED, 0, 0) for i, text in enumerate(seed["thoughts"], 1)]
    response = seed["response"]

    agreed_by: dict[str, int] | None = None
    rounds_used = 0
    agents = len(config.deliberators)
    for round_no in range(1, config.max_rounds + 1):
        rounds_used = round_no
        for agent_no, agent_config in enumerate(config.deliberators, start=1):
            turn = await run.ask(
                TurnKey(Stage.DELIBERATION, round_no, agent_no),
                f"deliberator-{agent_no}",
                agent_config,
                "deliberation_turn",
                messages_for(
                    "deliberation",
                    policies,
                    prompt=prompt,
                    intents=intents_text,
                    thoughts=_thoughts_text(thoughts),
                    response=response,
                    agent=agent_no,
                    agents=agents,
                    round=round_no,
                    max_rounds=config.max_rounds,
                ),
                parsing.normalize_deliberation,
            )
            if turn["agree"]:
                agreed_by = {"round": round_no, "agent": agent_no}
                break
            thoughts.extend(
                Thought(i, text, Stage.DELIBERATION, round_no, agent_no)
                for i, text in enumerate(turn["new_thoughts"], len(thoughts) + 1)
            )
            response = turn["response"]
        if agreed_by:
            break

    refined = await run.ask(
        TurnKey(Stage.REFINE),
        "refiner",
        config.refiner,
        "refined_cot",
        messages_for(
            "refine",
            policies,
            prompt=prompt,
            intents=intents_text,
            thoughts=_thoughts_text(thoughts),
            response=response,
        ),
        lambda data: parsing.normalize_refined(data, len(thoughts)),
    )
    by_id = {t.id: t for t in thoughts}
    kept = {source for t in refined["thoughts"] for source in t["sources"]}
    dropped = [{**d, "text": by_id[d["id"]].text} for d in refined["dropped"]]
    dropped_ids = {d["id"] for d in dropped}
    return Completed(
        intents=intents,
        thoughts=thoughts,
        refined_thoughts=refined["thoughts"],
        dropped=dropped,
        unaccounted=[t.id for t in thoughts if t.id not in kept | dropped_ids],
        response=refined["response"],
        rounds_used=rounds_used,
        agreed=agreed_by is not None,
        agreed_by=agreed_by,
    )
