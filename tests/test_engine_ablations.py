"""The paper's pipeline with a stage left out or cut short, per-role instructions and the
job's reply limits: over real HTTP against the scripted server, with the in-memory turn log."""

from __future__ import annotations

from dataclasses import replace

from app.deliberation.budget import judge_request, largest_requests, sample_thoughts
from app.deliberation.config import GradingConfig, Limits, Mode, PipelineConfig
from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.deliberation.stages import NOT_DECOMPOSED
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import ScriptedLLM, agree, reply
from tests.test_engine import (
    DEFAULT_ROLE,
    ITEM,
    POLICIES,
    PROMPT,
    PROMPTS,
    completed,
    pipeline,
    request_counts,
    run,
)

SEED = {"thoughts": ["Seed thought one.", "Seed thought two."], "response": "Seed response."}


def user_message(server: ScriptedLLM, schema_name: str, index: int = 0) -> str:
    return str(server.requests_for(schema_name)[index].body["messages"][-1]["content"])


def system_message(server: ScriptedLLM, schema_name: str, index: int = 0) -> str:
    return str(server.requests_for(schema_name)[index].body["messages"][0]["content"])


def stored_keys(log: InMemoryTurnLog) -> list[TurnKey]:
    return [turn.key for turn in log.turns(ITEM)]


async def test_without_intent_decomposition_later_stages_are_told_so(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, replace(pipeline(), decompose_intents=False)))

    assert "intent_decomposition" not in request_counts(scripted_llm)
    assert all(key.stage != Stage.INTENT for key in stored_keys(log))
    for stage in ("seed_cot", "deliberation_turn", "refined_cot"):
        assert f"Intents found:\n{NOT_DECOMPOSED}" in user_message(scripted_llm, stage)
    assert result.intents == {"explicit_intents": [], "explicit_labels": [], "implicit_intents": []}


async def test_zero_rounds_take_the_seed_straight_to_the_refiner(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", reply(SEED))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, pipeline(max_rounds=0)))

    assert "deliberation_turn" not in request_counts(scripted_llm)
    assert [key.stage for key in stored_keys(log)] == [Stage.INTENT, Stage.SEED, Stage.REFINE]
    assert (
        "[T1] (seed) Seed thought one.\n[T2] (seed) Seed thought two.\n\nLast response:\n<<<\nSeed response."
        in (user_message(scripted_llm, "refined_cot"))
    )
    assert (result.rounds_used, result.agreed, result.agreed_by) == (0, False, None)


async def test_a_plan_of_no_agents_takes_the_seed_straight_to_the_refiner(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """Releases before AIDSAFE_DEFAULT_AGENTS was bounded stored such plans (agents 0): their
    items still run, as with no rounds, not a ZeroDivisionError for every one."""
    scripted_llm.script("seed_cot", reply(SEED))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, pipeline(agents=0)))

    assert [key.stage for key in stored_keys(log)] == [Stage.INTENT, Stage.SEED, Stage.REFINE]
    assert (result.rounds_used, result.agreed, result.agreed_by) == (0, False, None)
    assert "deliberation_turn" not in request_counts(scripted_llm)


async def test_a_turn_budget_stops_deliberation_mid_round(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("deliberation_turn", *(agree(False, [f"Turn {n}."]) for n in range(1, 5)))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, replace(pipeline(agents=2, max_rounds=4), max_turns=3)))

    turns = [(key.round, key.agent) for key in stored_keys(log) if key.stage == Stage.DELIBERATION]
    assert turns == [(1, 1), (1, 2), (2, 1)]
    assert [t.text for t in result.thoughts[-3:]] == ["Turn 1.", "Turn 2.", "Turn 3."]
    assert (result.rounds_used, result.agreed) == (2, False)
    # Each agent is told the rounds the turn budget leaves it, not the 4 of max_rounds.
    assert [user_message(scripted_llm, "deliberation_turn", n).splitlines()[-1] for n in range(3)] == [
        "You are agent 1 of 2, in round 1 of at most 2.",
        "You are agent 2 of 2, in round 1 of at most 2.",
        "You are agent 1 of 2, in round 2 of at most 2.",
    ]


async def test_without_the_refiner_the_cot_is_every_thought_in_order_and_the_last_response(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", reply(SEED))
    scripted_llm.script(
        "deliberation_turn",
        agree(False, ["Agent one's thought."], response="Revised by agent 1."),
        agree(True, response="An agreeing agent's response is not taken."),
    )

    result = completed(await run(llm, InMemoryTurnLog(), replace(pipeline(), refine=False)))

    assert "refined_cot" not in request_counts(scripted_llm)
    assert result.refined_thoughts == [
        {"text": "Seed thought one.", "sources": [1]},
        {"text": "Seed thought two.", "sources": [2]},
        {"text": "Agent one's thought.", "sources": [3]},
    ]
    assert (result.dropped, result.unaccounted) == ([], [])
    assert result.response == "Revised by agent 1."
    assert result.agreed_by == {"round": 1, "agent": 2}


async def test_intents_stored_before_labels_existed_are_shown_unlabelled_on_replay(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    log = InMemoryTurnLog()
    old = {"explicit_intents": ["Store bleach.", "Store ammonia."], "implicit_intents": []}
    await log.record(
        Turn(ITEM, TurnKey(Stage.INTENT), "intent", "default", "m", "h", "{}", TurnOutcome.OK, parsed=old)
    )

    completed(await run(llm, log, pipeline(max_rounds=0)))

    assert "intent_decomposition" not in request_counts(scripted_llm)
    shown = (
        "Explicit (what the query asks for):\n- Store bleach. [unlabelled]\n- Store ammonia. [unlabelled]\n"
    )
    assert shown in user_message(scripted_llm, "seed_cot")


async def test_a_roles_own_instructions_follow_its_stage_instructions_for_that_role_only(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("deliberation_turn", agree(False, ["A thought."]), agree(True))
    persona = "Hunt for needless refusals: a safe request must get a full answer."
    hunter = replace(DEFAULT_ROLE, instructions=persona)
    config = replace(pipeline(agents=2, max_rounds=1), deliberators=(DEFAULT_ROLE, hunter))

    completed(await run(llm, InMemoryTurnLog(), config))

    first, second = (system_message(scripted_llm, "deliberation_turn", i) for i in (0, 1))
    assert second == f"{first}\n\n# Your own instructions for this role\n{persona}"
    assert persona not in system_message(scripted_llm, "refined_cot")


async def test_the_jobs_limits_reach_the_schemas_and_the_instructions(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    limits = Limits(thoughts_per_turn=3, kept_thoughts=4, max_drops=2)

    completed(await run(llm, InMemoryTurnLog(), replace(pipeline(max_rounds=1), limits=limits)))

    def response_schema(name: str) -> dict[str, object]:
        schema: dict[str, object] = scripted_llm.requests_for(name)[0].body["response_format"]["json_schema"][
            "schema"
        ]
        return schema

    assert response_schema("seed_cot")["properties"]["thoughts"]["maxItems"] == 3  # type: ignore[index]
    assert response_schema("deliberation_turn")["properties"]["new_thoughts"]["maxItems"] == 3  # type: ignore[index]
    refined = response_schema("refined_cot")["properties"]
    assert (refined["thoughts"]["maxItems"], refined["dropped"]["maxItems"]) == (4, 2)  # type: ignore[index]
    assert "- thoughts: 1 to 3 short reasoning steps." in system_message(scripted_llm, "seed_cot")
    assert "- new_thoughts: reasoning steps to add (0 to 3)" in system_message(
        scripted_llm, "deliberation_turn"
    )


async def test_the_refiner_is_told_how_many_thoughts_it_may_keep_and_drop(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """A server that ignores the schema is told the limits its lists are cut to, so that the
    cut does not take the final CoT's conclusion."""
    limits = Limits(thoughts_per_turn=3, kept_thoughts=5, max_drops=7)

    completed(await run(llm, InMemoryTurnLog(), replace(pipeline(max_rounds=1), limits=limits)))

    refiner = system_message(scripted_llm, "refined_cot")
    assert "- thoughts: the final reasoning steps, in order: 1 to 5 (merge steps to fit" in refiner
    assert "- dropped: every thought you remove (0 to 7)," in refiner


async def test_a_job_of_one_thought_per_reply_asks_every_cot_writer_for_one(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """Not "2 to 1": a second thought would be cut from a server that ignores the schema."""
    one = Limits(thoughts_per_turn=1)

    completed(await run(llm, InMemoryTurnLog(), replace(pipeline(max_rounds=0), limits=one)))
    completed(await run(llm, InMemoryTurnLog(), replace(pipeline(), mode=Mode.ZERO_SHOT, limits=one)))

    for stage in ("seed_cot", "zero_shot_cot"):
        assert "- thoughts: 1 to 1 short reasoning steps." in system_message(scripted_llm, stage)


def test_the_request_budgets_follow_the_ablations() -> None:
    full = pipeline(agents=2, max_rounds=4)

    def budgets(config: PipelineConfig) -> dict[str, int]:
        return {b.role: b.tokens for b in largest_requests(config, POLICIES, PROMPTS, PROMPT)}

    default = budgets(full)
    assert list(default) == ["intent", "seed", "deliberator-1", "deliberator-2", "refiner"]
    no_intents = budgets(replace(full, decompose_intents=False))
    assert list(no_intents) == ["seed", "deliberator-1", "deliberator-2", "refiner"]
    assert list(budgets(replace(full, refine=False))) == ["intent", "seed", "deliberator-1", "deliberator-2"]
    assert list(budgets(replace(full, max_rounds=0))) == ["intent", "seed", "refiner"]
    assert list(budgets(replace(full, max_turns=1))) == ["intent", "seed", "deliberator-1", "refiner"]

    # Each reply read, at most: 512 tokens of English (4 bytes each) at 3 bytes a token, and
    # its labels (16, and 10 for each of 6 thoughts).
    reply_tokens = 683 + 76
    # Agent 1's last turn is the third: it reads 4 replies, not 8.
    capped = budgets(replace(full, max_turns=3))
    assert default["deliberator-1"] - capped["deliberator-1"] == 4 * reply_tokens
    assert default["deliberator-2"] - capped["deliberator-2"] == 6 * reply_tokens  # its turn 2 reads 3, not 9
    assert default["refiner"] - capped["refiner"] == 5 * reply_tokens  # 3 turns read, not 8
    # Without intents, nothing reads their reply; the note that replaces it is short.
    assert 0 < default["seed"] - no_intents["seed"] < reply_tokens


def test_a_grader_reading_a_cot_never_refined_counts_every_reply_it_was_written_in() -> None:
    graded = replace(pipeline(agents=2, max_rounds=2), grading=GradingConfig(DEFAULT_ROLE))
    unrefined = replace(graded, refine=False)

    def grader(config: PipelineConfig) -> int:
        return next(
            b.tokens for b in largest_requests(config, POLICIES, PROMPTS, PROMPT) if b.role == "grader"
        )

    # The refined CoT is one reply; the unrefined one the seed and every turn: each reply read at
    # most 512 tokens of English (683 at 3 bytes a token) and its labels (76).
    assert grader(unrefined) - grader(graded) == unrefined.turn_budget() * (683 + 76)


def test_a_cot_never_refined_can_hold_every_thought_of_the_seed_and_of_each_turn() -> None:
    """What the labeling tools offer to flag: a refined CoT keeps at most `kept_thoughts`."""
    refined = replace(pipeline(agents=2, max_rounds=4), limits=Limits(thoughts_per_turn=5, kept_thoughts=8))
    unrefined = replace(refined, refine=False)

    assert sample_thoughts(refined) == 8
    assert sample_thoughts(replace(refined, mode=Mode.ZERO_SHOT)) == 5  # one reply, refined or not
    assert sample_thoughts(unrefined) == (1 + 8) * 5
    assert sample_thoughts(replace(unrefined, max_turns=3)) == (1 + 3) * 5
    assert sample_thoughts(replace(unrefined, max_rounds=0)) == 5


def test_a_roles_budget_counts_its_own_instructions_and_names_its_endpoint() -> None:
    persona = "Hunt for needless refusals. " * 30  # 840 bytes: 280 estimated tokens
    other = replace(DEFAULT_ROLE, endpoint="second", instructions=persona)
    plain = pipeline(agents=2, max_rounds=1)
    configured = replace(plain, deliberators=(DEFAULT_ROLE, other))

    before = {b.role: b for b in largest_requests(plain, POLICIES, PROMPTS, PROMPT)}
    after = {b.role: b for b in largest_requests(configured, POLICIES, PROMPTS, PROMPT)}

    assert after["deliberator-1"] == before["deliberator-1"]
    assert after["deliberator-2"].endpoint == "second" and before["deliberator-2"].endpoint == "default"
    assert 280 < after["deliberator-2"].tokens - before["deliberator-2"].tokens < 300  # and its heading


def test_the_judges_budget_counts_its_own_instructions() -> None:
    persona = "Prefer the answer that refuses less. " * 20
    plain = judge_request(DEFAULT_ROLE, POLICIES, PROMPTS, PROMPT, (512, 512), 256)
    judged = judge_request(
        replace(DEFAULT_ROLE, instructions=persona), POLICIES, PROMPTS, PROMPT, (512, 512), 256
    )

    assert (judged.role, judged.endpoint) == ("judge", "default")
    assert judged.tokens - plain.tokens > len(persona) // 3
