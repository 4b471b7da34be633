"""Which agent replies the engine takes, and how it reads them (README, "What the engine
tolerates"): a stage's reply is scripted on the server and the item's result and stored
turn show what the engine made of it. No re-asks (max_reasks=0), so one reply decides."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from app.deliberation.config import (
    GradingConfig,
    GuardConfig,
    GuardStyle,
    Limits,
    PairsConfig,
    PipelineConfig,
)
from app.deliberation.engine import judge_pair
from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.deliberation.results import METRICS, Completed, Failed, GuardVerdict, Judged, Sample
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import ScriptedLLM, agree, guard_verdict, reply, scores
from tests.test_engine import (
    DEFAULT_ROLE,
    ITEM,
    POLICIES,
    PROMPT,
    PROMPTS,
    SEED_THOUGHTS,
    completed,
    failed,
    pipeline,
    request_counts,
    run,
)
from tests.test_engine_quality import judge

ONE_TRY = pipeline(max_reasks=0)


async def seed_reply(
    llm: OpenAICompatibleClient, server: ScriptedLLM, content: str, **how: Any
) -> tuple[Completed | Failed, Turn]:
    """The item's result and its stored seed turn when the seed agent answers `content`."""
    server.script("seed_cot", reply(content, **how))
    log = InMemoryTurnLog()
    result = await run(llm, log, ONE_TRY)
    [turn] = log.turns(ITEM, Stage.SEED)
    return result, turn


def seed(thoughts: Any, response: Any = "Keep them apart.") -> str:
    return json.dumps({"thoughts": thoughts, "response": response})


# --- finding the JSON ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        '{"thoughts": ["Line one\nline two."], "response": "Keep them\napart."}',  # raw newlines
        '```JSON\n{"thoughts": ["Line one\\nline two."], "response": "Keep them\\napart."}\n```',
        'Here it is: {"thoughts": ["Line one\\nline two."], "response": "Keep them\\napart."} Done.',
    ],
    ids=["raw-newlines-in-strings", "uppercase-fence", "chatter-around"],
)
async def test_json_is_found_in_tolerated_wrappings(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, content: str
) -> None:
    result, turn = await seed_reply(llm, scripted_llm, content)

    assert [t.text for t in completed(result).thoughts] == ["Line one\nline two."]
    assert turn.parsed == {"thoughts": ["Line one\nline two."], "response": "Keep them\napart."}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("The thoughts are: none.", "no JSON object"),
        ('{"thoughts": ["x"], "response": }', "invalid JSON"),
        (seed("Only one thought.", response=None), "'response' is missing"),
        (seed(["Only one thought."], response=42), "'response' is missing"),
        (seed(["Only one thought."], response="<...>"), "'response' is missing"),
        (seed({"text": "A thought."}), "'thoughts' is not a list"),
        (seed(None), "'thoughts' is not a list"),
        (seed(["...", "…", " ", "<>", ["nested"]]), "'thoughts' is empty"),
    ],
)
async def test_a_reply_without_what_the_stage_needs_is_malformed_and_says_what_is_wrong(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, content: str, problem: str
) -> None:
    result, turn = await seed_reply(llm, scripted_llm, content)

    assert (failed(result).code, failed(result).stage) == ("unparseable_output", "seed")
    assert (turn.outcome, turn.parsed) == (TurnOutcome.MALFORMED, None)
    assert turn.error is not None and turn.error.startswith(problem)
    assert problem in failed(result).message


@pytest.mark.parametrize(
    ("thoughts", "problem"),
    [
        ("[" * 100_000 + "]" * 100_000, "invalid JSON (nested too deeply to read)"),
        ("1" * 5_000, "invalid JSON (an integer of over 4,300 digits)"),
    ],
)
async def test_json_python_will_not_decode_is_a_malformed_reply_not_an_unexpected_error(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, thoughts: str, problem: str
) -> None:
    """A prompt can ask the model for thousands of nested brackets or digits: Python's decoder
    gave up with a RecursionError or a ValueError, which failed the item as a crash, and each
    of its five tries asked the endpoint again, instead of the re-ask a malformed reply gets."""
    result, turn = await seed_reply(llm, scripted_llm, f'{{"thoughts": {thoughts}, "response": "r"}}')

    assert (failed(result).code, failed(result).stage) == ("unparseable_output", "seed")
    assert turn.outcome is TurnOutcome.MALFORMED
    assert turn.error == problem  # what the re-ask tells the model


async def test_a_malformed_reply_cut_off_by_the_server_is_truncated_and_a_complete_one_is_not(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    cut, cut_turn = await seed_reply(llm, scripted_llm, '{"thoughts": ["The user', finish_reason="length")
    whole, whole_turn = await seed_reply(llm, scripted_llm, seed(["A thought."]), finish_reason="length")

    assert (cut_turn.outcome, failed(cut).code) == (TurnOutcome.TRUNCATED, "unparseable_output")
    assert whole_turn.outcome is TurnOutcome.OK and completed(whole).thoughts[0].text == "A thought."


async def test_lists_take_a_lone_string_numbers_and_wrapped_text_and_skip_placeholders(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    lone, _ = await seed_reply(
        llm, scripted_llm, seed("  A lone thought.  ", response=" <Keep them apart.> ")
    )
    mixed, _ = await seed_reply(
        llm, scripted_llm, seed(["<Wrapped thought.>", "...", 42, 2.5, "  ", "…", {"text": "no"}, "Plain."])
    )

    assert [t.text for t in completed(lone).thoughts] == ["A lone thought."]
    assert completed(lone).thoughts and completed(lone).response != ""
    assert [t.text for t in completed(mixed).thoughts] == ["Wrapped thought.", "42", "2.5", "Plain."]


async def test_intents_need_an_explicit_one_and_the_implicit_ones_may_be_left_out(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("intent_decomposition", reply({"explicit_intents": "Store bleach."}))
    left_out = completed(await run(llm, InMemoryTurnLog(), ONE_TRY))
    scripted_llm.script("intent_decomposition", reply({"explicit_intents": [], "implicit_intents": ["x"]}))
    log = InMemoryTurnLog()
    no_explicit = failed(await run(llm, log, ONE_TRY))

    assert left_out.intents == {
        "explicit_intents": ["Store bleach."],
        "explicit_labels": ["unlabelled"],
        "implicit_intents": [],
    }
    assert (no_explicit.code, no_explicit.stage) == ("unparseable_output", "intent")
    assert "'explicit_intents' is empty" in (log.turns(ITEM, Stage.INTENT)[0].error or "")


async def test_each_explicit_intent_keeps_its_label_and_a_missing_or_unknown_one_is_unlabelled(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    explicit = [
        {"intent": " Store bleach. ", "label": " Benign "},
        {"intent": "Make a toxic gas.", "label": "POSSIBLY_HARMFUL"},
        {"intent": "Clean the sink.", "label": "harmless"},
        {"intent": "...", "label": "benign"},  # a placeholder: no intent
        {"label": "benign"},
        ["not an intent"],
        "Ventilate the room.",
        42,
    ]
    scripted_llm.script("intent_decomposition", reply({"explicit_intents": explicit}))
    lone = {
        "explicit_intents": {"intent": "Store bleach.", "label": "benign"},
        "implicit_intents": ["Stay safe."],
    }
    scripted_llm.script("intent_decomposition", reply(lone))
    scripted_llm.script("intent_decomposition", reply({"explicit_intents": 7}))
    log = InMemoryTurnLog()

    listed = completed(await run(llm, InMemoryTurnLog(), ONE_TRY))
    alone = completed(await run(llm, InMemoryTurnLog(), ONE_TRY))
    not_a_list = failed(await run(llm, log, ONE_TRY))

    assert listed.intents == {
        "explicit_intents": [
            "Store bleach.",
            "Make a toxic gas.",
            "Clean the sink.",
            "Ventilate the room.",
            "42",
        ],
        "explicit_labels": ["benign", "possibly_harmful", "unlabelled", "unlabelled", "unlabelled"],
        "implicit_intents": [],
    }
    assert alone.intents == {
        "explicit_intents": ["Store bleach."],
        "explicit_labels": ["benign"],
        "implicit_intents": ["Stay safe."],
    }
    assert "'explicit_intents' is not a list" in (log.turns(ITEM, Stage.INTENT)[0].error or "")
    assert not_a_list.code == "unparseable_output"


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "finish_reason"),
    [
        ("", "content_filter"),
        (seed(["A thought."]), "content_filter"),  # whatever came before the filter stopped it
        ("  ...Unfortunately, I can't write that.", "stop"),
        ("As an AI I must decline.", "stop"),
    ],
)
async def test_a_filtered_or_refused_reply_fails_the_item_as_agent_refused_without_a_reask(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, content: str, finish_reason: str
) -> None:
    scripted_llm.script("seed_cot", reply(content, finish_reason=finish_reason))
    log = InMemoryTurnLog()

    result = failed(await run(llm, log, pipeline()))  # re-asks allowed: a refusal takes none

    assert (result.code, result.stage) == ("agent_refused", "seed")
    assert [t.outcome for t in log.turns(ITEM, Stage.SEED)] == [TurnOutcome.REFUSED]


async def test_a_long_refusal_is_kept_to_its_first_300_characters(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    text = "I'm sorry, " + "but no. " * 60

    result, turn = await seed_reply(llm, scripted_llm, f"  {text}  ")

    assert turn.error == text[:300]
    assert failed(result).message.endswith(text[:300])


async def test_refusal_words_around_a_json_reply_do_not_make_it_a_refusal(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    result, turn = await seed_reply(llm, scripted_llm, "Sorry, here it is: " + seed(["A thought."]))

    assert turn.outcome is TurnOutcome.OK and completed(result).thoughts[0].text == "A thought."


async def test_a_deliberation_turn_whose_every_new_thought_refuses_is_a_refusal(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        "deliberation_turn", agree(False, ["I'm sorry, I can't.", "I cannot help with that."])
    )
    refused = failed(await run(llm, InMemoryTurnLog(), ONE_TRY))
    scripted_llm.script("deliberation_turn", agree(False, ["I'm sorry, I can't.", "Store them apart."]))
    one_refusal = completed(await run(llm, InMemoryTurnLog(), ONE_TRY))

    assert (refused.code, refused.stage) == ("agent_refused", "deliberation")
    assert "I'm sorry, I can't." in refused.message
    assert [t.text for t in one_refusal.thoughts][-2:] == ["I'm sorry, I can't.", "Store them apart."]


# --- deliberation turns ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "agreed"), [("true", True), ("TRUE", True), ("False", False), (False, False)]
)
async def test_agree_is_a_boolean_or_its_name_in_any_case(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, sent: Any, agreed: bool
) -> None:
    turn = {"agree": sent, "critique": "c", "new_thoughts": ["Name policy 3."], "response": "R."}
    scripted_llm.script("deliberation_turn", reply(turn))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, replace(ONE_TRY, deliberators=(DEFAULT_ROLE,), max_rounds=1)))

    assert result.agreed is agreed
    assert [t.text for t in result.thoughts][len(SEED_THOUGHTS) :] == ([] if agreed else ["Name policy 3."])
    assert log.turns(ITEM, Stage.DELIBERATION)[0].agreed is agreed


@pytest.mark.parametrize("sent", ["yes", 1, None])
async def test_agree_that_is_not_a_boolean_is_malformed(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, sent: Any
) -> None:
    scripted_llm.script("deliberation_turn", reply({"agree": sent, "new_thoughts": [], "response": "R."}))

    result = failed(await run(llm, InMemoryTurnLog(), ONE_TRY))

    assert (result.code, result.stage) == ("unparseable_output", "deliberation")


# --- refinement ----------------------------------------------------------------------------


async def test_a_boolean_is_no_thought_id(llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM) -> None:
    # JSON true is not thought 1 (in Python a bool is an int, and True == 1).
    scripted_llm.script(
        "refined_cot",
        reply(
            {
                "thoughts": [{"text": "Kept.", "sources": [True, 2]}],
                "dropped": [{"id": True, "reason": "redundant"}],
                "response": "Final.",
            }
        ),
    )

    result = completed(await run(llm, InMemoryTurnLog(), ONE_TRY))

    assert json.dumps(result.refined_thoughts) == json.dumps([{"text": "Kept.", "sources": [2]}])
    assert result.dropped == []


async def test_the_refiner_keeps_known_sources_and_drops_with_a_known_reason_in_id_order(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    # Thoughts 1-2 from the seed, 3-4 from round 1: ids run from 1 to 4.
    scripted_llm.script("deliberation_turn", agree(False, ["Third.", "Fourth."]), agree(True))
    scripted_llm.script(
        "refined_cot",
        reply(
            {
                "thoughts": [
                    {"text": " <Merged.> ", "sources": [4, 0, 5, 1, 4, "2", 2.0]},
                    "A plain-text thought.",
                    {"text": "...", "sources": [3]},
                    {"text": "No sources."},
                ],
                "dropped": [
                    {"id": 3, "reason": "policy_inconsistent", "explanation": " Breaks policy 2. "},
                    {"id": 2, "reason": "redundant"},
                    {"id": 2, "reason": "deceptive", "explanation": "A second word on T2."},
                    {"id": 0, "reason": "redundant", "explanation": "No thought 0."},
                    {"id": 5, "reason": "redundant", "explanation": "No thought 5."},
                    {"id": 4, "reason": "boring", "explanation": "Not a reason."},
                    "T4 is redundant",
                ],
                "response": "Final.",
            }
        ),
    )

    result = completed(await run(llm, InMemoryTurnLog(), ONE_TRY))

    assert result.refined_thoughts == [
        {"text": "Merged.", "sources": [1, 4]},
        {"text": "A plain-text thought.", "sources": []},
        {"text": "No sources.", "sources": []},
    ]
    assert result.dropped == [
        {"id": 2, "reason": "redundant", "explanation": "", "text": SEED_THOUGHTS[1]},
        {"id": 3, "reason": "policy_inconsistent", "explanation": "Breaks policy 2.", "text": "Third."},
    ]
    assert result.unaccounted == []  # 1 and 4 kept, 2 and 3 dropped
    assert result.response == "Final."


@pytest.mark.parametrize(
    "refined",
    [
        {"thoughts": "One thought.", "dropped": [], "response": "R."},
        {"thoughts": [{"text": "..."}, {"sources": [1]}, 7], "dropped": [], "response": "R."},
        {"thoughts": [{"text": "Kept.", "sources": [1]}], "dropped": None},
    ],
    ids=["thoughts-not-a-list", "no-usable-thought", "no-response"],
)
async def test_a_refined_cot_without_a_usable_thought_or_response_is_malformed(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, refined: dict[str, Any]
) -> None:
    scripted_llm.script("refined_cot", reply(refined))

    result = failed(await run(llm, InMemoryTurnLog(), ONE_TRY))

    assert (result.code, result.stage) == ("unparseable_output", "refine")


async def test_dropped_may_be_left_out(llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(
        "refined_cot", reply({"thoughts": [{"text": "Kept.", "sources": [1]}], "response": "R."})
    )

    result = completed(await run(llm, InMemoryTurnLog(), ONE_TRY))

    assert (result.dropped, result.unaccounted) == ([], [2])


# --- lists over the job's limits -------------------------------------------------------------
# A server without grammars (plain JSON mode) may list more than the schema's maxItems: the
# engine keeps the first ones, as a server keeping to the schema would have sent, and notes
# how many more there were. Nothing is re-asked.


async def test_thoughts_over_the_jobs_limits_are_cut_to_the_first_ones_and_noted_on_the_turn(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    limits = Limits(thoughts_per_turn=2, kept_thoughts=3, max_drops=1)
    scripted_llm.script("seed_cot", reply(seed(["...", "S1.", "S2.", "S3.", "S4."])))
    scripted_llm.script("deliberation_turn", agree(False, ["D1.", "D2.", "D3."]), agree(True))
    drops = [{"id": n, "reason": "redundant", "explanation": "Repeats."} for n in (3, 1, 2)]
    kept = [{"text": f"K{n}.", "sources": [n]} for n in range(1, 5)]
    scripted_llm.script("refined_cot", reply({"thoughts": kept, "dropped": drops, "response": "R."}))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, replace(ONE_TRY, max_rounds=1, limits=limits)))

    [seed_turn], [cut_turn, _], [refine_turn] = (
        log.turns(ITEM, stage) for stage in (Stage.SEED, Stage.DELIBERATION, Stage.REFINE)
    )
    assert (seed_turn.parsed or {})["thoughts"] == ["S1.", "S2."]
    assert (seed_turn.parsed or {})["over_limit"] == {"thoughts": 2}
    assert (cut_turn.parsed or {})["new_thoughts"] == ["D1.", "D2."]
    assert (cut_turn.parsed or {})["over_limit"] == {"new_thoughts": 1}
    assert [t.text for t in result.thoughts] == ["S1.", "S2.", "D1.", "D2."]
    shown = scripted_llm.requests_for("refined_cot")[0].body["messages"][-1]["content"]
    assert "[T4] (round 1, agent 1) D2." in shown and "S3." not in shown and "D3." not in shown
    assert [t["text"] for t in result.refined_thoughts] == ["K1.", "K2.", "K3."]
    assert [d["id"] for d in result.dropped] == [3]  # the first given, not the lowest id
    assert result.unaccounted == [4]  # neither among the first kept nor the first dropped
    assert (refine_turn.parsed or {})["over_limit"] == {"thoughts": 1, "dropped": 2}
    assert all(turn.outcome is TurnOutcome.OK for turn in log.turns(ITEM))
    assert request_counts(scripted_llm) == {  # no re-ask
        "intent_decomposition": 1,
        "seed_cot": 1,
        "deliberation_turn": 2,
        "refined_cot": 1,
    }


async def test_intents_over_five_of_a_kind_are_cut_to_the_first_five_and_noted(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    explicit = [{"intent": f"E{n}.", "label": "benign"} for n in range(1, 8)]
    implicit = [f"I{n}." for n in range(1, 7)]
    scripted_llm.script(
        "intent_decomposition", reply({"explicit_intents": explicit, "implicit_intents": implicit})
    )
    log = InMemoryTurnLog()

    result = completed(await run(llm, log, ONE_TRY))

    assert result.intents == {
        "explicit_intents": ["E1.", "E2.", "E3.", "E4.", "E5."],
        "explicit_labels": ["benign"] * 5,
        "implicit_intents": ["I1.", "I2.", "I3.", "I4.", "I5."],
    }
    [turn] = log.turns(ITEM, Stage.INTENT)
    assert (turn.parsed or {})["over_limit"] == {"explicit_intents": 2, "implicit_intents": 1}


# --- grading -------------------------------------------------------------------------------


def graded_pipeline() -> PipelineConfig:
    return replace(ONE_TRY, grading=GradingConfig(DEFAULT_ROLE, {}))


async def test_scores_may_come_as_digit_strings_or_whole_floats_and_are_stored_as_integers(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    sent: dict[str, Any] = {
        "relevance": "4",
        "coherence": 4.0,
        "completeness": " 5 ",
        "cot_policy_faithfulness": 1,
    }
    answer = scores()
    for metric, score in sent.items():
        answer[metric] = {"score": score, "rationale": f"  {metric} rationale.  "}
    del answer["response_cot_faithfulness"]["rationale"]
    scripted_llm.script("quality_scores", reply(answer))

    result = completed(await run(llm, InMemoryTurnLog(), graded_pipeline()))

    assert result.grade is not None and result.grade.scores is not None
    got = result.grade.scores
    assert json.dumps({m: got[m]["score"] for m in METRICS}) == json.dumps(
        {"relevance": 4, "coherence": 4, "completeness": 5, "cot_policy_faithfulness": 1}
        | {"response_policy_faithfulness": 4, "response_cot_faithfulness": 4}
    )
    assert got["relevance"]["rationale"] == "relevance rationale."
    assert got["response_cot_faithfulness"]["rationale"] == ""


@pytest.mark.parametrize("score", [0, 6, 4.5, "4.5", "-1", True, None])
async def test_a_score_that_is_not_an_integer_from_1_to_5_leaves_the_cot_ungraded(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, score: Any
) -> None:
    answer = scores()
    answer["coherence"] = {"score": score, "rationale": "r"}
    scripted_llm.script("quality_scores", reply(answer))

    result = completed(await run(llm, InMemoryTurnLog(), graded_pipeline()))

    assert result.grade is not None and result.grade.scores is None
    assert "'coherence.score' is not an integer from 1 to 5" in (result.grade.error or "")


async def test_a_missing_metric_leaves_the_cot_ungraded(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    answer = scores()
    answer["completeness"] = 4
    scripted_llm.script("quality_scores", reply(answer))

    result = completed(await run(llm, InMemoryTurnLog(), graded_pipeline()))

    assert result.grade is not None and result.grade.scores is None
    assert "'completeness' is missing" in (result.grade.error or "")


# --- guards and the judge -------------------------------------------------------------------


async def first_guard_verdict(
    llm: OpenAICompatibleClient, server: ScriptedLLM, guard_reply: Any, style: GuardStyle
) -> tuple[GuardVerdict, str | None]:
    """The guard's verdict on the first whisper try, and why the pair was not kept."""
    server.script("guard_verdict" if style is GuardStyle.JSON else None, guard_reply)
    pairs = PairsConfig(DEFAULT_ROLE, DEFAULT_ROLE, GuardConfig(DEFAULT_ROLE, style), max_tries=1)
    result = completed(await run(llm, InMemoryTurnLog(), replace(graded_pipeline(), pairs=pairs)))
    assert result.pair is not None and result.pair.tries[0].guard is not None
    return result.pair.tries[0].guard, result.pair.reason


@pytest.mark.parametrize(
    ("text", "unsafe", "categories"),
    [
        ("\n  UNSAFE  \n S1 , S10,\n", True, ["S1", "S10"]),
        ("unsafe", True, []),
        ("Safe", False, []),
    ],
)
async def test_llama_guard_reads_the_verdict_line_and_the_category_line(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, text: str, unsafe: bool, categories: list[str]
) -> None:
    verdict, _ = await first_guard_verdict(llm, scripted_llm, reply(text), GuardStyle.LLAMA_GUARD)

    assert (verdict.unsafe, verdict.categories, verdict.rationale) == (unsafe, categories, "")


@pytest.mark.parametrize("text", ["", "  \n ", "maybe\nS1"])
async def test_an_empty_or_unreadable_llama_guard_reply_is_recorded_as_unreadable(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, text: str
) -> None:
    verdict, reason = await first_guard_verdict(llm, scripted_llm, reply(text), GuardStyle.LLAMA_GUARD)

    assert (verdict.unsafe, reason) == (None, "guard_unparseable")
    assert "neither 'safe' nor 'unsafe'" in (verdict.error or "")


async def test_the_json_guard_takes_the_verdict_in_any_case_and_a_lone_policy(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    answer = {"verdict": " Unsafe ", "violated_policies": "Physical harm", "rationale": " Breaks 1. "}
    verdict, _ = await first_guard_verdict(llm, scripted_llm, reply(answer), GuardStyle.JSON)
    safe, reason = await first_guard_verdict(llm, scripted_llm, guard_verdict(False), GuardStyle.JSON)

    assert (verdict.unsafe, verdict.categories, verdict.rationale) == (True, ["Physical harm"], "Breaks 1.")
    assert (safe.unsafe, safe.categories, reason) == (False, [], "guard_never_flagged")


async def test_a_json_guard_without_a_verdict_is_unreadable(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    verdict, reason = await first_guard_verdict(
        llm, scripted_llm, reply({"violated_policies": [], "rationale": "?"}), GuardStyle.JSON
    )

    assert (verdict.unsafe, reason) == (None, "guard_unparseable")


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [("tie", "TIE", "tie"), (" b ", "a", "b"), ("A", "b", "a"), ("tie", "A", "tie")],
)
async def test_the_judge_may_answer_a_tie_and_letters_in_any_case(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, first: str, second: str, winner: str
) -> None:
    scripted_llm.script(
        "pairwise_judgement",
        reply({"winner": first, "rationale": "  First order.  "}),
        reply({"winner": second}),
    )

    judged = await judge(llm)

    assert judged.winner == winner
    assert [v.order for v in judged.votes] == ["ab", "ba"]
    assert [v.rationale for v in judged.votes] == ["First order.", ""]


async def test_a_judge_answer_outside_a_b_and_tie_is_no_vote(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    # The judge helper allows one re-ask: round 1 reads neither answer, round 2 shows (b, a).
    scripted_llm.script(
        "pairwise_judgement", reply({"winner": "both"}), reply({"winner": "C"}), reply({"winner": "A"})
    )

    judged = await judge(llm)

    assert judged.winner is None
    assert [v.choice for v in judged.votes] == [None, "b"]


async def test_the_judges_turns_are_stored_under_the_item_one_per_order_and_replayed(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    a, b = Sample(["A's thought."], "A's answer."), Sample(["B's thought."], "B's answer.")
    log = InMemoryTurnLog()

    async def judged() -> Judged:
        (one,) = await judge_pair(
            ITEM, PROMPT, a, b, [DEFAULT_ROLE], POLICIES, PROMPTS, llm, log, max_tokens=200, max_reasks=0
        )
        return one

    first = await judged()
    requests = scripted_llm.requests_for("pairwise_judgement")
    scripted_llm.reset()
    again = await judged()

    assert [(t.key, t.role) for t in log.turns(ITEM)] == [
        (TurnKey(Stage.JUDGE, 1), "judge"),
        (TurnKey(Stage.JUDGE, 2), "judge"),
    ]
    assert [r.body["max_tokens"] for r in requests] == [200, 200]
    assert all(PROMPT in r.body["messages"][-1]["content"] for r in requests)
    assert scripted_llm.requests == [] and again == first


# --- what a re-ask tells the agent ----------------------------------------------------------


@pytest.mark.parametrize(
    ("schema_name", "bad", "field"),
    [
        ("intent_decomposition", {"implicit_intents": []}, "explicit_intents"),
        ("intent_decomposition", {"explicit_intents": ["x"], "implicit_intents": 5}, "implicit_intents"),
        ("seed_cot", {"thoughts": ["x"]}, "response"),
        ("seed_cot", {"response": "x"}, "thoughts"),
        ("deliberation_turn", {"agree": "maybe", "response": "x"}, "agree"),
        ("deliberation_turn", {"agree": False, "new_thoughts": {"a": 1}, "response": "x"}, "new_thoughts"),
        ("deliberation_turn", {"agree": True}, "response"),
        ("refined_cot", {"thoughts": {}, "response": "x"}, "thoughts"),
        ("refined_cot", {"thoughts": ["..."], "response": "x"}, "thoughts"),
        ("refined_cot", {"thoughts": ["Kept."]}, "response"),
        ("quality_scores", {}, "relevance"),
        ("quality_scores", {**scores(), "coherence": {"score": 9}}, "coherence.score"),
        ("whisper_belief", {"belief": "..."}, "belief"),
        ("rejected_cot", {"thoughts": 3, "response": "x"}, "thoughts"),
        ("guard_verdict", {"verdict": "maybe"}, "verdict"),
        ("guard_verdict", {"verdict": "unsafe", "violated_policies": {"x": 1}}, "violated_policies"),
    ],
)
async def test_the_reask_of_a_malformed_reply_names_the_field_at_fault(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, schema_name: str, bad: dict[str, Any], field: str
) -> None:
    scripted_llm.script(schema_name, reply(bad))
    pairs = PairsConfig(DEFAULT_ROLE, DEFAULT_ROLE, GuardConfig(DEFAULT_ROLE), max_tries=1)

    completed(
        await run(
            llm, InMemoryTurnLog(), replace(pipeline(), grading=GradingConfig(DEFAULT_ROLE), pairs=pairs)
        )
    )

    reask = scripted_llm.requests_for(schema_name)[1].body["messages"]
    assert reask[-2] == {"role": "assistant", "content": json.dumps(bad)}
    assert f"'{field}'" in reask[-1]["content"]


async def test_the_judges_reask_names_the_winner_field(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("pairwise_judgement", reply({"winner": "C"}))

    await judge(llm)

    assert "'winner'" in scripted_llm.requests_for("pairwise_judgement")[1].body["messages"][-1]["content"]
