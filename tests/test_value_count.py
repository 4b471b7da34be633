"""The count of a JSON text's values taken before it is decoded (app/storable.py's
`count_values`), against a straightforward count: a byte at a time, every escape read as it
comes. Small texts with escapes, strings and brackets everywhere, also put where a slice of
the counted text ends. Pure and fast: the routes refusing a body for it are in
tests/test_hostile_input.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.storable import _COUNTED_SLICE, count_values

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def reference_count(raw: bytes, limit: int) -> int:
    """One for the text's first value, one for each comma and opening bracket outside strings;
    `limit + 1` once the values, or the quotes that delimit strings (two a string, one string a
    value and a key at most: four a value), are over the limit."""
    count, quotes, in_string, escaped = 1, 0, False, False
    for byte in raw:
        if escaped:
            escaped = False
        elif in_string and byte == ord("\\"):
            escaped = True
        elif byte == ord('"'):
            quotes += 1
            in_string = not in_string
        elif not in_string and byte in b",[{":
            count += 1
    return count if count <= limit and quotes <= 4 * limit else limit + 1


# The bytes that decide the count, and one that does not: texts of them are JSON-like enough
# (an escape only ever inside a string) to be read as the decoder would.
tokens = st.sampled_from(['"', "\\\\", '\\"', "\\n", ",", "[", "{", "]", "}", ":", "a", " "])


@st.composite
def json_like(draw: st.DrawFn) -> bytes:
    """Text whose backslashes stand only inside strings, as in any JSON text."""
    text, in_string = "", False
    for token in draw(st.lists(tokens, max_size=40)):
        if token.startswith("\\") and not in_string:
            continue
        in_string ^= token == '"'
        text += token
    return text.encode()


@EXAMPLES
@given(text=json_like(), limit=st.integers(0, 12))
def test_a_short_text_is_counted_as_read_a_byte_at_a_time(text: bytes, limit: int) -> None:
    assert count_values(text, limit) == reference_count(text, limit)


@EXAMPLES
@given(text=json_like(), limit=st.integers(1, 40), shift=st.integers(0, 24))
def test_a_text_is_counted_alike_wherever_a_slice_of_it_ends(text: bytes, limit: int, shift: int) -> None:
    """The text put so that a slice of the counted text ends `shift` bytes before its end: in a
    string, an escape or between values."""
    placed = b" " * (_COUNTED_SLICE - len(text) + shift) + text

    assert count_values(placed, limit) == reference_count(placed, limit)


@pytest.mark.parametrize(
    ("text", "values"),
    [
        (b"", 1),
        (b"1", 1),
        (b"[1,2]", 3),
        (b'{"a":[1,[2]]}', 5),
        (b'[",[{", "\\\\", "\\",[{"]', 4),
    ],
)
def test_a_text_of_as_many_values_as_the_limit_is_within_it_and_over_a_limit_one_less(
    text: bytes, values: int
) -> None:
    """Exact where no array or object is empty (one counted for an empty one: a bound)."""
    assert count_values(text, values) == values
    assert count_values(text, values - 1) == values
