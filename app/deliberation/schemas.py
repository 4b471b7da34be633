"""JSON schemas each stage asks for through `response_format`.

Bounds (maxItems, maxLength) matter: grammar-constrained servers such as llama.cpp turn
them into a grammar, so a small model cannot ramble until max_tokens.
"""

from __future__ import annotations

from typing import Any

THOUGHT_MAX_CHARS = 400
MAX_THOUGHTS_PER_TURN = 6
RESPONSE_MAX_CHARS = 1500
DROP_REASONS = ("redundant", "deceptive", "policy_inconsistent")


def _text(max_chars: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def _list_of(item: dict[str, Any], max_items: int, min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": min_items, "maxItems": max_items}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


INTENT = _object(
    {
        "explicit_intents": _list_of(_text(200), 5, min_items=1),
        "implicit_intents": _list_of(_text(200), 5),
    }
)

SEED = _object(
    {
        "thoughts": _list_of(_text(THOUGHT_MAX_CHARS), MAX_THOUGHTS_PER_TURN, min_items=1),
        "response": _text(RESPONSE_MAX_CHARS),
    }
)

DELIBERATION = _object(
    {
        "agree": {"type": "boolean"},
        "critique": _text(400),
        "new_thoughts": _list_of(_text(THOUGHT_MAX_CHARS), MAX_THOUGHTS_PER_TURN),
        "response": _text(RESPONSE_MAX_CHARS),
    }
)

REFINED = _object(
    {
        "thoughts": _list_of(
            _object(
                {
                    "text": _text(THOUGHT_MAX_CHARS),
                    "sources": _list_of({"type": "integer", "minimum": 1}, 8, min_items=1),
                }
            ),
            12,
            min_items=1,
        ),
        "dropped": _list_of(
            _object(
                {
                    "id": {"type": "integer", "minimum": 1},
                    "reason": {"type": "string", "enum": list(DROP_REASONS)},
                    "explanation": _text(300),
                }
            ),
            24,
        ),
        "response": _text(RESPONSE_MAX_CHARS),
    }
)

# Schema names travel in response_format.json_schema.name; servers and logs see them.
BY_NAME: dict[str, dict[str, Any]] = {
    "intent_decomposition": INTENT,
    "seed_cot": SEED,
    "deliberation_turn": DELIBERATION,
    "refined_cot": REFINED,
}
