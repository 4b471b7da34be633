"""Rows kept only for a while: dead viewer sessions and old webhook rejections are deleted,
by the store functions and by a worker's purge loop."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.webhooks import NewWebhookIn
from app.config import Settings
from app.idempotency import RequestHash
from app.store import keys, web_sessions, webhooks
from app.store.db import Sessions, in_batches
from app.store.models import ApiKey, WebhookRejection, WebSession
from tests.conftest import eventually, start_worker


async def new_key_id(sessions: Sessions, name: str) -> UUID:
    async with sessions.begin() as session:
        key, _ = await keys.create_key(session, name)
        return key.id


async def viewer_sessions(sessions: Sessions, key_id: UUID, count: int) -> list[UUID]:
    async with sessions.begin() as session:
        return [await web_sessions.start(session, key_id, lifetime_s=3600, most=count) for _ in range(count)]


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


async def test_dead_viewer_sessions_are_deleted_up_to_the_limit_and_live_ones_kept(
    sessions: Sessions,
) -> None:
    dead, live = await dead_and_live_sessions(sessions)

    async with sessions.begin() as session:
        first = await web_sessions.purge_dead(session, limit=2)
    assert first == 2 and len(await stored_sessions(sessions) - live) == 1
    async with sessions.begin() as session:
        rest = await web_sessions.purge_dead(session, limit=2)

    assert rest == len(dead) - 2
    assert await stored_sessions(sessions) == live


async def test_deleting_in_batches_commits_each_batch_and_goes_on_until_none_is_left(
    sessions: Sessions,
) -> None:
    dead, live = await dead_and_live_sessions(sessions)
    batches = 0

    async def fails_at_the_second_batch(session: AsyncSession, limit: int) -> int:
        nonlocal batches
        if (batches := batches + 1) == 2:
            raise RuntimeError("a fault in the second batch")
        return await web_sessions.purge_dead(session, limit)

    with pytest.raises(RuntimeError):
        await in_batches(sessions, fails_at_the_second_batch, size=1)
    assert len(await stored_sessions(sessions) - live) == len(dead) - 1, "the first batch stays deleted"

    assert await in_batches(sessions, web_sessions.purge_dead, size=1) == len(dead) - 1
    assert await stored_sessions(sessions) == live


async def rejections(sessions: Sessions, ages_days: list[float]) -> list[int]:
    """Refused deliveries (with bodies) to a new webhook, received that many days ago; their ids."""
    key_id = await new_key_id(sessions, "reviewer")
    async with sessions.begin() as session:
        new = webhooks.NewWebhook(key_id, "label_studio", "ls", None, RequestHash(NewWebhookIn(name="ls")))
        webhook, _ = await webhooks.create(session, new, max_live=1)
        for _ in ages_days:
            await webhooks.record_rejection(
                session, webhook.id, "unknown_items", "no such item", '{"task": "a prompt"}'
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


async def test_webhook_rejections_older_than_the_retention_are_deleted_up_to_the_limit(
    sessions: Sessions,
) -> None:
    *old, recent = await rejections(sessions, [8, 9, 6])

    async with sessions.begin() as session:
        first = await webhooks.purge_old_rejections(session, timedelta(days=7), limit=1)
    assert first == 1 and len(await stored_rejections(sessions)) == 2
    async with sessions.begin() as session:
        rest = await webhooks.purge_old_rejections(session, timedelta(days=7), limit=1)

    assert rest == 1
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


async def test_a_worker_deletes_the_expired_rows_around_one_another_transaction_holds(
    settings: Settings, sessions: Sessions, workers: list[Any]
) -> None:
    # One DELETE of every expired row waited for the held one, holding the others' locks the
    # while, until the statement timed out: nothing was deleted while the row stayed held.
    dead, live = await dead_and_live_sessions(sessions)
    held, *others = dead
    workers.append(start_worker(settings.model_copy(update={"purge_interval_s": 1})))

    async with sessions.begin() as holder:
        await holder.execute(select(WebSession.id).where(WebSession.id == held).with_for_update())

        async def others_deleted() -> bool:
            return await stored_sessions(sessions) == live | {held}

        await eventually(others_deleted, what="the expired rows that are not held deleted")

    async def held_deleted_once_free() -> bool:
        return await stored_sessions(sessions) == live

    await eventually(held_deleted_once_free, what="the held row deleted once released")
