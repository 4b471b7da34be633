"""API keys: random secrets shown once, stored as SHA-256 (they are high-entropy, so a
slow password hash buys nothing and would cost every request)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Unauthorized
from app.store.db import Sessions, driver_connection
from app.store.models import ApiKey

KEY_PREFIX = "aidsafe_"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_key(session: AsyncSession, name: str) -> tuple[ApiKey, str]:
    """A new key and its secret; the secret is not stored and cannot be shown again."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, prefix=secret[: len(KEY_PREFIX) + 6], key_hash=hash_key(secret))
    session.add(key)
    await session.flush()
    return key, secret


async def authenticate(sessions: Sessions, secret: str) -> ApiKey:
    """The key with this secret, if it is not revoked. Every API request asks, so this is
    one statement on the driver, outside any transaction: no ORM, no BEGIN/ROLLBACK."""
    async with driver_connection(sessions) as connection:
        row = await connection.fetchrow(_BY_HASH, hash_key(secret))
    if row is None or row["revoked_at"] is not None:
        raise Unauthorized("unknown or revoked API key")
    return ApiKey(**row)


_BY_HASH = "SELECT id, name, prefix, key_hash, created_at, revoked_at FROM api_keys WHERE key_hash = $1"
