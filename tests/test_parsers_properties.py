"""Properties of the readers of agent replies: whatever an agent sends, a stage either gets a
record of the shape its schema promises, or the reply is malformed (truncated, refused)
output with the reason in words, never another exception.

A record is what the stage asked for (its schema in stages.py) with these differences, which later
stages and the store rely on: a list the job's limits bind keeps to its maxItems, though a
server without grammars does not (a longer one is cut, and the record's `over_limit` says by
how many); a refined thought's sources and a guard's categories may be longer (no limit of
the job binds them); free comments (critique, rationale, explanation) may be empty; a
refined thought's sources are the ids 1..N of the N thoughts shown, without repeats, in
order, possibly none; dropped ids too; and a guard's verdict is read into
{unsafe, categories, rationale}.

Hypothesis draws values loosely from each schema (keys left out or added, lone strings
for lists, numbers as text, placeholders, refusal words) and from arbitrary JSON, so both
outcomes are exercised. Generation is derandomized and bounded."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.deliberation import parsing
from app.deliberation.config import Limits
from app.deliberation.ports import ChatReply, Stage, TokenLogprobs, TurnOutcome
from app.deliberation.results import Completed
from app.deliberation.schemas import DROP_REASONS
from app.deliberation.stages import DECLARED
from app.llm.client import OpenAICompatibleClient
from tests.memory_turn_log import InMemoryTurnLog
from tests.scripted_llm import ScriptedLLM, reply
from tests.test_engine import pipeline, run

# Below the lists' lengths drawn, so that replies go over them.
LIMITS = Limits(thoughts_per_turn=3, kept_thoughts=3, max_drops=2)
# Each stage's schema by the name it travels under.
BY_NAME = {
    spec.schema_name: schema for spec in DECLARED if spec.schema_name and (schema := spec.schema(LIMITS))
}
THOUGHTS_SHOWN = 4  # the refiner's parser is given this many thoughts
QUICK = settings(max_examples=40, deadline=None, derandomize=True, database=None)
OVER_HTTP = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- the record each stage promises ----------------------------------------------------------


def _relaxed(schema: Any, key: str | None = None) -> Any:
    """The wire schema as a record schema: no maxItems where no limit of the job binds the
    list, free comments may be empty."""
    if isinstance(schema, dict):
        unbound = key in ("sources", "violated_policies")
        relaxed = {k: _relaxed(v, k) for k, v in schema.items() if not (unbound and k == "maxItems")}
        if key in ("critique", "rationale", "explanation", "reason"):
            relaxed.pop("minLength", None)
        return relaxed
    if isinstance(schema, list):
        return [_relaxed(v) for v in schema]
    return schema


def _refined_record() -> dict[str, Any]:
    schema: dict[str, Any] = _relaxed(BY_NAME["refined_cot"])
    ids = {"type": "integer", "minimum": 1, "maximum": THOUGHTS_SHOWN}
    sources = schema["properties"]["thoughts"]["items"]["properties"]["sources"]
    sources.update(minItems=0, uniqueItems=True, items=ids)
    schema["properties"]["dropped"]["items"]["properties"]["id"] = ids
    return schema


_VERDICT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "unsafe": {"type": "boolean"},
        "categories": _relaxed(
            BY_NAME["guard_verdict"]["properties"]["violated_policies"], "violated_policies"
        ),
        "rationale": {"type": "string"},
    },
    "required": ["unsafe", "categories", "rationale"],
    "additionalProperties": False,
}
# A classifier's verdict (Llama Guard, ShieldGemma) also says what decided it.
_CLASSIFIED = {
    **_VERDICT,
    "properties": {
        **_VERDICT["properties"],
        "unsafe_probability": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "decided_by": {"enum": ["text", "logprobs"]},
        "logprobs_missing": {"type": ["string", "null"]},
    },
    "required": [*_VERDICT["required"], "unsafe_probability", "decided_by", "logprobs_missing"],
}


def _intent_record() -> dict[str, Any]:
    """Explicit intents as text, their labels beside them, implicit intents as sent."""
    wire = _relaxed(BY_NAME["intent_decomposition"])["properties"]
    explicit = wire["explicit_intents"]
    label = explicit["items"]["properties"]["label"]
    return {
        "type": "object",
        "properties": {
            "explicit_intents": {**explicit, "items": explicit["items"]["properties"]["intent"]},
            "explicit_labels": {**explicit, "items": {**label, "enum": [*label["enum"], parsing.UNLABELLED]}},
            "implicit_intents": wire["implicit_intents"],
        },
        "required": ["explicit_intents", "explicit_labels", "implicit_intents"],
        "additionalProperties": False,
    }


def _reader(normalize: Callable[..., dict[str, Any]], **values: Any) -> Callable[[Any], dict[str, Any]]:
    """The stage's normalizer as the Caller hands it a reply: with the job's limits."""
    return partial(normalize, limits=LIMITS, **values)


# schema name -> (reader of the parsed JSON, record schema)
STAGES: dict[str, tuple[Callable[[Any], dict[str, Any]], dict[str, Any]]] = {
    "intent_decomposition": (_reader(parsing.normalize_intent), _intent_record()),
    "seed_cot": (_reader(parsing.normalize_seed), _relaxed(BY_NAME["seed_cot"])),
    "zero_shot_cot": (_reader(parsing.normalize_seed), _relaxed(BY_NAME["zero_shot_cot"])),
    "rejected_cot": (_reader(parsing.normalize_seed), _relaxed(BY_NAME["rejected_cot"])),
    "standard_cot": (_reader(parsing.normalize_seed), _relaxed(BY_NAME["standard_cot"])),
    "deliberation_turn": (_reader(parsing.normalize_deliberation), _relaxed(BY_NAME["deliberation_turn"])),
    "refined_cot": (_reader(parsing.normalize_refined, thought_count=THOUGHTS_SHOWN), _refined_record()),
    "quality_scores": (_reader(parsing.normalize_scores), _relaxed(BY_NAME["quality_scores"])),
    "whisper_belief": (_reader(parsing.normalize_belief), _relaxed(BY_NAME["whisper_belief"])),
    "guard_verdict": (_reader(parsing.normalize_guard_json), _VERDICT),
    "pairwise_judgement": (_reader(parsing.normalize_judgement), _relaxed(BY_NAME["pairwise_judgement"])),
    "refusal_judgement": (_reader(parsing.normalize_refusal), _relaxed(BY_NAME["refusal_judgement"])),
}


def test_every_stage_schema_has_a_reader() -> None:
    assert sorted(STAGES) == sorted(BY_NAME)


def assert_is_a_record(record: dict[str, Any], schema: dict[str, Any]) -> None:
    assert json.loads(json.dumps(record)) == record  # plain JSON: what a turn stores
    record = dict(record)
    # Only a list the reply had over its limit is noted, and it is cut to that limit.
    for name, over in record.pop(parsing.OVER_LIMIT, {}).items():
        assert over >= 1 and len(record[name]) == schema["properties"][name]["maxItems"]
    jsonschema.Draft202012Validator(schema).validate(record)
    if "explicit_labels" in record:
        assert len(record["explicit_labels"]) == len(record["explicit_intents"])
    for thought in record.get("thoughts", []):
        if isinstance(thought, dict):
            assert thought["sources"] == sorted(thought["sources"])
    dropped = [d["id"] for d in record.get("dropped", [])]
    assert dropped == sorted(set(dropped))
    assert not any(isinstance(m.get("score"), bool) for m in record.values() if isinstance(m, dict))


# --- loose values ------------------------------------------------------------------------

_WORDS = ["...", "…", "<>", "< Keep apart. >", "  ", "", "true", "FALSE", "4", " 5 ", "4.5", "-1", "A", "b"]
_WORDS += ["Tie", "safe", " UNSAFE ", "I'm sorry, I can't.", "Store them apart.", *DROP_REASONS]
_TEXT = st.one_of(st.sampled_from(_WORDS), st.text(max_size=12))
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 9) | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)


def loose(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values near `schema`: often valid, often a little off, sometimes anything."""
    kind = schema.get("type")
    if kind == "object":
        near: st.SearchStrategy[Any] = st.fixed_dictionaries(
            {}, optional={name: loose(sub) for name, sub in schema["properties"].items()}
        )
    elif kind == "array":
        item = loose(schema["items"])
        near = st.lists(item, max_size=5) | item
    elif kind == "integer":
        near = st.integers(-1, 7) | st.sampled_from([4.0, 2.5, "3", True])
    elif kind == "boolean":
        near = st.booleans() | st.sampled_from(["true", "False", "yes", 1])
    else:
        near = st.sampled_from(schema["enum"]) if "enum" in schema else _TEXT
    return st.one_of(near, near, near, _ANY_JSON)


def wrapped(value: Any) -> st.SearchStrategy[str]:
    """The JSON text of `value`, alone or with the fences and chatter models add."""
    text = json.dumps(value)
    return st.sampled_from([text, f"```json\n{text}\n```", f"Here you go: {text} Done.", text[:-1]])


# --- the properties -----------------------------------------------------------------------


@pytest.mark.parametrize("schema_name", sorted(STAGES))
@QUICK
@given(data=st.data())
def test_a_reply_is_a_record_of_the_stage_or_malformed_never_an_exception(
    schema_name: str, data: st.DataObject
) -> None:
    read, record_schema = STAGES[schema_name]
    value = data.draw(loose(BY_NAME[schema_name]) | _ANY_JSON, label="value")
    content = data.draw(wrapped(value) | _TEXT, label="content")
    finish_reason = data.draw(st.sampled_from(["stop", "length", None]), label="finish_reason")

    outcome, record, error = parsing.judge_reply(ChatReply(content, finish_reason, "m", 0, 0, 0.0), read)

    if outcome is TurnOutcome.OK:
        assert record is not None and error is None
        assert_is_a_record(record, record_schema)
    else:
        assert record is None and isinstance(error, str) and error
        if outcome is not TurnOutcome.REFUSED:
            assert outcome is (TurnOutcome.TRUNCATED if finish_reason == "length" else TurnOutcome.MALFORMED)


_TOKENS = (
    st.sampled_from(["safe", "unsafe", "un", "Yes", " yes", "No", "no.", "\n\n", "", "S1", "maybe"]) | _TEXT
)
_FIRST_TOKENS = st.lists(
    st.builds(
        TokenLogprobs,
        _TOKENS,
        st.lists(st.tuples(_TOKENS, st.floats(max_value=0, allow_nan=False)), max_size=4).map(tuple),
    ),
    max_size=3,
).map(lambda tokens: tuple(tokens) or None)


@QUICK
@given(
    lines=st.lists(st.sampled_from(["safe", " Unsafe ", "S1, S2", " S3 ,", "", "maybe"]) | _TEXT, max_size=4),
    logprobs=st.none() | _FIRST_TOKENS,
    threshold=st.floats(0, 1),
)
def test_a_llama_guard_reply_is_a_verdict_or_malformed_never_an_exception(
    lines: list[str], logprobs: tuple[TokenLogprobs, ...] | None, threshold: float
) -> None:
    content = "\n".join(lines)
    read = partial(parsing.normalize_llama_guard, logprobs=logprobs, threshold=threshold)

    outcome, record, error = parsing.judge_reply(
        ChatReply(content, "stop", "m", 0, 0, 0.0), read, plain_text=True
    )

    if outcome is TurnOutcome.OK:
        assert record is not None
        assert_is_a_record(record, _CLASSIFIED)
        if record["decided_by"] == "text":
            assert record["unsafe"] is (content.split()[0].lower() == "unsafe")
        else:
            assert record["unsafe"] is (record["unsafe_probability"] >= threshold)
    else:
        assert record is None and isinstance(error, str) and error


@QUICK
@given(
    content=st.sampled_from(["Yes", "No.", " no, it is fine", "**Yes**\nIt breaks 2."]) | _TEXT,
    logprobs=st.none() | _FIRST_TOKENS,
)
def test_a_shieldgemma_reply_is_a_verdict_or_malformed_never_an_exception(
    content: str, logprobs: tuple[TokenLogprobs, ...] | None
) -> None:
    read = partial(parsing.normalize_shieldgemma, logprobs=logprobs, threshold=0.5)

    outcome, record, error = parsing.judge_reply(
        ChatReply(content, "stop", "m", 0, 0, 0.0), read, plain_text=True
    )

    if outcome is TurnOutcome.OK:
        assert record is not None
        assert_is_a_record(record, _CLASSIFIED)
        if record["decided_by"] == "text":
            first_word = re.match(r"\W*(\w*)", content)
            assert record["unsafe"] is (first_word is not None and first_word.group(1).lower() == "yes")
    else:
        assert record is None and isinstance(error, str) and error


def _valid(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the wire schema allows, with text no reader mistakes for a placeholder or a
    refusal, and ids among the thoughts shown."""
    kind = schema.get("type")
    if kind == "object":
        return st.fixed_dictionaries({name: _valid(sub) for name, sub in schema["properties"].items()})
    if kind == "array":
        return st.lists(
            _valid(schema["items"]), min_size=schema.get("minItems", 0), max_size=schema["maxItems"]
        )
    if kind == "integer":
        return st.integers(schema["minimum"], schema.get("maximum", THOUGHTS_SHOWN))
    if kind == "boolean":
        return st.booleans()
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    return st.text("abc ,.'\n", max_size=12).map(lambda text: f"Step {text}")


@pytest.mark.parametrize("schema_name", sorted(set(STAGES) - {"guard_verdict"}))
@settings(QUICK, max_examples=15)
@given(data=st.data())
def test_a_reply_the_wire_schema_allows_is_read_as_sent(schema_name: str, data: st.DataObject) -> None:
    read, record_schema = STAGES[schema_name]
    value = data.draw(_valid(BY_NAME[schema_name]))

    outcome, record, error = parsing.judge_reply(ChatReply(json.dumps(value), "stop", "m", 0, 0, 0.0), read)

    assert (outcome, error) == (TurnOutcome.OK, None)
    assert record is not None
    assert_is_a_record(record, record_schema)
    expected = copy.deepcopy(value)
    if schema_name == "refined_cot":
        for thought in expected["thoughts"]:
            thought["sources"] = sorted(set(thought["sources"]))
        first_word: dict[int, dict[str, Any]] = {}
        for entry in expected["dropped"]:
            first_word.setdefault(entry["id"], entry)
        expected["dropped"] = sorted(first_word.values(), key=lambda d: d["id"])
    if schema_name == "intent_decomposition":
        explicit = expected.pop("explicit_intents")
        expected["explicit_intents"] = [entry["intent"] for entry in explicit]
        expected["explicit_labels"] = [entry["label"] for entry in explicit]
    assert record == _stripped(expected)


def _stripped(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {k: _stripped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stripped(v) for v in value]
    return value


# --- over HTTP: the stage that failed is named ---------------------------------------------

ITEM_STAGES = {
    Stage.INTENT: "intent_decomposition",
    Stage.SEED: "seed_cot",
    Stage.DELIBERATION: "deliberation_turn",
    Stage.REFINE: "refined_cot",
}


@pytest.mark.parametrize("stage", list(ITEM_STAGES))
@OVER_HTTP
@given(data=st.data())
async def test_whatever_a_stage_replies_the_item_completes_or_fails_naming_that_stage(
    llm: OpenAICompatibleClient, scripted_llm: ScriptedLLM, stage: Stage, data: st.DataObject
) -> None:
    schema_name = ITEM_STAGES[stage]
    value = data.draw(loose(BY_NAME[schema_name]))
    scripted_llm.reset()
    scripted_llm.script(schema_name, reply(data.draw(wrapped(value))))

    result = await run(llm, InMemoryTurnLog(), replace(pipeline(), max_reasks=0))

    if not isinstance(result, Completed):
        assert result.code in ("unparseable_output", "agent_refused")
        assert result.stage == stage


# --- fences -------------------------------------------------------------------------------------

_FENCED = st.lists(
    st.sampled_from(["```", "`", "json", "JSON", " ", "\n", "\t", "\u2003", "{", "}", '"a"', ":", "1", "x"]),
    max_size=12,
).map("".join)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(_FENCED)
def test_a_fence_is_taken_off_as_the_one_expression_for_both_ends_did(text: str) -> None:
    both_ends = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)  # what it replaced
    assert parsing.unfenced(text) == both_ends.sub("", text.strip())


@pytest.mark.parametrize(
    ("data", "read"),
    [
        (
            {"refused": True, "reason": " asks for a weapon "},
            {"refused": True, "reason": "asks for a weapon"},
        ),
        ({"refused": " True "}, {"refused": True, "reason": ""}),
        ({"refused": "FALSE", "reason": None}, {"refused": False, "reason": ""}),
    ],
)
def test_a_refusal_verdict_reads_a_boolean_or_its_word_in_any_case(
    data: dict[str, Any], read: dict[str, Any]
) -> None:
    assert parsing.normalize_refusal(data, limits=LIMITS) == read


@pytest.mark.parametrize("refused", ["yes", None, 1])
def test_a_refusal_verdict_without_a_boolean_is_malformed_and_says_so(refused: Any) -> None:
    with pytest.raises(parsing.MalformedOutput) as raised:
        parsing.normalize_refusal({"refused": refused}, limits=LIMITS)
    assert str(raised.value) == "'refused' is not a boolean"


def test_a_drop_that_is_no_object_is_skipped_and_the_drops_after_it_still_read() -> None:
    refined = parsing.normalize_refined(
        {"thoughts": ["kept"], "dropped": ["2", {"id": 3, "reason": DROP_REASONS[0]}], "response": "r"},
        3,
        limits=Limits(),
    )
    assert [drop["id"] for drop in refined["dropped"]] == [3]


def test_a_turn_without_a_critique_is_stored_with_an_empty_one() -> None:
    turn = parsing.normalize_deliberation({"agree": True, "response": "r"}, limits=Limits())
    assert turn["critique"] == ""
