"""API keys as the API checks them: each process remembers a key it found for a few seconds,
and refuses the unknown keys of an address that sent too many without looking them up.

Every request authenticates, and looking the key up in Postgres was about a quarter of the
CPU of a GET /v1/jobs/{id}. So each API process remembers a key it has found for
`max_age_s` (setting `api_key_cache_s`; 0 looks every key up). The price: a revoked key
keeps working for up to that long. Unknown and revoked keys are never remembered.

Each unknown or revoked key is a lookup too, which anyone may send: they are counted per
client address (`failures`, shared with the deliveries to unknown webhooks), and past the
limit an address's keys are checked against the live keys' hashes held in memory
(KnownValues) instead: an unknown one is refused with 429, a known one served as ever.
"""

from __future__ import annotations

from sqlalchemy import select

from app.api.failures import Failures, counted_as
from app.api.known_values import KnownValues
from app.api.recent import Recent
from app.errors import TooManyWrongKeys, Unauthorized
from app.store import keys
from app.store.db import Sessions
from app.store.models import ApiKey


class KnownKeys:
    def __init__(self, sessions: Sessions, max_age_s: float, failures: Failures) -> None:
        self._sessions = sessions
        self._found: Recent[str, ApiKey] = Recent(max_age_s)  # by key hash
        self._failures = failures
        self._live = KnownValues(sessions, select(ApiKey.key_hash).where(ApiKey.revoked_at.is_(None)))

    async def authenticate(self, secret: str, address: str) -> ApiKey:
        """keys.authenticate (raises Unauthorized), answered from memory for `max_age_s`;
        TooManyWrongKeys for an unknown key from an address past its limit."""
        key_hash = keys.hash_key(secret)
        refused_for_s = self._failures.refused_for_s(address)
        if refused_for_s is not None and not await self._live.holds(key_hash):
            raise too_many_wrong_keys(self._failures, address, refused_for_s)
        try:
            return await self._found.get(key_hash, lambda: keys.authenticate(self._sessions, secret))
        except Unauthorized:
            if (refused_for_s := await self._failures.count(address)) is not None:
                raise too_many_wrong_keys(self._failures, address, refused_for_s) from None
            raise

    async def aclose(self) -> None:
        """Stop the lookups in flight (before the database they read goes)."""
        await self._found.aclose()
        await self._live.aclose()


def too_many_wrong_keys(failures: Failures, address: str, retry_after_s: int) -> TooManyWrongKeys:
    return TooManyWrongKeys(
        f"{counted_as(address)} sent {failures.limit} unknown or revoked API keys (or deliveries to unknown "
        f"webhooks) in {failures.window_s} s, the most it may: check the key or URL you send, and "
        "try again after Retry-After",
        retry_after_s=retry_after_s,
    )
