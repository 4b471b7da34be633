"""How many failures of one kind (wrong webhook secrets) each client address had lately,
counted in Redis so that every API process sees them, and the refusal of an address that had
too many.

Anyone who knows a webhook's URL can send it secrets, and each wrong one was answered as fast
as the API could and stored as a rejection. An address past the limit has its further
failures refused with 429 until its window ends. What is right (the webhook's secret) is never
refused: it is not found by guessing, and a guesser behind the same proxy as the tool would
otherwise cost it its deliveries, which Label Studio does not send again. Other addresses are
counted apart. The count is a fixed window from the address's first failure: one Redis call
per failure, none for a success.

Redis is not a store of record (the design): while it does not answer, failures are counted
nowhere and nothing is refused for them, since Label Studio does not send a refused delivery
again."""

from __future__ import annotations

import logging
import math

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("aidsafe.api")

# The count and the milliseconds left of its window, set by the first failure (a later one
# does not extend it).
_COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return {count, redis.call('PTTL', KEYS[1])}
"""


class Failures:
    """At most `limit` failures (`what`, for the logs and Redis keys) per client address, and
    per scope if the caller gives one ("webhook <id>"), in `window_s` seconds."""

    def __init__(self, redis: Redis, key_prefix: str, what: str, limit: int, window_s: int) -> None:
        self._redis = redis
        self._key_prefix = f"{key_prefix}:{what.replace(' ', '_')}"
        self._what = what
        self.limit = limit
        self.window_s = window_s
        self._count = redis.register_script(_COUNT)

    async def count(self, address: str, scope: str = "") -> int | None:
        """Count a failure of `address`: the seconds left of its window if it is now past
        its limit (the caller refuses), else None (also while Redis does not answer)."""
        try:
            counted = await self._count(
                keys=[f"{self._key_prefix}:{scope}:{address}"], args=[self.window_s * 1000]
            )
        except (RedisError, OSError):
            log.warning("could not count the %s sent by %s%s", self._what, address, _to(scope), exc_info=True)
            return None
        count, left_ms = int(counted[0]), int(counted[1])
        if count == self.limit:  # logged once a window, not at each refusal after it
            log.warning(
                "%s sent %d %s%s in %d s; refusing more till the window ends",
                address,
                self.limit,
                self._what,
                _to(scope),
                self.window_s,
            )
        if count <= self.limit or left_ms <= 0:
            return None
        return math.ceil(left_ms / 1000)


def _to(scope: str) -> str:
    return f" to {scope}" if scope else ""
