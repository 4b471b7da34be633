"""The AIDSAFE engine over real HTTP: the production client against the scripted server,
with the in-memory turn log standing in for Postgres."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from app.config import Settings
from app.deliberation.config import Limits, PipelineConfig, RoleConfig
from app.deliberation.engine import deliberate
from app.deliberation.policies import policy_set
from app.deliberation.ports import ChatReply, ChatRequest, LLMClient, LLMUnavailable, Stage, TurnOutcome
from app.deliberation.prompt_sets import builtin
from app.deliberation.results import Completed, Failed
from app.deliberation.stages import DECLARED
from app.llm.client import OpenAICompatibleClient
from tests.conftest import client_for
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import (
    ScriptedLLM,
    agree,
    http_error,
    malformed,
    refusal,
    reply,
    stall,
    truncated,
)

ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_SET = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text(encoding="utf-8"))
POLICIES = policy_set(_DEFAULT_SET["name"], _DEFAULT_SET["policies"])
PROMPTS = builtin()
PROMPT = "How do I store bleach and ammonia safely at home?"
ITEM = uuid.UUID("00000000-0000-4000-8000-000000000001")
MAX_REASKS = 2
# What the scripted server's default seed_cot answer says, in order.
SEED_THOUGHTS = [
    "The user wants practical information; nothing in the request is harmful.",
    "The policies allow a direct answer with a note on safety.",
]
STAGE_SCHEMAS = ("intent_decomposition", "seed_cot", "deliberation_turn", "refined_cot")
DEFAULT_ROLE = RoleConfig(endpoint="default", model="scripted-model", temperature=0.7)


def pipeline(
    agents: int = 2, max_rounds: int = 3, seed: RoleConfig = DEFAULT_ROLE, max_reasks: int = MAX_REASKS
) -> PipelineConfig:
    return PipelineConfig(
        intent=DEFAULT_ROLE,
        seed=seed,
        deliberators=(DEFAULT_ROLE,) * agents,
        refiner=DEFAULT_ROLE,
        max_rounds=max_rounds,
        max_tokens=512,
        max_reasks=max_reasks,
    )


async def run(
    llm: LLMClient, log: InMemoryTurnLog, config: PipelineConfig | None = None
) -> Completed | Failed:
    return await deliberate(ITEM, PROMPT, config or pipeline(), POLICIES, PROMPTS, llm, log)


def completed(result: Completed | Failed) -> Completed:
    assert isinstance(result, Completed), result
    return result


def failed(result: Completed | Failed) -> Failed:
    assert isinstance(result, Failed), result
    return result


def request_counts(server: ScriptedLLM) -> Counter[str | None]:
    return Counter(r.schema_name for r in server.requests)


class GoesDownAfter:
    """An LLMClient that passes `calls` requests through, then behaves like an outage."""

    def __init__(self, inner: LLMClient, calls: int) -> None:
        self._inner = inner
        self._left = calls

    async def chat(self, request: ChatRequest) -> ChatReply:
        if self._left == 0:
            raise LLMUnavailable("simulated outage")
        self._left -= 1
        return await self._inner.chat(request)


# --- deliberation and refinement ---------------------------------------------------------


async def test_deliberation_stops_at_first_agreement(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        "deliberation_turn",
        agree(False, ["Name policy 3."], response="Response after round 1, agent 1."),
        agree(False, ["Mention ventilation."], response="Response after round 1, agent 2."),
        agree(True),  # round 2, agent 1
        agree(False, ["Never reached."]),
    )

    result = completed(await run(llm, InMemoryTurnLog(), pipeline(agents=2, max_rounds=4)))

    assert len(scripted_llm.requests_for("deliberation_turn")) == 3
    assert result.rounds_used == 2
    assert result.agreed is True
    assert result.agreed_by == {"round": 2, "agent": 1}
    assert "Never reached." not in [t.text for t in result.thoughts]
    assert scripted_llm.pending("deliberation_turn") == 1


async def test_thoughts_accumulate_in_order_with_stage_round_and_agent(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        "deliberation_turn",
        agree(False, ["A1", "A2"], response="Response after round 1, agent 1."),
        agree(False, ["B1"], response="Response after round 1, agent 2."),
        agree(False, ["C1"], response="Response after round 2, agent 1."),
        agree(True),
    )

    result = completed(await run(llm, InMemoryTurnLog(), pipeline(agents=2, max_rounds=4)))

    assert [(t.id, t.text, t.stage, t.round, t.agent) for t in result.thoughts] == [
        (1, SEED_THOUGHTS[0], "seed", 0, 0),
        (2, SEED_THOUGHTS[1], "seed", 0, 0),
        (3, "A1", "deliberation", 1, 1),
        (4, "A2", "deliberation", 1, 1),
        (5, "B1", "deliberation", 1, 2),
        (6, "C1", "deliberation", 2, 1),
    ]
    assert result.agreed_by == {"round": 2, "agent": 2}


async def test_each_agent_sees_every_earlier_thought_with_its_author(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("deliberation_turn", agree(False, ["A1", "A2"]), agree(True))

    await run(llm, InMemoryTurnLog())

    second_turn = scripted_llm.requests_for("deliberation_turn")[1].body["messages"][-1]["content"]
    assert f"[T1] (seed) {SEED_THOUGHTS[0]}" in second_turn
    assert "[T3] (round 1, agent 1) A1" in second_turn
    assert "[T4] (round 1, agent 1) A2" in second_turn
    assert "agent 2 of 2, in round 1" in second_turn


async def test_budget_exhausted_without_agreement_still_refines(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    agents, max_rounds = 2, 3
    scripted_llm.script(
        "deliberation_turn", *[agree(False, [f"Step {n}."]) for n in range(agents * max_rounds)]
    )

    result = completed(await run(llm, InMemoryTurnLog(), pipeline(agents=agents, max_rounds=max_rounds)))

    assert len(scripted_llm.requests_for("deliberation_turn")) == agents * max_rounds
    assert result.rounds_used == max_rounds
    assert result.agreed is False
    assert result.agreed_by is None
    assert len(result.thoughts) == len(SEED_THOUGHTS) + agents * max_rounds
    assert len(scripted_llm.requests_for("refined_cot")) == 1
    assert result.refined_thoughts


async def test_refiner_drops_carry_reason_and_original_text_and_silence_is_unaccounted(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("deliberation_turn", agree(False, ["Store them apart."]), agree(True))
    scripted_llm.script(
        "refined_cot",
        reply(
            {
                "thoughts": [{"text": "Storing cleaners is benign (policy 5).", "sources": [1, 99]}],
                "dropped": [
                    {"id": 2, "reason": "redundant", "explanation": "Repeats T1."},
                    {"id": 42, "reason": "deceptive", "explanation": "No such thought."},
                ],
                "response": "Keep bleach and ammonia apart, in a ventilated place.",
            }
        ),
    )

    result = completed(await run(llm, InMemoryTurnLog()))

    assert [t.text for t in result.thoughts] == [*SEED_THOUGHTS, "Store them apart."]
    assert result.refined_thoughts == [{"text": "Storing cleaners is benign (policy 5).", "sources": [1]}]
    assert result.dropped == [
        {"id": 2, "reason": "redundant", "explanation": "Repeats T1.", "text": SEED_THOUGHTS[1]}
    ]
    assert result.unaccounted == [3]
    assert result.response == "Keep bleach and ammonia apart, in a ventilated place."


# --- bad output: re-asks, truncation, refusals ---------------------------------------------


async def test_malformed_json_is_reasked_with_the_bad_output_shown(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", malformed("{not json"))
    log = InMemoryTurnLog()

    result = completed(await run(llm, log))

    assert [t.text for t in result.thoughts] == SEED_THOUGHTS
    first, reask = scripted_llm.requests_for("seed_cot")
    assert reask.body["messages"][:2] == first.body["messages"]
    assert reask.body["messages"][2] == {"role": "assistant", "content": "{not json"}
    assert reask.body["messages"][3]["role"] == "user"
    assert [(t.key.attempt, t.outcome) for t in log.turns(ITEM, Stage.SEED)] == [
        (0, TurnOutcome.MALFORMED),
        (1, TurnOutcome.OK),
    ]


async def test_output_truncated_on_every_try_fails_as_unparseable(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", *[truncated()] * (MAX_REASKS + 1))
    log = InMemoryTurnLog()

    result = failed(await run(llm, log))

    assert (result.code, result.stage) == ("unparseable_output", "seed")
    assert len(scripted_llm.requests_for("seed_cot")) == MAX_REASKS + 1
    assert [(t.key.attempt, t.outcome) for t in log.turns(ITEM, Stage.SEED)] == [
        (attempt, TurnOutcome.TRUNCATED) for attempt in range(MAX_REASKS + 1)
    ]
    assert "cut off" in scripted_llm.requests_for("seed_cot")[-1].body["messages"][-1]["content"]
    assert scripted_llm.requests_for("deliberation_turn") == []


async def test_truncated_output_is_reasked_without_it_and_with_twice_the_tokens(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", truncated(), truncated())

    completed(await run(llm, InMemoryTurnLog()))

    first, second, third = scripted_llm.requests_for("seed_cot")
    assert [r.body["max_tokens"] for r in (first, second, third)] == [
        first.body["max_tokens"] * factor for factor in (1, 2, 4)
    ]
    for reask in (second, third):
        assert reask.body["messages"][:2] == first.body["messages"]
        assert len(reask.body["messages"]) == 3, "the cut-off reply is not sent back"
        assert "cut off" in reask.body["messages"][2]["content"]


@pytest.mark.parametrize(
    ("schema", "limits", "told"),
    [
        ("seed_cot", Limits(thoughts_per_turn=1), "thoughts: 1 to 1 short"),
        ("refined_cot", Limits(kept_thoughts=2), "in order: 1 to 2 ("),
    ],
)
async def test_the_reask_of_a_truncated_reply_asks_for_no_more_thoughts_than_the_stage_allows(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, schema: str, limits: Limits, told: str
) -> None:
    """One re-ask serves every stage, each with its own limit (or no thoughts at all), so it
    names no count of its own ("at most three thoughts" asked a seed allowed 1 for three) and
    points at the stage's instructions, which name the job's limit."""
    scripted_llm.script(schema, truncated())

    completed(await run(llm, InMemoryTurnLog(), replace(pipeline(agents=1, max_rounds=1), limits=limits)))

    first, reask = scripted_llm.requests_for(schema)
    asked = reask.body["messages"][-1]["content"]
    assert not re.search(r"\b(\d+|one|two|three|four|five|six|seven|eight|nine|ten) thoughts?\b", asked)
    assert "cut off" in asked and "no more entries than your instructions allow" in asked
    assert reask.body["messages"][0] == first.body["messages"][0]
    assert told in reask.body["messages"][0]["content"]


async def test_plain_text_refusal_fails_the_item_as_agent_refused(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", refusal("I'm sorry, but I can't help with that."))
    log = InMemoryTurnLog()

    result = failed(await run(llm, log))

    assert (result.code, result.stage) == ("agent_refused", "seed")
    assert [t.outcome for t in log.turns(ITEM, Stage.SEED)] == [TurnOutcome.REFUSED]
    assert len(scripted_llm.requests_for("seed_cot")) == 1  # a refusal is not re-asked
    assert scripted_llm.requests_for("deliberation_turn") == []
    assert scripted_llm.requests_for("refined_cot") == []


async def test_refusal_in_the_message_refusal_field_fails_the_item_as_agent_refused(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("deliberation_turn", refusal("I can't assist with that.", in_refusal_field=True))
    log = InMemoryTurnLog()

    result = failed(await run(llm, log))

    assert (result.code, result.stage) == ("agent_refused", "deliberation")
    assert "I can't assist with that." in result.message
    assert [t.outcome for t in log.turns(ITEM, Stage.DELIBERATION)] == [TurnOutcome.REFUSED]
    assert scripted_llm.requests_for("refined_cot") == []


async def test_json_seed_whose_every_thought_refuses_fails_as_agent_refused(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        "seed_cot",
        reply(
            {
                "thoughts": ["I'm sorry, I can't reason about this.", "I cannot help with that request."],
                "response": "I can't help with that.",
            }
        ),
    )

    result = failed(await run(llm, InMemoryTurnLog()))

    assert (result.code, result.stage) == ("agent_refused", "seed")
    assert scripted_llm.requests_for("deliberation_turn") == []


async def test_json_in_fences_with_chatter_around_it_parses(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    seed = {"thoughts": ["Safe storage is benign (policy 5)."], "response": "Keep them apart."}
    scripted_llm.script(
        "seed_cot", reply(f"Sure! Here is the JSON:\n```json\n{json.dumps(seed)}\n```\nHope this helps.")
    )
    log = InMemoryTurnLog()

    result = completed(await run(llm, log))

    assert [t.text for t in result.thoughts] == ["Safe storage is benign (policy 5)."]
    assert [t.outcome for t in log.turns(ITEM, Stage.SEED)] == [TurnOutcome.OK]


# --- transient faults and resuming ----------------------------------------------------------


async def test_rate_limit_waits_for_retry_after_and_stores_one_turn(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("intent_decomposition", http_error(429, retry_after=1))
    log = InMemoryTurnLog()

    started = time.monotonic()
    completed(await run(llm, log))

    assert time.monotonic() - started >= 1.0
    limited, answered = scripted_llm.requests_for("intent_decomposition")
    assert answered.received_at - limited.received_at >= 1.0
    assert [t.key.attempt for t in log.turns(ITEM, Stage.INTENT)] == [0]


async def test_persistent_server_errors_propagate_and_a_later_run_resumes(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, settings: Settings
) -> None:
    scripted_llm.script(
        "deliberation_turn",
        agree(False, ["Store them apart."]),
        *[http_error(500)] * (settings.llm_max_retries + 1),
    )
    log = InMemoryTurnLog()

    with pytest.raises(LLMUnavailable):
        await run(llm, log)

    kept = [(t.key.stage, t.key.round, t.key.agent) for t in log.turns(ITEM)]
    assert kept == [(Stage.INTENT, 0, 0), (Stage.SEED, 0, 0), (Stage.DELIBERATION, 1, 1)]

    scripted_llm.reset()
    result = completed(await run(llm, log))

    assert request_counts(scripted_llm) == {"deliberation_turn": 1, "refined_cot": 1}
    assert result.agreed_by == {"round": 1, "agent": 2}
    assert log.ignored_records == 0


async def test_request_stalled_past_the_client_timeout_is_retried(
    settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", stall(5))
    log = InMemoryTurnLog()

    async with client_for(settings, timeout_s=0.3) as quick:
        completed(await run(quick, log))

    assert len(scripted_llm.requests_for("seed_cot")) == 2
    assert len(log.turns(ITEM, Stage.SEED)) == 1


async def test_resumed_run_asks_nothing_twice_and_matches_a_clean_run(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    def script_deliberation() -> None:
        scripted_llm.script(
            "deliberation_turn",
            agree(False, ["Store them apart."], response="Apart."),
            agree(False, ["Never mix them."], response="Apart, never mixed."),
            agree(True),
        )

    script_deliberation()
    clean = completed(await run(llm, InMemoryTurnLog()))
    clean_requests = len(scripted_llm.requests)
    scripted_llm.reset()

    script_deliberation()
    log = InMemoryTurnLog()
    with pytest.raises(LLMUnavailable):
        await run(GoesDownAfter(llm, calls=3), log)  # intent, seed, round 1 agent 1
    resumed = completed(await run(llm, log))

    assert len(scripted_llm.requests) == clean_requests
    assert resumed == clean
    assert log.ignored_records == 0


async def test_rerunning_a_finished_item_makes_no_request_and_returns_the_same_result(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    log = InMemoryTurnLog()
    first = completed(await run(llm, log))
    scripted_llm.reset()

    again = completed(await run(llm, log))

    assert scripted_llm.requests == []
    assert again == first


# --- requests: endpoints, models, message layout ---------------------------------------------


async def test_each_role_goes_to_its_own_endpoint_and_model(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, second_llm: ScriptedLLM
) -> None:
    seed_role = RoleConfig(endpoint="second", model="second-model", temperature=0.2)

    completed(await run(llm, InMemoryTurnLog(), pipeline(seed=seed_role)))

    [seed] = second_llm.requests
    assert seed.schema_name == "seed_cot"
    assert (seed.body["model"], seed.body["temperature"]) == ("second-model", 0.2)
    assert scripted_llm.requests_for("seed_cot") == []
    assert request_counts(scripted_llm) == {
        "intent_decomposition": 1,
        "deliberation_turn": 1,
        "refined_cot": 1,
    }
    assert {r.body["model"] for r in scripted_llm.requests} == {"scripted-model"}


async def test_every_request_starts_with_a_system_message_carrying_the_policies(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    completed(await run(llm, InMemoryTurnLog()))

    for request in scripted_llm.requests:
        system, user = request.body["messages"]
        assert system["role"] == "system"
        assert POLICIES.text in system["content"]
        assert POLICIES.version in system["content"]
        assert PROMPT not in system["content"]  # item text stays out of the cacheable prefix
        assert user["role"] == "user"
        assert PROMPT in user["content"]


async def test_policies_are_a_shared_prefix_of_every_stage_system_message(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    completed(await run(llm, InMemoryTurnLog()))

    systems = {r.schema_name: r.body["messages"][0]["content"] for r in scripted_llm.requests}
    assert set(systems) == set(STAGE_SCHEMAS)
    shared = os.path.commonprefix(list(systems.values()))
    assert POLICIES.text in shared
    assert len(set(systems.values())) == len(STAGE_SCHEMAS)  # stage instructions follow it


async def test_every_request_names_its_stage_schema_in_response_format(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    completed(await run(llm, InMemoryTurnLog()))

    assert [r.schema_name for r in scripted_llm.requests] == list(STAGE_SCHEMAS)
    for request in scripted_llm.requests:
        response_format = request.body["response_format"]
        assert response_format["type"] == "json_schema"
        assert response_format["json_schema"]["name"] == request.schema_name
        [declared] = [stage for stage in DECLARED if stage.schema_name == request.schema_name]
        assert response_format["json_schema"]["schema"] == declared.schema(Limits())


# --- purity ---------------------------------------------------------------------------------


def test_engine_core_imports_no_web_queue_database_or_http_library() -> None:
    probe = textwrap.dedent(
        """
        import importlib, json, pkgutil, sys
        import app.deliberation as core
        modules = [m.name for m in pkgutil.walk_packages(core.__path__, core.__name__ + ".")]
        for name in modules:
            importlib.import_module(name)
        banned = {"fastapi", "arq", "sqlalchemy", "redis", "httpx", "aiohttp", "starlette", "asyncpg"}
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in banned)
        print(json.dumps({"modules": modules, "leaked": leaked}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )

    found = json.loads(done.stdout)
    assert "app.deliberation.engine" in found["modules"]
    assert found["leaked"] == []
