"""JSON schemas each stage asks for through `response_format`.

Grammar-constrained servers (llama.cpp, vLLM) compile these into a grammar. maxItems keeps
a small model from listing thoughts until max_tokens; string maxLength is left out on
purpose: llama.cpp unrolls it into one nested rule per character and rejects the grammar.

Each schema is built when a request is made (a few microseconds), from the job's limits on
what a reply may list. Every builder takes the limits, used or not, so stages declare them alike.
The normalizers (parsing.py) keep a reply to the same limits: a server may ignore the schema.
"""

from __future__ import annotations

from typing import Any

from app.deliberation.config import Limits
from app.deliberation.results import METRICS

DROP_REASONS = ("redundant", "deceptive", "policy_inconsistent")
POSSIBLY_HARMFUL = "possibly_harmful"  # fulfilling the intent could help someone cause harm
INTENT_LABELS = ("benign", POSSIBLY_HARMFUL)
MAX_INTENTS = 5  # of each kind, explicit and implicit, whatever the job's limits


TEXT: dict[str, Any] = {"type": "string", "minLength": 1}
LABEL: dict[str, Any] = {"type": "string", "enum": list(INTENT_LABELS)}


def _list_of(item: dict[str, Any], max_items: int, min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": min_items, "maxItems": max_items}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def intent(limits: Limits) -> dict[str, Any]:
    return _object(
        {
            "explicit_intents": _list_of(
                _object({"intent": TEXT, "label": {"type": "string", "enum": list(INTENT_LABELS)}}),
                MAX_INTENTS,
                min_items=1,
            ),
            "implicit_intents": _list_of(TEXT, MAX_INTENTS),
        }
    )


def seed(limits: Limits) -> dict[str, Any]:
    return _object(
        {
            "thoughts": _list_of(TEXT, limits.thoughts_per_turn, min_items=1),
            "response": TEXT,
        }
    )


def deliberation(limits: Limits) -> dict[str, Any]:
    return _object(
        {
            "agree": {"type": "boolean"},
            "critique": TEXT,
            "new_thoughts": _list_of(TEXT, limits.thoughts_per_turn),
            "response": TEXT,
        }
    )


def refined(limits: Limits) -> dict[str, Any]:
    return _object(
        {
            "thoughts": _list_of(
                _object(
                    {
                        "text": TEXT,
                        "sources": _list_of({"type": "integer", "minimum": 1}, 8, min_items=1),
                    }
                ),
                limits.kept_thoughts,
                min_items=1,
            ),
            "dropped": _list_of(
                _object(
                    {
                        "id": {"type": "integer", "minimum": 1},
                        "reason": {"type": "string", "enum": list(DROP_REASONS)},
                        "explanation": TEXT,
                    }
                ),
                limits.max_drops,
            ),
            "response": TEXT,
        }
    )


def scores(limits: Limits) -> dict[str, Any]:
    return _object(
        {
            metric: _object({"score": {"type": "integer", "minimum": 1, "maximum": 5}, "rationale": TEXT})
            for metric in METRICS
        }
    )


def belief(limits: Limits) -> dict[str, Any]:
    return _object({"belief": TEXT})


def guard_verdict(limits: Limits) -> dict[str, Any]:
    return _object(
        {
            "verdict": {"type": "string", "enum": ["safe", "unsafe"]},
            "violated_policies": _list_of(TEXT, 5),
            "rationale": TEXT,
        }
    )


def judgement(limits: Limits) -> dict[str, Any]:
    return _object({"winner": {"type": "string", "enum": ["A", "B", "tie"]}, "rationale": TEXT})


def refusal_verdict(limits: Limits) -> dict[str, Any]:
    return _object({"refused": {"type": "boolean"}, "reason": TEXT})
