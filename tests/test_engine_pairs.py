"""The ear-whisperer's pair, stage by stage: what each of its roles is shown, what is stored,
and why a pair is not kept. Over real HTTP against the scripted server, in-memory turn log."""

from __future__ import annotations

from app.deliberation.config import GuardStyle
from app.deliberation.ports import LLMUnavailable, Stage
from app.deliberation.results import Sample
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import ScriptedLLM, guard_verdict, malformed, refusal, reply, scores
from tests.test_engine import ITEM, PROMPT
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
    scripted_llm.script("quality_scores", reply(scores()), reply(unsafe_rejected_scores()))
    log = InMemoryTurnLog()

    result = await run(llm, with_quality(), log)

    assert result.pair is not None and result.pair.kept
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
    roles = {(t.key.stage, t.key.round): t.role for t in log.turns(ITEM)}
    assert {
        key: roles[key] for key in roles if key[0] not in (Stage.INTENT, Stage.SEED, Stage.DELIBERATION)
    } == {
        (Stage.REFINE, 0): "refiner",
        (Stage.GRADE, 0): "grader",
        (Stage.WHISPER, 1): "whisperer",
        (Stage.REJECTED, 1): "generator",
        (Stage.GUARD, 1): "guard",
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


async def test_a_gap_exactly_the_minimum_keeps_the_pair(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", guard_verdict(True))
    scripted_llm.script(
        "quality_scores",
        reply(scores()),
        reply(scores(cot_policy_faithfulness=3, response_policy_faithfulness=3)),
    )

    result = await run(llm, with_quality(min_gap=1.0))

    assert result.pair is not None
    assert (result.pair.kept, result.pair.reason, result.pair.gap) == (True, None, 1.0)


async def test_a_pair_whose_rejected_side_cannot_be_graded_is_not_kept_and_says_why(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", guard_verdict(True))
    scripted_llm.script("quality_scores", reply(scores()), *[malformed()] * 3)

    result = await run(llm, with_quality())

    pair = result.pair
    assert pair is not None
    assert (pair.kept, pair.reason, pair.gap) == (False, "grading_failed", None)
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
    assert result.pair is not None and (result.pair.kept, result.pair.reason) == (False, "grading_failed")
    assert result.pair.rejected_grade is not None and result.pair.rejected_grade.scores is not None


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
        assert result.pair is not None and (result.pair.kept, result.pair.reason) == (False, reason)
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
