"""API keys: random secrets shown once, stored as SHA-256 (they are high-entropy, so a
slow password hash buys nothing and would cost every request)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from uuid import UUID

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Unauthorized
from app.store.db import Sessions, driver_connection
from app.store.driver_statements import DriverStatement
from app.store.models import ApiKey

KEY_PREFIX = "aidsafe_"
# Lets a key read hazardous text: whispered beliefs, rejected CoTs, guard rationales and the
# turns that hold them. Without it a key sees that such text exists, never the text.
HAZARDOUS_READ = "hazardous:read"
SCOPES = frozenset({HAZARDOUS_READ})


class UnknownScope(ValueError):
    pass


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_key(session: AsyncSession, name: str, scopes: Iterable[str] = ()) -> tuple[ApiKey, str]:
    """A new key and its secret; the secret is not stored and cannot be shown again.
    Raises UnknownScope for a scope not in SCOPES."""
    wanted = sorted(set(scopes))
    if unknown := [scope for scope in wanted if scope not in SCOPES]:
        raise UnknownScope(f"unknown scope {', '.join(unknown)}; known scopes: {', '.join(sorted(SCOPES))}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, prefix=secret[: len(KEY_PREFIX) + 6], key_hash=hash_key(secret), scopes=wanted)
    session.add(key)
    await session.flush()
    return key, secret


async def authenticate(sessions: Sessions, secret: str) -> ApiKey:
    """The key with this secret, if it is not revoked. Every API request asks, so this is
    one statement on the driver, outside any transaction: no ORM, no BEGIN/ROLLBACK."""
    async with driver_connection(sessions) as connection:
        row = await _BY_HASH.fetchrow(connection, key_hash=hash_key(secret))
    if row is None or row["revoked_at"] is not None:
        raise Unauthorized("unknown or revoked API key")
    return ApiKey(**row)


async def is_live(session: AsyncSession, key_id: UUID) -> bool:
    """Whether the key is still there and not revoked: what a long-lived stream checks as it goes."""
    live = select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    return await session.scalar(live) is not None


async def hold(session: AsyncSession, key_id: UUID) -> None:
    """Lock the key's row until the caller's transaction ends (FOR NO KEY UPDATE), so that the
    key's requests that count or number its rows take turns. The inserts of rows naming the
    key lock it FOR KEY SHARE only: they do not wait. API routes open the session in the key's
    turn (KeyWriteSession), so the key's requests do not wait here, each on a connection."""
    await session.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update(key_share=True))


def reads_hazardous(key: ApiKey) -> bool:
    return HAZARDOUS_READ in key.scopes


# Every column, by the names ApiKey's attributes have.
_BY_HASH = DriverStatement(select(ApiKey.__table__).where(ApiKey.key_hash == bindparam("key_hash")))
