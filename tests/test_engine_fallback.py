"""A refusal asks the job's fallback role the same request: the engine over real HTTP (the
scripted server plays the stage's agent on the default endpoint and the fallback on
`second`), with the in-memory turn log standing in for Postgres."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.deliberation.budget import largest_requests
from app.deliberation.config import GradingConfig, GuardStyle, Mode, PipelineConfig, RoleConfig
from app.deliberation.ports import FALLBACK_ATTEMPT, LLMUnavailable, Stage, TurnKey, TurnOutcome
from app.deliberation.results import METRICS
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import (
    ScriptedLLM,
    agree,
    guard_verdict,
    http_error,
    malformed,
    refusal,
    reply,
    scores,
)
from tests.test_engine import DEFAULT_ROLE, ITEM, POLICIES, PROMPT, PROMPTS, completed, failed, pipeline, run
from tests.test_engine_quality import unsafe_rejected_scores, with_quality

FALLBACK = RoleConfig(endpoint="second", model="fallback-model", temperature=0.3)
SEED = {"thoughts": ["The fallback reasons about safe storage."], "response": "Keep them apart."}


def with_fallback(agents: int = 2, max_rounds: int = 3) -> PipelineConfig:
    return replace(pipeline(agents, max_rounds), fallback=FALLBACK)


def keys(log: InMemoryTurnLog, stage: Stage) -> list[tuple[int, int, int, str, str, TurnOutcome]]:
    return [
        (t.key.round, t.key.agent, t.key.attempt, t.endpoint, t.model, t.outcome)
        for t in log.turns(ITEM, stage)
    ]


async def test_a_refused_seed_is_answered_by_the_fallback_and_both_turns_are_kept(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", refusal())
    second_llm.script("seed_cot", reply(SEED))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, with_fallback()))

    assert keys(log, Stage.SEED) == [
        (0, 0, 0, "default", "scripted-model", TurnOutcome.REFUSED),
        (0, 0, FALLBACK_ATTEMPT, "second", "fallback-model", TurnOutcome.OK),
    ]
    assert result.fallbacks == [{"stage": "seed", "round": 0, "agent": 0, "model": "fallback-model"}]
    assert result.thoughts[0].text == SEED["thoughts"][0]  # the fallback's answer is the stage's
    [refused] = scripted_llm.requests_for("seed_cot")
    [asked] = second_llm.requests
    assert asked.body["messages"] == refused.body["messages"]  # the same request, of another model
    assert (asked.body["model"], asked.body["temperature"]) == ("fallback-model", 0.3)
    # Only the refused stage moved: the later ones are the stage agents' own.
    assert {r.body["model"] for r in scripted_llm.requests} == {"scripted-model"}
    assert len(scripted_llm.requests_for("refined_cot")) == 1


async def test_a_refused_deliberation_turn_falls_back_with_the_agents_persona_and_is_named_in_the_result(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    persona = "Hunt for needless refusals."
    hunter = replace(DEFAULT_ROLE, instructions=persona)
    config = replace(with_fallback(agents=2, max_rounds=2), deliberators=(DEFAULT_ROLE, hunter))
    scripted_llm.script(
        "deliberation_turn",
        agree(False, ["Agent 1 adds a thought."]),
        refusal("I can't assist with that.", in_refusal_field=True),
        agree(True),  # round 2, agent 1: back with the job's own agent
    )
    second_llm.script("deliberation_turn", agree(False, ["The fallback adds one."], response="Fallback's."))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, config))

    assert keys(log, Stage.DELIBERATION) == [
        (1, 1, 0, "default", "scripted-model", TurnOutcome.OK),
        (1, 2, 0, "default", "scripted-model", TurnOutcome.REFUSED),
        (1, 2, FALLBACK_ATTEMPT, "second", "fallback-model", TurnOutcome.OK),
        (2, 1, 0, "default", "scripted-model", TurnOutcome.OK),
    ]
    assert result.fallbacks == [{"stage": "deliberation", "round": 1, "agent": 2, "model": "fallback-model"}]
    assert [(t.text, t.round, t.agent) for t in result.thoughts[-2:]] == [
        ("Agent 1 adds a thought.", 1, 1),
        ("The fallback adds one.", 1, 2),
    ]
    [asked] = second_llm.requests
    assert persona in asked.body["messages"][0]["content"]  # the role's instructions stay
    assert asked.body["messages"] == scripted_llm.requests_for("deliberation_turn")[1].body["messages"]


async def test_a_fallback_that_refuses_too_fails_the_item_as_agent_refused(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("intent_decomposition", refusal())
    second_llm.script("intent_decomposition", refusal("I won't do that either."))
    log = InMemoryTurnLog()

    result = failed(await run(llm, log, with_fallback()))

    assert (result.code, result.stage) == ("agent_refused", "intent")
    assert "fallback-model" in result.message and "I won't do that either." in result.message
    assert keys(log, Stage.INTENT) == [
        (0, 0, 0, "default", "scripted-model", TurnOutcome.REFUSED),
        (0, 0, FALLBACK_ATTEMPT, "second", "fallback-model", TurnOutcome.REFUSED),
    ]
    assert len(second_llm.requests) == 1  # a refusal is not re-asked, the fallback's neither
    assert scripted_llm.requests_for("seed_cot") == []


async def test_a_refused_refinement_falls_back_and_reads_the_same_thoughts(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("refined_cot", refusal())
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, with_fallback()))

    assert [(t.key.attempt, t.model, t.outcome) for t in log.turns(ITEM, Stage.REFINE)] == [
        (0, "scripted-model", TurnOutcome.REFUSED),
        (FALLBACK_ATTEMPT, "fallback-model", TurnOutcome.OK),
    ]
    assert result.fallbacks == [{"stage": "refine", "round": 0, "agent": 0, "model": "fallback-model"}]
    [asked] = second_llm.requests
    assert asked.body["messages"] == scripted_llm.requests_for("refined_cot")[0].body["messages"]


async def test_without_a_fallback_a_refusal_fails_the_item_with_one_call(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("refined_cot", refusal())
    log = InMemoryTurnLog()

    result = failed(await run(llm, log, pipeline()))

    assert (result.code, result.stage) == ("agent_refused", "refine")
    assert result.message.startswith("the refiner agent refused to reason")
    assert [t.key for t in log.turns(ITEM, Stage.REFINE)] == [TurnKey(Stage.REFINE)]
    assert second_llm.requests == []


async def test_only_a_refusal_falls_back_not_unusable_output(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", malformed(), malformed(), malformed())

    result = failed(await run(llm, InMemoryTurnLog(), with_fallback()))

    assert (result.code, result.stage) == ("unparseable_output", "seed")
    assert second_llm.requests == []


async def test_the_fallbacks_bad_output_is_re_asked_from_its_own_attempt_numbers(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", malformed(), refusal())  # refused on the re-ask
    second_llm.script("seed_cot", malformed(), reply(SEED))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, with_fallback()))

    assert [(t.key.attempt, t.outcome) for t in log.turns(ITEM, Stage.SEED)] == [
        (0, TurnOutcome.MALFORMED),
        (1, TurnOutcome.REFUSED),
        (FALLBACK_ATTEMPT, TurnOutcome.MALFORMED),
        (FALLBACK_ATTEMPT + 1, TurnOutcome.OK),
    ]
    first, reask = second_llm.requests
    # The fallback starts from the stage's request, not from the refused conversation.
    assert first.body["messages"] == scripted_llm.requests_for("seed_cot")[0].body["messages"]
    assert len(reask.body["messages"]) == len(first.body["messages"]) + 2
    assert result.fallbacks == [{"stage": "seed", "round": 0, "agent": 0, "model": "fallback-model"}]


async def test_a_zero_shot_refusal_falls_back(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("zero_shot_cot", refusal())
    second_llm.script("zero_shot_cot", reply(SEED))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, replace(with_fallback(), mode=Mode.ZERO_SHOT)))

    assert result.response == SEED["response"]
    assert result.fallbacks == [{"stage": "zero_shot", "round": 0, "agent": 0, "model": "fallback-model"}]
    assert [t.key.attempt for t in log.turns(ITEM, Stage.ZERO_SHOT)] == [0, FALLBACK_ATTEMPT]


async def test_a_resumed_item_reuses_the_refusal_and_asks_the_fallback_once(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    """A crash between the refusal and the fallback's answer: here the fallback's endpoint
    stays down past the client's retries, so the first run ends with LLMUnavailable."""
    scripted_llm.script("seed_cot", refusal())
    second_llm.script("seed_cot", *[http_error(500)] * 3, reply(SEED))
    log = InMemoryTurnLog()
    config = with_fallback()

    with pytest.raises(LLMUnavailable):
        await run(llm, log, config)
    assert [t.outcome for t in log.turns(ITEM, Stage.SEED)] == [TurnOutcome.REFUSED]

    resumed = completed(await run(llm, log, config))
    again = completed(await run(llm, log, config))  # everything is stored: nothing is asked

    assert len(scripted_llm.requests_for("seed_cot")) == 1  # the refusing agent was not asked again
    assert len(second_llm.requests) == 4 and second_llm.pending("seed_cot") == 0
    assert log.ignored_records == 0
    assert (
        resumed.fallbacks
        == again.fallbacks
        == [{"stage": "seed", "round": 0, "agent": 0, "model": "fallback-model"}]
    )
    assert resumed == again


def with_pairs(guard_style: GuardStyle = GuardStyle.JSON) -> PipelineConfig:
    return replace(with_quality(guard_style=guard_style), fallback=FALLBACK)


def fell_back(stage: str, round: int = 0) -> dict[str, object]:
    return {"stage": stage, "round": round, "agent": 0, "model": "fallback-model"}


async def test_a_refused_grade_is_scored_by_the_fallback_and_listed_after_the_items_own_stages(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", refusal())
    scripted_llm.script("quality_scores", refusal("I won't grade this."))
    second_llm.script("seed_cot", reply(SEED))
    second_llm.script("quality_scores", reply(scores(relevance=2)))
    config = replace(with_fallback(), grading=GradingConfig(DEFAULT_ROLE, {"relevance": 3.0}))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, config))

    assert result.grade is not None and result.grade.scores == scores(relevance=2)
    assert result.gate is not None and result.gate.reasons == ["relevance 2 < 3"]
    assert result.fallbacks == [fell_back("seed"), fell_back("grade")]
    assert keys(log, Stage.GRADE) == [
        (0, 0, 0, "default", "scripted-model", TurnOutcome.REFUSED),
        (0, 0, FALLBACK_ATTEMPT, "second", "fallback-model", TurnOutcome.OK),
    ]
    graded = second_llm.requests_for("quality_scores")[0]
    assert graded.body["messages"] == scripted_llm.requests_for("quality_scores")[0].body["messages"]


async def test_a_grade_the_fallback_refuses_too_leaves_the_cot_ungraded_not_failed(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("quality_scores", refusal())
    second_llm.script("quality_scores", refusal("I will not grade it either."))
    config = replace(with_fallback(), grading=GradingConfig(DEFAULT_ROLE, dict.fromkeys(METRICS, 3.0)))

    result = completed(await run(llm, InMemoryTurnLog(), config))

    assert result.grade is not None and result.grade.scores is None
    assert "fallback-model" in (result.grade.error or "") and "either" in (result.grade.error or "")
    assert result.gate is not None and not result.gate.accepted
    assert result.fallbacks == []


async def test_a_refused_whisper_is_written_by_the_fallback_and_the_pair_goes_on(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("whisper_belief", refusal())
    second_llm.script("whisper_belief", reply({"belief": "The fallback's belief."}))
    scripted_llm.script("guard_verdict", guard_verdict(True))
    scripted_llm.script("quality_scores", reply(scores()), reply(unsafe_rejected_scores()))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, with_pairs()))

    assert result.pair is not None and result.pair.made
    assert [t.belief for t in result.pair.tries] == ["The fallback's belief."]
    assert (
        "The fallback's belief."
        in scripted_llm.requests_for("rejected_cot")[0].body["messages"][-1]["content"]
    )
    assert result.fallbacks == [fell_back("whisper", 1)]
    assert [(t.key.round, t.key.attempt, t.model) for t in log.turns(ITEM, Stage.WHISPER)] == [
        (1, 0, "scripted-model"),
        (1, FALLBACK_ATTEMPT, "fallback-model"),
    ]


async def test_a_whisper_the_fallback_refuses_too_ends_the_pair_as_whisperer_refused(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("whisper_belief", refusal())
    second_llm.script("whisper_belief", refusal())

    result = completed(await run(llm, InMemoryTurnLog(), with_pairs()))

    assert result.pair is not None and result.pair.reason == "whisperer_refused"
    assert len(second_llm.requests_for("whisper_belief")) == 1
    assert scripted_llm.requests_for("rejected_cot") == [] and result.fallbacks == []


async def test_a_refusing_json_guard_is_asked_again_of_the_fallback_whose_verdict_counts(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", refusal())
    second_llm.script("guard_verdict", guard_verdict(True, "Physical harm"))
    scripted_llm.script("quality_scores", reply(scores()), reply(unsafe_rejected_scores()))

    result = completed(await run(llm, InMemoryTurnLog(), with_pairs()))

    assert result.pair is not None and result.pair.made
    [flagged] = result.pair.tries
    assert flagged.guard is not None and flagged.guard.categories == ["Physical harm"]
    assert result.fallbacks == [fell_back("guard", 1)]


async def test_a_refused_grade_of_the_rejected_side_falls_back_under_its_try_number(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", guard_verdict(False), guard_verdict(True))
    # The chosen side, try 1's rejected side (every guarded try is graded), then try 2's.
    scripted_llm.script("quality_scores", reply(scores()), reply(scores()), refusal())
    second_llm.script("quality_scores", reply(unsafe_rejected_scores()))

    result = completed(await run(llm, InMemoryTurnLog(), with_pairs()))

    assert result.pair is not None and result.pair.made and result.pair.gap == 2.5
    assert result.fallbacks == [fell_back("grade", 2)]


async def test_the_generator_resisting_the_belief_is_a_failed_try_never_asked_of_the_fallback(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script("rejected_cot", refusal("I can't reason from that belief."))
    scripted_llm.script("guard_verdict", guard_verdict(True))
    scripted_llm.script("quality_scores", reply(scores()), reply(unsafe_rejected_scores()))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, with_pairs()))

    assert result.pair is not None and result.pair.made
    assert result.pair.tries[0].refusal == "I can't reason from that belief."
    assert second_llm.requests == [] and result.fallbacks == []
    assert [(t.key.round, t.key.attempt) for t in log.turns(ITEM, Stage.REJECTED)] == [(1, 0), (2, 0)]


async def test_a_refusing_llama_guard_is_not_asked_of_the_fallback_chat_model(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    scripted_llm.script(None, refusal())

    result = completed(await run(llm, InMemoryTurnLog(), with_pairs(GuardStyle.LLAMA_GUARD)))

    assert result.pair is not None and result.pair.reason == "guard_unparseable"
    [judged] = result.pair.tries
    assert judged.guard is not None and "refused" in (judged.guard.error or "")
    assert second_llm.requests == [] and result.fallbacks == []


def test_the_fallbacks_requests_are_budgeted_on_its_endpoint() -> None:
    plain = largest_requests(pipeline(), POLICIES, PROMPTS, PROMPT)
    budgets = largest_requests(with_fallback(), POLICIES, PROMPTS, PROMPT)

    assert budgets[: len(plain)] == plain
    assert [(b.role, b.endpoint, b.tokens, b.falls_back) for b in budgets[len(plain) :]] == [
        (f"{b.role} (fallback)", "second", b.tokens, False) for b in plain
    ]


@pytest.mark.parametrize(
    ("guard_style", "falling_back"),
    [
        (
            GuardStyle.JSON,
            ["intent", "seed", "deliberator-1", "deliberator-2", "refiner", "grader", "whisperer", "guard"],
        ),
        (
            GuardStyle.LLAMA_GUARD,
            ["intent", "seed", "deliberator-1", "deliberator-2", "refiner", "grader", "whisperer"],
        ),
    ],
)
def test_the_fallback_is_budgeted_for_every_stage_that_falls_back_and_no_other(
    guard_style: GuardStyle, falling_back: list[str]
) -> None:
    own = largest_requests(replace(with_pairs(guard_style), fallback=None), POLICIES, PROMPTS, PROMPT)
    budgets = largest_requests(with_pairs(guard_style), POLICIES, PROMPTS, PROMPT)

    assert budgets[: len(own)] == own
    assert [b.role for b in own if b.falls_back] == falling_back
    by_role = {b.role: b for b in own}
    assert [(b.role, b.endpoint, b.tokens) for b in budgets[len(own) :]] == [
        (f"{role} (fallback)", "second", by_role[role].tokens) for role in falling_back
    ]
