"""Prompt sets in the engine: the built-in set, the checks a registered set must pass (each
problem naming its template, stage and placeholder), and a set's wording reaching the
requests the scripted server receives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from app.deliberation.budget import stage_floors
from app.deliberation.engine import deliberate
from app.deliberation.policies import content_version
from app.deliberation.prompt_sets import (
    BUILTIN_NAME,
    TEMPLATE_DIR,
    Problem,
    builtin,
    prompt_set,
    template_slots,
    validate,
)
from app.deliberation.stages import DECLARED, INTENT, SEED
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import ScriptedLLM, malformed, truncated
from tests.test_engine import ITEM, POLICIES, PROMPT, completed, pipeline

BUILTIN = dict(builtin().templates)


def changed(**templates: str) -> dict[str, str]:
    """The built-in templates with some replaced (keys with "_" for "." in their names)."""
    return {**BUILTIN, **{name.replace("__", "."): text for name, text in templates.items()}}


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, problems
    return problems[0]


# --- the built-in set ------------------------------------------------------------------


def test_the_builtin_set_is_the_prompt_files_versioned_by_their_content() -> None:
    prompts = builtin()

    assert prompts.name == BUILTIN_NAME == "aidsafe-default"
    assert set(prompts.templates) == {p.name.removesuffix(".txt") for p in TEMPLATE_DIR.glob("*.txt")}
    assert prompts.templates["seed.user"] == (TEMPLATE_DIR / "seed.user.txt").read_text(encoding="utf-8")
    assert prompts.version == content_version(BUILTIN)
    assert validate(prompts.templates) == []


def test_the_builtin_intent_template_asks_for_benign_implicit_intents_and_labelled_explicit_ones() -> None:
    intent = builtin().templates["intent.system"]

    assert "implicit_intents: plausible benign readings" in intent
    assert '"possibly_harmful"' in intent and '"benign"' in intent


def test_every_template_of_every_stage_is_declared_with_the_values_the_stage_fills() -> None:
    slots = template_slots()
    for spec in DECLARED:
        if spec.templates is None:
            continue
        system, user = spec.templates
        assert slots[system].required == frozenset()
        assert slots[user].required == {"prompt", *spec.inputs}
        assert slots[user].allowed == {"prompt", *spec.inputs, *spec.extras}
        assert spec.stage.value in slots[system].used_by


def test_the_whisperer_may_be_shown_its_guards_violations_and_a_set_written_before_stays_valid() -> None:
    slots = template_slots()["whisper.user"]

    assert "violations" in slots.allowed - slots.required
    assert validate(changed(whisper__user="User query:\n<<<\n$prompt\n>>>\n\n$history\n")) == []


# --- versions ----------------------------------------------------------------------------


def test_a_version_is_the_content_whatever_the_name_or_order() -> None:
    reordered = dict(reversed(list(BUILTIN.items())))

    mine = prompt_set("mine", reordered)

    assert (mine.name, mine.version) == ("mine", builtin().version)
    assert prompt_set("mine", changed(seed__user=BUILTIN["seed.user"] + " ")).version != builtin().version


def test_a_set_keeps_its_templates_when_the_mapping_it_was_made_from_changes() -> None:
    templates = changed()
    prompts = prompt_set("mine", templates)

    templates["seed.user"] = "changed $prompt $intents"

    assert prompts.templates["seed.user"] == BUILTIN["seed.user"]


# --- validation --------------------------------------------------------------------------


def test_an_unknown_placeholder_names_the_template_the_stage_and_the_placeholder() -> None:
    problem = only(validate(changed(seed__user=BUILTIN["seed.user"] + "\nTone: $tone")))

    assert (problem.template, problem.stage, problem.placeholder) == ("seed.user", "seed", "tone")
    assert "template 'seed.user' (stage seed): unknown placeholder $tone" in problem.message
    assert "$intents, $prompt" in problem.message  # what it may use


def test_a_placeholder_in_a_template_that_may_show_none_says_so() -> None:
    problem = only(validate(changed(reask__truncated="Shorter, $name.")))

    assert problem.message.endswith(": unknown placeholder $name; it may use none")


def test_a_missing_placeholder_the_stage_needs_is_a_problem() -> None:
    problem = only(
        validate(changed(deliberation__user="Query: $prompt\nIntents: $intents\nSo far: $thoughts"))
    )

    assert (problem.template, problem.stage, problem.placeholder) == (
        "deliberation.user",
        "deliberation",
        "response",
    )
    assert "missing placeholder $response" in problem.message


def test_the_query_itself_is_required_in_every_user_template() -> None:
    problem = only(validate(changed(intent__user="List the intents.")))

    assert (problem.template, problem.placeholder) == ("intent.user", "prompt")


def test_the_preamble_must_show_the_policies_and_a_role_template_its_instructions() -> None:
    problems = validate(changed(preamble="Be safe.", role_instructions="Be yourself."))

    assert [(p.template, p.placeholder) for p in problems] == [
        ("preamble", "policies"),
        ("role_instructions", "instructions"),
    ]
    assert problems[0].stage == "every stage (preamble)"


def test_a_stage_without_its_template_is_named() -> None:
    templates = changed()
    del templates["refine.system"]

    problem = only(validate(templates))

    assert (problem.template, problem.stage, problem.placeholder) == ("refine.system", "refine", None)
    assert problem.message == "stage refine has no template 'refine.system'"


@pytest.mark.parametrize(
    ("template", "used_by"),
    [
        ("role_instructions", "every stage (a role's own instructions)"),
        ("reask.malformed", "every stage (re-ask after a malformed reply)"),
        ("reask.truncated", "every stage (re-ask after a cut-off reply)"),
        ("shieldgemma.user", "guard"),  # a classifier's one message
    ],
)
def test_a_missing_shared_or_classifier_template_says_where_it_is_used(template: str, used_by: str) -> None:
    templates = changed()
    del templates[template]

    problem = only(validate(templates))

    assert (problem.template, problem.stage, problem.placeholder) == (template, used_by, None)
    assert problem.message == f"stage {used_by} has no template '{template}'"


def test_a_template_no_stage_uses_is_refused() -> None:
    problem = only(validate(changed(**{"intnet.system": "typo"})))

    assert (problem.template, problem.stage) == ("intnet.system", "")
    # It lists the templates a set has, so the typo can be matched to the intended name.
    # It lists the names a set may use, so the typo can be matched to the intended one.
    known = "the templates are preamble, role_instructions, reask.malformed, reask.truncated, intent.system"
    assert problem.message.startswith(f"unknown template 'intnet.system'; {known}, intent.user, ")
    assert problem.message.endswith(", refusal.system, refusal.user")


def test_unparseable_dollar_syntax_says_where() -> None:
    problem = only(validate(changed(seed__system=BUILTIN["seed.system"] + "\nBudget: $5")))

    assert (problem.template, problem.stage, problem.placeholder) == ("seed.system", "seed", None)
    assert "Invalid placeholder" in problem.message and "line " in problem.message
    assert "$$" in problem.message


def test_escaped_and_braced_placeholders_are_fine() -> None:
    assert validate(changed(seed__user="Costs $$5. ${prompt} with ${intents}")) == []


def test_a_shared_system_template_names_every_stage_using_it() -> None:
    problem = only(validate(changed(zero_shot__system="Write it. $prompt")))

    assert problem.stage == "zero_shot, rejected"
    assert problem.placeholder == "prompt"  # the query goes in the user message, not here


def test_counters_are_allowed_only_where_the_stage_fills_them() -> None:
    assert validate(changed(deliberation__user=BUILTIN["deliberation.user"] + " $agent")) == []

    problem = only(validate(changed(intent__user="$prompt (agent $agent)")))

    assert (problem.template, problem.placeholder) == ("intent.user", "agent")


def test_system_templates_may_show_the_job_limits() -> None:
    assert validate(changed(refine__system="Keep at most $kept_thoughts; drop up to $max_drops.")) == []


def test_every_problem_is_reported_in_template_order() -> None:
    templates = changed(intent__user="no query", judge__user="$prompt $first $second $third")
    del templates["guard.system"]

    assert [(p.template, p.placeholder) for p in validate(templates)] == [
        ("intent.user", "prompt"),
        ("guard.system", None),
        ("judge.user", "third"),
    ]


# --- floors --------------------------------------------------------------------------------


def test_a_stage_floor_grows_with_its_own_templates_only() -> None:
    plain = stage_floors(builtin(), 256)
    longer = stage_floors(prompt_set("long", changed(seed__system="x" * 3000)), 256)

    assert set(plain) == {spec.stage.value for spec in DECLARED if spec.templates is not None}
    # 3,000 bytes are 1,000 estimated tokens, in place of the built-in instructions'.
    assert longer["seed"] - plain["seed"] == pytest.approx(1000 - _tokens(BUILTIN["seed.system"]), abs=8)
    assert {stage: floor for stage, floor in longer.items() if stage != "seed"} == {
        stage: floor for stage, floor in plain.items() if stage != "seed"
    }
    assert stage_floors(builtin(), 512)["seed"] == plain["seed"] + 256


def _tokens(text: str) -> int:
    return -(-len(text.encode()) // 3)


# --- requests -------------------------------------------------------------------------------


async def run_with(prompts_templates: Mapping[str, str], llm: OpenAICompatibleClient) -> None:
    prompts = prompt_set("mine", prompts_templates)
    completed(
        await deliberate(
            ITEM, PROMPT, pipeline(agents=1, max_rounds=1), POLICIES, prompts, llm, InMemoryTurnLog()
        )
    )


async def test_a_sets_templates_word_the_requests(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    await run_with(
        changed(
            preamble="HOUSE RULES ($policy_set_name)\n$policies",
            intent__system="FIND INTENTS.",
            seed__user="QUERY>> $prompt\nINTENTS>> $intents",
        ),
        llm,
    )

    intent = scripted_llm.requests_for(INTENT.schema_name)[0].body["messages"]
    assert intent[0]["content"].startswith(f"HOUSE RULES ({POLICIES.name})\n{POLICIES.text}\n\nFIND INTENTS.")
    seed = scripted_llm.requests_for(SEED.schema_name)[0].body["messages"]
    assert seed[1]["content"].startswith(f"QUERY>> {PROMPT}\nINTENTS>> Explicit")
    assert "HOUSE RULES" in scripted_llm.requests_for("refined_cot")[0].body["messages"][0]["content"]


async def test_re_asks_are_worded_by_the_set(llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(SEED.schema_name, malformed("{oops"), truncated())

    await run_with(changed(reask__malformed="AGAIN: $error", reask__truncated="SHORTER."), llm)

    _, after_malformed, after_truncated = scripted_llm.requests_for(SEED.schema_name)
    assert after_malformed.body["messages"][-1]["content"].startswith("AGAIN: ")
    assert after_truncated.body["messages"][-1]["content"] == "SHORTER."


async def test_a_role_s_instructions_are_worded_by_the_set(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM
) -> None:
    config = pipeline(agents=1, max_rounds=1)
    config = replace(config, deliberators=(replace(config.deliberators[0], instructions="Hunt refusals."),))
    prompts = prompt_set("mine", changed(role_instructions="PERSONA: $instructions"))

    completed(await deliberate(ITEM, PROMPT, config, POLICIES, prompts, llm, InMemoryTurnLog()))

    system = scripted_llm.requests_for("deliberation_turn")[0].body["messages"][0]["content"]
    assert system.endswith("PERSONA: Hunt refusals.")
