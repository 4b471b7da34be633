"""How many wrong secrets each client address sent each webhook lately, counted in Redis so
that every API process sees them, and the refusal of an address that sent too many.

A webhook's URL is all a caller needs to try secrets, and each wrong one was answered as fast
as the API could and stored as a rejection. An address past the limit has its wrong secrets
refused with 429, unstored, until its window ends. The right secret is never refused: a secret
of 256 bits is not found by guessing, and a guesser behind the same proxy as the tool would
otherwise cost the tool its deliveries, which Label Studio does not send again. Other addresses
are counted apart. The count is a fixed window from the address's first wrong secret: two
Redis calls for a wrong secret, none for a right one.

Redis is not a store of record (the design): while it does not answer, deliveries are checked
against nothing rather than refused, since Label Studio does not send a refused one again."""

from __future__ import annotations

import logging
import math
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import TooManyWrongSecrets

log = logging.getLogger("aidsafe.api")

# The count, and its window set by the first wrong secret (a later one does not extend it).
_COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return count
"""


class WrongSecrets:
    """At most `limit` wrong secrets per webhook and client address in `window_s` seconds."""

    def __init__(self, redis: Redis, key_prefix: str, limit: int, window_s: int) -> None:
        self._redis = redis
        self._key_prefix = key_prefix
        self.limit = limit
        self.window_s = window_s
        self._count = redis.register_script(_COUNT)

    def _key(self, webhook_id: UUID, address: str) -> str:
        return f"{self._key_prefix}:webhook_wrong_secrets:{webhook_id}:{address}"

    async def refuse_if_over(self, webhook_id: UUID, address: str) -> None:
        """TooManyWrongSecrets (with the seconds left of the window) if `address` sent
        `webhook_id` its most wrong secrets in this window."""
        key = self._key(webhook_id, address)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                count, left_ms = await pipe.execute()
        except (RedisError, OSError):
            log.warning("could not read the wrong secrets sent to webhook %s", webhook_id, exc_info=True)
            return
        if count is not None and int(count) >= self.limit and left_ms > 0:
            raise TooManyWrongSecrets(
                f"this address sent this webhook {self.limit} wrong secrets in {self.window_s} s, "
                "the most it may: check the secret the tool sends, and try again after Retry-After",
                retry_after_s=math.ceil(left_ms / 1000),
            )

    async def count(self, webhook_id: UUID, address: str) -> None:
        """Count a wrong (or missing) secret `address` sent `webhook_id`."""
        try:
            count = await self._count(keys=[self._key(webhook_id, address)], args=[self.window_s * 1000])
        except (RedisError, OSError):
            log.warning("could not count a wrong secret sent to webhook %s", webhook_id, exc_info=True)
            return
        if count == self.limit:  # logged once a window, not at each refusal after it
            log.warning(
                "webhook %s: %s sent %d wrong secrets in %d s; refusing its deliveries till the window ends",
                webhook_id,
                address,
                self.limit,
                self.window_s,
            )
