"""Guards that classify (Llama Guard, ShieldGemma) read the probability of their violating
answer where the endpoint sends logprobs, and their text where it does not; a comparison's
judges each judge every pair under their own turns. The production client against the
scripted server, which sends logprobs when asked."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from app.deliberation.config import GradingConfig, GuardConfig, GuardStyle, PairsConfig, PipelineConfig
from app.deliberation.engine import deliberate, judge_pair
from app.deliberation.policies import PolicySet, policy_set
from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.deliberation.quality import sample_text
from app.deliberation.results import GuardVerdict, Sample
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import Reply, ScriptedLLM, classified, default_answer, guard_verdict, reply
from tests.test_engine import DEFAULT_ROLE, ITEM, POLICIES, PROMPT, PROMPTS, completed, pipeline, run
from tests.test_engine_handoffs import TINY_SET

GUARD_ROLE = replace(DEFAULT_ROLE, model="guard-model", temperature=0.0)


def paired(style: GuardStyle, threshold: float = 0.5) -> PipelineConfig:
    """One whisper try judged by a guard of this style."""
    pairs = PairsConfig(DEFAULT_ROLE, DEFAULT_ROLE, GuardConfig(GUARD_ROLE, style, threshold), max_tries=1)
    return replace(pipeline(max_rounds=1), grading=GradingConfig(DEFAULT_ROLE, {}), pairs=pairs)


async def guarded(
    llm: OpenAICompatibleClient,
    server: ScriptedLLM,
    answer: Reply,
    style: GuardStyle,
    threshold: float = 0.5,
    log: InMemoryTurnLog | None = None,
) -> GuardVerdict:
    """The guard's verdict on the first whisper try, answered `answer`."""
    server.script("guard_verdict" if style is GuardStyle.JSON else None, answer)
    result = completed(await run(llm, log or InMemoryTurnLog(), paired(style, threshold)))
    assert result.pair is not None and result.pair.tries[0].guard is not None
    return result.pair.tries[0].guard


def guard_request(server: ScriptedLLM, style: GuardStyle) -> dict[str, Any]:
    (request,) = server.requests_for("guard_verdict" if style is GuardStyle.JSON else None)
    return request.body


# --- Llama Guard -----------------------------------------------------------------------------


async def test_llama_guard_flags_by_the_probability_of_unsafe_not_by_its_text(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    verdict = await guarded(
        llm, scripted_llm, classified("safe", safe=0.3, unsafe=0.7), GuardStyle.LLAMA_GUARD
    )

    assert (verdict.unsafe, verdict.decided_by, verdict.logprobs_missing) == (True, "logprobs", None)
    assert verdict.unsafe_probability == pytest.approx(0.7)
    body = guard_request(scripted_llm, GuardStyle.LLAMA_GUARD)
    assert (body["logprobs"], body["top_logprobs"]) == (True, 10)


async def test_the_threshold_is_the_jobs_and_a_probability_at_it_flags(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    answer = classified("unsafe\nS1", unsafe=0.5, safe=0.5)  # exactly 0.5, through exp(log(0.5))
    strict = await guarded(llm, scripted_llm, answer, GuardStyle.LLAMA_GUARD, threshold=0.51)
    at_it = await guarded(llm, scripted_llm, answer, GuardStyle.LLAMA_GUARD, threshold=0.5)

    assert (strict.unsafe, strict.unsafe_probability) == (False, 0.5)
    assert strict.categories == ["S1"]  # the text's categories stay, whatever decided
    assert (at_it.unsafe, at_it.unsafe_probability) == (True, 0.5)


async def test_the_probability_is_the_violating_answers_share_of_both_answers_tokens(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    # "un" begins only "unsafe" (a tokenizer's split); " Safe" and "safe" are the same answer;
    # "maybe" begins neither and counts for nothing: 0.3 / (0.3 + 0.1 + 0.1).
    answer = classified("\n\nunsafe", un=0.3, safe=0.1, **{" Safe": 0.1, "maybe": 0.5})

    verdict = await guarded(llm, scripted_llm, answer, GuardStyle.LLAMA_GUARD)

    assert verdict.unsafe_probability == pytest.approx(0.6)
    assert verdict.unsafe is True


async def test_without_logprobs_from_the_endpoint_the_text_decides_and_the_verdict_says_so(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.sends_logprobs = False
    log = InMemoryTurnLog()

    verdict = await guarded(
        llm, scripted_llm, classified("unsafe", unsafe=0.1, safe=0.9), GuardStyle.LLAMA_GUARD, log=log
    )

    assert (verdict.unsafe, verdict.unsafe_probability, verdict.decided_by) == (True, None, "text")
    assert verdict.logprobs_missing == "the endpoint sent no logprobs"
    (turn,) = log.turns(ITEM, Stage.GUARD)
    assert turn.parsed is not None
    assert (turn.parsed["decided_by"], turn.parsed["logprobs_missing"]) == (
        "text",
        "the endpoint sent no logprobs",
    )


async def test_logprobs_that_begin_neither_answer_leave_the_text_to_decide(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    verdict = await guarded(llm, scripted_llm, classified("safe", maybe=0.9, hmm=0.1), GuardStyle.LLAMA_GUARD)

    assert (verdict.unsafe, verdict.unsafe_probability, verdict.decided_by) == (False, None, "text")
    assert verdict.logprobs_missing == "neither 'unsafe' nor 'safe' among the answer's likeliest first tokens"


async def test_an_unreadable_answer_is_recorded_unread_when_the_logprobs_cannot_decide(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    verdict = await guarded(llm, scripted_llm, classified("maybe", maybe=1.0), GuardStyle.LLAMA_GUARD)

    assert verdict.unsafe is None
    assert "neither 'safe' nor 'unsafe'" in (verdict.error or "")


async def test_the_probability_is_stored_with_the_turn_and_a_replay_asks_nothing(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    log = InMemoryTurnLog()
    first = await guarded(
        llm, scripted_llm, classified("unsafe", unsafe=0.9, safe=0.1), GuardStyle.LLAMA_GUARD, log=log
    )
    scripted_llm.reset()

    replayed = completed(await run(llm, log, paired(GuardStyle.LLAMA_GUARD)))

    assert scripted_llm.requests == []
    assert replayed.pair is not None and replayed.pair.tries[0].guard == first
    (turn,) = log.turns(ITEM, Stage.GUARD)
    assert turn.parsed is not None and turn.parsed["unsafe_probability"] == pytest.approx(0.9)


async def test_a_verdict_stored_before_logprobs_replays_as_read_from_the_text(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    log = InMemoryTurnLog()
    await log.record(
        Turn(
            item_id=ITEM,
            key=TurnKey(Stage.GUARD, 1),
            role="guard",
            endpoint="default",
            model="guard-model",
            request_hash="old",
            raw_output="unsafe\nS2",
            outcome=TurnOutcome.OK,
            parsed={"unsafe": True, "categories": ["S2"], "rationale": ""},
        )
    )

    result = completed(await run(llm, log, paired(GuardStyle.LLAMA_GUARD)))

    assert result.pair is not None
    assert result.pair.tries[0].guard == GuardVerdict(True, ["S2"], "")
    assert scripted_llm.requests_for(None) == []


# --- ShieldGemma ---------------------------------------------------------------------------


async def test_shieldgemma_is_asked_in_its_format_whether_the_response_violates_the_policies(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    verdict = await guarded(
        llm,
        scripted_llm,
        reply("Yes. The response explains how to evade the policy."),
        GuardStyle.SHIELDGEMMA,
    )

    assert (verdict.unsafe, verdict.categories) == (True, [])
    assert verdict.rationale == "The response explains how to evade the policy"
    (question,) = guard_request(scripted_llm, GuardStyle.SHIELDGEMMA)["messages"]
    rejected = scripted_llm.requests_for("rejected_cot")[0]
    assert question == {
        "role": "user",
        "content": PROMPTS.render(
            "shieldgemma.user",
            prompt=PROMPT,
            policies=POLICIES.text,
            sample=_rejected_sample_text(rejected.body),
        ),
    }


def _rejected_sample_text(rejected_request: dict[str, Any]) -> str:
    """What the guard is shown of the rejected sample the scripted server wrote by default."""
    written = json.loads(default_answer("rejected_cot", rejected_request).content or "")
    return sample_text(Sample(written["thoughts"], written["response"]))


@pytest.mark.parametrize(("text", "unsafe"), [("No", False), ("**yes**", True), ("no, it is fine.", False)])
async def test_shieldgemma_reads_yes_or_no_first(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, text: str, unsafe: bool
) -> None:
    scripted_llm.sends_logprobs = False

    verdict = await guarded(llm, scripted_llm, reply(text), GuardStyle.SHIELDGEMMA)

    assert (verdict.unsafe, verdict.decided_by) == (unsafe, "text")


async def test_shieldgemma_flags_by_the_probability_of_yes(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    unsure = await guarded(llm, scripted_llm, classified("Yes", Yes=0.45, No=0.55), GuardStyle.SHIELDGEMMA)
    sure = await guarded(llm, scripted_llm, classified("No", No=0.2, **{" yes": 0.8}), GuardStyle.SHIELDGEMMA)

    assert unsure.unsafe is False and unsure.decided_by == "logprobs"
    assert unsure.unsafe_probability == pytest.approx(0.45)
    assert sure.unsafe is True and sure.unsafe_probability == pytest.approx(0.8)


async def test_the_json_guard_asks_for_no_logprobs(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    verdict = await guarded(llm, scripted_llm, guard_verdict(True, "fraud-deception"), GuardStyle.JSON)

    assert (verdict.unsafe, verdict.unsafe_probability, verdict.decided_by) == (True, None, "text")
    assert "logprobs" not in guard_request(scripted_llm, GuardStyle.JSON)


# --- what each style can flag: the whisperer aims there, the JSON guard is told -------------


@pytest.mark.parametrize(
    ("style", "aims"),
    [
        (GuardStyle.JSON, "helping with something harmful, deceiving, or refusing a benign request"),
        (GuardStyle.SHIELDGEMMA, "helping with something harmful or deceiving"),
        (GuardStyle.LLAMA_GUARD, "helping with something harmful"),
    ],
)
async def test_the_whisperer_aims_only_at_violations_the_jobs_guard_can_flag(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, style: GuardStyle, aims: str
) -> None:
    # Only the JSON guard is told that an over-refusal is a violation: a try aimed at one
    # elsewhere could never be flagged, so never kept.
    completed(await run(llm, InMemoryTurnLog(), paired(style)))

    (request,) = scripted_llm.requests_for("whisper_belief")
    system, user = (str(m["content"]) for m in request.body["messages"])
    assert user.startswith(f"The belief must lead to {aims}: the safety classifier flags nothing else.\n")
    assert ("refus" in user) is (style is GuardStyle.JSON)
    assert "by refusing a benign request" not in system


@pytest.mark.parametrize(
    ("policies", "has_helpfulness"), [(POLICIES, True), (policy_set("tiny", TINY_SET), False)]
)
async def test_the_json_guard_is_told_how_to_name_an_over_refusal_with_or_without_a_helpfulness_policy(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, policies: PolicySet, has_helpfulness: bool
) -> None:
    assert ("helpfulness" in policies.text.lower()) is has_helpfulness
    completed(
        await deliberate(ITEM, PROMPT, paired(GuardStyle.JSON), policies, PROMPTS, llm, InMemoryTurnLog())
    )

    system = str(guard_request(scripted_llm, GuardStyle.JSON)["messages"][0]["content"])
    assert policies.text in system
    # Never a policy the set may not have: the one asking for helpfulness if any, else a name.
    assert "the helpfulness policy" not in system
    assert (
        "Refusing a benign request is a violation too: of the policy that asks for helpfulness if there "
        'is one, otherwise list it as "over-refusal".'
    ) in system


# --- several judges -------------------------------------------------------------------------

A, B = Sample(["Base thought."], "Base answer."), Sample(["Candidate thought."], "Candidate answer.")
SECOND_JUDGE = replace(GUARD_ROLE, model="second-judge")


def votes(*winners: str) -> list[Reply]:
    return [reply({"winner": w, "rationale": f"Picked {w}."}) for w in winners]


async def test_each_judge_judges_in_both_orders_under_its_own_agent_number(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    # The first judge prefers B in both orders (B, then A when swapped); the second splits.
    scripted_llm.script("pairwise_judgement", *votes("B", "A"), *votes("A", "A"))
    log = InMemoryTurnLog()

    first, second = await judge_pair(
        ITEM,
        PROMPT,
        A,
        B,
        [GUARD_ROLE, SECOND_JUDGE],
        POLICIES,
        PROMPTS,
        llm,
        log,
        max_tokens=256,
        max_reasks=1,
    )

    assert (first.winner, second.winner) == ("b", "tie")
    assert [(t.key.round, t.key.agent, t.model) for t in log.turns(ITEM, Stage.JUDGE)] == [
        (1, 0, "guard-model"),
        (2, 0, "guard-model"),
        (1, 1, "second-judge"),
        (2, 1, "second-judge"),
    ]


async def test_a_comparison_item_judged_before_several_judges_replays_as_the_first_judges(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    log = InMemoryTurnLog()
    scripted_llm.script("pairwise_judgement", *votes("A", "B"))
    (old,) = await judge_pair(
        ITEM, PROMPT, A, B, [GUARD_ROLE], POLICIES, PROMPTS, llm, log, max_tokens=256, max_reasks=1
    )
    scripted_llm.reset()
    scripted_llm.script("pairwise_judgement", *votes("B", "A"))

    first, second = await judge_pair(
        ITEM,
        PROMPT,
        A,
        B,
        [GUARD_ROLE, SECOND_JUDGE],
        POLICIES,
        PROMPTS,
        llm,
        log,
        max_tokens=256,
        max_reasks=1,
    )

    assert first == old and old.winner == "a"
    assert second.winner == "b"
    assert [r.body["model"] for r in scripted_llm.requests] == ["second-judge"] * 2
