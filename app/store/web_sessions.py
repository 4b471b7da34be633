"""Viewer login sessions (app/web/session.py): started at login, ended at logout, and live
only while unexpired and their API key is not revoked; the workers delete the dead ones."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast
from uuid import UUID

from sqlalchemy import CursorResult, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.store.models import ApiKey, WebSession


async def start(session: AsyncSession, key_id: UUID, lifetime_s: float, most: int) -> UUID:
    """A new session for this key, in the caller's transaction; its id. The key keeps `most`
    live sessions at most: the new one and its newest others. Its other sessions (the oldest
    live ones, and those logged out of or expired) are deleted, so a key logging in in a loop
    holds `most` rows, not one per login. A key's logins take turns until the caller commits."""
    # Two logins at once would each miss the other's uncommitted session and keep `most` beside
    # it. The turn is the key's logins' own, not its row's: a login never waits behind the
    # key's other writes, and the next one reads this one's session (READ COMMITTED).
    turn = f"viewer sessions of {key_id}"
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(turn, 0))))
    row = WebSession(key_id=key_id, expires_at=func.now() + timedelta(seconds=lifetime_s))
    session.add(row)
    await session.flush()
    # Live ones only: those logged out of must not take the places of browsers still in. The
    # new one is kept by its id, not its time: a login that waited for its turn may have begun
    # (its now()) before the one it waited for, and would seem the older.
    others_kept = (
        select(WebSession.id)
        .where(
            WebSession.key_id == key_id,
            WebSession.id != row.id,
            WebSession.ended_at.is_(None),
            WebSession.expires_at > func.now(),
        )
        .order_by(WebSession.created_at.desc(), WebSession.id.desc())
        .limit(most - 1)
    )
    await session.execute(
        delete(WebSession).where(
            WebSession.key_id == key_id, WebSession.id != row.id, WebSession.id.not_in(others_kept)
        )
    )
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
