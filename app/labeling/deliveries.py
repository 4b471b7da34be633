"""Label Studio deliveries recorded, at once or later. Label Studio sends each delivery once,
and keeps no failure log: one that carried its webhook's secret while Postgres was away is
spooled to Redis by the API and recorded by a worker once Postgres is back
(`replay_spooled`), through the same steps as a live delivery (`record`, `keep_refusal`).

While Postgres is away the webhook cannot be looked up: each API process remembers the
webhooks whose deliveries it verified lately (app/api/verified_webhooks.py), and checks a delivery's
secret against those; a replay checks it again against Postgres (the webhook may have been
revoked or deleted meanwhile). A spooled delivery keeps the hash of the secret sent, never
the secret."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from uuid import UUID, uuid4

from pydantic import TypeAdapter
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import NotFound, ServiceError
from app.labeling import imports, label_studio
from app.labeling.imports import ImportReport
from app.labeling.reviews import Parsed
from app.metrics import DELIVERIES_REPLAYED
from app.storable import decoded
from app.store import webhooks as store
from app.store.db import Sessions, closed_quietly, database_away

log = logging.getLogger("aidsafe.deliveries")
SECRET_HEADER = "X-Aidsafe-Webhook-Secret"
# One pass replays at a time, holding a lease. A pass whose worker was killed leaves its entry
# in the processing list: once the lease lapses, the next pass replays it again.
REPLAY_LEASE_S = 120.0
REPLAY_PASS_S = 30.0  # a pass takes no new entry after this long, well within its lease

# Adds an entry unless the spool (waiting and being replayed) holds `max` entries or `max`
# bytes already. The bytes are counted in KEYS[3], less each entry recorded.
_SPOOL = """
local size = string.len(ARGV[1])
if redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[2])
    or tonumber(redis.call('GET', KEYS[3]) or '0') + size > tonumber(ARGV[3]) then
    return 0
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[3], size)
return 1
"""
# The byte count starts over once the spool is empty: nothing may drift it for good.
_EMPTIED = """
if redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[3]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


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
        head, _, raw = entry.partition(b"\n")
        fields = json.loads(head)
        return cls(
            UUID(fields["webhook_id"]),
            UUID(fields["owner_key_id"]),
            fields["sent_hash"],
            raw,
            fields["received_at"],
        )

    @property
    def body(self) -> str:
        """As a refusal keeps it."""
        return self.raw.decode("utf-8", errors="replace")


_EVENT = TypeAdapter(label_studio.WebhookIn)


def read_delivery(raw: bytes) -> Parsed:
    """The delivery's reviews and retractions (CPU for a big one: call it off the loop)."""
    return label_studio.read_webhook(decoded(raw, _EVENT, imports.MAX_IMPORT_VALUES))


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
    session: AsyncSession, webhook_id: UUID, owner_key_id: UUID, refusal: ServiceError, body: str | None
) -> None:
    """Keep a refused delivery for its owner (its body only if it carried the secret)."""
    await session.rollback()
    log.warning("webhook %s refused a delivery: %s %s", webhook_id, refusal.code, refusal.message)
    await store.record_rejection(session, webhook_id, owner_key_id, refusal.code, refusal.message, body)
    await session.commit()


def _keys(prefix: str) -> tuple[str, str, str, str]:
    """The spool (waiting), the entries being replayed, their bytes, and the replay lease."""
    keys = ("spooled", "processing", "bytes", "replaying")
    spooled, processing, size, lease = (f"{prefix}:deliveries:{key}" for key in keys)
    return spooled, processing, size, lease


async def spool(redis: Redis, prefix: str, max_entries: int, max_bytes: int, delivery: Delivery) -> bool:
    """Add a delivery to the spool; False if it holds `max_entries` or `max_bytes` already
    (being replayed included), so that an outage cannot fill Redis."""
    spooled, processing, size, _ = _keys(prefix)
    entry, most = delivery.encoded(), (str(max_entries), str(max_bytes))
    added = await redis.eval(_SPOOL, 3, spooled, processing, size, entry, *most)  # type: ignore[arg-type, misc]
    return bool(added)


async def spooled_count(redis: Redis, prefix: str) -> int:
    """Deliveries spooled and not yet recorded, being replayed included."""
    spooled, processing, _, _ = _keys(prefix)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.llen(spooled)
        pipe.llen(processing)
        waiting, replaying = await pipe.execute()
    return int(waiting) + int(replaying)


async def replay_spooled(sessions: Sessions, redis: Redis, prefix: str) -> int:
    """Record the spooled deliveries, oldest first, until none is left, Postgres is still away
    (the entry goes back to the front, for the next pass), or REPLAY_PASS_S has passed; how
    many were recorded or refused. Each entry is moved to the processing list (LMOVE) while it
    is replayed and removed once its outcome is committed: one a killed worker left there is
    replayed again by the next pass, which records nothing twice (a version stored is a
    duplicate). Run by one worker at a time (a lease); another finds it held and returns 0."""
    spooled, processing, size, lease = _keys(prefix)
    token = uuid4().hex
    if not await redis.set(lease, token, nx=True, px=int(REPLAY_LEASE_S * 1000)):
        return 0
    replayed, ends_at = 0, time.monotonic() + REPLAY_PASS_S
    try:
        while await redis.lmove(processing, spooled, "RIGHT", "LEFT") is not None:
            pass  # a killed pass's entries, back to the front in their order
        while time.monotonic() < ends_at and (
            entry := await redis.lmove(spooled, processing, "LEFT", "RIGHT")
        ):
            try:
                outcome = await _replay(sessions, Delivery.decoded(entry))
            except Exception as error:
                # Postgres away: first again next pass. A bug: last, not to hold up the others.
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.lrem(processing, 1, entry)
                    (pipe.lpush if database_away(error) else pipe.rpush)(spooled, entry)
                    await pipe.execute()
                if database_away(error):
                    log.warning("a spooled delivery waits for the database: %r", error)
                    break
                raise
            async with redis.pipeline(transaction=True) as pipe:
                pipe.lrem(processing, 1, entry)
                pipe.decrby(size, len(entry))
                await pipe.execute()
            DELIVERIES_REPLAYED.labels(outcome).inc()
            replayed += 1
        await redis.eval(_EMPTIED, 3, spooled, processing, size)  # type: ignore[misc]
    finally:
        await redis.eval(_RELEASE, 1, lease, token)  # type: ignore[misc]
    return replayed


async def _replay(sessions: Sessions, delivery: Delivery) -> str:
    """A spooled delivery recorded as a live one would be: "recorded", or "refused" (its
    refusal kept, unless the webhook was deleted meanwhile: nothing is kept of it then)."""
    async with closed_quietly(sessions) as session:
        try:
            parsed = await asyncio.to_thread(read_delivery, delivery.raw)
            report = await record(session, delivery.webhook_id, delivery.sent_hash, parsed)
        except ServiceError as refusal:
            try:
                await keep_refusal(
                    session, delivery.webhook_id, delivery.owner_key_id, refusal, delivery.body
                )
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
