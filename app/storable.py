"""Data from outside (HTTP bodies, labeling tool imports, sample and benchmark files), read
and checked where it comes in: JSON text has its values counted before it is decoded, so no
one decode holds the GIL for long, and what PostgreSQL cannot store is a 4xx naming it
rather than a 500 from the database; and what is kept as it came (an LLM's reply, a refused
delivery's body) has what PostgreSQL cannot store replaced."""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from app.errors import InvalidRequest, MalformedBody, PayloadTooLarge

T = TypeVar("T")

# Deeper JSON serves no caller, and pydantic refuses to serialize past ~255 levels (a 500
# after the row was accepted); the check stays far from Python's recursion limit too.
MAX_JSON_DEPTH = 32
_COUNTED_SLICE = 256 * 1024
# Far more than any number a caller means (a 128-bit integer has 39 digits, a double 24
# characters at most). The decoder converts numbers holding the GIL: a body of 4,300-digit
# integers (the most Python converts) held it, and so the event loop, for 1-3 s.
MAX_NUMBER_CHARS = 100


def read_json(text: str) -> Any:
    """JSON text from outside, read. json.JSONDecodeError (a ValueError) if it is not JSON; a
    ValueError saying why for what is JSON but not read: nesting past Python's recursion
    limit, a number of over MAX_NUMBER_CHARS characters (refused before it is converted)."""
    try:
        return json.loads(text, parse_int=_read_int, parse_float=_read_float)
    except RecursionError:
        raise ValueError(f"JSON must not nest arrays and objects more than {MAX_JSON_DEPTH} deep") from None


def _checked_length(number: str) -> str:
    if len(number) > MAX_NUMBER_CHARS:
        raise ValueError(f"numbers must have at most {MAX_NUMBER_CHARS} characters")
    return number


def _read_int(number: str) -> int:
    return int(_checked_length(number))


def _read_float(number: str) -> float:
    return float(_checked_length(number))


def count_values(raw: bytes, limit: int) -> int:
    """An upper bound on the number of values in JSON text `raw` (objects, arrays, strings,
    numbers, literals), counted at C speed without parsing it: `limit + 1` once over `limit`.

    Every value but the first of each array or object follows a comma, and the first follows
    the bracket. Commas and brackets inside strings do not count: with escaped backslashes
    and quotes dropped, every other quote-delimited piece is string content. Each string has
    two quotes and a value has at most one key, so more than 4 x limit quotes is over the
    limit. The text is read a slice at a time, so that no one call holds the GIL for long (one
    replace of 30 MiB held it for 50 ms on a busy machine); a slice never ends inside an
    escape, so each is unescaped alone."""
    count, quotes, in_string = 1, 0, False
    start = 0
    while start < len(raw) and count <= limit and quotes <= 4 * limit:
        end = start + _COUNTED_SLICE
        piece = raw[start:end]
        if (len(piece) - len(piece.rstrip(b"\\"))) % 2:  # the escape's last byte is next
            end += 1
            piece = raw[start:end]
        unescaped = piece.replace(b"\\\\", b"").replace(b'\\"', b"")
        pieces = unescaped.split(b'"')
        outside = b"".join(pieces[int(in_string) :: 2])
        count += outside.count(b",") + outside.count(b"[") + outside.count(b"{")
        quotes += len(pieces) - 1
        in_string ^= len(pieces) % 2 == 0  # an odd number of quotes in the slice
        start = end
    return count if count <= limit and quotes <= 4 * limit else limit + 1


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


def decoded(raw: bytes, adapter: TypeAdapter[T], max_values: int) -> T:
    """JSON text as `adapter`'s type: MalformedBody (400), InvalidRequest (422) or
    PayloadTooLarge (413, over `max_values` values). Slow for a big text: call it off the
    event loop."""
    if count_values(raw, max_values) > max_values:
        raise PayloadTooLarge(f"the request body holds over {max_values:,} JSON values")
    try:
        data = read_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedBody(f"the body is not UTF-8 JSON text: {exc}") from None
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    try:
        return adapter.validate_python(storable_input(data))
    except ValueError as exc:  # storable_input, and ValidationError (a ValueError)
        if isinstance(exc, ValidationError):
            raise InvalidRequest.of(exc.errors(include_url=False)) from None
        raise _invalid(str(exc)) from None


def _invalid(problem: str) -> InvalidRequest:
    return InvalidRequest.of([{"loc": (), "msg": problem}])
