"""What an Idempotency-Key's replay must match: the hash of the request a submit route was
sent, which a new job stores and a replay is checked against."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from pydantic import BaseModel


@dataclass(frozen=True)
class RequestHash:
    """A submit request's hash: `body` as parsed, then `upload` (the bytes of an uploaded
    file and its type, for a route that takes one)."""

    body: BaseModel
    upload: bytes = b""

    @cached_property
    def value(self) -> str:
        """What a new job stores."""
        return hashlib.sha256(self.body.model_dump_json().encode() + self.upload).hexdigest()

    def matches(self, stored: str) -> bool:
        """Whether a job that stored `stored` was made by this request (a replay), not another."""
        return stored == self.value
