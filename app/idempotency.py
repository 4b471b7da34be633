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
    file and its type, for a route that takes one).

    The body is hashed as the client sent it: fields it left out are left out (pydantic's
    `exclude_unset`, at every level), so a release that changes a default does not turn a
    replay spanning it into a conflict. Fields it gave are hashed as parsed, even at their
    default, except where a field's `exclude_if` leaves its default out."""

    body: BaseModel
    upload: bytes = b""

    @cached_property
    def value(self) -> str:
        """What a new job stores."""
        return _sha256(self.body.model_dump_json(exclude_unset=True), self.upload)

    @cached_property
    def legacy(self) -> str:
        return _legacy_full_dump_hash(self.body, self.upload)

    def computed(self) -> RequestHash:
        """This, with both hashes computed now (for a large upload: in a thread)."""
        _ = self.value, self.legacy
        return self

    def matches(self, stored: str) -> bool:
        """Whether a job that stored `stored` was made by this request (a replay), not another."""
        return stored == self.value or stored == self.legacy


def _legacy_full_dump_hash(body: BaseModel, upload: bytes) -> str:
    """The hash jobs stored before `RequestHash.value` left unset fields out: the body with
    every default filled in (only a field's `exclude_if` kept it out).

    It matches only while the request schemas dump as they did then: so, while it is
    accepted, keep their `exclude_if` rules, and give a new field one at its default. Keys
    do not expire (the README: a key is freed only when its job is deleted), so this can go
    once no job with an Idempotency-Key created before this release is left (`SELECT
    count(*) FROM jobs WHERE idempotency_key IS NOT NULL AND created_at < <its deploy>`), or
    once replays of submissions that old may be refused."""
    return _sha256(body.model_dump_json(), upload)


def _sha256(dumped: str, upload: bytes) -> str:
    digest = hashlib.sha256(dumped.encode())
    digest.update(upload)
    return digest.hexdigest()
