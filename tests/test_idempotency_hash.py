"""An Idempotency-Key's request hash written and hashed a piece at a time (app/idempotency.py): the same
text, and so the same hash, as the one-shot encoder's, for every shape of body; held a slice at
a time, never whole. Pure and fast: the replays through the API are tests/test_idempotency.py."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from typing import Any

import pytest

from app.idempotency import _TEXT_SLICE, _canonical_json, _sha256


def one_shot(value: Any) -> str:
    """The text earlier releases hashed: one `json.dumps` of the whole body."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


VALUES = {
    "empty object": {},
    "empty array": [],
    "one key": {"a": 1},
    "keys out of order": {"b": 1, "a": [2, 3], "c": {"z": None, "y": True, "x": False}},
    "arrays": [[], [[]], [1, "2", [3.5, -0.0]], {"k": []}],
    "scalars": [0, -1, 2**70, 1.5e300, 1e-7, True, False, None],
    "escapes": ['"', "\\", "\n\t\x00\x1f", "\u2028\u2029", "é\U0001f600", ""],
    "escaped keys": {'"': 1, "\\": 2, "é": 3, "a\nb": 4},
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_a_body_is_written_as_the_one_shot_encoder_writes_it(value: Any) -> None:
    assert "".join(_canonical_json(value)) == one_shot(value)


@pytest.mark.parametrize("length", [_TEXT_SLICE - 1, _TEXT_SLICE, _TEXT_SLICE + 1, 2 * _TEXT_SLICE + 3])
def test_a_string_about_a_slice_long_is_written_whole_in_pieces_of_a_slice_at_most(length: int) -> None:
    """The last character of each slice, and the first of the next, is one that is escaped."""
    text = ("a" * (_TEXT_SLICE - 1) + '"\\') * 3
    value = {"k": text[:length]}

    pieces = list(_canonical_json(value))

    assert "".join(pieces) == one_shot(value)
    assert max(map(len, pieces)) <= 2 * _TEXT_SLICE  # each character written at most twice
    assert len(pieces) >= 2 + length // _TEXT_SLICE  # a slice a piece, not one call for it all


@pytest.mark.parametrize(
    "pieces",
    [
        [],
        ["{}"],
        ["{", '"a"', ":", "1", "}"],  # short pieces, all hashed after the last
        ["é" * (_TEXT_SLICE // 3), "\U0001f600" * _TEXT_SLICE, "x"],  # each over a slice in bytes
        ["ab"] * (_TEXT_SLICE // 2) + ["c"],  # a slice of characters, then one more
        ["a" * (_TEXT_SLICE - 1), "b", "c" * (_TEXT_SLICE + 1), "d"],
    ],
    ids=["nothing", "one piece", "a few pieces", "multibyte", "many small pieces", "about a slice"],
)
@pytest.mark.parametrize("upload", [b"", b"csv\x00\xff"])
def test_the_hash_is_of_the_pieces_joined_in_utf_8_then_the_upload(pieces: list[str], upload: bytes) -> None:
    assert _sha256(pieces, upload) == hashlib.sha256("".join(pieces).encode() + upload).hexdigest()


def test_the_pieces_are_hashed_a_slice_at_a_time_never_joined_whole() -> None:
    """Joined and encoded whole, a body of 30 MiB held the GIL as long, and took twice its size
    again in memory: hashed a slice at a time, what is held is a few slices' worth."""
    size = 32 * _TEXT_SLICE

    def pieces() -> Any:  # made as they are read, as _canonical_json makes them
        for number in range(size // 1024):
            yield str(number % 10) * 1024

    tracemalloc.start()
    digest = _sha256(pieces(), b"")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert digest == hashlib.sha256("".join(pieces()).encode()).hexdigest()
    assert peak < 8 * _TEXT_SLICE  # about 3 slices; joined whole, 3 x 32
