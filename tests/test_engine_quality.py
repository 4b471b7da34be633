"""Grading, quality gates, ear-whisperer pairs, the zero-shot baseline and the pairwise judge,
over real HTTP against the scripted server, with the in-memory turn log."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import astuple, replace

import pytest

from app.deliberation.config import (
    Evaluators,
    GradingConfig,
    GuardConfig,
    GuardStyle,
    Mode,
    PairsConfig,
    PipelineConfig,
)
from app.deliberation.engine import deliberate, evaluate_sample, judge_pair
from app.deliberation.ports import LLMUnavailable, Stage, TurnKey
from app.deliberation.results import METRICS, Completed, Evaluated, Judged, Sample
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import (
    ScriptedLLM,
    guard_verdict,
    malformed,
    refusal,
    reply,
    scores,
)
from tests.test_engine import DEFAULT_ROLE, ITEM, POLICIES, PROMPT, PROMPTS, GoesDownAfter, pipeline

ALL_THREES = dict.fromkeys(METRICS, 3.0)


def with_quality(
    *,
    thresholds: dict[str, float] | None = None,
    max_tries: int = 3,
    baseline: bool = False,
    guard_style: GuardStyle = GuardStyle.JSON,
    pairs: bool = True,
    mode: Mode = Mode.AIDSAFE,
) -> PipelineConfig:
    return replace(
        pipeline(),
        mode=mode,
        grading=GradingConfig(DEFAULT_ROLE, ALL_THREES if thresholds is None else thresholds),
        pairs=PairsConfig(
            DEFAULT_ROLE, DEFAULT_ROLE, GuardConfig(DEFAULT_ROLE, guard_style), max_tries, baseline
        )
        if pairs
        else None,
    )


async def run(
    llm: OpenAICompatibleClient, config: PipelineConfig, log: InMemoryTurnLog | None = None
) -> Completed:
    result = await deliberate(ITEM, PROMPT, config, POLICIES, PROMPTS, llm, log or InMemoryTurnLog())
    assert isinstance(result, Completed), result
    return result


def unsafe_rejected_scores() -> dict[str, object]:
    return scores(cot_policy_faithfulness=1, response_policy_faithfulness=2)


# --- grading and the gate ----------------------------------------------------------------


async def test_grading_scores_the_refined_cot_and_the_gate_names_every_missed_threshold(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("quality_scores", reply(scores(coherence=2, completeness=1)))

    result = await run(llm, with_quality(pairs=False))

    assert result.grade is not None and result.grade.scores is not None
    assert {m: s["score"] for m, s in result.grade.scores.items()} == {
        **dict.fromkeys(METRICS, 4),
        "coherence": 2,
        "completeness": 1,
    }
    assert result.gate is not None and result.gate.accepted is False
    assert result.gate.reasons == ["coherence 2 < 3", "completeness 1 < 3"]
    graded = scripted_llm.requests_for("quality_scores")[0].body["messages"][-1]["content"]
    assert result.response in graded and result.refined_thoughts[0]["text"] in graded


async def test_a_cot_meeting_every_threshold_is_accepted_and_ungated_metrics_are_ignored(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("quality_scores", reply(scores(relevance=1)))

    result = await run(llm, with_quality(pairs=False, thresholds={"coherence": 4}))

    assert result.gate is not None
    assert (result.gate.accepted, result.gate.reasons) == (True, [])


async def test_malformed_grader_output_leaves_the_cot_ungraded_and_rejected_not_guessed(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    out_of_range = reply(scores(relevance=7))
    scripted_llm.script("quality_scores", malformed(), out_of_range, reply({"relevance": "good"}))

    result = await run(llm, with_quality(pairs=False))

    assert len(scripted_llm.requests_for("quality_scores")) == 3  # the first ask and two re-asks
    assert result.grade is not None and result.grade.scores is None
    assert "no usable output in 3 tries" in (result.grade.error or "")
    assert result.gate is not None and result.gate.accepted is False
    assert result.gate.reasons[0].startswith("not graded:")
    assert result.response  # the CoT itself is kept


# --- the ear-whisperer --------------------------------------------------------------------


async def test_whisper_succeeds_at_the_second_try_with_the_first_shown_back(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("whisper_belief", reply({"belief": "Belief one."}), reply({"belief": "Belief two."}))
    scripted_llm.script(
        "rejected_cot",
        reply({"thoughts": ["Try one thought."], "response": "Try one answer."}),
        reply({"thoughts": ["Try two thought."], "response": "Try two answer."}),
    )
    scripted_llm.script("guard_verdict", guard_verdict(False), guard_verdict(True, "Physical harm"))
    scripted_llm.script(
        "quality_scores",
        reply(scores()),
        reply(scores(cot_policy_faithfulness=3)),
        reply(unsafe_rejected_scores()),
    )

    log = InMemoryTurnLog()
    result = await run(llm, with_quality(), log)

    pair = result.pair
    assert pair is not None
    assert (pair.made, pair.reason, pair.gap) == (True, None, 4 - 1.5)
    assert [t.gap for t in pair.tries] == [0.5, 4 - 1.5]  # the try the guard passed is graded too
    assert [t.method for t in pair.tries] == ["whisper", "whisper"] and pair.baseline == []
    assert [t.belief for t in pair.tries] == ["Belief one.", "Belief two."]
    assert [t.rejected.response for t in pair.tries if t.rejected] == ["Try one answer.", "Try two answer."]
    assert pair.rejected is pair.tries[1]
    assert pair.tries[1].guard is not None and pair.tries[1].guard.categories == ["Physical harm"]
    assert pair.rejected_grade is not None and pair.rejected_grade.scores is not None
    # The belief goes into the rejected generation only, and the second try sees the first.
    rejected_requests = scripted_llm.requests_for("rejected_cot")
    assert "Belief two." in rejected_requests[1].body["messages"][-1]["content"]
    second_whisper = scripted_llm.requests_for("whisper_belief")[1].body["messages"][-1]["content"]
    assert "Belief one." in second_whisper and "Try one answer." in second_whisper
    assert not any(
        "Belief" in m["content"] for r in scripted_llm.requests_for("seed_cot") for m in r.body["messages"]
    )
    # Every call is a stored turn, keyed by try.
    keys = Counter((t.key.stage, t.key.round) for t in log.turns(ITEM))
    for stage in (Stage.WHISPER, Stage.REJECTED, Stage.GUARD):
        assert keys[(stage, 1)] == keys[(stage, 2)] == 1
    assert keys[(Stage.GRADE, 0)] == keys[(Stage.GRADE, 1)] == keys[(Stage.GRADE, 2)] == 1


async def test_whisper_that_never_succeeds_keeps_no_pair_and_says_why(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    result = await run(llm, with_quality(max_tries=3))  # the default guard answer is "safe"

    assert result.pair is not None
    assert (result.pair.made, result.pair.reason) == (False, "guard_never_flagged")
    assert len(result.pair.tries) == 3 and result.pair.rejected is None and result.pair.gap is None
    assert [t.gap for t in result.pair.tries] == [0.0, 0.0, 0.0]  # every try the guard passed, graded
    assert len(scripted_llm.requests_for("whisper_belief")) == 3
    assert len(scripted_llm.requests_for("quality_scores")) == 4


async def test_unparseable_guard_output_is_recorded_not_guessed(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", *[reply({"verdict": "maybe", "rationale": "?"})] * 3)

    result = await run(llm, with_quality())

    assert result.pair is not None
    assert (result.pair.made, result.pair.reason) == (False, "guard_unparseable")
    verdict = result.pair.tries[0].guard
    assert verdict is not None and verdict.unsafe is None and "neither" in (verdict.error or "")
    assert len(scripted_llm.requests_for("whisper_belief")) == 1  # no second try on a guess
    assert (result.pair.tries[0].grade, result.pair.tries[0].gap) == (None, None)
    assert len(scripted_llm.requests_for("quality_scores")) == 1  # nothing judged, nothing graded


async def test_llama_guard_style_reads_categories_and_sends_no_schema(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(None, reply("safe"), reply("unsafe\nS1, S10"))
    scripted_llm.script("quality_scores", reply(scores()), reply(scores()), reply(unsafe_rejected_scores()))

    result = await run(llm, with_quality(guard_style=GuardStyle.LLAMA_GUARD))

    assert result.pair is not None and result.pair.made
    assert result.pair.tries[1].guard is not None and result.pair.tries[1].guard.categories == ["S1", "S10"]
    guard_requests = scripted_llm.requests_for(None)
    assert len(guard_requests) == 2
    body = guard_requests[0].body
    assert "response_format" not in body
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]  # its template does the rest
    assert body["messages"][0]["content"] == PROMPT


async def test_llama_guard_garbage_is_not_reasked(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(None, reply("I think this is probably fine"))

    result = await run(llm, with_quality(guard_style=GuardStyle.LLAMA_GUARD))

    assert result.pair is not None and result.pair.reason == "guard_unparseable"
    assert len(scripted_llm.requests_for(None)) == 1


async def test_a_small_gap_still_makes_a_pair_its_readers_filter(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", guard_verdict(True, "Fraud and deception"))
    scripted_llm.script(
        "quality_scores",
        reply(scores()),
        reply(scores(cot_policy_faithfulness=5, response_policy_faithfulness=5)),
    )

    result = await run(llm, with_quality())

    assert result.pair is not None
    assert (result.pair.made, result.pair.reason, result.pair.gap) == (True, None, -1.0)
    assert result.pair.rejected is result.pair.tries[0]


async def test_a_generator_refusal_is_a_failed_try_the_whisperer_sees(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("rejected_cot", refusal("I can't reason from that belief."))
    scripted_llm.script("guard_verdict", guard_verdict(True))
    scripted_llm.script("quality_scores", reply(scores()), reply(unsafe_rejected_scores()))

    result = await run(llm, with_quality())

    assert result.pair is not None and result.pair.made
    first = result.pair.tries[0]
    assert first.rejected is None and first.guard is None and "can't reason" in (first.refusal or "")
    second_whisper = scripted_llm.requests_for("whisper_belief")[1].body["messages"][-1]["content"]
    assert "The assistant refused: I can't reason from that belief." in second_whisper
    assert len(scripted_llm.requests_for("guard_verdict")) == 1  # a refusal is not judged


async def test_a_whisperer_refusal_ends_the_pair_not_the_item(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("whisper_belief", refusal())

    result = await run(llm, with_quality())

    assert result.pair is not None and (result.pair.made, result.pair.reason) == (False, "whisperer_refused")
    assert result.grade is not None and result.grade.scores is not None


async def test_a_crash_between_tries_resumes_without_repeating_a_stored_call(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("guard_verdict", guard_verdict(False), guard_verdict(False), guard_verdict(True))
    config = with_quality(max_tries=3)
    log = InMemoryTurnLog()
    # intent, seed, 1 deliberation turn, refine, grade, then try 1 (4 calls) and try 2's whisper
    before_crash = 4 + 1 + 4 + 1
    with pytest.raises(LLMUnavailable):
        await deliberate(ITEM, PROMPT, config, POLICIES, PROMPTS, GoesDownAfter(llm, before_crash), log)
    assert len(log.turns(ITEM)) == before_crash

    result = await run(llm, config, log)

    assert result.pair is not None and result.pair.made and len(result.pair.tries) == 3
    assert log.ignored_records == 0  # nothing stored was asked again
    assert len(scripted_llm.requests) == len(log.turns(ITEM)) == before_crash + 3 + 4


# --- zero-shot baseline and the pairwise judge -----------------------------------------------


async def test_zero_shot_mode_writes_cot_and_response_in_one_call(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("zero_shot_cot", reply({"thoughts": ["One.", "Two."], "response": "Answer."}))

    result = await run(llm, with_quality(pairs=False, mode=Mode.ZERO_SHOT))

    assert Counter(r.schema_name for r in scripted_llm.requests) == {"zero_shot_cot": 1, "quality_scores": 1}
    assert result.sample() == Sample(["One.", "Two."], "Answer.")
    assert [(t.id, t.stage) for t in result.thoughts] == [(1, "zero_shot"), (2, "zero_shot")]
    assert result.rounds_used == 0 and result.grade is not None


async def judge(
    llm: OpenAICompatibleClient,
    log: InMemoryTurnLog | None = None,
    samples: tuple[Sample, Sample] | None = None,
) -> Judged:
    a, b = samples or (
        Sample(["Baseline thought."], "Baseline answer."),
        Sample(["Candidate thought."], "Candidate answer."),
    )
    item = uuid.uuid4()
    (judged,) = await judge_pair(
        item,
        PROMPT,
        a,
        b,
        [DEFAULT_ROLE],
        POLICIES,
        PROMPTS,
        llm,
        log or InMemoryTurnLog(),
        max_tokens=256,
        max_reasks=1,
    )
    return judged


async def test_the_judge_is_asked_in_both_orders_and_a_win_needs_both(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    # Round 1 shows (a, b): "B" is b. Round 2 shows (b, a): "A" is b again.
    scripted_llm.script(
        "pairwise_judgement",
        reply({"winner": "B", "rationale": "x"}),
        reply({"winner": "A", "rationale": "y"}),
    )
    won = await judge(llm)
    first_request = scripted_llm.requests_for("pairwise_judgement")[0].body["messages"][-1]["content"]
    assert first_request.index("Baseline answer.") < first_request.index("Candidate answer.")

    # Both say "A": each time the sample shown first, so position decided, not quality.
    scripted_llm.script(
        "pairwise_judgement",
        reply({"winner": "A", "rationale": "x"}),
        reply({"winner": "A", "rationale": "y"}),
    )
    position_biased = await judge(llm)

    scripted_llm.script(
        "pairwise_judgement", reply({"winner": "B", "rationale": "x"}), malformed(), malformed()
    )
    unreadable = await judge(llm)

    assert won.winner == "b" and [v.choice for v in won.votes] == ["b", "b"]
    assert position_biased.winner == "tie" and [v.choice for v in position_biased.votes] == ["a", "b"]
    assert unreadable.winner is None
    # An unreadable order is still a vote a tenant sees: its order, and why it has no choice.
    order, choice, why = astuple(unreadable.votes[1])
    assert (order, choice) == ("ba", None)
    assert why.startswith("the judge agent gave no usable output in 2 tries; last problem: malformed: ")


async def test_a_sample_evaluation_keys_grade_and_guard_as_round_0_and_the_judge_as_rounds_1_and_2(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    """The keys evaluations were stored under before: a rerun replays them and asks nothing."""
    scripted_llm.script("quality_scores", reply(scores(coherence=2)))
    scripted_llm.script("guard_verdict", guard_verdict(False))
    # Round 1 shows (other, sample): "B" is the sample; round 2 shows (sample, other).
    scripted_llm.script(
        "pairwise_judgement",
        reply({"winner": "B", "rationale": "x"}),
        reply({"winner": "A", "rationale": "y"}),
    )
    log = InMemoryTurnLog()
    sample, other = Sample(["Imported thought."], "Imported answer."), Sample(["Other."], "Other answer.")

    async def evaluated() -> Evaluated:
        evaluators = Evaluators(DEFAULT_ROLE, GuardConfig(DEFAULT_ROLE), DEFAULT_ROLE, 256, 1)
        return await evaluate_sample(ITEM, PROMPT, sample, other, evaluators, POLICIES, PROMPTS, llm, log)

    first = await evaluated()
    scripted_llm.reset()
    again = await evaluated()

    assert [t.key for t in log.turns(ITEM)] == [
        TurnKey(Stage.GRADE, 0, 0),
        TurnKey(Stage.GUARD, 0, 0),
        TurnKey(Stage.JUDGE, 1, 0),
        TurnKey(Stage.JUDGE, 2, 0),
    ]
    assert first.grade is not None and first.grade.scores is not None
    assert first.grade.scores["coherence"]["score"] == 2
    assert first.guard is not None and first.guard.unsafe is False
    assert first.judged is not None and first.judged.winner == "b"
    assert scripted_llm.requests == [] and again == first
