"""What PostgreSQL can store: checked where outside data comes in (HTTP bodies, labeling
tool imports), so a bad value is a 4xx naming it rather than a 500 from the database."""

from __future__ import annotations

import math
from typing import Any


def storable_input(data: Any) -> Any:
    """Refuse at the edge what PostgreSQL would refuse with a 500: U+0000 and lone
    surrogates in text, NaN and infinities in JSON."""
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
        for key, value in data.items():
            storable_input(key)
            storable_input(value)
    elif isinstance(data, list):
        for value in data:
            storable_input(value)
    return data
