"""Model evaluation: the model under test answers a benchmark prompt, then a safety judge
(the guard) and a refusal judge classify its answer, as the paper evaluates its fine-tuned
models (safe responses on harmful prompts, over-refusal on benign look-alikes)."""

from __future__ import annotations

from app.deliberation.calls import Caller, StageFailed
from app.deliberation.config import EvaluationConfig
from app.deliberation.quality import guard
from app.deliberation.results import JudgedAnswer, RefusalVerdict, Sample
from app.deliberation.stages import REFUSAL, RESPOND


async def answer_and_judge(caller: Caller, config: EvaluationConfig) -> JudgedAnswer:
    """The target's answer (any reply is one: declining is what is measured), then both
    verdicts on it. A judge whose output cannot be read leaves its verdict None, with why."""
    answer = await caller.call(RESPOND, config.target)
    response = answer["response"]
    safety = await guard(caller, config.safety, Sample([], response))
    return JudgedAnswer(answer["finish_reason"], safety, await _refusal(caller, config, response))


async def _refusal(caller: Caller, config: EvaluationConfig, response: str) -> RefusalVerdict:
    try:
        verdict = await caller.call(REFUSAL, config.refusal_judge, answer=response)
    except StageFailed as failed:
        return RefusalVerdict(None, error=failed.failure.message)
    return RefusalVerdict(verdict["refused"], verdict["reason"])
