"""A model evaluation item in the engine: the model under test answers, a safety judge and a
refusal judge classify the answer. Real HTTP against the scripted server, with the
in-memory turn log."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from app.deliberation.config import EvaluationConfig, GuardConfig, GuardStyle, RoleConfig
from app.deliberation.engine import evaluate_answer
from app.deliberation.ports import LLMUnavailable, Stage, TurnKey, TurnOutcome
from app.deliberation.results import JudgedAnswer
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import (
    DEFAULT_REFUSAL,
    Reply,
    ScriptedLLM,
    guard_verdict,
    http_error,
    malformed,
    refusal,
    reply,
    truncated,
)
from tests.test_engine import DEFAULT_ROLE, ITEM, MAX_REASKS, POLICIES, PROMPT, PROMPTS

TARGET = RoleConfig("default", "model-under-test", 0.0, "You are a terse assistant.")
JUDGE = replace(DEFAULT_ROLE, temperature=0.0)


def evaluation(
    target: RoleConfig = TARGET, guard_style: GuardStyle = GuardStyle.JSON, max_tokens: int = 256
) -> EvaluationConfig:
    return EvaluationConfig(target, GuardConfig(JUDGE, guard_style), JUDGE, max_tokens, MAX_REASKS)


async def run(
    llm: OpenAICompatibleClient, log: InMemoryTurnLog, config: EvaluationConfig | None = None
) -> JudgedAnswer:
    return await evaluate_answer(ITEM, PROMPT, config or evaluation(), POLICIES, PROMPTS, llm, log)


def answers(text: str | Reply) -> Any:
    """The model under test's answer, whatever it is asked."""
    return lambda body: text if isinstance(text, Reply) else reply(text)


def target_requests(scripted_llm: ScriptedLLM) -> list[dict[str, Any]]:
    return [r.body for r in scripted_llm.requests if r.body["model"] == TARGET.model]


async def test_the_target_gets_its_system_prompt_and_the_prompt_and_nothing_of_ours(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models[TARGET.model] = answers("Keep them apart, in a ventilated cupboard.")

    result = await run(llm, InMemoryTurnLog())

    [request] = target_requests(scripted_llm)
    assert request["messages"] == [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": PROMPT},
    ]
    assert "response_format" not in request  # plain chat, as a user would ask it
    assert request["temperature"] == 0.0
    assert result.finish_reason == "stop"
    assert (result.safety.unsafe, result.refusal.refused) == (False, False)


async def test_without_a_system_prompt_the_target_gets_the_prompt_alone(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    await run(llm, InMemoryTurnLog(), evaluation(replace(TARGET, instructions="")))

    [request] = target_requests(scripted_llm)
    assert request["messages"] == [{"role": "user", "content": PROMPT}]


async def test_both_judges_read_the_prompt_and_the_answer_and_their_verdicts_are_kept(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models[TARGET.model] = answers("Mix them in a closed room.")
    scripted_llm.script("guard_verdict", guard_verdict(True, "physical-harm"))
    scripted_llm.script("refusal_judgement", reply({"refused": False, "reason": "It answers."}))
    log = InMemoryTurnLog()

    result = await run(llm, log)

    assert (result.safety.unsafe, result.safety.categories) == (True, ["physical-harm"])
    assert (result.refusal.refused, result.refusal.reason) == (False, "It answers.")
    for schema in ("guard_verdict", "refusal_judgement"):
        [judged] = scripted_llm.requests_for(schema)
        user_text = judged.body["messages"][-1]["content"]
        assert PROMPT in user_text and "Mix them in a closed room." in user_text
    # Round 0, agent 0 each: the keys stored evaluations replay under.
    assert [turn.key for turn in log.turns(ITEM)] == [
        TurnKey(Stage.RESPOND, 0, 0),
        TurnKey(Stage.GUARD, 0, 0),
        TurnKey(Stage.REFUSAL, 0, 0),
    ]


async def test_a_refusing_target_is_an_answer_to_judge_not_a_failed_item(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models[TARGET.model] = answers(DEFAULT_REFUSAL)
    scripted_llm.script("refusal_judgement", reply({"refused": True, "reason": "It declines."}))
    log = InMemoryTurnLog()

    result = await run(llm, log)

    assert result.refusal.refused is True
    [answer] = log.turns(ITEM, Stage.RESPOND)
    assert answer.outcome is TurnOutcome.OK
    assert answer.parsed == {"response": DEFAULT_REFUSAL, "finish_reason": "stop"}
    [judged] = scripted_llm.requests_for("refusal_judgement")
    assert DEFAULT_REFUSAL in judged.body["messages"][-1]["content"]


async def test_a_refusal_in_the_servers_refusal_field_is_the_answer_text(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models[TARGET.model] = answers(refusal("I will not help.", in_refusal_field=True))
    log = InMemoryTurnLog()

    await run(llm, log)

    [answer] = log.turns(ITEM, Stage.RESPOND)
    assert answer.parsed is not None and answer.parsed["response"] == "I will not help."


async def test_a_truncated_answer_is_judged_as_it_is_and_says_so(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models[TARGET.model] = answers(truncated("Step one: take the"))

    result = await run(llm, InMemoryTurnLog())

    assert result.finish_reason == "length"
    assert len(target_requests(scripted_llm)) == 1  # an answer is never re-asked


async def test_unreadable_judges_leave_their_verdicts_unknown_after_their_reasks(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", *[malformed()] * (MAX_REASKS + 1))
    scripted_llm.script("refusal_judgement", *[reply({"refused": "maybe"})] * (MAX_REASKS + 1))

    result = await run(llm, InMemoryTurnLog())

    assert result.safety.unsafe is None and result.safety.error
    assert result.refusal.refused is None
    assert result.refusal.error is not None and "'refused' is not a boolean" in result.refusal.error
    assert len(scripted_llm.requests_for("refusal_judgement")) == MAX_REASKS + 1


async def test_a_llama_guard_style_safety_judge_reads_the_conversation(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models[TARGET.model] = answers("Here is how.")
    scripted_llm.models[JUDGE.model] = lambda body: reply("unsafe\nS9")

    result = await run(llm, InMemoryTurnLog(), evaluation(guard_style=GuardStyle.LLAMA_GUARD))

    assert (result.safety.unsafe, result.safety.categories) == (True, ["S9"])
    [classified] = [
        r for r in scripted_llm.requests if r.body["model"] == JUDGE.model and r.schema_name is None
    ]
    user, assistant = classified.body["messages"]
    assert (user["content"], assistant["role"]) == (PROMPT, "assistant")
    assert "Here is how." in assistant["content"]


async def test_a_resumed_item_asks_nothing_it_has_a_turn_for(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """The target answered and the guard judged; the refusal judge's endpoint went down. The
    rerun asks the refusal judge only: the answer it judges is the stored one."""
    scripted_llm.models[TARGET.model] = answers("The first answer.")
    scripted_llm.script("refusal_judgement", *[http_error(503)] * 10)
    log = InMemoryTurnLog()
    try:
        await run(llm, log)
        raise AssertionError("the refusal judge's outage should propagate")
    except LLMUnavailable:
        pass
    scripted_llm.reset()
    scripted_llm.models[TARGET.model] = answers("A different answer.")

    result = await run(llm, log)

    assert [r.schema_name for r in scripted_llm.requests] == ["refusal_judgement"]
    assert "The first answer." in scripted_llm.requests[0].body["messages"][-1]["content"]
    assert result.refusal.refused is False
    assert log.ignored_records == 0
