"""What an Idempotency-Key's replay must match: the hash of the request a submit route was
sent, which a new job stores and a replay is checked against."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel


class RequestHash:
    """A submit request's hash: `body` as parsed, then `upload` (the bytes of an uploaded
    file and its type, for a route that takes one). Each form is computed when first read.

    The body is hashed as the client sent it: fields it left out are left out (pydantic's
    `exclude_unset`, at every level), so a release that changes a default does not turn a
    replay spanning it into a conflict. Fields it gave are hashed as parsed, even at their
    default, except where a field's `exclude_if` leaves its default out. Object keys are
    sorted at every level, so free-form objects (metadata, sample rows) match in any order."""

    def __init__(self, body: BaseModel, upload: bytes = b"") -> None:
        self.body = body
        self.upload = upload
        # Not functools.cached_property: on Python 3.11 it takes one lock for all instances,
        # so an upload hashed in a thread would stall every other request reading its hash.
        self._value: str | None = None
        self._legacy: str | None = None

    @property
    def value(self) -> str:
        """What a new job stores."""
        if self._value is None:
            # The standard library's encoder, not orjson: a body may hold integers beyond 64 bits.
            sent = self.body.model_dump(mode="json", exclude_unset=True)
            canonical = json.dumps(sent, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            self._value = _sha256(canonical.encode(), self.upload)
        return self._value

    @property
    def legacy(self) -> str:
        if self._legacy is None:
            self._legacy = _legacy_full_dump_hash(self.body, self.upload)
        return self._legacy

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
    return _sha256(body.model_dump_json().encode(), upload)


def _sha256(dumped: bytes, upload: bytes) -> str:
    digest = hashlib.sha256(dumped)
    digest.update(upload)
    return digest.hexdigest()
