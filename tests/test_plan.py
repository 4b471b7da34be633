"""A job's plan: resolved from the request into a frozen, typed variant per kind of job, stored
as its JSON and read back as the same plan."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import BatchConfig, EndpointConfig, Prices, Settings
from app.deliberation.budget import (
    MIN_REPLY_TOKENS,
    evaluation_requests,
    judge_request,
    largest_requests,
    sample_evaluation_requests,
    sample_judge_request,
    stage_floors,
)
from app.deliberation.config import (
    EvaluationConfig,
    Evaluators,
    GradingConfig,
    GuardConfig,
    GuardStyle,
    Limits,
    Mode,
    RoleConfig,
)
from app.deliberation.policies import MAX_POLICY_TEXT_CHARS, PolicySet, policy_set
from app.deliberation.prompt_sets import builtin
from app.deliberation.results import METRICS, Sample
from app.deliberation.stages import DECLARED
from app.errors import BatchUnsupported, InvalidConfig, InvalidPromptSet, RequestTooLarge
from app.plan import (
    BatchOptions,
    ComparisonPlan,
    GenerationPlan,
    GradingIn,
    GuardIn,
    JobConfigIn,
    JobPlan,
    PresetRef,
    RoleIn,
    TargetIn,
    check_comparison_fits,
    check_job_fits,
    check_model_evaluation_fits,
    check_prompt_set_fits,
    check_sample_evaluation_fits,
    comparison_mismatches,
    cot_thoughts,
    read_plan,
    resolve,
    resolve_comparison,
    resolve_model_evaluation,
    resolve_sample_evaluation,
)
from app.store.policy_sets import DEFAULT_FILE, load_file
from tests.conftest import ROOT
from tests.test_engine import POLICIES, PROMPTS

SETTINGS = Settings(
    llm_model="server-model",
    llm_endpoints={"second": EndpointConfig(base_url="http://127.0.0.1:1/v1", default_model="second-model")},
)
# A third endpoint without a default model; prices on two of the three; a batch API on "default".
PRICES, SECOND_PRICES, BATCH_PRICES = (
    Prices(input=1, output=2),
    Prices(input=3, output=4),
    Prices(input=0.5, output=1),
)
PRICED = Settings(
    llm_model="server-model",
    llm_batch=BatchConfig(prices=BATCH_PRICES),
    llm_endpoints={
        "second": EndpointConfig(base_url="http://127.0.0.1:1/v1", default_model="second-model"),
        "third": EndpointConfig(base_url="http://127.0.0.1:2/v1"),
    },
    llm_prices={"default": PRICES, "second": SECOND_PRICES},
)
EVERYTHING = JobConfigIn.model_validate(
    {
        "mode": "zero_shot",
        "agents": 2,
        "max_tokens": 512,
        "defaults": {"temperature": 0.3},
        "refiner": {"endpoint": "second"},
        "grading": {"thresholds": {"relevance": 4}},
        "pairs": {
            "guard": {
                "style": "llama_guard",
                "model": "guard-model",
                "threshold": 0.3,
                "instructions": "S1 only.",
            },
            "max_tries": 2,
            "baseline": True,
        },
    }
)


def stored(plan: JobPlan) -> dict[str, Any]:
    """The plan as the jobs table holds it: its JSON, decoded."""
    decoded: dict[str, Any] = json.loads(plan.model_dump_json())
    return decoded


@pytest.mark.parametrize("config", [JobConfigIn(), EVERYTHING])
def test_a_generation_plan_reads_back_from_its_json_as_the_same_plan(config: JobConfigIn) -> None:
    plan = resolve(config, SETTINGS)

    assert read_plan(stored(plan)) == plan
    assert type(read_plan(stored(plan))) is GenerationPlan


def test_a_comparison_plan_reads_back_from_its_json_as_the_same_plan() -> None:
    plan = resolve_comparison([RoleIn(endpoint="second"), None], SETTINGS, uuid.uuid4(), uuid.uuid4())

    assert read_plan(stored(plan)) == plan
    assert type(read_plan(stored(plan))) is ComparisonPlan
    # Judging roles default to temperature 0; a judge left out is the server's default model.
    assert plan.judges == (
        RoleConfig("second", "second-model", 0.0),
        RoleConfig("default", "server-model", 0.0),
    )
    assert plan.endpoints() == {"second", "default"}
    priced = resolve_comparison([RoleIn(endpoint="second"), None], PRICED, uuid.uuid4(), uuid.uuid4())
    assert priced.prices == {"default": PRICES, "second": SECOND_PRICES}


def test_a_comparison_plan_stored_with_one_judge_reads_as_a_list_of_one() -> None:
    plan = resolve_comparison([RoleIn(endpoint="second")], SETTINGS, uuid.uuid4(), uuid.uuid4())
    old = stored(plan)
    assert isinstance(old, dict)
    old["judge"] = old.pop("judges")[0]

    read = read_plan(old)

    assert read == plan and isinstance(read, ComparisonPlan) and read.mismatches == ()
    assert "mismatches" not in stored(read)  # nothing differed: the JSON stays as it was


def test_a_comparison_plan_names_no_judge_twice_or_none() -> None:
    plan = stored(resolve_comparison([None], SETTINGS, uuid.uuid4(), uuid.uuid4()))
    assert isinstance(plan, dict)
    with pytest.raises(ValidationError):
        read_plan({**plan, "judges": []})
    with pytest.raises(ValidationError):  # both: the old field is read only when alone
        read_plan({**plan, "judge": plan["judges"][0]})


def test_a_comparison_records_what_the_caller_allowed_to_differ() -> None:
    plan = resolve_comparison([None], SETTINGS, uuid.uuid4(), uuid.uuid4(), ["policy_set", "grader"])

    assert read_plan(stored(plan)) == plan and plan.mismatches == ("policy_set", "grader")


def _generation(grader: RoleIn | None) -> GenerationPlan:
    return resolve(JobConfigIn(grading=None if grader is None else GradingIn(grader=grader)), SETTINGS)


def test_jobs_differ_in_their_policy_set_by_content_version_not_name() -> None:
    plan = _generation(None)

    assert comparison_mismatches(plan, plan, (("a", "v1"), ("b", "v1"))) == {}
    assert comparison_mismatches(plan, plan, (("a", "v1"), ("a", "v2"))) == {
        "policy_set": {"baseline": "a@v1", "candidate": "a@v2"}
    }


def test_jobs_differ_in_their_grader_not_in_their_gate() -> None:
    same = (("p", "v"), ("p", "v"))
    graded = _generation(RoleIn())
    other_gate = resolve(JobConfigIn(grading=GradingIn(thresholds={"relevance": 5})), SETTINGS)
    other_model = _generation(RoleIn(model="other-grader"))

    assert comparison_mismatches(graded, other_gate, same) == {}
    assert comparison_mismatches(_generation(None), _generation(None), same) == {}
    grader = {"endpoint": "default", "model": "server-model", "temperature": 0.0, "instructions": ""}
    assert comparison_mismatches(graded, other_model, same) == {
        "grader": {"baseline": grader, "candidate": {**grader, "model": "other-grader"}}
    }
    assert comparison_mismatches(_generation(None), graded, same) == {
        "grader": {"baseline": None, "candidate": grader}
    }
    assert comparison_mismatches(graded, _generation(None), same) == {
        "grader": {"baseline": grader, "candidate": None}
    }


def test_the_mode_tells_the_plans_apart() -> None:
    generation = stored(resolve(JobConfigIn(), SETTINGS))
    comparison = stored(resolve_comparison([None], SETTINGS, uuid.uuid4(), uuid.uuid4()))
    assert isinstance(generation, dict) and isinstance(comparison, dict)

    assert isinstance(read_plan({**generation, "mode": "zero_shot"}), GenerationPlan)
    with pytest.raises(ValidationError, match="union_tag_invalid"):
        read_plan({**generation, "mode": "pairs_only"})
    with pytest.raises(ValidationError, match="union_tag_not_found"):
        read_plan({k: v for k, v in generation.items() if k != "mode"})
    # A comparison's fields are not a generation plan's, whatever else the JSON holds.
    with pytest.raises(ValidationError):
        read_plan({**comparison, "mode": "aidsafe"})
    with pytest.raises(ValidationError):
        read_plan({**generation, "mode": "comparison"})


def test_a_plan_is_frozen() -> None:
    plan = resolve(EVERYTHING, SETTINGS)
    assert plan.pairs is not None

    with pytest.raises(ValidationError, match="frozen"):
        plan.max_tokens = 4096
    with pytest.raises(ValidationError, match="frozen"):
        plan.pairs.guard.style = GuardStyle.JSON
    with pytest.raises(AttributeError):  # the engine's dataclasses: frozen too
        plan.roles.refiner.model = "other"  # type: ignore[misc]


def test_the_engine_config_carries_every_choice_of_the_plan() -> None:
    pipeline = resolve(EVERYTHING, SETTINGS).pipeline()

    assert (pipeline.mode, pipeline.max_tokens, len(pipeline.deliberators)) == (Mode.ZERO_SHOT, 512, 2)
    assert pipeline.refiner == RoleConfig("second", "second-model", 0.3)
    assert pipeline.grading is not None and dict(pipeline.grading.thresholds) == {"relevance": 4}
    assert pipeline.pairs is not None and (pipeline.pairs.max_tries, pipeline.pairs.baseline) == (2, True)
    assert (pipeline.pairs.whisperer, pipeline.pairs.generator) == (
        RoleConfig("default", "server-model", 0.3),
    ) * 2
    assert pipeline.pairs.guard == GuardConfig(
        RoleConfig("default", "guard-model", 0.0, "S1 only."), GuardStyle.LLAMA_GUARD, threshold=0.3
    )


def test_a_guard_stored_before_thresholds_reads_with_the_default() -> None:
    plan = stored(resolve(EVERYTHING, SETTINGS))
    assert isinstance(plan, dict)
    del plan["pairs"]["guard"]["threshold"]

    read = read_plan(plan)

    assert isinstance(read, GenerationPlan) and read.pairs is not None
    assert read.pairs.config().guard.threshold == 0.5


def test_a_plan_stored_before_the_baseline_reads_back_without_it_and_keeps_its_min_gap() -> None:
    plan = resolve(JobConfigIn.model_validate({"pairs": {"min_gap": 1.5}}), SETTINGS)
    old = stored(plan)
    assert isinstance(old, dict)
    del old["pairs"]["baseline"]

    read = read_plan(old)

    assert isinstance(read, GenerationPlan) and read.pairs is not None
    assert (read.pairs.min_gap, read.pairs.baseline, read.pipeline().pairs) == (
        1.5,
        False,
        plan.pipeline().pairs,
    )


def _job(settings: Settings = SETTINGS, **config: Any) -> GenerationPlan:
    return resolve(JobConfigIn.model_validate(config), settings)


def test_a_jobs_cots_hold_the_thoughts_its_plan_allows_and_a_comparisons_none() -> None:
    """What the labeling tools offer to flag for the job's CoTs."""
    per_turn = Limits().thoughts_per_turn

    assert cot_thoughts(_job(limits={"kept_thoughts": 8})) == 8
    assert cot_thoughts(_job(refine=False, agents=2, max_rounds=4)) == (1 + 2 * 4) * per_turn
    assert cot_thoughts(resolve_comparison([None], SETTINGS, uuid.uuid4(), uuid.uuid4())) == 0


def test_a_role_takes_its_own_fields_then_the_jobs_defaults_then_the_servers() -> None:
    plan = _job(
        PRICED,
        defaults={"endpoint": "second", "temperature": 0.3, "instructions": "Be brief."},
        seed={"model": "seed-model", "temperature": 1.1, "instructions": "Hunt needless refusals."},
        refiner={"endpoint": "third"},
        grading={},
    )

    assert plan.roles.seed == RoleConfig("second", "seed-model", 1.1, "Hunt needless refusals.")
    assert plan.roles.intent == RoleConfig("second", "second-model", 0.3, "Be brief.")  # the endpoint's model
    assert plan.roles.refiner == RoleConfig("third", "server-model", 0.3, "Be brief.")  # it has none
    # A judging role's own default temperature, 0, goes before the job's defaults.
    assert plan.grading is not None and plan.grading.grader == RoleConfig(
        "second", "second-model", 0.0, "Be brief."
    )
    # The job's default model goes before the endpoint's; nothing given: the server's temperature.
    assert _job(defaults={"model": "job-model"}).roles.intent == RoleConfig(
        "default", "job-model", SETTINGS.default_temperature, ""
    )


def test_an_unknown_endpoint_is_refused_naming_the_role_and_the_configured_endpoints() -> None:
    with pytest.raises(
        InvalidConfig,
        match=re.escape("deliberators[1]: unknown endpoint 'nowhere'; configured: default, second, third"),
    ):
        _job(PRICED, deliberators=[{}, {"endpoint": "nowhere"}])


def test_a_model_the_endpoint_does_not_offer_is_refused_naming_the_role_and_the_models_offered() -> None:
    """Tenants share an endpoint's prices: one naming a dearer model than they were set for
    would spend more than its costs and budget count."""
    offering = Settings(
        llm_model="server-model",
        llm_endpoints={
            "second": EndpointConfig(
                base_url="http://127.0.0.1:1/v1", default_model="small", models=["small", "large"]
            )
        },
        fallback_endpoint="second",
        fallback_model="huge",
    )
    plan = resolve(
        JobConfigIn.model_validate(
            {"defaults": {"endpoint": "second"}, "refiner": {"model": "large"}, "fallback": False}
        ),
        offering,
    )
    assert (plan.roles.intent.model, plan.roles.refiner.model) == ("small", "large")
    assert _job(offering, fallback=False).roles.intent.model == "server-model"  # "default" lists none

    offered = "; offered: small, large"
    with pytest.raises(
        InvalidConfig, match=re.escape(f"seed: model 'dear' is not offered on endpoint 'second'{offered}")
    ):
        _job(offering, fallback=False, seed={"endpoint": "second", "model": "dear"})
    with pytest.raises(
        InvalidConfig, match=re.escape(f"fallback: model 'huge' is not offered on endpoint 'second'{offered}")
    ):
        _job(offering)
    with pytest.raises(InvalidConfig, match=re.escape("targets[0]: model 'dear' is not offered")):
        resolve_model_evaluation([TargetIn(endpoint="second", model="dear")], None, None, None, offering)


def test_the_deliberators_listed_set_the_agents_and_must_agree_with_a_given_number() -> None:
    listed = _job(deliberators=[{}, {}, {"model": "third-agent"}])

    assert [role.model for role in listed.roles.deliberators] == [
        "server-model",
        "server-model",
        "third-agent",
    ]
    assert len(_job(agents=3).roles.deliberators) == 3
    assert len(_job().roles.deliberators) == SETTINGS.default_agents
    with pytest.raises(InvalidConfig, match="'deliberators' lists 2 agents but 'agents' is 3"):
        _job(agents=3, deliberators=[{}, {}])


def test_what_a_job_leaves_out_is_the_servers_and_a_round_budget_of_zero_stays_zero() -> None:
    server = SETTINGS.model_copy(update={"default_max_rounds": 3, "default_max_tokens": 300, "max_reasks": 5})

    assert (_job(server).max_rounds, _job(server).max_tokens, _job(server).max_reasks) == (3, 300, 5)
    assert (_job(server, max_rounds=0).max_rounds, _job(server, max_tokens=100).max_tokens) == (0, 100)


def test_pairs_turn_grading_on_gated_at_3_on_every_metric() -> None:
    assert _job(pairs={}).grading == GradingConfig(
        RoleConfig("default", "server-model", 0.0), dict.fromkeys(METRICS, 3.0)
    )
    assert _job().grading is None


def test_the_engine_config_carries_the_ablations_the_limits_and_the_fallback() -> None:
    pipeline = _job(
        max_rounds=3,
        max_turns=5,
        decompose_intents=False,
        refine=False,
        limits={"thoughts_per_turn": 2, "kept_thoughts": 4, "max_drops": 1},
        fallback={"endpoint": "second"},
    ).pipeline()

    assert (pipeline.max_rounds, pipeline.max_turns, pipeline.max_reasks) == (3, 5, SETTINGS.max_reasks)
    assert (pipeline.decompose_intents, pipeline.refine, pipeline.limits) == (False, False, Limits(2, 4, 1))
    assert pipeline.fallback == RoleConfig("second", "second-model", SETTINGS.default_temperature)


_DEFAULT = {"endpoint": "default"}


@pytest.mark.parametrize(
    ("config", "called"),
    [
        ({}, False),
        ({"intent": {"endpoint": "second"}}, True),
        ({"intent": {"endpoint": "second"}, "decompose_intents": False}, False),
        ({"refiner": {"endpoint": "second"}}, True),
        ({"refiner": {"endpoint": "second"}, "refine": False}, False),
        ({"deliberators": [{}, {"endpoint": "second"}]}, True),
        ({"deliberators": [{}, {"endpoint": "second"}], "max_turns": 1}, False),
        ({"deliberators": [{}, {"endpoint": "second"}], "max_rounds": 0}, False),
        # Zero-shot: the seed role's one call.
        ({"mode": "zero_shot", "defaults": {"endpoint": "second"}, "seed": {"endpoint": "default"}}, False),
        ({"grading": {"grader": {"endpoint": "second"}}}, True),
        ({"pairs": {"whisperer": {"endpoint": "second"}}}, True),
        ({"pairs": {"generator": {"endpoint": "second"}}}, True),
        ({"pairs": {"guard": {"endpoint": "second"}}}, True),
        # Pairs add their roles' endpoints to the stages'.
        (
            {
                "defaults": {"endpoint": "second"},
                "pairs": {"whisperer": _DEFAULT, "generator": _DEFAULT, "guard": _DEFAULT},
            },
            True,
        ),
        ({"fallback": {"endpoint": "second"}}, True),
    ],
)
def test_a_job_calls_and_pins_the_prices_of_the_endpoints_of_the_stages_it_runs(
    config: dict[str, Any], called: bool
) -> None:
    plan = _job(PRICED, **config)

    assert plan.endpoints() == ({"default", "second"} if called else {"default"})
    assert plan.prices == ({"default": PRICES, "second": SECOND_PRICES} if called else {"default": PRICES})


def test_an_unpriced_endpoint_pins_no_price() -> None:
    plan = _job(PRICED, defaults={"endpoint": "third"})

    assert (plan.prices, "prices" in stored(plan)) == ({}, False)


def test_batch_delivery_pins_the_batch_prices_and_the_online_ones() -> None:
    plan = _job(PRICED, delivery="batch")
    online = _job(PRICED, delivery="batch", batch={"unanswered": "online"})

    assert (plan.delivery, stored(plan)["delivery"], stored(_job(PRICED)).get("delivery")) == (
        "batch",
        "batch",
        None,
    )
    assert (plan.batch, plan.prices, plan.online_prices) == (
        BatchOptions(),
        {"default": BATCH_PRICES},
        {"default": PRICES},
    )
    assert (plan.sends_online(), online.sends_online()) == (False, True)
    assert read_plan(stored(online)) == online
    assert (_job(PRICED).batch, _job(PRICED).online_prices) == (None, {})


def test_batch_delivery_needs_a_batch_api_on_every_endpoint_and_batch_options_need_batch_delivery() -> None:
    with pytest.raises(BatchUnsupported, match="without one: second, third [(]use delivery") as refused:
        _job(PRICED, delivery="batch", refiner={"endpoint": "third"}, seed={"endpoint": "second"})
    assert refused.value.details == {"endpoints": ["second", "third"]}
    with pytest.raises(InvalidConfig, match="^'batch' options need delivery 'batch'$"):
        _job(PRICED, batch={"unanswered": "online"})


def test_a_sample_evaluation_plans_the_roles_asked_for_judging_at_temperature_0() -> None:
    against = uuid.uuid4()
    plan = resolve_sample_evaluation(
        RoleIn(), None, RoleIn(endpoint="second", temperature=0.5), against, PRICED
    )
    judge_only = resolve_sample_evaluation(None, None, RoleIn(), None, PRICED)

    assert (plan.grader, plan.guard) == (RoleConfig("default", "server-model", 0.0), None)
    assert (judge_only.grader, judge_only.judge) == (None, RoleConfig("default", "server-model", 0.0))
    assert (plan.judge, plan.against_job_id) == (RoleConfig("second", "second-model", 0.5), against)
    assert (plan.max_tokens, plan.max_reasks) == (PRICED.default_max_tokens, PRICED.max_reasks)
    assert plan.endpoints() == {"default", "second"}
    assert plan.prices == {"default": PRICES, "second": SECOND_PRICES}
    assert plan.evaluators() == Evaluators(
        plan.grader, None, plan.judge, PRICED.default_max_tokens, PRICED.max_reasks
    )
    assert read_plan(stored(plan)) == plan
    with pytest.raises(InvalidConfig, match="^ask for at least one of 'grade', 'guard' or 'judge'$"):
        resolve_sample_evaluation(None, None, None, None, PRICED)


def test_a_sample_evaluations_guard_is_judged_at_the_threshold_asked_for() -> None:
    guard = GuardIn(endpoint="third", model="guard-model", style=GuardStyle.LLAMA_GUARD, threshold=0.9)
    plan = resolve_sample_evaluation(None, guard, None, None, PRICED)

    assert plan.evaluators() == Evaluators(
        None,
        GuardConfig(RoleConfig("third", "guard-model", 0.0), GuardStyle.LLAMA_GUARD, threshold=0.9),
        None,
        PRICED.default_max_tokens,
        PRICED.max_reasks,
    )
    assert (plan.endpoints(), plan.prices) == ({"third"}, {})


def test_a_model_evaluation_names_each_target_and_judges_it_at_the_threshold_asked_for() -> None:
    targets = [
        TargetIn(endpoint="second", system_prompt="You are a helpful assistant."),
        TargetIn(name="tuned", model="tuned-model", temperature=0.4),
    ]
    guard = GuardIn(endpoint="second", style=GuardStyle.SHIELDGEMMA, threshold=0.8)
    plan = resolve_model_evaluation(targets, guard, RoleIn(endpoint="third"), 200, PRICED)

    assert [target.name for target in plan.targets] == ["second:second-model", "tuned"]
    assert plan.evaluation(1) == EvaluationConfig(
        RoleConfig("default", "tuned-model", 0.4),
        GuardConfig(RoleConfig("second", "second-model", 0.0), GuardStyle.SHIELDGEMMA, threshold=0.8),
        RoleConfig("third", "server-model", 0.0),
        200,
        PRICED.max_reasks,
    )
    # The target's system prompt is the whole system message: the role's instructions.
    assert plan.evaluation(0).target == RoleConfig(
        "second", "second-model", 0.0, "You are a helpful assistant."
    )
    assert plan.endpoints() == {"default", "second", "third"}
    assert plan.prices == {"default": PRICES, "second": SECOND_PRICES}
    assert read_plan(stored(plan)) == plan


def test_a_model_evaluation_judges_with_the_servers_defaults_when_none_are_given() -> None:
    plan = resolve_model_evaluation([TargetIn()], None, None, None, SETTINGS)

    judge = RoleConfig("default", "server-model", 0.0)
    assert plan.evaluation(0) == EvaluationConfig(
        judge, GuardConfig(judge), judge, SETTINGS.default_max_tokens, SETTINGS.max_reasks
    )


def test_two_targets_of_one_name_are_refused_naming_it() -> None:
    twins = [TargetIn(model="a"), TargetIn(name="zeta"), TargetIn(name="default:a")]

    with pytest.raises(InvalidConfig, match="two targets are named 'default:a'; give each its own name"):
        resolve_model_evaluation(twins, None, None, None, SETTINGS)


def test_a_fallback_takes_its_own_fields_then_the_servers_fallback_then_the_endpoints() -> None:
    server = PRICED.model_copy(update={"fallback_model": "server-fallback"})
    job_defaults = {"defaults": {"endpoint": "second", "model": "job-model", "temperature": 0.4}}

    # The job's defaults name the model it stands in for: only their temperature applies.
    assert _job(server, **job_defaults).fallback == RoleConfig("default", "server-fallback", 0.4)
    assert _job(server, fallback={"endpoint": "third"}).fallback == RoleConfig(
        "third", "server-fallback", PRICED.default_temperature
    )
    # Without a server fallback model: the endpoint's default model, else the server's model.
    assert _job(PRICED, fallback={"endpoint": "second", "temperature": 1.5}).fallback == RoleConfig(
        "second", "second-model", 1.5
    )
    assert _job(PRICED, fallback={"endpoint": "third"}).fallback == RoleConfig(
        "third", "server-model", PRICED.default_temperature
    )
    assert _job(server, fallback=False).fallback is None
    with pytest.raises(
        InvalidConfig,
        match=re.escape("fallback: unknown endpoint 'nowhere'; configured: default, second, third"),
    ):
        _job(PRICED, fallback={"endpoint": "nowhere"})


SHORT, LONG = "Is bleach safe?", "How do I store bleach and ammonia safely at home, away from small children?"


def _context(tokens: int | None, settings: Settings = SETTINGS) -> Settings:
    """The settings with the default endpoint's context at `tokens` ("second"'s is unknown)."""
    return settings.model_copy(update={"llm_max_context_tokens": tokens})


# How each way of running the embedded model (SmolLM2) sets its context and the job defaults:
# patterns of N_CTX, AIDSAFE_DEFAULT_MAX_TOKENS and AIDSAFE_DEFAULT_MAX_ROUNDS in its file.
EMBEDDED_MODEL_SETTINGS = {
    "scripts/demo.sh": (
        r"^N_CTX=(\d+)$",
        r"^export AIDSAFE_DEFAULT_MAX_TOKENS=(\d+)$",
        r"^export AIDSAFE_DEFAULT_MAX_ROUNDS=(\d+)$",
    ),
    "docker-compose.yml": tuple(
        rf"^  {name}: \$\{{{name}:-(\d+)\}}$"
        for name in (
            "AIDSAFE_LLM_MAX_CONTEXT_TOKENS",
            "AIDSAFE_DEFAULT_MAX_TOKENS",
            "AIDSAFE_DEFAULT_MAX_ROUNDS",
        )
    ),
}


@pytest.mark.parametrize("deployment", list(EMBEDDED_MODEL_SETTINGS))
def test_the_readmes_first_job_and_a_job_of_defaults_fit_the_embedded_model_as_deployed(
    deployment: str,
) -> None:
    """README has its curl examples tried on the demo's server (KEEP_RUNNING=1) and its commands
    run in the compose stack as written: the context and defaults each gives the embedded model
    must take the first example's job, and a job that sets nothing (as most examples and
    `aidsafe submit samples/prompts.jsonl` do), worded by the built-in prompts and policies. A
    default the file does not set is the server's."""
    text = (ROOT / deployment).read_text(encoding="utf-8")
    found = [re.search(pattern, text, re.MULTILINE) for pattern in EMBEDDED_MODEL_SETTINGS[deployment]]
    values = dict(
        zip(("llm_max_context_tokens", "default_max_tokens", "default_max_rounds"), found, strict=True)
    )
    assert values["llm_max_context_tokens"] is not None, f"{deployment} sets no context"
    embedded = SETTINGS.model_copy(update={name: int(m.group(1)) for name, m in values.items() if m})
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"^# Submit .*?-d '(\{.*?\})'$", readme, re.MULTILINE | re.DOTALL)
    body = json.loads(first.group(1))  # type: ignore[union-attr]
    samples = [
        json.loads(line)["prompt"] for line in (ROOT / "samples" / "prompts.jsonl").open(encoding="utf-8")
    ]
    default = load_file(DEFAULT_FILE)

    for config, prompts in ((body["config"], body["prompts"]), ({}, body["prompts"] + samples)):
        check_job_fits(
            _job(embedded, **config),
            policy_set(default["name"], default["policies"]),
            builtin(),
            prompts,
            embedded,
        )


def test_a_job_fits_exactly_when_its_largest_request_for_its_longest_prompt_fits() -> None:
    plan = _job(max_rounds=2, grading={})
    largest, second = sorted(
        largest_requests(plan.pipeline(), POLICIES, PROMPTS, LONG), key=lambda b: -b.tokens
    )[:2]
    assert largest.tokens > second.tokens + 1

    check_job_fits(plan, POLICIES, PROMPTS, [SHORT, LONG], _context(largest.tokens))
    check_job_fits(
        plan, POLICIES, PROMPTS, [SHORT, LONG], _context(None)
    )  # an unknown context takes anything
    with pytest.raises(RequestTooLarge) as refused:
        check_job_fits(plan, POLICIES, PROMPTS, [SHORT, LONG], _context(largest.tokens - 1))
    assert refused.value.details == [
        {
            "role": largest.role,
            "endpoint": "default",
            "estimated_tokens": largest.tokens,
            "max_context_tokens": largest.tokens - 1,
        }
    ]
    assert refused.value.message == (
        f"role '{largest.role}' may send endpoint 'default' requests of about {largest.tokens:,} tokens with "
        f"max_tokens, over its max_context_tokens of {largest.tokens - 1:,}; lower max_tokens, max_rounds "
        "or agents, shorten the prompts, the policies or the prompt set's templates, or use an endpoint "
        "with a larger context"
    )
    # Two over: the message names the one furthest over, the details both.
    with pytest.raises(RequestTooLarge, match=f"role '{largest.role}'") as both:
        check_job_fits(plan, POLICIES, PROMPTS, [SHORT, LONG], _context(second.tokens - 1))
    assert {over["role"] for over in both.value.details} == {largest.role, second.role}
    # The shortest prompt alone makes smaller requests; an endpoint of unknown context takes them all.
    check_job_fits(plan, POLICIES, PROMPTS, [SHORT], _context(largest.tokens - 1))
    check_job_fits(_job(defaults={"endpoint": "second"}), POLICIES, PROMPTS, [LONG], _context(100))


def _ceiling(tokens: int, settings: Settings = SETTINGS) -> Settings:
    """The settings with the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS at `tokens`."""
    return settings.model_copy(update={"llm_max_request_tokens": tokens})


def test_a_job_fits_the_servers_ceiling_while_its_largest_prompt_leaves_the_least_reply_under_it() -> None:
    # The client lowers a max_tokens over what the ceiling leaves, down to MIN_REPLY_TOKENS: a
    # request over the ceiling with its max_tokens is sent, one whose prompt leaves less is not.
    plan = _job(max_rounds=2, grading={}, max_tokens=2_048)
    budgets = largest_requests(plan.pipeline(), POLICIES, PROMPTS, LONG)
    largest = max(budgets, key=lambda b: b.prompt_tokens)
    least = largest.prompt_tokens + MIN_REPLY_TOKENS
    assert least < largest.tokens

    check_job_fits(plan, POLICIES, PROMPTS, [SHORT, LONG], _ceiling(least))
    with pytest.raises(RequestTooLarge) as refused:
        check_job_fits(plan, POLICIES, PROMPTS, [SHORT, LONG], _ceiling(least - 1))
    assert refused.value.details == [
        {
            "role": largest.role,
            "endpoint": "default",
            "estimated_tokens": largest.tokens,
            "max_request_tokens": least - 1,
        }
    ]
    assert refused.value.message == (
        f"role '{largest.role}' may send endpoint 'default' requests of about {largest.tokens:,} tokens with "
        f"max_tokens, over the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS of {least - 1:,}: their prompt, "
        f"of about {largest.prompt_tokens:,} tokens, leaves less than 64 for a reply; lower max_tokens, "
        "max_rounds or agents, shorten the prompts, the policies or the prompt set's templates"
    )
    # An endpoint of unknown context is held to it too.
    second = _job(defaults={"endpoint": "second"}, max_rounds=2, grading={}, max_tokens=2_048)
    with pytest.raises(RequestTooLarge, match="endpoint 'second'"):
        check_job_fits(second, POLICIES, PROMPTS, [LONG], _ceiling(least - 1))


def test_a_max_tokens_under_the_least_reply_must_fit_the_servers_ceiling_whole() -> None:
    plan = resolve_comparison([None], SETTINGS, uuid.uuid4(), uuid.uuid4())
    judge = judge_request(plan.judges[0], POLICIES, PROMPTS, LONG, (300, 500), 40)
    plan = plan.model_copy(update={"max_tokens": 40})

    check_comparison_fits(plan, POLICIES, PROMPTS, LONG, (300, 500), _ceiling(judge.tokens))
    with pytest.raises(RequestTooLarge, match="leaves less than 40 for a reply") as refused:
        check_comparison_fits(plan, POLICIES, PROMPTS, LONG, (300, 500), _ceiling(judge.tokens - 1))
    assert [over["role"] for over in refused.value.details] == [judge.role]


def test_the_lesser_of_an_endpoints_context_and_the_servers_ceiling_names_a_refusal() -> None:
    plan = _job(mode="zero_shot", max_tokens=2_048)
    [writer] = largest_requests(plan.pipeline(), POLICIES, PROMPTS, SHORT)
    over_both = writer.least_tokens - 1

    for context, ceiling, named in [
        (over_both, over_both, "its max_context_tokens"),
        (over_both + 1, over_both, "the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS"),
    ]:
        with pytest.raises(RequestTooLarge, match=f"over {named} of {over_both:,}"):
            check_job_fits(plan, POLICIES, PROMPTS, [SHORT], _context(context, _ceiling(ceiling)))
    # Over a context its max_tokens and all, the job is refused, though its prompt and least
    # reply are under it, where the context is the lesser limit.
    with pytest.raises(RequestTooLarge, match="over its max_context_tokens"):
        check_job_fits(plan, POLICIES, PROMPTS, [SHORT], _context(writer.tokens - 1, _ceiling(writer.tokens)))


def test_the_refusal_names_the_role_that_must_shrink_most_whichever_limit_holds_it() -> None:
    # The seed, on "default", is 500 tokens over its context; the refiner, on "second" (context
    # unknown), is one over the ceiling with its least reply, though far more with its max_tokens
    # of 1,024, which the client would lower.
    plan = _job(max_tokens=1_024, deliberators=[{"endpoint": "second"}], refiner={"endpoint": "second"})
    budgets = {b.role: b for b in largest_requests(plan.pipeline(), POLICIES, PROMPTS, SHORT)}
    seed, refiner = budgets["seed"], budgets["refiner"]
    ceiling, context = refiner.least_tokens - 1, seed.tokens - 500
    assert refiner.tokens - ceiling > 500 and context <= ceiling

    with pytest.raises(RequestTooLarge) as refused:
        check_job_fits(plan, POLICIES, PROMPTS, [SHORT], _context(context, _ceiling(ceiling)))
    assert {over["role"] for over in refused.value.details} == {"seed", "refiner"}
    assert refused.value.message.startswith(
        f"role 'seed' may send endpoint 'default' requests of about {seed.tokens:,} tokens with "
        f"max_tokens, over its max_context_tokens of {context:,}"
    )


def test_a_context_over_the_servers_ceiling_does_not_refuse_what_the_ceiling_lowers() -> None:
    # The client holds the request to the ceiling alone and lowers its max_tokens to what that
    # leaves: the request it sends is under the larger context too.
    plan = _job(mode="zero_shot", max_tokens=2_048)
    [writer] = largest_requests(plan.pipeline(), POLICIES, PROMPTS, SHORT)
    ceiling = writer.least_tokens

    check_job_fits(plan, POLICIES, PROMPTS, [SHORT], _context(writer.tokens - 1, _ceiling(ceiling)))
    check_job_fits(plan, POLICIES, PROMPTS, [SHORT], _context(ceiling + 1, _ceiling(ceiling)))
    with pytest.raises(RequestTooLarge, match="over the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS"):
        check_job_fits(plan, POLICIES, PROMPTS, [SHORT], _context(ceiling, _ceiling(ceiling - 1)))


def test_a_policy_set_over_the_cap_is_refused_whatever_the_endpoints_take() -> None:
    plan = _job()
    at_cap = PolicySet("big", "v9", "x" * MAX_POLICY_TEXT_CHARS)

    check_job_fits(plan, at_cap, PROMPTS, [SHORT], SETTINGS)
    with pytest.raises(
        RequestTooLarge,
        match=re.escape(
            "policy set 'big' version v9 renders to 50,001 characters of prompt text; at most 50,000"
        ),
    ):
        check_job_fits(plan, replace(at_cap, text=at_cap.text + "x"), PROMPTS, [SHORT], SETTINGS)


def test_a_comparison_fits_when_each_judges_request_with_both_samples_fits() -> None:
    plan = resolve_comparison([None, RoleIn(endpoint="second")], SETTINGS, uuid.uuid4(), uuid.uuid4())
    judge = judge_request(plan.judges[0], POLICIES, PROMPTS, LONG, (300, 500), plan.max_tokens)

    check_comparison_fits(plan, POLICIES, PROMPTS, LONG, (300, 500), _context(judge.tokens))
    with pytest.raises(RequestTooLarge) as refused:
        check_comparison_fits(plan, POLICIES, PROMPTS, LONG, (300, 500), _context(judge.tokens - 1))
    assert [over["role"] for over in refused.value.details] == [judge.role]


def test_a_model_evaluation_fits_when_every_targets_and_judges_request_fits() -> None:
    plan = resolve_model_evaluation(
        [TargetIn(endpoint="second"), TargetIn(name="long", system_prompt="Answer at length. " * 200)],
        None,
        None,
        None,
        SETTINGS,
    )
    budgets = [b for t in (0, 1) for b in evaluation_requests(plan.evaluation(t), POLICIES, PROMPTS, LONG)]
    largest = max(b.tokens for b in budgets if b.endpoint == "default")

    check_model_evaluation_fits(plan, POLICIES, PROMPTS, [SHORT, LONG], _context(largest))
    with pytest.raises(RequestTooLarge) as refused:
        check_model_evaluation_fits(plan, POLICIES, PROMPTS, [SHORT, LONG], _context(largest - 1))
    # The judges' requests are the same for every target: each is listed once.
    assert sorted(over["role"] for over in refused.value.details) == sorted(
        {b.role for b in budgets if b.endpoint == "default" and b.tokens == largest}
    )


def test_a_sample_evaluation_fits_when_its_largest_sample_fits() -> None:
    plan = resolve_sample_evaluation(RoleIn(), None, None, None, SETTINGS)
    small, large = Sample(["Short."], "Fine."), Sample(["A longer thought. " * 50], "A longer answer. " * 50)
    samples = [(SHORT, small), (LONG, large)]  # the prompt and the sample together decide
    [grader] = sample_evaluation_requests(plan.evaluators(), POLICIES, PROMPTS, LONG, large)

    check_sample_evaluation_fits(plan, POLICIES, PROMPTS, samples, [], _context(grader.tokens))
    with pytest.raises(RequestTooLarge):
        check_sample_evaluation_fits(plan, POLICIES, PROMPTS, samples, [], _context(grader.tokens - 1))


def test_a_sample_evaluations_judge_fits_when_its_largest_pair_of_samples_fits() -> None:
    plan = resolve_sample_evaluation(None, None, RoleIn(), uuid.uuid4(), SETTINGS)
    assert plan.judge is not None
    small, large = Sample(["Short."], "Fine."), Sample(["A longer thought. " * 50], "A longer answer. " * 50)
    samples = [(SHORT, small), (LONG, large), (LONG, small)]
    # The small sample is read with the other set's largest: the pair, not our sample, decides.
    # The large one's prompt is not in the other set: it is not judged.
    against = [10_000, None, 10]
    pair = sample_judge_request(plan.judge, POLICIES, PROMPTS, SHORT, small, 10_000, plan.max_tokens)

    check_sample_evaluation_fits(plan, POLICIES, PROMPTS, samples, against, _context(pair.tokens))
    with pytest.raises(RequestTooLarge) as refused:
        check_sample_evaluation_fits(plan, POLICIES, PROMPTS, samples, against, _context(pair.tokens - 1))
    assert refused.value.details == [
        {
            "role": "judge",
            "endpoint": "default",
            "estimated_tokens": pair.tokens,
            "max_context_tokens": pair.tokens - 1,
        }
    ]


def test_a_prompt_set_must_fit_the_largest_endpoint_context_with_the_default_max_tokens() -> None:
    floors = stage_floors(PROMPTS, SETTINGS.default_max_tokens)
    stage = max(floors, key=lambda s: floors[s])
    largest = floors[stage]
    second = EndpointConfig(base_url="http://127.0.0.1:1/v1", max_context_tokens=largest)
    only_default = SETTINGS.model_copy(update={"llm_endpoints": {}})

    # Every stage fits "second", though none fits the default endpoint.
    check_prompt_set_fits(
        PROMPTS, _context(10, SETTINGS.model_copy(update={"llm_endpoints": {"second": second}}))
    )
    check_prompt_set_fits(PROMPTS, _context(10))  # "second"'s context is unknown: it may take anything
    with pytest.raises(
        InvalidPromptSet, match=f"stage {stage}: templates .* about {largest:,} tokens"
    ) as refused:
        check_prompt_set_fits(PROMPTS, _context(largest - 1, only_default))
    templates = {spec.stage.value: list(spec.templates or ()) for spec in DECLARED}
    assert refused.value.details == [
        {"stage": s, "templates": templates[s], "estimated_tokens": tokens, "max_context_tokens": largest - 1}
        for s, tokens in floors.items()
        if tokens == largest
    ]
    assert f"templates {', '.join(templates[stage])} make requests" in refused.value.message


NOWHERE = RoleIn(endpoint="nowhere")


@pytest.mark.parametrize(
    ("plan_of", "path"),
    [
        (lambda: _job(intent=NOWHERE), "intent"),
        (lambda: _job(seed=NOWHERE), "seed"),
        (lambda: _job(refiner=NOWHERE), "refiner"),
        (lambda: _job(grading={"grader": NOWHERE}), "grading.grader"),
        (lambda: _job(pairs={"whisperer": NOWHERE}), "pairs.whisperer"),
        (lambda: _job(pairs={"generator": NOWHERE}), "pairs.generator"),
        (lambda: _job(pairs={"guard": {"endpoint": "nowhere"}}), "pairs.guard"),
        (lambda: resolve_comparison([None, NOWHERE], SETTINGS, uuid.uuid4(), uuid.uuid4()), "judges[1]"),
        (lambda: resolve_sample_evaluation(NOWHERE, None, None, None, SETTINGS), "grade"),
        (lambda: resolve_sample_evaluation(None, GuardIn(endpoint="nowhere"), None, None, SETTINGS), "guard"),
        (lambda: resolve_sample_evaluation(None, None, NOWHERE, None, SETTINGS), "judge.judge"),
        (
            lambda: resolve_model_evaluation(
                [TargetIn(), TargetIn(endpoint="nowhere")], None, None, None, SETTINGS
            ),
            "targets[1]",
        ),
        (
            lambda: resolve_model_evaluation([TargetIn()], GuardIn(endpoint="nowhere"), None, None, SETTINGS),
            "safety_judge",
        ),
        (lambda: resolve_model_evaluation([TargetIn()], None, NOWHERE, None, SETTINGS), "refusal_judge"),
    ],
)
def test_an_unknown_endpoint_is_refused_naming_the_field_it_was_given_in(plan_of: Any, path: str) -> None:
    with pytest.raises(
        InvalidConfig, match=re.escape(f"{path}: unknown endpoint 'nowhere'; configured: default, second")
    ):
        plan_of()


def test_a_refusal_names_the_role_furthest_over_its_endpoints_context() -> None:
    # The zero-shot call on the default endpoint; a grader of long instructions on "second".
    plan = _job(
        mode="zero_shot",
        grading={"grader": {"endpoint": "second", "instructions": "Weigh every word. " * 100}},
    )
    writer, grader = largest_requests(plan.pipeline(), POLICIES, PROMPTS, SHORT)
    assert grader.tokens > writer.tokens
    second = EndpointConfig(base_url="http://127.0.0.1:1/v1", max_context_tokens=grader.tokens - 1)
    settings = _context(writer.tokens - 10, SETTINGS.model_copy(update={"llm_endpoints": {"second": second}}))

    with pytest.raises(
        RequestTooLarge, match=f"^role '{writer.role}' may send endpoint 'default'"
    ) as refused:
        check_job_fits(plan, POLICIES, PROMPTS, [SHORT], settings)
    assert [over["role"] for over in refused.value.details] == [writer.role, grader.role]


def test_a_job_started_from_a_preset_records_it_and_one_without_shows_none() -> None:
    preset = PresetRef(name="careful", version="v3")
    plan = resolve(JobConfigIn(), SETTINGS, preset)

    assert (plan.preset, stored(plan)["preset"]) == (preset, {"name": "careful", "version": "v3"})
    assert read_plan(stored(plan)) == plan
    assert "preset" not in stored(resolve(JobConfigIn(), SETTINGS))
