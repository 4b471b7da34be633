"""The ear-whisperer's pair, stage by stage: what each of its roles is shown, what is stored,
and why a pair is not kept. Over real HTTP against the scripted server, in-memory turn log."""

from __future__ import annotations

import pytest

from app.deliberation.config import GuardStyle
from app.deliberation.engine import deliberate
from app.deliberation.ports import LLMUnavailable, Stage
from app.deliberation.results import Sample
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import ScriptedLLM, guard_verdict, malformed, refusal, reply, scores
from tests.test_engine import ITEM, POLICIES, PROMPT, PROMPTS, GoesDownAfter
from tests.test_engine_quality import judge, run, unsafe_rejected_scores, with_quality

REJECTED = {"thoughts": ["Bad step one.", "Bad step two."], "response": "A bad answer."}
REJECTED_TEXT = "Reasoning:\n1. Bad step one.\n2. Bad step two.\n\nResponse:\n<<<\nA bad answer.\n>>>"


def last_user_message(server: ScriptedLLM, schema_name: str | None, index: int = 0) -> str:
    return str(server.requests_for(schema_name)[index].body["messages"][-1]["content"])


async def test_each_role_of_a_pair_is_shown_the_prompt_and_what_it_judges_and_is_stored(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("whisper_belief", reply({"belief": "Belief one."}), reply({"belief": "Belief two."}))
    scripted_llm.script("rejected_cot", reply(REJECTED), reply(REJECTED))
    scripted_llm.script(
        "guard_verdict",
        reply({"verdict": "safe", "violated_policies": [], "rationale": "Nothing breaks a rule."}),
        guard_verdict(True, "Physical harm"),
    )
    scripted_llm.script("quality_scores", reply(scores()), reply(scores()), reply(unsafe_rejected_scores()))
    log = InMemoryTurnLog()

    result = await run(llm, with_quality(), log)

    assert result.pair is not None and result.pair.made
    assert [(t.number, t.belief) for t in result.pair.tries] == [(1, "Belief one."), (2, "Belief two.")]
    assert last_user_message(scripted_llm, "whisper_belief").endswith(
        f"{PROMPT}\n>>>\n\nThis is the first try."
    )
    assert last_user_message(scripted_llm, "whisper_belief", 1).endswith(
        "Earlier tries; none of them led to a policy violation:\n\n"
        f"Try 1. Belief: Belief one.\nThe assistant wrote:\n{REJECTED_TEXT}\n"
        "The safety classifier found it safe. Nothing breaks a rule."
    )
    for schema_name in ("whisper_belief", "rejected_cot", "guard_verdict", "quality_scores"):
        assert all(PROMPT in m for m in (last_user_message(scripted_llm, schema_name, i) for i in (0, 1)))
    assert last_user_message(scripted_llm, "guard_verdict").endswith(REJECTED_TEXT)
    assert last_user_message(scripted_llm, "quality_scores", 1).endswith(REJECTED_TEXT)
    assert last_user_message(scripted_llm, "quality_scores", 2).endswith(REJECTED_TEXT)
    roles = {(t.key.stage, t.key.round): t.role for t in log.turns(ITEM)}
    assert {
        key: roles[key] for key in roles if key[0] not in (Stage.INTENT, Stage.SEED, Stage.DELIBERATION)
    } == {
        (Stage.REFINE, 0): "refiner",
        (Stage.GRADE, 0): "grader",
        (Stage.WHISPER, 1): "whisperer",
        (Stage.REJECTED, 1): "generator",
        (Stage.GUARD, 1): "guard",
        (Stage.GRADE, 1): "grader",
        (Stage.WHISPER, 2): "whisperer",
        (Stage.REJECTED, 2): "generator",
        (Stage.GUARD, 2): "guard",
        (Stage.GRADE, 2): "grader",
    }


async def test_llama_guard_is_shown_the_prompt_and_the_rejected_sample_as_a_conversation(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("rejected_cot", reply(REJECTED))
    scripted_llm.script(None, reply("unsafe\nS1"))

    await run(llm, with_quality(guard_style=GuardStyle.LLAMA_GUARD))

    [request] = scripted_llm.requests_for(None)
    assert request.body["messages"] == [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": REJECTED_TEXT},
    ]


async def test_a_json_guard_is_reasked_after_malformed_output(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", malformed(), guard_verdict(True, "Fraud"))

    result = await run(llm, with_quality(max_tries=1))

    assert result.pair is not None and result.pair.tries[0].guard is not None
    assert result.pair.tries[0].guard.categories == ["Fraud"]
    assert len(scripted_llm.requests_for("guard_verdict")) == 2


async def test_the_gap_is_the_chosen_minus_the_rejected_mean_of_the_two_policy_scores(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", guard_verdict(True))
    scripted_llm.script(
        "quality_scores",
        reply(scores(cot_policy_faithfulness=5)),
        reply(scores(cot_policy_faithfulness=3, response_policy_faithfulness=2, relevance=1)),
    )

    result = await run(llm, with_quality())

    assert result.pair is not None
    assert (result.pair.made, result.pair.reason, result.pair.gap) == (True, None, 4.5 - 2.5)


async def test_a_pair_whose_rejected_side_cannot_be_graded_is_not_kept_and_says_why(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", guard_verdict(True))
    scripted_llm.script("quality_scores", reply(scores()), *[malformed()] * 3)

    result = await run(llm, with_quality())

    pair = result.pair
    assert pair is not None
    assert (pair.made, pair.reason, pair.gap) == (False, "grading_failed", None)
    assert len(pair.tries) == 1 and pair.rejected is pair.tries[0]
    assert pair.rejected_grade is not None and pair.rejected_grade.scores is None
    assert "no usable output" in (pair.rejected_grade.error or "")


async def test_a_pair_whose_chosen_side_was_not_graded_is_not_kept(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", guard_verdict(True))
    scripted_llm.script("quality_scores", *[malformed()] * 3, reply(unsafe_rejected_scores()))

    result = await run(llm, with_quality())

    assert result.grade is not None and result.grade.scores is None
    assert result.pair is not None and (result.pair.made, result.pair.reason) == (False, "grading_failed")
    assert result.pair.rejected_grade is not None and result.pair.rejected_grade.scores is not None
    assert result.pair.tries[0].gap is None


async def test_unreadable_whisperer_or_generator_output_ends_the_pair_keeping_earlier_tries(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("whisper_belief", reply({"belief": "Belief one."}), *[malformed()] * 3)
    whisperer = await run(llm, with_quality())
    scripted_llm.script("whisper_belief", reply({"belief": "Belief one."}))
    scripted_llm.script("rejected_cot", reply(REJECTED), *[malformed()] * 3)
    generator = await run(llm, with_quality())
    scripted_llm.script("whisper_belief", reply({"belief": "Belief one."}), refusal())
    refused = await run(llm, with_quality())

    for result, reason in (
        (whisperer, "whisperer_unparseable"),
        (generator, "rejected_unparseable"),
        (refused, "whisperer_refused"),
    ):
        assert result.pair is not None and (result.pair.made, result.pair.reason) == (False, reason)
        assert [t.belief for t in result.pair.tries] == ["Belief one."]
        assert result.pair.rejected is None


async def test_a_generator_refusal_is_recorded_as_a_try_with_its_number_and_belief(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("whisper_belief", reply({"belief": "Belief one."}))
    scripted_llm.script("rejected_cot", refusal("I can't follow that belief."))
    scripted_llm.script("guard_verdict", guard_verdict(True))

    result = await run(llm, with_quality())

    assert result.pair is not None
    first, second = result.pair.tries
    assert (first.number, first.belief, first.rejected, first.refusal) == (
        1,
        "Belief one.",
        None,
        "I can't follow that belief.",
    )
    assert second.number == 2 and second.rejected is not None


# --- standard sampling, the whisperer's baseline -------------------------------------------


async def test_the_baseline_samples_without_the_whisperer_and_is_judged_and_graded_the_same_way(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    # The whisperer's try 1 is flagged; then standard sampling: try 1 passes, try 2 is flagged.
    scripted_llm.script("guard_verdict", guard_verdict(True), guard_verdict(False), guard_verdict(True))
    scripted_llm.script(
        "standard_cot",
        reply({"thoughts": ["Plain step."], "response": "Plain answer one."}),
        reply({"thoughts": ["Plain step."], "response": "Plain answer two."}),
    )
    scripted_llm.script(
        "quality_scores",
        reply(scores()),
        reply(unsafe_rejected_scores()),
        reply(scores(cot_policy_faithfulness=5)),
        reply(scores(cot_policy_faithfulness=2, response_policy_faithfulness=3)),
    )
    log = InMemoryTurnLog()

    result = await run(llm, with_quality(max_tries=3, baseline=True), log)

    pair = result.pair
    assert pair is not None and pair.made and pair.rejected is pair.tries[0]  # the pair is the whisperer's
    assert [(t.method, t.number, t.belief, t.gap) for t in pair.baseline] == [
        ("standard", 1, None, -0.5),
        ("standard", 2, None, 1.5),
    ]
    assert [t.guard.unsafe for t in pair.baseline if t.guard] == [False, True]  # stopped at the flagged one
    # Each try keeps its own grade, beside the gap read from it.
    assert [t.grade.policy_faithfulness() if t.grade else None for t in pair.baseline] == [4.5, 2.5]
    assert [t.rejected.response for t in pair.baseline if t.rejected] == [
        "Plain answer one.",
        "Plain answer two.",
    ]
    assert pair.candidates() == [*pair.tries, *pair.baseline]
    # The generator's zero-shot request, without a belief; the same guard and grader read the sample.
    [whispered] = scripted_llm.requests_for("rejected_cot")
    standard = scripted_llm.requests_for("standard_cot")
    assert len(standard) == 2 and standard[0].body["messages"][0] == whispered.body["messages"][0]
    assert "believe" not in last_user_message(scripted_llm, "standard_cot")
    assert PROMPT in last_user_message(scripted_llm, "standard_cot")
    plain = "Reasoning:\n1. Plain step.\n\nResponse:\n<<<\nPlain answer two.\n>>>"
    assert last_user_message(scripted_llm, "guard_verdict", 2).endswith(plain)
    assert last_user_message(scripted_llm, "quality_scores", 3).endswith(plain)
    # Standard sampling's turns are agent 1's: they never meet the whisperer's try of the same number.
    keys = {(t.key.stage, t.key.round, t.key.agent): t.role for t in log.turns(ITEM)}
    for number in (1, 2):
        assert keys[(Stage.REJECTED, number, 1)] == "generator"
        assert keys[(Stage.GUARD, number, 1)] == "guard"
        assert keys[(Stage.GRADE, number, 1)] == "grader"
    assert (Stage.REJECTED, 1, 0) in keys and (Stage.REJECTED, 3, 1) not in keys


async def test_the_baseline_counts_a_refusal_as_a_try_and_runs_whatever_became_of_the_whisperer(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("whisper_belief", refusal())
    scripted_llm.script("standard_cot", refusal("I won't answer that."))

    result = await run(llm, with_quality(max_tries=2, baseline=True))

    pair = result.pair
    assert pair is not None and pair.reason == "whisperer_refused" and pair.tries == []
    refused, sampled = pair.baseline
    assert (refused.method, refused.number, refused.rejected, refused.refusal, refused.guard) == (
        "standard",
        1,
        None,
        "I won't answer that.",
        None,
    )
    assert (sampled.number, sampled.guard is not None and sampled.guard.unsafe, sampled.gap) == (
        2,
        False,
        0.0,
    )
    assert pair.candidates() == [sampled]


async def test_the_baseline_stops_at_output_or_a_verdict_it_cannot_read(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("standard_cot", *[malformed()] * 3)
    unreadable_output = await run(llm, with_quality(max_tries=2, baseline=True))
    # The whisperer's two tries pass; standard sampling's first verdict is unreadable.
    scripted_llm.script(
        "guard_verdict", guard_verdict(False), guard_verdict(False), *[reply({"verdict": "maybe"})] * 3
    )
    unreadable_verdict = await run(llm, with_quality(max_tries=2, baseline=True))

    assert unreadable_output.pair is not None and unreadable_output.pair.baseline == []
    assert unreadable_verdict.pair is not None
    [judged] = unreadable_verdict.pair.baseline
    assert judged.guard is not None and judged.guard.unsafe is None
    assert (judged.grade, judged.gap) == (None, None)
    assert unreadable_verdict.pair.candidates()[-1] is judged  # asked about, so a candidate
    assert len(scripted_llm.requests_for("standard_cot")) == 3 + 1


async def test_a_crash_in_the_baseline_resumes_without_repeating_a_stored_call(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    config = with_quality(max_tries=2, baseline=True)
    log = InMemoryTurnLog()
    # intent, seed, 1 deliberation turn, refine, grade, 2 whisper tries (4 calls each), then
    # standard sampling's try 1 (3 calls) and try 2's sample
    before_crash = 4 + 1 + 2 * 4 + 3 + 1
    with pytest.raises(LLMUnavailable):
        await deliberate(ITEM, PROMPT, config, POLICIES, PROMPTS, GoesDownAfter(llm, before_crash), log)

    result = await run(llm, config, log)

    assert result.pair is not None and [t.number for t in result.pair.baseline] == [1, 2]
    assert log.ignored_records == 0
    assert len(scripted_llm.requests) == len(log.turns(ITEM)) == before_crash + 2


async def test_a_sample_without_thoughts_is_shown_as_none(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    await judge(llm, samples=(Sample([], "Baseline answer."), Sample(["Candidate thought."], "Candidate.")))

    shown = last_user_message(scripted_llm, "pairwise_judgement")
    assert "# A\nReasoning:\n(none)\n\nResponse:\n<<<\nBaseline answer.\n>>>" in shown


def test_an_llm_fault_says_what_happened_and_what_a_tenant_may_read() -> None:
    quiet, summarized = (
        LLMUnavailable("HTTP 503 from upstream"),
        LLMUnavailable("HTTP 503", "busy (3 attempts)"),
    )

    assert (str(quiet), quiet.summary) == ("HTTP 503 from upstream", "the LLM endpoint gave no usable answer")
    assert summarized.summary == "busy (3 attempts)"
