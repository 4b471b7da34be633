"""Label Studio deliveries recorded, at once or later. Label Studio sends each delivery once,
and keeps no failure log: one that carried its webhook's secret while Postgres was away is
spooled to Redis by the API and recorded by a worker once Postgres is back
(`replay_spooled`), through the same steps as a live delivery (`record`, `keep_refusal`).

While Postgres is away the webhook cannot be looked up: the API remembers the webhooks whose
deliveries it verified lately (app/api/verified_webhooks.py, in each process and in Redis),
and checks a delivery's secret against those; a replay checks it again against Postgres (the
webhook may have been revoked or deleted meanwhile). A spooled delivery keeps the hash of
the secret sent, never the secret.

An entry the replay cannot read (not JSON, a field missing or of the wrong type: written by
another release, or not by this code) goes to a bounded dead list, with why, for an operator
to look at (`aidsafe deliveries dead`), and drop or put back in the spool once every worker
reads it (`requeue_dead`: a rolling upgrade's older workers could not read the newer entries):
kept in the spool, it failed on every pass and held its share of the spool's bounds for good."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from redis.asyncio import Redis
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.errors import NotFound, ServiceError
from app.labeling import imports, label_studio
from app.labeling.imports import ImportReport
from app.labeling.reviews import Parsed
from app.metrics import DELIVERIES_REPLAYED
from app.storable import decoded
from app.store import webhooks as store
from app.store.db import Sessions, closed_quietly, database_away
from app.threads import in_thread

log = logging.getLogger("aidsafe.deliveries")
SECRET_HEADER = "X-Aidsafe-Webhook-Secret"
# One pass replays at a time, holding a lease. A pass whose worker was killed leaves its entry
# in the processing list: once the lease lapses, the next pass replays it again.
REPLAY_LEASE_S = 120.0
REPLAY_PASS_S = 30.0  # a pass takes no new entry after this long, well within its lease
# The dead list keeps the newest this many, and this many bytes at most (2,000 deliveries of
# up to 4 MiB would be 8 GiB); an older one is dropped (and the drop logged): a release writing
# entries no other can read must not fill Redis.
DEAD_KEPT = 2000
DEAD_KEPT_BYTES = 64 * 1024 * 1024

# Adds an entry to the end of the waiting list unless the spool (waiting and being replayed)
# holds `most` entries or `most_bytes` bytes already, or the API key it is counted under (if
# any) its share of either. The bytes are counted in `size_key`, each key's entries and bytes in
# the hash `per_key`; each entry recorded is taken off (_GIVE_BACK).
_ADMIT = """
local function admit(waiting, processing, size_key, per_key, entry,
                     most, most_bytes, key, key_most, key_most_bytes)
    local size, key_bytes = string.len(entry), key .. ':bytes'
    if redis.call('LLEN', waiting) + redis.call('LLEN', processing) >= tonumber(most)
        or tonumber(redis.call('GET', size_key) or '0') + size > tonumber(most_bytes)
        or key ~= '' and (tonumber(redis.call('HGET', per_key, key) or '0') >= tonumber(key_most)
            or tonumber(redis.call('HGET', per_key, key_bytes) or '0') + size > tonumber(key_most_bytes)) then
        return false
    end
    redis.call('RPUSH', waiting, entry)
    redis.call('INCRBY', size_key, size)
    if key ~= '' then
        redis.call('HINCRBY', per_key, key, 1)
        redis.call('HINCRBY', per_key, key_bytes, size)
    end
    return true
end
"""
_SPOOL = (
    _ADMIT
    + """
return admit(KEYS[1], KEYS[2], KEYS[3], KEYS[4], unpack(ARGV)) and 1 or 0
"""
)
# The counts start over once the spool is empty: nothing may drift them for good.
_EMPTIED = """
if redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[3], KEYS[4]) end
return 0
"""
# Takes an entry that left processing off the counts: the spool's bytes, and its API key's
# entries and bytes if it names one. A count that would reach zero or less is deleted: entries
# spooled before the per-key counts existed were never counted in them, and took them below
# zero, which let their key take more than its share.
_GIVE_BACK = """
local function lessen(hash, field, by)
    if redis.call('HINCRBY', hash, field, -by) <= 0 then redis.call('HDEL', hash, field) end
end
local function give_back(size_key, per_key, entry, key)
    local size = string.len(entry)
    if redis.call('DECRBY', size_key, size) <= 0 then redis.call('DEL', size_key) end
    if key ~= '' then
        lessen(per_key, key, 1)
        lessen(per_key, key .. ':bytes', size)
    end
end
"""
# An entry recorded leaves the counts only if it was still in processing: a pass whose lease
# expired mid-entry and the next pass, which took that entry back, both record it.
_RECORDED = (
    _GIVE_BACK
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then give_back(KEYS[2], KEYS[3], ARGV[1], ARGV[2]) end
return 0
"""
)
# An entry unread goes to the front of the dead list, as ARGV[3] (its reason, then the entry),
# once (see _RECORDED: -1 if it was not in processing); the list, whose bytes KEYS[5] counts
# (anew when it was empty), keeps the newest DEAD_KEPT (ARGV[4]) and DEAD_KEPT_BYTES (ARGV[5]),
# the newest always: how many older ones were dropped.
_DEAD_LETTERED = (
    _GIVE_BACK
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return -1 end
give_back(KEYS[2], KEYS[3], ARGV[1], ARGV[2])
local kept = redis.call('LPUSH', KEYS[4], ARGV[3])
if kept == 1 then redis.call('SET', KEYS[5], 0) end
local kept_bytes = redis.call('INCRBY', KEYS[5], string.len(ARGV[3]))
local dropped = 0
while kept > 1 and (kept > tonumber(ARGV[4]) or kept_bytes > tonumber(ARGV[5])) do
    kept_bytes = redis.call('DECRBY', KEYS[5], string.len(redis.call('RPOP', KEYS[4])))
    kept, dropped = kept - 1, dropped + 1
end
return dropped
"""
)
# The dead list's bytes (KEYS[2] of the scripts below), less `freed` taken off its list KEYS[1]:
# none once it is empty, so nothing may drift them for good.
_DEAD_FREED = """
local function dead_freed(dead, dead_bytes, freed)
    if redis.call('DECRBY', dead_bytes, freed) <= 0 or redis.call('LLEN', dead) == 0 then
        redis.call('DEL', dead_bytes)
    end
end
"""
# A dead one, ARGV[1], back to the end of the spool as its entry, in one step, admitted and
# counted as _SPOOL admits one (ARGV[2] to ARGV[7] as its ARGV[1] to ARGV[6]): 1; 0 if the
# spool's bounds or its key's share leave no room for it (it stays dead); -1 if it is no longer
# dead (requeued or dropped meanwhile).
_REQUEUED = (
    _ADMIT
    + _DEAD_FREED
    + """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then return -1 end
if not admit(KEYS[3], KEYS[4], KEYS[5], KEYS[6], unpack(ARGV, 2)) then return 0 end
redis.call('LREM', KEYS[1], -1, ARGV[1])
dead_freed(KEYS[1], KEYS[2], string.len(ARGV[1]))
return 1
"""
)
# The dead one whose fingerprint is ARGV[1] (`dead_fingerprint`) and every one older, dropped
# in one step: how many; none if no dead one has it (dropped, requeued or trimmed since). Looked
# for from the oldest, so of two alike (same bytes) the older is taken, not one that came after;
# a full list (DEAD_KEPT_BYTES hashed) takes Redis about a quarter of a second.
_DROPPED_THROUGH = (
    _DEAD_FREED
    + """
local freed = 0
for age = 1, redis.call('LLEN', KEYS[1]) do
    local kept = redis.call('LINDEX', KEYS[1], -age)
    freed = freed + string.len(kept)
    if string.sub(redis.sha1hex(kept), 1, string.len(ARGV[1])) == ARGV[1] then
        redis.call('LTRIM', KEYS[1], 0, -age - 1)
        dead_freed(KEYS[1], KEYS[2], freed)
        return age
    end
end
return 0
"""
)
# An entry that failed goes back to the front (LPUSH) or the end (RPUSH) of the waiting list,
# only if it was still in processing (see _RECORDED).
_PUT_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then redis.call(ARGV[2], KEYS[2], ARGV[1]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class UnreadableEntry(ValueError):
    """A spooled entry that is no delivery this release can read; the message says why."""


# The times a datetime holds, a day inside them: a refusal is kept at its delivery's time, and
# a time out of them (NaN, 1e300) failed every replay of an entry refused.
_FIRST_TIME = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_LAST_TIME = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


class _Head(BaseModel):
    """A spooled entry's first line. Strict: a field of the wrong type is unread, not guessed."""

    model_config = ConfigDict(strict=True)

    webhook_id: UUID
    owner_key_id: UUID
    sent_hash: str | None
    received_at: float = Field(allow_inf_nan=False, ge=_FIRST_TIME, le=_LAST_TIME)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery whose secret was verified, as spooled: its body's bytes as received."""

    webhook_id: UUID
    owner_key_id: UUID
    sent_hash: str | None  # hash_key of the secret it carried (verified: never None)
    raw: bytes
    received_at: float  # Unix time

    def encoded(self) -> bytes:
        head = {
            "webhook_id": str(self.webhook_id),
            "owner_key_id": str(self.owner_key_id),
            "sent_hash": self.sent_hash,
            "received_at": self.received_at,
        }
        # One line of JSON, then the body as it came (Redis strings are bytes): no escaping.
        return json.dumps(head).encode() + b"\n" + self.raw

    @classmethod
    def decoded(cls, entry: bytes) -> Delivery:
        """The delivery `encoded` made; UnreadableEntry if its head is not JSON, or lacks a
        field, or holds one of the wrong type or a time no datetime holds."""
        head, _, raw = entry.partition(b"\n")
        try:
            fields = _Head.model_validate_json(head)
        except ValidationError as error:
            raise UnreadableEntry(_why(error)) from None
        return cls(fields.webhook_id, fields.owner_key_id, fields.sent_hash, raw, fields.received_at)

    @property
    def body(self) -> str:
        """As a refusal keeps it."""
        return self.raw.decode("utf-8", errors="replace")


def _why(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, problem['loc'])) or 'head'}: {problem['msg']}" for problem in error.errors()
    )


class _NamedOwner(BaseModel):
    """The one field of an unread entry's head the spool counted it under."""

    model_config = ConfigDict(strict=True)

    owner_key_id: str


def _named_owner(entry: bytes) -> str:
    """The API key an unread entry's head names, as the spool counted it under ("" if none):
    an entry of an older release may still name it."""
    try:  # pydantic, as the head was read: json.loads raises RecursionError on deep nesting
        return _NamedOwner.model_validate_json(entry.partition(b"\n")[0]).owner_key_id
    except ValidationError:  # not JSON, no object, or no key named
        return ""


class _DeadHead(BaseModel):
    """A dead one's first line, as `DeadDelivery.encoded` writes it."""

    model_config = ConfigDict(strict=True)

    reason: str
    dead_at: float = Field(allow_inf_nan=False, ge=_FIRST_TIME, le=_LAST_TIME)


@dataclass(frozen=True, slots=True)
class DeadDelivery:
    """A spooled entry the replay could not read, as the dead list keeps it: why, when it was
    moved there (Unix time), and the entry byte for byte."""

    reason: str
    dead_at: float
    entry: bytes

    def encoded(self) -> bytes:
        return json.dumps({"reason": self.reason, "dead_at": self.dead_at}).encode() + b"\n" + self.entry

    @classmethod
    def decoded(cls, kept: bytes) -> DeadDelivery:
        """The dead one `encoded` made; UnreadableEntry if the list holds something else there
        (written by hand, or by another release), saying why."""
        head, _, entry = kept.partition(b"\n")
        try:
            fields = _DeadHead.model_validate_json(head)
        except ValidationError as error:
            raise UnreadableEntry(_why(error)) from None
        return cls(fields.reason, fields.dead_at, entry)


@dataclass(frozen=True, slots=True)
class ForeignDead:
    """Something in the dead list that is no dead one `DeadDelivery.encoded` made: as it is,
    with why it could not be read."""

    kept: bytes
    reason: str


def _dead_one(kept: bytes) -> DeadDelivery | ForeignDead:
    try:
        return DeadDelivery.decoded(kept)
    except UnreadableEntry as unread:
        return ForeignDead(kept, str(unread))


_EVENT = TypeAdapter(label_studio.WebhookIn)


def read_delivery(raw: bytes) -> Parsed:
    """The delivery's reviews and retractions (CPU for a big one: call it off the loop)."""
    return label_studio.read_webhook(decoded(raw, _EVENT, imports.MAX_IMPORT_VALUES))


def unrecordable_now(error: BaseException) -> bool:
    """Whether a delivery whose secret was verified is spooled for this error: Postgres is
    away, or no connection of the pool came free in time (Label Studio would not wait)."""
    return database_away(error) or isinstance(error, PoolTimeoutError)


async def record(
    session: AsyncSession, webhook_id: UUID, sent_hash: str | None, parsed: Parsed
) -> ImportReport:
    """Record a delivery read: its webhook is found and held again (it may have been revoked or
    deleted since its secret was first checked), the secret checked, the reviews recorded and
    committed. ServiceError if refused: `keep_refusal` then."""
    webhook, owner_revoked = await store.find(session, webhook_id, "label_studio")
    store.check_secret(webhook, owner_revoked, sent_hash, SECRET_HEADER)
    report = await imports.record_reviews(
        session, parsed, owner_key_id=webhook.owner_key_id, webhook_id=webhook_id
    )
    await session.commit()
    return report


async def keep_refusal(
    session: AsyncSession,
    webhook_id: UUID,
    refusal: ServiceError,
    body: str | None,
    received_at: datetime | None = None,
) -> None:
    """Keep a refused delivery for the webhook's owner (its body only if it carried the
    secret); one received earlier (`received_at`: a spooled one) is kept once however often it
    is replayed."""
    await session.rollback()
    log.warning("webhook %s refused a delivery: %s %s", webhook_id, refusal.code, refusal.message)
    await store.record_rejection(session, webhook_id, refusal.code, refusal.message, body, received_at)
    await session.commit()


@dataclass(frozen=True, slots=True)
class _Spool:
    """The spool's Redis keys: deliveries waiting, being replayed, their bytes, each API key's
    entries and bytes, the replay lease, and the entries that could not be read and their bytes."""

    waiting: str
    processing: str
    size: str
    per_key: str
    lease: str
    dead: str
    dead_bytes: str

    @classmethod
    def of(cls, prefix: str) -> _Spool:
        names = ("spooled", "processing", "bytes", "keys", "replaying", "dead", "dead_bytes")
        return cls(*(f"{prefix}:deliveries:{name}" for name in names))

    @property
    def counted(self) -> tuple[str, str, str, str]:
        return self.waiting, self.processing, self.size, self.per_key


@dataclass(frozen=True, slots=True)
class SpoolLimits:
    """What the spool holds at most; one API key's deliveries, `key_share` of it."""

    entries: int
    bytes: int
    key_share: float

    @classmethod
    def of(cls, settings: Settings) -> SpoolLimits:
        return cls(
            settings.delivery_spool_max, settings.delivery_spool_max_bytes, settings.delivery_spool_key_share
        )

    @property
    def per_key(self) -> tuple[int, int]:
        return math.ceil(self.entries * self.key_share), math.ceil(self.bytes * self.key_share)


async def spool(redis: Redis, prefix: str, limits: SpoolLimits, delivery: Delivery) -> bool:
    """Add a delivery to the spool; False if it holds its most entries or bytes already (being
    replayed included), or the delivery's API key its share of them: an outage can neither fill
    Redis nor let one key's tool take the others' room."""
    keys, entry = _Spool.of(prefix), delivery.encoded()
    most = (limits.entries, limits.bytes, delivery.owner_key_id, *limits.per_key)
    added = await redis.eval(_SPOOL, 4, *keys.counted, entry, *map(str, most))  # type: ignore[arg-type, misc]
    return bool(added)


async def spooled_count(redis: Redis, prefix: str) -> int:
    """Deliveries spooled and not yet recorded, being replayed included."""
    keys = _Spool.of(prefix)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.llen(keys.waiting)
        pipe.llen(keys.processing)
        waiting, replaying = await pipe.execute()
    return int(waiting) + int(replaying)


async def replay_spooled(sessions: Sessions, redis: Redis, prefix: str) -> int:
    """Record the spooled deliveries, oldest first, until none is left, Postgres is still away
    (the entry goes back to the front, for the next pass), or REPLAY_PASS_S has passed; how
    many were recorded or refused. Each entry is moved to the processing list (LMOVE) while it
    is replayed and removed once its outcome is committed: one a killed worker left there is
    replayed again by the next pass, which records nothing twice (a version stored is a
    duplicate). An entry that cannot be read is moved to the dead list (not counted). Run by
    one worker at a time (a lease); another finds it held and returns 0."""
    keys = _Spool.of(prefix)
    spooled, processing, lease = keys.waiting, keys.processing, keys.lease
    token = uuid4().hex
    if not await redis.set(lease, token, nx=True, px=int(REPLAY_LEASE_S * 1000)):
        return 0
    replayed, ends_at = 0, time.monotonic() + REPLAY_PASS_S
    try:
        while await redis.lmove(processing, spooled, "RIGHT", "LEFT") is not None:
            pass  # a killed pass's entries, back to the front in their order
        # None ends the spool; an empty entry (b"", falsy) is one unread, not its end.
        while (
            time.monotonic() < ends_at
            and (entry := await redis.lmove(spooled, processing, "LEFT", "RIGHT")) is not None
        ):
            try:
                delivery = Delivery.decoded(entry)
            except UnreadableEntry as unread:
                await _dead_letter(redis, keys, entry, str(unread))
                continue
            try:
                outcome = await _replay(sessions, delivery)
            except Exception as error:
                # Postgres away: first again next pass. A bug: last, not to hold up the others.
                waits = unrecordable_now(error)
                await redis.eval(_PUT_BACK, 2, processing, spooled, entry, "LPUSH" if waits else "RPUSH")  # type: ignore[misc]
                if waits:
                    log.warning("a spooled delivery waits for the database: %r", error)
                    break
                raise
            await redis.eval(
                _RECORDED, 3, processing, keys.size, keys.per_key, entry, str(delivery.owner_key_id)
            )  # type: ignore[misc]
            DELIVERIES_REPLAYED.labels(outcome).inc()
            replayed += 1
        await redis.eval(_EMPTIED, 4, *keys.counted)  # type: ignore[misc]
    finally:
        await redis.eval(_RELEASE, 1, lease, token)  # type: ignore[misc]
    return replayed


async def _dead_letter(redis: Redis, keys: _Spool, entry: bytes, reason: str) -> None:
    """Move an entry unread from processing to the dead list, giving its counts back; said once."""
    kept = DeadDelivery(reason, time.time(), entry).encoded()
    dead_keys = (keys.processing, keys.size, keys.per_key, keys.dead, keys.dead_bytes)
    dead_args = (entry, _named_owner(entry), kept, str(DEAD_KEPT), str(DEAD_KEPT_BYTES))
    dropped = await redis.eval(_DEAD_LETTERED, 5, *dead_keys, *dead_args)  # type: ignore[arg-type, misc]
    if dropped < 0:  # another pass, whose lease had lapsed, moved it
        return
    log.error("a spooled delivery could not be read, moved to %s: %s", keys.dead, reason)
    if dropped:
        log.warning(
            "the dead list keeps the newest %d, %d bytes at most: its %d oldest were dropped",
            DEAD_KEPT,
            DEAD_KEPT_BYTES,
            dropped,
        )


async def dead_count(redis: Redis, prefix: str) -> int:
    """Spooled entries the replay could not read, in the dead list."""
    return int(await redis.llen(_Spool.of(prefix).dead))  # type: ignore[misc]


def dead_fingerprint(kept: bytes) -> str:
    """What names a dead one for `drop_dead`: the first 16 hex digits of the SHA-1 of its bytes
    as the list keeps them (64 bits: two of 2,000 share one by chance once in 10^13)."""
    return hashlib.sha1(kept, usedforsecurity=False).hexdigest()[:16]


DEAD_FINGERPRINT = re.compile(r"[0-9a-f]{16}")  # as `dead_fingerprint` gives it


@dataclass(frozen=True, slots=True)
class DeadListing:
    """The dead list at one moment: how many it holds, the newest of them (newest first), and
    the fingerprint of its newest (None if it is empty), which `drop_dead` takes."""

    count: int
    newest: list[DeadDelivery | ForeignDead]
    newest_fingerprint: str | None


async def dead_deliveries(redis: Redis, prefix: str, limit: int) -> DeadListing:
    """The dead list with its newest `limit` entries (0: all), read in one step (the count, the
    entries and the fingerprint agree); one this code did not put there, as a ForeignDead."""
    dead = _Spool.of(prefix).dead
    async with redis.pipeline(transaction=True) as pipe:
        pipe.llen(dead)
        pipe.lrange(dead, 0, limit - 1)
        count, kept = await pipe.execute()
    newest_fingerprint = dead_fingerprint(kept[0]) if kept else None
    return DeadListing(int(count), [_dead_one(entry) for entry in kept], newest_fingerprint)


async def drop_dead(redis: Redis, prefix: str, fingerprint: str) -> int:
    """Drop the dead one whose fingerprint (`dead_fingerprint`) is `fingerprint`, and every one
    older, in one step: those an operator saw, `fingerprint` being the newest `dead_deliveries`
    gave, not one that came after. How many were dropped: none if no dead one has it (dropped,
    requeued or trimmed since). ValueError if `fingerprint` is not one (a prefix would match)."""
    if not DEAD_FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"not a dead one's fingerprint: {fingerprint!r}")
    keys = _Spool.of(prefix)
    dropped = await redis.eval(_DROPPED_THROUGH, 2, keys.dead, keys.dead_bytes, fingerprint)  # type: ignore[misc]
    return int(dropped)


@dataclass(frozen=True, slots=True)
class Requeued:
    """What `requeue_dead` did with the dead ones: put back in the spool; left dead because the
    spool (or their API key's share of it) was full; left dead because they are no dead one
    this code put there (ForeignDead)."""

    requeued: int = 0
    no_room: int = 0
    foreign: int = 0


async def requeue_dead(redis: Redis, prefix: str, limits: SpoolLimits) -> Requeued:
    """Put the dead ones back at the end of the spool, oldest first, each in one step (in the
    spool, counted as one spooled, or still dead: never both, never neither), for the next
    replay pass to read again: one that still cannot be read goes dead again. Only those dead
    when it started: one that goes dead meanwhile stays. One that finds the spool or its API
    key's share full stays dead, as one spooled then would have been refused."""
    keys = _Spool.of(prefix)
    counted = (keys.dead, keys.dead_bytes, *keys.counted)
    requeued, no_room, foreign = 0, 0, 0
    for kept in reversed(await redis.lrange(keys.dead, 0, -1)):  # type: ignore[misc]
        try:
            entry = DeadDelivery.decoded(kept).entry
        except UnreadableEntry:
            foreign += 1
            continue
        most = (limits.entries, limits.bytes, _owner_counted(entry), *limits.per_key)
        moved = await redis.eval(_REQUEUED, 6, *counted, kept, entry, *map(str, most))  # type: ignore[arg-type, misc]
        requeued, no_room = requeued + (moved == 1), no_room + (moved == 0)
    return Requeued(requeued, no_room, foreign)


def _owner_counted(entry: bytes) -> str:
    """The API key a spooled entry is counted under, as its replay will give it back: the one
    its delivery names if it can be read (`spool`), else the one its head names (`_dead_letter`)."""
    try:
        return str(Delivery.decoded(entry).owner_key_id)
    except UnreadableEntry:
        return _named_owner(entry)


async def _replay(sessions: Sessions, delivery: Delivery) -> str:
    """A spooled delivery recorded as a live one would be: "recorded", or "refused" (its
    refusal kept, unless the webhook was deleted meanwhile: nothing is kept of it then)."""
    async with closed_quietly(sessions) as session:
        try:
            parsed = await in_thread(read_delivery, delivery.raw)
            report = await record(session, delivery.webhook_id, delivery.sent_hash, parsed)
        except ServiceError as refusal:
            try:
                received_at = datetime.fromtimestamp(delivery.received_at, UTC)
                await keep_refusal(session, delivery.webhook_id, refusal, delivery.body, received_at)
            except NotFound:
                log.warning("a spooled delivery's webhook %s was deleted: dropped", delivery.webhook_id)
            return "refused"
    waited_s = time.time() - delivery.received_at
    log.info(
        "a delivery to webhook %s spooled %.0f s ago was recorded: %d imported, %d duplicates",
        delivery.webhook_id,
        waited_s,
        report.imported,
        report.duplicates,
    )
    return "recorded"
