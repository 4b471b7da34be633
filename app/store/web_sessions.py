"""Viewer login sessions (app/web/session.py): started at login, ended at logout, and live
only while unexpired and their API key is not revoked; the workers delete the dead ones."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast
from uuid import UUID

from sqlalchemy import CursorResult, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.store.models import ApiKey, WebSession

# Browsers one key may be logged in from. Each login makes a row that lives for hours, and a
# live one is never purged: a key logging in in a loop (150 a second) grew the table without bound.
MAX_SESSIONS_PER_KEY = 100


async def start(session: AsyncSession, key_id: UUID, lifetime_s: float) -> UUID:
    """A new session for this key, in the caller's transaction; its id. The key's sessions
    other than its newest MAX_SESSIONS_PER_KEY live ones are deleted (logged out, or dead)."""
    row = WebSession(key_id=key_id, expires_at=func.now() + timedelta(seconds=lifetime_s))
    session.add(row)
    await session.flush()
    # Live ones only: those logged out of must not take the places of browsers still in.
    newest = (
        select(WebSession.id)
        .where(WebSession.key_id == key_id, WebSession.ended_at.is_(None), WebSession.expires_at > func.now())
        .order_by(WebSession.created_at.desc(), WebSession.id.desc())
        .limit(MAX_SESSIONS_PER_KEY)
    )
    await session.execute(delete(WebSession).where(WebSession.key_id == key_id, WebSession.id.not_in(newest)))
    return row.id


async def live_key(session: AsyncSession, session_id: UUID) -> ApiKey | None:
    """The key of this session if the session is live: not ended, not expired, key not revoked."""
    return await session.scalar(
        select(ApiKey)
        .join(WebSession, WebSession.key_id == ApiKey.id)
        .where(
            WebSession.id == session_id,
            WebSession.ended_at.is_(None),
            WebSession.expires_at > func.now(),
            ApiKey.revoked_at.is_(None),
        )
    )


async def end(session: AsyncSession, session_id: UUID) -> None:
    """End the session, in the caller's transaction; ending it again changes nothing."""
    await session.execute(
        update(WebSession)
        .where(WebSession.id == session_id, WebSession.ended_at.is_(None))
        .values(ended_at=func.now())
    )


async def purge_dead(session: AsyncSession, limit: int) -> int:
    """Delete, in the caller's transaction, up to `limit` sessions that can never be live
    again: ended, expired, or of a revoked key (a key is never unrevoked); how many. Rows
    another transaction holds are left for a later call."""
    revoked = select(ApiKey.id).where(ApiKey.revoked_at.is_not(None))
    dead = (
        select(WebSession.id)
        .where(
            or_(
                WebSession.ended_at.is_not(None),
                WebSession.expires_at <= func.now(),
                WebSession.key_id.in_(revoked),
            )
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    deleted = await session.execute(delete(WebSession).where(WebSession.id.in_(dead)))
    return cast(CursorResult[Any], deleted).rowcount  # a DELETE's result
