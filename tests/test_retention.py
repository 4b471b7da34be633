"""Rows kept only for a while: dead viewer sessions and old webhook rejections are deleted,
by the store functions and by a worker's purge loop."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import select, update

from app.config import Settings
from app.store import keys, web_sessions, webhooks
from app.store.db import Sessions
from app.store.models import ApiKey, WebhookRejection, WebSession
from tests.conftest import eventually, start_worker


async def new_key_id(sessions: Sessions, name: str) -> UUID:
    async with sessions.begin() as session:
        key, _ = await keys.create_key(session, name)
        return key.id


async def viewer_sessions(sessions: Sessions, key_id: UUID, count: int) -> list[UUID]:
    async with sessions.begin() as session:
        return [await web_sessions.start(session, key_id, lifetime_s=3600) for _ in range(count)]


async def stored_sessions(sessions: Sessions) -> set[UUID]:
    async with sessions() as session:
        return set(await session.scalars(select(WebSession.id)))


async def dead_and_live_sessions(sessions: Sessions) -> tuple[set[UUID], set[UUID]]:
    """(ended, expired and revoked-key sessions; live ones), one or two of each."""
    alice, bob = await new_key_id(sessions, "alice"), await new_key_id(sessions, "bob")
    ended, expired, live = await viewer_sessions(sessions, alice, 3)
    revoked = await viewer_sessions(sessions, bob, 1)
    async with sessions.begin() as session:
        await web_sessions.end(session, ended)
        await session.execute(
            update(WebSession).where(WebSession.id == expired).values(expires_at=WebSession.created_at)
        )
        await session.execute(update(ApiKey).where(ApiKey.id == bob).values(revoked_at=ApiKey.created_at))
    return {ended, expired, *revoked}, {live}


async def test_dead_viewer_sessions_are_deleted_and_live_ones_kept(sessions: Sessions) -> None:
    dead, live = await dead_and_live_sessions(sessions)

    async with sessions.begin() as session:
        deleted = await web_sessions.purge_dead(session)

    assert deleted == len(dead)
    assert await stored_sessions(sessions) == live


async def rejections(sessions: Sessions, ages_days: list[float]) -> list[int]:
    """Refused deliveries (with bodies) to a new webhook, received that many days ago; their ids."""
    key_id = await new_key_id(sessions, "reviewer")
    async with sessions.begin() as session:
        webhook, _ = await webhooks.create(session, key_id, "label_studio", "ls")
        for _ in ages_days:
            await webhooks.record_rejection(
                session, webhook.id, key_id, "unknown_items", "no such item", '{"task": "a prompt"}'
            )
        ids = list(await session.scalars(select(WebhookRejection.id).order_by(WebhookRejection.id)))
        for rejection_id, age in zip(ids, ages_days, strict=True):
            received = WebhookRejection.received_at - timedelta(days=age)
            await session.execute(
                update(WebhookRejection)
                .where(WebhookRejection.id == rejection_id)
                .values(received_at=received)
            )
        return ids


async def stored_rejections(sessions: Sessions) -> list[int]:
    async with sessions() as session:
        return list(await session.scalars(select(WebhookRejection.id).order_by(WebhookRejection.id)))


async def test_webhook_rejections_older_than_the_retention_are_deleted(sessions: Sessions) -> None:
    old, recent = await rejections(sessions, [8, 6])

    async with sessions.begin() as session:
        deleted = await webhooks.purge_old_rejections(session, timedelta(days=7))

    assert deleted == 1
    assert await stored_rejections(sessions) == [recent]


async def test_a_worker_deletes_dead_viewer_sessions_and_old_webhook_rejections(
    settings: Settings, sessions: Sessions, workers: list[Any]
) -> None:
    dead, live = await dead_and_live_sessions(sessions)
    old, recent = await rejections(sessions, [3, 1])
    # The hazardous-text purge stays off: this loop runs regardless.
    workers.append(
        start_worker(settings.model_copy(update={"webhook_rejections_kept_days": 2, "purge_interval_s": 1}))
    )

    async def deleted() -> bool:
        return await stored_sessions(sessions) == live and await stored_rejections(sessions) == [recent]

    await eventually(deleted, what="the worker's deletion of dead sessions and old rejections")
