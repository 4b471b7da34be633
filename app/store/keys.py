"""API keys: random secrets shown once, stored as SHA-256 (they are high-entropy, so a
slow password hash buys nothing and would cost every request)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Unauthorized
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


async def authenticate(session: AsyncSession, secret: str) -> ApiKey:
    key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("unknown or revoked API key")
    return key
