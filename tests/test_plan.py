"""A job's plan: resolved from the request into a frozen, typed variant per kind of job, stored
as its JSON and read back as the same plan."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import EndpointConfig, Settings
from app.deliberation.config import GuardConfig, GuardStyle, Mode, RoleConfig
from app.plan import (
    ComparisonPlan,
    GenerationPlan,
    GradingIn,
    JobConfigIn,
    RoleIn,
    comparison_mismatches,
    read_plan,
    resolve,
    resolve_comparison,
)

SETTINGS = Settings(
    llm_model="server-model",
    llm_endpoints={"second": EndpointConfig(base_url="http://127.0.0.1:1/v1", default_model="second-model")},
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
            "guard": {"style": "llama_guard", "model": "guard-model", "threshold": 0.3},
            "max_tries": 2,
            "baseline": True,
        },
    }
)


def stored(plan: GenerationPlan | ComparisonPlan) -> dict[str, Any]:
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
    assert pipeline.pairs.guard == GuardConfig(
        RoleConfig("default", "guard-model", 0.0), GuardStyle.LLAMA_GUARD, threshold=0.3
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
