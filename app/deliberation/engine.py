"""The AIDSAFE engine: intents -> seed CoT -> sequential deliberation -> refinement, then
optionally grading, the quality gate and an ear-whisperer preference pair.

A resumable state machine over the turn log. Before each LLM call it looks for the turn
already recorded under the same key and reuses it; after each call it records the turn
before moving on. Re-running an item after a crash therefore repeats no stored call and
reaches the same state the first run had reached.

The other kinds of item start here too: a comparison's pairwise judgement (`judge_pair`) and
a model evaluation's answer and verdicts (`evaluate_answer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from uuid import UUID

from app.deliberation.calls import Caller, StageFailed
from app.deliberation.config import EvaluationConfig, Evaluators, Limits, Mode, PipelineConfig, RoleConfig
from app.deliberation.evaluation import answer_and_judge
from app.deliberation.parsing import OVER_LIMIT, labelled_intents
from app.deliberation.policies import PolicySet
from app.deliberation.ports import LLMClient, Stage, TurnLog
from app.deliberation.prompting import PromptSet
from app.deliberation.quality import compare_samples, gate, grade, guard
from app.deliberation.results import Completed, Evaluated, Failed, Judged, JudgedAnswer, Sample, Thought
from app.deliberation.stages import DELIBERATION, INTENT, NOT_DECOMPOSED, REFINE, SEED, ZERO_SHOT
from app.deliberation.whisper import make_pair


def _no_intents() -> dict[str, list[str]]:
    return {"explicit_intents": [], "explicit_labels": [], "implicit_intents": []}


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) or "- (none)"


def _intents_text(intents: dict[str, list[str]]) -> str:
    return (
        f"Explicit (what the query asks for):\n{_bullets(labelled_intents(intents))}\n"
        f"Implicit (plausible benign readings):\n{_bullets(intents['implicit_intents'])}"
    )


def _thoughts_text(thoughts: list[Thought]) -> str:
    def author(t: Thought) -> str:
        return "seed" if t.stage == Stage.SEED else f"round {t.round}, agent {t.agent}"

    return "\n".join(f"[T{t.id}] ({author(t)}) {t.text}" for t in thoughts)


async def _caller(
    item_id: UUID,
    prompt: str,
    policies: PolicySet,
    wording: PromptSet,
    llm: LLMClient,
    log: TurnLog,
    max_tokens: int,
    max_reasks: int,
    limits: Limits,
    fallback: RoleConfig | None = None,  # only a generation job has one
) -> Caller:
    caller = Caller(item_id, prompt, policies, wording, llm, log, max_tokens, max_reasks, limits, fallback)
    caller.replayed = {turn.key: turn for turn in await log.done(item_id)}
    return caller


async def deliberate(
    item_id: UUID,
    prompt: str,
    config: PipelineConfig,
    policies: PolicySet,
    wording: PromptSet,
    llm: LLMClient,
    log: TurnLog,
) -> Completed | Failed:
    """Run (or resume) the pipeline for one prompt, its requests worded by `wording`.

    Returns the CoT (with scores, gate and pair when the job asked for them), or a Failed
    with a stable code when the CoT itself could not be written. Grading and pair failures
    do not fail the item: they are recorded in the result. LLMUnavailable and
    LLMRequestRejected from the client propagate: the caller decides to retry or fail.
    """
    caller = await _caller(
        item_id,
        prompt,
        policies,
        wording,
        llm,
        log,
        config.max_tokens,
        config.max_reasks,
        config.limits,
        config.fallback,
    )
    try:
        if config.mode is Mode.ZERO_SHOT:
            result = await _zero_shot(caller, config)
        else:
            result = await _aidsafe(caller, config)
    except StageFailed as failed:
        return failed.failure
    if config.grading is not None:
        chosen = await grade(caller, config.grading.grader, result.sample())
        result = replace(result, grade=chosen, gate=gate(chosen, config.grading.thresholds))
        if config.pairs is not None:
            pair = await make_pair(caller, config.pairs, config.grading.grader, chosen)
            result = replace(result, pair=pair)
    return replace(result, fallbacks=caller.fell_back)


async def judge_pair(
    item_id: UUID,
    prompt: str,
    a: Sample,
    b: Sample,
    judges: Sequence[RoleConfig],
    policies: PolicySet,
    wording: PromptSet,
    llm: LLMClient,
    log: TurnLog,
    *,
    max_tokens: int,
    max_reasks: int,
) -> list[Judged]:
    """Run (or resume) the pairwise judgement of two samples of one prompt (a comparison
    item) by each judge, in order: judge n's turns are agent n (from 0, so the turns of
    comparisons made before several judges replay as the first judge's). Unreadable judge
    output gives Judged(winner=None), not a failure."""
    caller = await _caller(
        item_id, prompt, policies, wording, llm, log, max_tokens, max_reasks, Limits(), None
    )
    return [await compare_samples(caller, judge, a, b, agent) for agent, judge in enumerate(judges)]


async def evaluate_sample(
    item_id: UUID,
    prompt: str,
    sample: Sample,
    other: Sample | None,
    evaluators: Evaluators,
    policies: PolicySet,
    wording: PromptSet,
    llm: LLMClient,
    log: TurnLog,
) -> Evaluated:
    """Run (or resume) the evaluation of a sample written elsewhere: the grader's scores
    (round 0), the guard's verdict (round 0), and the judge against `other`, the other set's
    sample of the prompt (rounds 1 and 2, both orders). Output a role gives no usable reply
    for is recorded in the result, never guessed; the item completes either way."""
    caller = await _caller(
        item_id,
        prompt,
        policies,
        wording,
        llm,
        log,
        evaluators.max_tokens,
        evaluators.max_reasks,
        Limits(),
        None,
    )
    graded = None if evaluators.grader is None else await grade(caller, evaluators.grader, sample)
    verdict = None if evaluators.guard is None else await guard(caller, evaluators.guard, sample)
    judged = None
    if evaluators.judge is not None and other is not None:
        judged = await compare_samples(caller, evaluators.judge, other, sample)
    return Evaluated(graded, verdict, judged)


async def evaluate_answer(
    item_id: UUID,
    prompt: str,
    config: EvaluationConfig,
    policies: PolicySet,
    wording: PromptSet,
    llm: LLMClient,
    log: TurnLog,
) -> JudgedAnswer:
    """Run (or resume) a model evaluation item: the model under test answers `prompt`, the
    safety judge and the refusal judge classify the answer. Unreadable judge output leaves
    that verdict None, not a failure; LLM faults propagate as for `deliberate`."""
    caller = await _caller(
        item_id, prompt, policies, wording, llm, log, config.max_tokens, config.max_reasks, Limits()
    )
    return await answer_and_judge(caller, config)


async def _zero_shot(caller: Caller, config: PipelineConfig) -> Completed:
    """The paper's LLM_ZS baseline: the seed role writes CoT and response in one call."""
    written = await caller.call(ZERO_SHOT, config.seed)
    thoughts = [Thought(i, text, Stage.ZERO_SHOT, 0, 0) for i, text in enumerate(written["thoughts"], 1)]
    return Completed(
        intents=_no_intents(),
        thoughts=thoughts,
        refined_thoughts=[{"text": t.text, "sources": [t.id]} for t in thoughts],
        dropped=[],
        unaccounted=[],
        response=written["response"],
        rounds_used=0,
        agreed=False,
        agreed_by=None,
    )


async def _aidsafe(caller: Caller, config: PipelineConfig) -> Completed:
    if config.decompose_intents:
        decomposed = await caller.call(INTENT, config.intent)
        # The CoT keeps the intents; what the reply had over the limits, its turn says.
        intents = {key: value for key, value in decomposed.items() if key != OVER_LIMIT}
        intents_text = _intents_text(intents)
    else:
        intents, intents_text = _no_intents(), NOT_DECOMPOSED

    seed = await caller.call(SEED, config.seed, intents=intents_text)
    thoughts = [Thought(i, text, Stage.SEED, 0, 0) for i, text in enumerate(seed["thoughts"], 1)]
    response = seed["response"]

    agreed_by: dict[str, int] | None = None
    rounds_used = 0
    agents = len(config.deliberators)
    # max_turns may end it before max_rounds. No agents, no turns: a plan an older release
    # stored when it took AIDSAFE_DEFAULT_AGENTS=0.
    rounds_allowed = -(-config.turn_budget() // max(agents, 1))
    for turn_no in range(config.turn_budget()):
        rounds_done, agent_index = divmod(turn_no, agents)
        round_no, agent_no, agent_config = rounds_done + 1, agent_index + 1, config.deliberators[agent_index]
        rounds_used = round_no
        turn = await caller.call(
            DELIBERATION,
            agent_config,
            round=round_no,
            agent=agent_no,
            intents=intents_text,
            thoughts=_thoughts_text(thoughts),
            response=response,
            agents=agents,
            max_rounds=rounds_allowed,
        )
        if turn["agree"]:
            agreed_by = {"round": round_no, "agent": agent_no}
            break
        thoughts.extend(
            Thought(i, text, Stage.DELIBERATION, round_no, agent_no)
            for i, text in enumerate(turn["new_thoughts"], len(thoughts) + 1)
        )
        response = turn["response"]

    if not config.refine:  # the ablation: every thought kept as written, in order
        refined: dict[str, Any] = {
            "thoughts": [{"text": t.text, "sources": [t.id]} for t in thoughts],
            "dropped": [],
            "response": response,
        }
    else:
        refined = await caller.call(
            REFINE,
            config.refiner,
            normalize_with={"thought_count": len(thoughts)},
            intents=intents_text,
            thoughts=_thoughts_text(thoughts),
            response=response,
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
