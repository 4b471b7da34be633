"""How many failures of one kind (wrong webhook secrets, unknown API keys) each client address
had lately, counted in Redis so that every API process sees them, and the refusal of an
address that had too many.

Anyone can send an API key, or a delivery with a secret to a webhook's URL, and each wrong
one was answered as fast as the API could: a lookup in Postgres each (of the key, of the
webhook), and a stored rejection for a wrong secret. An address past the limit has its further
failures refused with 429 until its window ends. What is right (a known key, a webhook's
secret) is never refused: it is not found by guessing, and a guesser behind the same proxy as
a tenant or its tool would otherwise cost them their requests, and Label Studio does not send
a refused delivery again. Other addresses are counted apart. The count is a fixed window from
the address's first failure: one Redis call per failure, none for a success.

An IPv6 address counts as its /64 network (`counting_unit`): a host is usually given a whole
/64, so counted per address it could send each guess from a fresh one.

Each process also remembers, till its window ends, an address it saw past its limit: the
callers that can refuse before their lookup check that memory (refused_for_s), not Redis, so
that a request of a known key costs no Redis call. Another process learns of it at its own
next failure there. (A wrong secret is known wrong only once its webhook is looked up.)

Redis is not a store of record (the design): while it does not answer, failures are counted
nowhere and nothing is refused for them, since Label Studio does not send a refused delivery
again."""

from __future__ import annotations

import ipaddress
import logging
import math
import time

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
        self._refused_till: dict[str, float] = {}  # address (and scope): when its window ends
        self._prune_at = 1  # drop ended windows once this many are held

    async def count(self, address: str, scope: str = "") -> int | None:
        """Count a failure of `address`: the seconds left of its window if it is now past
        its limit (the caller refuses), else None (also while Redis does not answer)."""
        address = counting_unit(address)
        key = f"{scope}:{address}"
        try:
            counted = await self._count(keys=[f"{self._key_prefix}:{key}"], args=[self.window_s * 1000])
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
        if len(self._refused_till) >= self._prune_at:
            now = time.monotonic()
            self._refused_till = {k: till for k, till in self._refused_till.items() if till > now}
            self._prune_at = 2 * max(len(self._refused_till), 1)
        self._refused_till[key] = time.monotonic() + left_ms / 1000
        return math.ceil(left_ms / 1000)

    def refused_for_s(self, address: str, scope: str = "") -> int | None:
        """The seconds left of the window in which this process saw `address` past its limit,
        or None: no Redis call (nor, while no address is refused, a parse of `address`)."""
        if not self._refused_till:
            return None
        till = self._refused_till.get(f"{scope}:{counting_unit(address)}")
        left_s = None if till is None else till - time.monotonic()
        return math.ceil(left_s) if left_s is not None and left_s > 0 else None


def counting_unit(address: str) -> str:
    """What `address`'s failures are counted with: an IPv6 address's /64 network, the IPv4
    address an IPv4-mapped IPv6 one stands for, any other as given ("unknown" included)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def counted_as(address: str) -> str:
    """What a refusal tells the client was counted (`counting_unit`): this address, or the /64
    network of an IPv6 one, which a neighbour's failures count towards too."""
    unit = counting_unit(address)
    return f"this address's /64 network ({unit})" if unit.endswith("/64") else "this address"


def _to(scope: str) -> str:
    return f" to {scope}" if scope else ""
