"""The webhooks whose deliveries were verified lately: a delivery carrying one's secret is
read at once, before it waits for a database connection, and spooled while Postgres is away
(app/labeling/deliveries.py). Each API process holds the webhooks it verified; Redis holds
every process's for as long, so that one started during an outage, or one a load balancer
sends the tool's deliveries to for the first time, still knows them. Redis keeps the
secret's hash, never the secret."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("aidsafe.webhooks")
VERIFIED_FOR_S = 3600
MAX_VERIFIED = 10_000  # webhooks held per API process
# A webhook delivered to often is stored in Redis again at most this often per process; its
# entry there lives VERIFIED_FOR_S from then.
STORED_AGAIN_AFTER_S = 60.0
# Redis's answers about a webhook hold up its delivery's body: Label Studio gives up after 1 s.
REDIS_AT_MOST_S = 0.5


@dataclass(frozen=True, slots=True)
class Verified:
    secret_hash: str
    owner_key_id: UUID
    at: float  # monotonic
    stored_at: float  # when this process last stored it in Redis (monotonic)

    def carried_by(self, sent_hash: str | None) -> bool:
        return sent_hash is not None and hmac.compare_digest(sent_hash, self.secret_hash)


class VerifiedWebhooks:
    """The webhooks verified lately (for `max_age_s`; this process holds the `max_held`
    latest): their secret's hash and owner. A plain dict in the order they were last verified,
    and a Redis key per webhook that expires."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        max_age_s: int = VERIFIED_FOR_S,
        max_held: int = MAX_VERIFIED,
    ) -> None:
        self._redis, self._prefix = redis, prefix
        self._max_age_s, self._max_held = max_age_s, max_held
        self._held: dict[UUID, Verified] = {}

    async def remember(self, webhook_id: UUID, secret_hash: str, owner_key_id: UUID) -> None:
        """A delivery to the webhook carried its secret (of hash `secret_hash`). Redis failing
        only logs: the delivery goes on without it."""
        now = time.monotonic()
        held = self._held.pop(webhook_id, None)  # to the end: the latest verified
        same_secret = held is not None and held.secret_hash == secret_hash
        stored_at = held.stored_at if held is not None and same_secret else float("-inf")
        due = now - stored_at >= STORED_AGAIN_AFTER_S
        # Marked stored before it is: if Redis fails, the next try is a while away, not on
        # every delivery (each would wait for it).
        self._held[webhook_id] = Verified(secret_hash, owner_key_id, now, now if due else stored_at)
        if len(self._held) > self._max_held:
            del self._held[next(iter(self._held))]
        if not due:
            return
        try:
            async with asyncio.timeout(REDIS_AT_MOST_S):
                await self._redis.set(
                    self._key(webhook_id), f"{secret_hash} {owner_key_id}", ex=self._max_age_s
                )
        except (RedisError, TimeoutError) as error:
            log.warning("webhook %s: its verification was not stored in Redis: %r", webhook_id, error)

    def held(self, webhook_id: UUID, sent_hash: str | None) -> Verified | None:
        """The webhook, if this process verified it lately and the delivery carries its secret."""
        held = self._held.get(webhook_id)
        if held is None or time.monotonic() - held.at > self._max_age_s or not held.carried_by(sent_hash):
            return None
        return held

    async def get(
        self, webhook_id: UUID, sent_hash: str | None, at_most_s: float | None = REDIS_AT_MOST_S
    ) -> Verified | None:
        """The webhook, if any API process verified it lately and the delivery carries its
        secret; None too if Redis cannot tell (within `at_most_s`, or its own timeout)."""
        if (held := self.held(webhook_id, sent_hash)) is not None or sent_hash is None:
            return held
        try:
            async with asyncio.timeout(at_most_s):
                stored = await self._redis.get(self._key(webhook_id))
        except (RedisError, TimeoutError) as error:
            log.warning("webhook %s: Redis could not tell whether it was verified: %r", webhook_id, error)
            return None
        if stored is None:
            return None
        secret_hash, owner_key_id = stored.decode().split(" ")
        verified = Verified(secret_hash, UUID(owner_key_id), time.monotonic(), float("-inf"))
        return verified if verified.carried_by(sent_hash) else None

    def _key(self, webhook_id: UUID) -> str:
        return f"{self._prefix}:webhooks:{webhook_id}:verified"
