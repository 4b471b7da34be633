"""What an Idempotency-Key's replay must match: the hash of the request a submit route was
sent, which a new job stores and a replay is checked against."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from json.encoder import encode_basestring
from typing import Any

from pydantic import BaseModel

from app.errors import IdempotencyConflict
from app.threads import in_thread


class RequestHash:
    """A submit request's hash: `body` as parsed, then `upload` (the bytes of an uploaded
    file and its type, for a route that takes one). Make it with `RequestHash.of`, which
    computes it in a worker thread: a body of tens of MiB takes a tenth of a second or more.

    The body is hashed as the client sent it: fields it left out are left out (pydantic's
    `exclude_unset`, at every level), so a release that changes a default does not turn a
    replay spanning it into a conflict. Fields it gave are hashed as parsed, even at their
    default, except where a field's `exclude_if` leaves its default out. Object keys are
    sorted at every level, so free-form objects (metadata, sample rows) match in any order."""

    def __init__(self, body: BaseModel, upload: bytes = b"") -> None:
        self.body = body
        self.upload = upload
        self.value = _sha256(_canonical_json(_sent(body)), upload)  # what a new job stores

    @classmethod
    async def of(cls, body: BaseModel, upload: bytes = b"") -> RequestHash:
        return await in_thread(cls, body, upload)

    async def matches(self, stored: str, *, may_be_legacy: bool) -> bool:
        """Whether the row that stored `stored` was made by this request (a replay), not another.

        Only a row stored before requests were hashed by the fields sent (`may_be_legacy`) may
        hold `_legacy_full_dump_hash`: a second dump of the whole body, up to tens of MiB,
        holding the GIL (so the event loop) for a tenth of a second, that a key could otherwise
        have computed at will by replaying its own used key with another large body. It is
        computed (in a thread) only for such a row, and only when the hash stored is not this one."""
        if stored == self.value:
            return True
        return may_be_legacy and stored == await in_thread(_legacy_full_dump_hash, self.body, self.upload)

    async def check_replay(self, stored: str, *, may_be_legacy: bool) -> None:
        """IdempotencyConflict unless what stored `stored` was made by this request."""
        if not await self.matches(stored, may_be_legacy=may_be_legacy):
            raise IdempotencyConflict("this Idempotency-Key was already used with a different request body")


# Characters quoted a call, and encoded and hashed a call: a 30 MiB string quoted in one call
# held the GIL, and so the event loop, for 0.1-0.3 s.
_TEXT_SLICE = 256 * 1024


def _canonical_json(value: Any) -> Iterator[str]:
    """`value` (a pydantic JSON-mode dump: string keys) as sorted compact JSON, the text of
    `json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`, a piece at
    a time. Not the standard library's encoder: its one call per string holds the GIL for the
    whole string, and one `json.dumps` for the whole body; nor orjson: a body may hold
    integers beyond 64 bits."""
    if isinstance(value, str) and len(value) <= _TEXT_SLICE:
        yield encode_basestring(value)
    elif isinstance(value, str):
        yield '"'
        for start in range(0, len(value), _TEXT_SLICE):
            yield encode_basestring(value[start : start + _TEXT_SLICE])[1:-1]
        yield '"'
    elif isinstance(value, dict):
        yield "{"
        for number, (key, item) in enumerate(sorted(value.items())):
            if number:
                yield ","
            yield from _canonical_json(key)
            yield ":"
            yield from _canonical_json(item)
        yield "}"
    elif isinstance(value, list):
        yield "["
        for number, item in enumerate(value):
            if number:
                yield ","
            yield from _canonical_json(item)
        yield "]"
    else:  # a number, a boolean or null: short
        yield json.dumps(value)


def _sent(body: BaseModel) -> Any:
    """The fields the client sent, at every level."""
    return body.model_dump(mode="json", exclude_unset=True)


def _legacy_full_dump_hash(body: BaseModel, upload: bytes) -> str:
    """The hash jobs stored before `RequestHash.value` left unset fields out: the body with
    every default filled in (only a field's `exclude_if` kept it out).

    It matches only while the request schemas dump as they did then: so, while it is
    accepted, keep their `exclude_if` rules, and give a new field one at its default. Keys
    do not expire (the README: a key is freed only when its job is deleted), so this can go
    once no job with an Idempotency-Key created before this release is left (`SELECT
    count(*) FROM jobs WHERE idempotency_key IS NOT NULL AND created_at < <its deploy>`), or
    once replays of submissions that old may be refused. Only jobs marked
    `request_hash_may_be_legacy` are checked against it: every job stored before migration
    0038, including those since this release's deploy, which `UPDATE jobs SET
    request_hash_may_be_legacy = false WHERE created_at >= <its deploy>` would spare it."""
    return _sha256([body.model_dump_json()], upload)


def _sha256(text: Iterable[str], upload: bytes) -> str:
    """The hash of `text`'s pieces, UTF-8, then `upload`: encoded and hashed a slice at a time,
    never joined (hashlib lets go of the GIL as it hashes)."""
    digest = hashlib.sha256()
    pending: list[str] = []
    pending_chars = 0
    for piece in text:
        pending.append(piece)
        pending_chars += len(piece)
        if pending_chars >= _TEXT_SLICE:
            digest.update("".join(pending).encode())
            pending, pending_chars = [], 0
    digest.update("".join(pending).encode())
    digest.update(upload)
    return digest.hexdigest()
