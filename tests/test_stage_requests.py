"""Every stage's request, pinned byte for byte.

A turn stores the hash of the request it sent (model, messages, schema name, temperature,
max_tokens). Replay reads stored turns by key, not by hash, but a stored hash that no longer
matches what the engine would send means old items and new ones were asked different
questions. So any change to a template, a renderer, a schema or the order of messages shows
up here first: if it is meant, re-pin the figures (print `_fingerprint(...)`), and say so.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import replace
from typing import Any

from jsonschema import Draft202012Validator

from app.deliberation.budget import (
    judge_request,
    largest_requests,
    reply_tokens,
    request_tokens,
    sample_evaluation_requests,
    sample_judge_request,
)
from app.deliberation.config import (
    Evaluators,
    GradingConfig,
    GuardConfig,
    GuardStyle,
    Limits,
    Mode,
    PairsConfig,
    PipelineConfig,
)
from app.deliberation.engine import deliberate, judge_pair
from app.deliberation.ports import Stage
from app.deliberation.prompt_sets import TEMPLATE_DIR
from app.deliberation.quality import sample_text, sample_text_bytes
from app.deliberation.results import METRICS, Completed, Judged, Sample
from app.deliberation.stages import (
    DECLARED,
    DELIBERATION,
    GRADE,
    GUARD,
    INTENT,
    JUDGE,
    REFINE,
    REJECTED,
    SEED,
    ZERO_SHOT,
)
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import ScriptedLLM, agree, guard_verdict, malformed, refusal, reply, scores, truncated
from tests.test_engine import DEFAULT_ROLE, ITEM, POLICIES, PROMPT, PROMPTS, pipeline

GRADER = replace(DEFAULT_ROLE, temperature=0.0)


def _config(mode: Mode, guard_style: GuardStyle, max_tries: int) -> PipelineConfig:
    return replace(
        pipeline(agents=2, max_rounds=2),
        mode=mode,
        grading=GradingConfig(GRADER, dict.fromkeys(METRICS, 3.0)),
        pairs=PairsConfig(DEFAULT_ROLE, DEFAULT_ROLE, GuardConfig(GRADER, guard_style), max_tries),
    )


def _fingerprint(log: InMemoryTurnLog, item: uuid.UUID, server: ScriptedLLM) -> dict[str, object]:
    """Per turn: key, role and request hash; and one digest of every HTTP body sent, which
    also covers what the hash leaves out (the schema itself, response_format)."""
    turns = [
        f"{t.key.stage}/{t.key.round}/{t.key.agent}/{t.key.attempt} {t.role} {t.request_hash[:16]}"
        for t in log.turns(item)
    ]
    bodies = json.dumps([r.body for r in server.requests], sort_keys=True)
    return {"turns": turns, "bodies": hashlib.sha256(bodies.encode()).hexdigest()[:16]}


async def test_aidsafe_stages_with_reasks_grading_and_a_whispered_pair_send_pinned_requests(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("intent_decomposition", malformed())  # a malformed re-ask
    scripted_llm.script("seed_cot", truncated())  # a truncated re-ask: brevity, twice the tokens
    scripted_llm.script(
        "deliberation_turn",
        agree(False, ["Name the policy."], response="Round 1, agent 1."),
        agree(False, ["Mention ventilation."], response="Round 1, agent 2."),
        agree(True),
    )
    scripted_llm.script("whisper_belief", *(reply({"belief": f"Belief {n}."}) for n in (1, 2, 3)))
    scripted_llm.script(
        "rejected_cot",
        reply({"thoughts": ["Try one thought."], "response": "Try one answer."}),
        refusal(),  # the generator resists: the whisperer sees the refusal
        reply({"thoughts": ["Try three thought."], "response": "Try three answer."}),
    )
    scripted_llm.script("guard_verdict", guard_verdict(False), guard_verdict(True, "Physical harm"))
    scripted_llm.script(
        "quality_scores",
        reply(scores()),
        reply(scores(cot_policy_faithfulness=1, response_policy_faithfulness=1)),
    )
    log = InMemoryTurnLog()

    result = await deliberate(
        ITEM, PROMPT, _config(Mode.AIDSAFE, GuardStyle.JSON, 3), POLICIES, PROMPTS, llm, log
    )

    assert isinstance(result, Completed) and result.pair is not None and result.pair.made
    assert _fingerprint(log, ITEM, scripted_llm) == {
        "turns": [
            "intent/0/0/0 intent 13f2cb3b46a1df57",
            "intent/0/0/1 intent dbedbb13c4467555",
            "seed/0/0/0 seed 84d49dbd33a4c375",
            "seed/0/0/1 seed 68cd79854f335b11",
            "deliberation/1/1/0 deliberator-1 a1f21a2a786505b4",
            "deliberation/1/2/0 deliberator-2 027d9cac4919d49b",
            "deliberation/2/1/0 deliberator-1 2bc9e24327b91856",
            "refine/0/0/0 refiner f1be05f33a9c2659",
            "grade/0/0/0 grader cf40c1df3f266961",
            "whisper/1/0/0 whisperer b392f5ffa4de9f8b",
            "rejected/1/0/0 generator 98f7edeaebcd7bde",
            "guard/1/0/0 guard ca015903a72e8191",
            "grade/1/0/0 grader e1d018b87b9c0fa2",
            "whisper/2/0/0 whisperer fcbb0516df06464b",
            "rejected/2/0/0 generator 7732414a06d72ec1",
            "whisper/3/0/0 whisperer d9186ed203450089",
            "rejected/3/0/0 generator ae5f93ac54cbe47b",
            "guard/3/0/0 guard 7078888c018648c0",
            "grade/3/0/0 grader 8a9712e0307b9fb3",
        ],
        "bodies": "10e5b0054b610eb5",
    }


async def test_zero_shot_with_a_llama_guard_pair_sends_pinned_requests(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("rejected_cot", reply({"thoughts": ["Rules bend."], "response": "Bent answer."}))
    scripted_llm.script(None, reply("unsafe\nS1"))
    scripted_llm.script("quality_scores", reply(scores()), reply(scores(cot_policy_faithfulness=1)))
    log = InMemoryTurnLog()

    config = _config(Mode.ZERO_SHOT, GuardStyle.LLAMA_GUARD, 1)
    result = await deliberate(ITEM, PROMPT, config, POLICIES, PROMPTS, llm, log)

    assert isinstance(result, Completed) and result.pair is not None and result.pair.tries[0].guard
    assert _fingerprint(log, ITEM, scripted_llm) == {
        "turns": [
            "zero_shot/0/0/0 zero-shot a7fe469576f0b141",
            "grade/0/0/0 grader cefc22aca5cee350",
            "whisper/1/0/0 whisperer f7737e9188f9340d",
            "rejected/1/0/0 generator 902f37798175744b",
            "guard/1/0/0 guard dfa128c27c2976d5",
            "grade/1/0/0 grader 7d6ebf3e8fb9852b",
        ],
        "bodies": "2a9643bb9babbcee",
    }


async def test_the_pairwise_judge_sends_pinned_requests(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("pairwise_judgement", malformed(), reply({"winner": "A", "rationale": "Clearer."}))
    log = InMemoryTurnLog()
    a, b = Sample(["Base thought."], "Base answer."), Sample(["Candidate thought."], "Candidate answer.")

    judged = await judge_pair(
        ITEM, PROMPT, a, b, [GRADER], POLICIES, PROMPTS, llm, log, max_tokens=256, max_reasks=1
    )

    assert [type(j) for j in judged] == [Judged]
    assert _fingerprint(log, ITEM, scripted_llm) == {
        "turns": [
            "judge/1/0/0 judge 38bb3658769975bd",
            "judge/1/0/1 judge 7463ff35b183a061",
            "judge/2/0/0 judge b07dfb35c317f496",
        ],
        "bodies": "27ae18d2397653dc",
    }


async def test_a_shieldgemma_guard_sends_one_pinned_question_with_the_policies_and_asks_for_logprobs(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(None, reply("Yes"))
    log = InMemoryTurnLog()

    config = _config(Mode.ZERO_SHOT, GuardStyle.SHIELDGEMMA, 1)
    result = await deliberate(ITEM, PROMPT, config, POLICIES, PROMPTS, llm, log)

    assert isinstance(result, Completed) and result.pair is not None and result.pair.tries[0].guard
    (guard,) = scripted_llm.requests_for(None)
    (question,) = guard.body["messages"]
    assert question["role"] == "user" and POLICIES.text in question["content"]
    assert "Human Question: " + PROMPT in question["content"]
    assert question["content"].endswith(
        "Your answer must start with 'Yes' or 'No'. "
        "And then walk through step by step to be sure we answer correctly."
    )
    assert (guard.body["logprobs"], guard.body["top_logprobs"]) == (True, 10)
    assert "response_format" not in guard.body
    assert _fingerprint(log, ITEM, scripted_llm) == {
        "turns": [
            "zero_shot/0/0/0 zero-shot a7fe469576f0b141",
            "grade/0/0/0 grader cefc22aca5cee350",
            "whisper/1/0/0 whisperer 7e39615580b328d4",
            "rejected/1/0/0 generator 902f37798175744b",
            "guard/1/0/0 guard 8d8e3cf4dff75b6f",
            "grade/1/0/0 grader cefc22aca5cee350",
        ],
        "bodies": "8dcf309bd9ecd72b",
    }


async def test_several_judges_send_pinned_requests_each_under_its_own_agent_number(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    log = InMemoryTurnLog()
    a, b = Sample(["Base thought."], "Base answer."), Sample(["Candidate thought."], "Candidate answer.")
    second = replace(GRADER, model="second-judge")

    judged = await judge_pair(
        ITEM, PROMPT, a, b, [GRADER, second], POLICIES, PROMPTS, llm, log, max_tokens=256, max_reasks=1
    )

    assert len(judged) == 2
    assert [r.body["model"] for r in scripted_llm.requests] == [GRADER.model] * 2 + ["second-judge"] * 2
    assert _fingerprint(log, ITEM, scripted_llm) == {
        "turns": [
            "judge/1/0/0 judge 38bb3658769975bd",
            "judge/2/0/0 judge b07dfb35c317f496",
            "judge/1/1/0 judge 18166047af6fe483",
            "judge/2/1/0 judge 2e9973ac1217b7e8",
        ],
        "bodies": "9b07ef580ddbaab7",
    }


def test_request_budgets_of_every_role_are_pinned() -> None:
    budgets = [
        *largest_requests(_config(Mode.AIDSAFE, GuardStyle.JSON, 3), POLICIES, PROMPTS, PROMPT),
        *largest_requests(_config(Mode.ZERO_SHOT, GuardStyle.LLAMA_GUARD, 2), POLICIES, PROMPTS, PROMPT),
        *largest_requests(_config(Mode.ZERO_SHOT, GuardStyle.SHIELDGEMMA, 1), POLICIES, PROMPTS, PROMPT)[-1:],
        judge_request(
            GRADER,
            POLICIES,
            PROMPTS,
            PROMPT,
            (reply_tokens(512, Limits()), reply_tokens(1024, Limits())),
            256,
        ),
    ]

    assert [(b.role, b.tokens) for b in budgets] == [
        ("intent", 3563),
        ("seed", 4237),
        ("deliberator-1", 6629),
        ("deliberator-2", 7388),
        ("refiner", 8318),
        ("grader", 4777),
        ("whisperer", 8029),
        ("generator", 4270),
        ("guard", 4244),
        ("zero-shot", 3498),
        ("grader", 4777),
        ("whisperer", 5738),
        ("generator", 4270),
        ("guard", 1304),
        ("guard", 3880),
        ("judge", 5309),
    ]


def test_a_sample_evaluations_budgets_are_pinned_and_read_the_whole_sample() -> None:
    evaluators = Evaluators(GRADER, GuardConfig(GRADER, GuardStyle.LLAMA_GUARD), GRADER, 256, 2)
    sample = Sample(["Keep it cold."], "Refrigerate it.")
    longer = replace(sample, response=sample.response + "x" * 3000)  # 1,000 more tokens
    other = 1_254  # bytes of the other set's sample: 418 tokens

    budgets = [
        [(b.role, b.tokens) for b in sample_evaluation_requests(evaluators, POLICIES, PROMPTS, PROMPT, s)]
        + [("judge", sample_judge_request(GRADER, POLICIES, PROMPTS, PROMPT, s, other, 256).tokens)]
        for s in (sample, longer)
    ]
    asked_nothing = Evaluators(None, None, None, 256, 2)

    assert budgets == [
        [("grader", 3784), ("guard", 310), ("judge", 3547)],
        [("grader", 4784), ("guard", 1310), ("judge", 4547)],
    ]
    assert sample_evaluation_requests(asked_nothing, POLICIES, PROMPTS, PROMPT, sample) == []


def test_a_sample_judges_request_counts_the_other_sample_as_it_is_shown() -> None:
    ours, theirs = (
        Sample(["Keep it cold."], "Refrigerate it."),
        Sample(["Cool it.", "Ré" * 500], "Chill. " * 400),
    )
    shown = sample_text(theirs)
    messages = JUDGE.messages(
        POLICIES, PROMPTS, Limits(), GRADER.instructions, prompt=PROMPT, first=shown, second=sample_text(ours)
    )
    sent = request_tokens(messages, JUDGE.schema(Limits()), 256)

    size = sample_text_bytes(
        len(theirs.thoughts), sum(len(t.encode()) for t in [*theirs.thoughts, theirs.response])
    )
    estimated = sample_judge_request(GRADER, POLICIES, PROMPTS, PROMPT, ours, size, 256).tokens

    assert size == len(shown.encode())
    assert sent <= estimated <= sent + 1  # counted apart from the message: a token high at most


def test_every_stage_is_declared_with_its_own_schema_name_and_existing_templates() -> None:
    assert {spec.stage for spec in DECLARED} == set(Stage)
    # Servers, logs and the scripted server tell stages apart by schema name.
    named = [spec.schema_name for spec in DECLARED if spec.schema_name is not None]
    assert len(named) == len(set(named))
    for spec in DECLARED:
        assert (spec.schema(Limits()) is None) == spec.plain_text
        for template in [*(spec.templates or ()), *filter(None, [spec.classifier_prompt])]:
            assert (TEMPLATE_DIR / f"{template}.txt").is_file(), template


def _closed_and_bounded(schema: dict[str, Any], where: str) -> list[str]:
    """What a grammar-constrained server needs of a schema: every object closed with all its
    fields required, every list bounded, no string maxLength (llama.cpp unrolls it into a
    rule per character and rejects the grammar). The problems, by path."""
    problems = []
    if schema.get("type") == "object":
        properties = schema["properties"]
        if schema.get("additionalProperties") is not False:
            problems.append(f"{where}: open object")
        if schema.get("required") != list(properties):
            problems.append(f"{where}: required {schema.get('required')} is not every field")
        for name, value in properties.items():
            problems += _closed_and_bounded(value, f"{where}.{name}")
    elif schema.get("type") == "array":
        if not 0 <= schema.get("minItems", 0) <= schema.get("maxItems", -1):
            problems.append(f"{where}: unbounded list")
        problems += _closed_and_bounded(schema["items"], f"{where}[]")
    elif "maxLength" in schema:
        problems.append(f"{where}: string maxLength")
    return problems


def test_every_schema_is_closed_bounded_and_compilable_by_a_grammar() -> None:
    for spec in DECLARED:
        if (schema := spec.schema(Limits())) is not None:
            Draft202012Validator.check_schema(schema)
            assert _closed_and_bounded(schema, spec.schema_name or "") == []


def test_what_each_stage_may_list() -> None:
    """The list bounds the prompts promise the model and the readers rely on, by default and
    as a job sets them."""

    def bounds(schema: dict[str, Any]) -> tuple[int, int]:
        return schema["minItems"], schema["maxItems"]

    def schemas(limits: Limits) -> list[dict[str, Any]]:
        built = [spec.schema(limits) for spec in (INTENT, SEED, DELIBERATION, REFINE, ZERO_SHOT, REJECTED)]
        assert all(built)
        return built  # type: ignore[return-value]

    intent, seed, turn, refined, zero_shot, rejected = schemas(Limits())
    assert bounds(intent["properties"]["explicit_intents"]) == (1, 5)
    assert bounds(intent["properties"]["implicit_intents"]) == (0, 5)
    assert bounds(seed["properties"]["thoughts"]) == (1, 6)
    assert bounds(turn["properties"]["new_thoughts"]) == (0, 6)
    assert turn["properties"]["agree"] == {"type": "boolean"}
    kept = refined["properties"]["thoughts"]
    assert bounds(kept) == (1, 12)
    assert bounds(kept["items"]["properties"]["sources"]) == (1, 8)
    dropped = refined["properties"]["dropped"]
    assert bounds(dropped) == (0, 24)
    assert dropped["items"]["properties"]["reason"]["enum"] == [
        "redundant",
        "deceptive",
        "policy_inconsistent",
    ]
    assert zero_shot == rejected == seed

    _, seed, turn, refined, zero_shot, _ = schemas(Limits(thoughts_per_turn=3, kept_thoughts=5, max_drops=2))
    assert bounds(seed["properties"]["thoughts"]) == bounds(zero_shot["properties"]["thoughts"]) == (1, 3)
    assert bounds(turn["properties"]["new_thoughts"]) == (0, 3)
    assert bounds(refined["properties"]["thoughts"]) == (1, 5)
    assert bounds(refined["properties"]["dropped"]) == (0, 2)

    judge, guard, grade = (spec.schema(Limits()) for spec in (JUDGE, GUARD, GRADE))
    assert judge and judge["properties"]["winner"]["enum"] == ["A", "B", "tie"]
    assert guard and guard["properties"]["verdict"]["enum"] == ["safe", "unsafe"]
    assert grade and set(grade["properties"]) == set(METRICS)
    assert all(
        metric["properties"]["score"] == {"type": "integer", "minimum": 1, "maximum": 5}
        for metric in grade["properties"].values()
    )
