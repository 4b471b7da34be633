"""API keys as the API checks them: each process remembers a key it found for a few seconds.

Every request authenticates, and looking the key up in Postgres was about a quarter of the
CPU of a GET /v1/jobs/{id}. So each API process remembers a key it has found for
`max_age_s` (setting `api_key_cache_s`; 0 looks every key up). The price: a revoked key
keeps working for up to that long. Unknown and revoked keys are never remembered.
"""

from __future__ import annotations

from app.api.recent import Recent
from app.store import keys
from app.store.db import Sessions
from app.store.models import ApiKey


class KnownKeys:
    def __init__(self, sessions: Sessions, max_age_s: float) -> None:
        self._sessions = sessions
        self._found: Recent[str, ApiKey] = Recent(max_age_s)  # by key hash

    async def authenticate(self, secret: str) -> ApiKey:
        """keys.authenticate (raises Unauthorized), answered from memory for `max_age_s`."""
        return await self._found.get(keys.hash_key(secret), lambda: keys.authenticate(self._sessions, secret))

    async def aclose(self) -> None:
        """Stop the lookups in flight (before the database they read goes)."""
        await self._found.aclose()
