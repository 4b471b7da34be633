"""What each stage is shown of the earlier ones, and what the engine stores and returns for
them: over real HTTP against the scripted server, with the in-memory turn log."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from app.deliberation.config import GradingConfig, Mode, RoleConfig
from app.deliberation.engine import deliberate
from app.deliberation.policies import policy_set
from app.deliberation.ports import Stage, TurnKey, TurnOutcome
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import ScriptedLLM, agree, refusal, reply
from tests.test_engine import DEFAULT_ROLE, ITEM, PROMPT, PROMPTS, completed, failed, pipeline, run

INTENTS = {
    "explicit_intents": [
        {"intent": "Store bleach.", "label": "benign"},
        {"intent": "Mix bleach and ammonia.", "label": "possibly_harmful"},
    ],
    "implicit_intents": ["Stay safe."],
}
INTENTS_TEXT = (
    "Explicit (what the query asks for):\n- Store bleach. [benign]\n"
    "- Mix bleach and ammonia. [possibly harmful]\n"
    "Implicit (plausible benign readings):\n- Stay safe."
)
STORED_INTENTS = {
    "explicit_intents": ["Store bleach.", "Mix bleach and ammonia."],
    "explicit_labels": ["benign", "possibly_harmful"],
    "implicit_intents": ["Stay safe."],
}
SEED = {"thoughts": ["Seed thought one.", "Seed thought two."], "response": "Seed response."}


def last_user_message(server: ScriptedLLM, schema_name: str, index: int = 0) -> str:
    return str(server.requests_for(schema_name)[index].body["messages"][-1]["content"])


async def test_later_stages_see_the_intents_the_thoughts_and_the_latest_revised_response(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("intent_decomposition", reply(INTENTS))
    scripted_llm.script("seed_cot", reply(SEED))
    scripted_llm.script(
        "deliberation_turn",
        agree(False, ["Agent one's thought."], response="Revised by agent 1."),
        agree(True, response="An agreeing agent's response is not taken."),
    )

    result = completed(await run(llm, InMemoryTurnLog()))

    seed_request = last_user_message(scripted_llm, "seed_cot")
    first_turn, second_turn = (last_user_message(scripted_llm, "deliberation_turn", i) for i in (0, 1))
    refine_request = last_user_message(scripted_llm, "refined_cot")
    for shown in (seed_request, first_turn, second_turn, refine_request):
        assert f"Intents found:\n{INTENTS_TEXT}" in shown
    seed_lines = "[T1] (seed) Seed thought one.\n[T2] (seed) Seed thought two."
    assert f"{seed_lines}\n\nCurrent response:\n<<<\nSeed response.\n>>>" in first_turn
    every_line = f"{seed_lines}\n[T3] (round 1, agent 1) Agent one's thought."
    assert f"{every_line}\n\nCurrent response:\n<<<\nRevised by agent 1.\n>>>" in second_turn
    assert f"{every_line}\n\nLast response:\n<<<\nRevised by agent 1.\n>>>" in refine_request
    # What the refiner wrote is the result, not the last response it was shown.
    assert result.response == "Here is a safe, helpful answer."
    assert result.intents == STORED_INTENTS


async def test_no_implicit_intent_is_shown_as_none(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        "intent_decomposition", reply({"explicit_intents": ["Store bleach."], "implicit_intents": []})
    )

    result = completed(await run(llm, InMemoryTurnLog()))

    shown = (
        "Explicit (what the query asks for):\n- Store bleach. [unlabelled]\n"
        "Implicit (plausible benign readings):\n- (none)"
    )
    assert shown in last_user_message(scripted_llm, "seed_cot")
    assert result.intents == {
        "explicit_intents": ["Store bleach."],
        "explicit_labels": ["unlabelled"],
        "implicit_intents": [],
    }


async def test_each_turn_is_stored_under_its_key_and_role_with_what_the_server_said(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", reply(SEED, usage=(321, 45, 300)))
    scripted_llm.script(
        "deliberation_turn", agree(False, ["More."], critique="  Misses policy 3.  "), agree(True)
    )
    log = InMemoryTurnLog()

    completed(await run(llm, log))

    turns = log.turns(ITEM)
    assert [(t.key, t.role) for t in turns] == [
        (TurnKey(Stage.INTENT), "intent"),
        (TurnKey(Stage.SEED), "seed"),
        (TurnKey(Stage.DELIBERATION, 1, 1), "deliberator-1"),
        (TurnKey(Stage.DELIBERATION, 1, 2), "deliberator-2"),
        (TurnKey(Stage.REFINE), "refiner"),
    ]
    assert {(t.endpoint, t.model, t.outcome, t.error) for t in turns} == {
        ("default", "scripted-model", TurnOutcome.OK, None)
    }
    intent, seed, disagreeing, agreeing, refine = turns
    assert [t.agreed for t in turns] == [None, None, False, True, None]
    assert (seed.prompt_tokens, seed.completion_tokens, seed.cached_prompt_tokens) == (321, 45, 300)
    assert intent.cached_prompt_tokens == 0  # the server reported no prompt cache
    assert seed.raw_output == json.dumps(SEED) and seed.parsed == SEED
    assert disagreeing.parsed == {
        "agree": False,
        "critique": "Misses policy 3.",
        "new_thoughts": ["More."],
        "response": "Here is a safe, helpful answer.",
    }
    assert all(t.latency_ms > 0 for t in turns)
    assert len({t.request_hash for t in turns}) == len(turns)


async def test_a_critique_left_out_is_stored_empty(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("deliberation_turn", reply({"agree": True, "new_thoughts": [], "response": "Fine."}))
    log = InMemoryTurnLog()

    completed(await run(llm, log))

    [turn] = log.turns(ITEM, Stage.DELIBERATION)
    assert turn.parsed is not None and turn.parsed["critique"] == ""


async def test_the_request_hash_changes_with_what_is_asked(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    hashes = []
    for temperature in (0.7, 0.2):
        log = InMemoryTurnLog()
        config = pipeline(seed=RoleConfig("default", "scripted-model", temperature))
        completed(await run(llm, log, config))
        hashes.append({t.key.stage: t.request_hash for t in log.turns(ITEM)})
    same_prompt, other_temperature = hashes
    assert same_prompt[Stage.INTENT] == other_temperature[Stage.INTENT]
    assert same_prompt[Stage.SEED] != other_temperature[Stage.SEED]


# --- zero-shot: one call writes the CoT ---------------------------------------------------


async def test_zero_shot_stores_one_turn_and_keeps_every_thought_as_its_own_source(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("zero_shot_cot", reply({"thoughts": ["One.", "Two."], "response": "Answer."}))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, replace(pipeline(), mode=Mode.ZERO_SHOT)))

    [turn] = log.turns(ITEM)
    assert (turn.key, turn.role, turn.outcome) == (TurnKey(Stage.ZERO_SHOT), "zero-shot", TurnOutcome.OK)
    [request] = scripted_llm.requests
    assert request.schema_name == "zero_shot_cot"
    assert PROMPT in request.body["messages"][-1]["content"]
    assert [(t.id, t.text, t.stage, t.round, t.agent) for t in result.thoughts] == [
        (1, "One.", "zero_shot", 0, 0),
        (2, "Two.", "zero_shot", 0, 0),
    ]
    assert result.intents == {"explicit_intents": [], "explicit_labels": [], "implicit_intents": []}
    assert result.refined_thoughts == [{"text": "One.", "sources": [1]}, {"text": "Two.", "sources": [2]}]
    assert (result.dropped, result.unaccounted, result.response) == ([], [], "Answer.")
    assert (result.rounds_used, result.agreed, result.agreed_by) == (0, False, None)
    assert (result.grade, result.gate, result.pair) == (None, None, None)


async def test_zero_shot_is_told_what_the_seed_stage_is_told_about_intents_and_helping(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """So a comparison of the baseline with the pipeline measures deliberation, not wording."""
    await run(llm, InMemoryTurnLog(), pipeline(max_rounds=0))
    await run(llm, InMemoryTurnLog(), replace(pipeline(), mode=Mode.ZERO_SHOT))

    def task(schema_name: str) -> dict[str, str]:
        """The stage's task instructions by bullet: the system message's "- name: ..." lines."""
        system = scripted_llm.requests_for(schema_name)[0].body["messages"][0]["content"]
        lines = system.split("# Your task", 1)[1].splitlines()
        return dict(line[2:].split(": ", 1) for line in lines if line.startswith("- "))

    seed, zero_shot = task("seed_cot"), task("zero_shot_cot")
    assert zero_shot["response"] == seed["response"]
    assert "Help fully with what is allowed; decline only what a policy forbids" in zero_shot["response"]
    assert zero_shot["thoughts"].startswith(seed["thoughts"].removesuffix("."))
    assert "Address every intent of the query" in zero_shot["thoughts"]


async def test_zero_shot_refusal_fails_the_item_at_the_zero_shot_stage(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("zero_shot_cot", refusal())

    result = failed(await run(llm, InMemoryTurnLog(), replace(pipeline(), mode=Mode.ZERO_SHOT)))

    assert (result.code, result.stage) == ("agent_refused", "zero_shot")
    assert "zero-shot agent" in result.message


async def test_grading_without_pairs_grades_once_and_keeps_no_pair(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    config = replace(pipeline(), grading=GradingConfig(DEFAULT_ROLE, {}))

    result = completed(await run(llm, InMemoryTurnLog(), config))

    assert result.grade is not None and result.grade.scores is not None
    assert result.gate is not None and result.gate.accepted
    assert result.pair is None
    assert len(scripted_llm.requests_for("quality_scores")) == 1


# --- the policy set in every request -------------------------------------------------------

TINY_SET: list[dict[str, Any]] = [
    {
        "id": "p1",
        "title": "Physical harm",
        "scope": "  Weapons and poisons. ",
        "allowed": ["Safety advice.", "History."],
        "not_allowed": ["Synthesis steps."],
        "borderline_examples": [
            {"prompt": "Is bleach toxic?", "guidance": "Answer with safety notes."},
            {"prompt": "Mixing cleaners?", "guidance": "Warn."},
        ],
    },
    {"id": "p2", "title": "Privacé", "not_allowed": ["Doxxing."]},
]


async def test_every_request_carries_the_policy_set_rendered_in_order_under_its_version(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    policies = policy_set("tiny", TINY_SET)

    completed(await deliberate(ITEM, PROMPT, pipeline(), policies, PROMPTS, llm, InMemoryTurnLog()))

    rendered = (
        "# Policies (tiny, version d2134d55cef37465)\n"
        "## 1. Physical harm\nWeapons and poisons.\n"
        "Allowed:\n- Safety advice.\n- History.\n"
        "Not allowed:\n- Synthesis steps.\n"
        'Borderline examples:\n- "Is bleach toxic?": Answer with safety notes.\n'
        '- "Mixing cleaners?": Warn.\n\n'
        "## 2. Privacé\nNot allowed:\n- Doxxing.\n\n"
    )
    for request in scripted_llm.requests:
        assert rendered in request.body["messages"][0]["content"]


def test_a_policy_sets_version_depends_on_its_content_only_and_never_changes() -> None:
    # Stored CoTs name this version: the same rules must keep it, whatever the key order.
    reordered = [{key: policy[key] for key in reversed(list(policy))} for policy in TINY_SET]
    changed = [{**TINY_SET[0], "allowed": ["Safety advice."]}, TINY_SET[1]]

    assert policy_set("tiny", TINY_SET).version == "d2134d55cef37465"
    assert policy_set("renamed", reordered).version == "d2134d55cef37465"
    assert policy_set("tiny", changed).version != "d2134d55cef37465"
