"""What PostgreSQL can store: checked where outside data comes in (HTTP bodies, labeling
tool imports), so a bad value is a 4xx naming it rather than a 500 from the database; and
replaced in what is kept as it came (an LLM's reply, a refused delivery's body)."""

from __future__ import annotations

import json
import math
from typing import Any

# Deeper JSON serves no caller, and pydantic refuses to serialize past ~255 levels (a 500
# after the row was accepted); the check stays far from Python's recursion limit too.
MAX_JSON_DEPTH = 32


def read_json(text: str) -> Any:
    """JSON text from outside, read. json.JSONDecodeError (a ValueError) if it is not JSON; a
    ValueError saying why for what json cannot read though it is JSON: nesting past Python's
    recursion limit, an integer of over 4,300 digits."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError(f"JSON must not nest arrays and objects more than {MAX_JSON_DEPTH} deep") from None
    except ValueError:
        raise ValueError("integers must have at most 4,300 digits") from None


def storable_input(data: Any, depth: int = 0) -> Any:
    """Refuse at the edge what PostgreSQL or serialization would refuse with a 500: U+0000
    and lone surrogates in text, NaN and infinities in JSON, nesting deeper than
    MAX_JSON_DEPTH arrays and objects."""
    if isinstance(data, str):
        if "\x00" in data:
            raise ValueError("text must not contain the NUL character (U+0000)")
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    elif isinstance(data, float) and not math.isfinite(data):
        raise ValueError("numbers must be finite (no NaN or Infinity)")
    elif isinstance(data, dict):
        _nest(depth)
        for key, value in data.items():
            storable_input(key, depth + 1)
            storable_input(value, depth + 1)
    elif isinstance(data, list):
        _nest(depth)
        for value in data:
            storable_input(value, depth + 1)
    return data


def _nest(depth: int) -> None:
    if depth >= MAX_JSON_DEPTH:
        raise ValueError(f"JSON must not nest arrays and objects more than {MAX_JSON_DEPTH} deep")


def replace_unstorable(value: Any) -> Any:
    """`value` with what PostgreSQL text and jsonb cannot hold replaced, at every level: NUL
    by U+FFFD, lone surrogates by "?". For text that is kept, not refused, with them: an LLM
    may send both, and a refused delivery is kept to show its owner what came."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {replace_unstorable(k): replace_unstorable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_unstorable(v) for v in value]
    return value
