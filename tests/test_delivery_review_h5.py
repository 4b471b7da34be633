"""Reviewer H5's demonstrations on 6a1a98b (deliveries read before the lookup, verified
webhooks in Redis, per-key spool shares)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select, text

from app.config import Settings
from app.labeling import deliveries
from app.store.db import Sessions
from app.store.models import Webhook
from tests.conftest import api_client, eventually
from tests.test_api import error_of
from tests.test_delivery_spool import api_whose_postgres_goes, spool_of, verified_webhook
from tests.test_labeling import stored
from tests.test_webhooks import HEADER, SKIPPED_EVENT, deliver, new_webhook, rejections


async def test_a_refused_body_of_a_webhook_delivered_to_lately_is_still_kept(
    api: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    """Read before the lookup, outside its try: a body not JSON, too large or stalled was
    answered 4xx and its refusal never kept (GET .../rejections showed nothing)."""
    webhook = await new_webhook(api, auth)
    assert (await deliver(api, webhook, SKIPPED_EVENT)).status_code == 200  # now held here
    path = httpx.URL(webhook["url"]).path

    response = await api.post(
        path, content=b"{}", headers={HEADER: webhook["secret"], "Content-Type": "text/plain"}
    )

    error_of(response, 400, "bad_request")
    assert [r["code"] for r in await rejections(api, auth, webhook)] == ["bad_request"]


async def test_a_webhook_another_process_verified_is_read_before_the_lookup_too(
    settings: Settings, sessions: Sessions, auth: dict[str, str]
) -> None:
    """README: a webhook verified by any API process is 'read at once, before it waits for
    the database'. Only one this process holds is: one known through Redis alone waits unread
    behind a held row or a starved pool (30 s), past Label Studio's 1 s."""
    async with api_client(settings) as first:
        webhook = await new_webhook(first, auth)
        assert (await deliver(first, webhook, SKIPPED_EVENT)).status_code == 200
    read = asyncio.Event()

    async def watched() -> AsyncIterator[bytes]:
        read.set()
        yield json.dumps(SKIPPED_EVENT).encode()

    headers = {HEADER: webhook["secret"], "Content-Type": "application/json"}
    async with api_client(settings) as second, sessions.begin() as session:
        held = select(Webhook.id).where(Webhook.id == UUID(webhook["id"])).with_for_update()
        await session.execute(held)
        delivery = asyncio.create_task(
            second.post(httpx.URL(webhook["url"]).path, content=watched(), headers=headers)
        )
        try:
            await asyncio.wait_for(read.wait(), 1.0)
        finally:
            await session.commit()
            answer = await delivery
    assert answer.status_code == 200


async def test_an_undecodable_spool_entry_does_not_hold_up_the_others(
    settings: Settings, sessions: Sessions, auth: dict[str, str], redis: Redis
) -> None:
    """'A bug: last, not to hold up the others.' Delivery.decoded moved out of the try: an
    entry it cannot read stays in processing, goes back to the front each pass, and every
    delivery behind it waits for good."""
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()
        assert (await deliver(api, webhook, event)).status_code == 202
    spooled = f"{settings.redis_key_prefix}:deliveries:spooled"
    await redis.lpush(spooled, b"not a spooled delivery")  # type: ignore[misc]

    for _ in range(2):
        with pytest.raises(ValueError):
            await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix)

    assert [r.external_id for r in await stored(sessions)] == ["601"]
    assert await spool_of(redis, settings) == [b"not a spooled delivery"]


async def test_an_entry_two_passes_replayed_after_a_lease_expired_is_taken_off_the_counts_once(
    settings: Settings, sessions: Sessions, auth: dict[str, str], redis: Redis
) -> None:
    """A pass whose entry outlives REPLAY_LEASE_S (a held row, a slow Postgres) and the next
    pass, which takes that entry back from processing, both remove it: LREM finds it once, the
    counts are decremented twice, and the key's share (and the spool's bytes) undercount what
    is spooled until the spool is next empty."""
    prefix = settings.redis_key_prefix
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        other = await new_webhook(api, auth, "ls-other")
        assert (await deliver(api, other, SKIPPED_EVENT)).status_code == 200
        await proxy.close()
        assert (await deliver(api, webhook, event)).status_code == 202
        [entry] = await spool_of(redis, settings)
        key_id = json.loads(entry.partition(b"\n")[0])["owner_key_id"]

        async with sessions() as first_held, sessions() as other_held, sessions() as watcher:
            for session, held in ((first_held, webhook), (other_held, other)):
                await session.execute(
                    select(Webhook.id).where(Webhook.id == UUID(held["id"])).with_for_update()
                )
            first_pid = await first_held.scalar(text("select pg_backend_pid()"))

            async def waiting_on_first() -> int:
                blocked = text(
                    "select count(*) from pg_stat_activity where :pid = any(pg_blocking_pids(pid))"
                )
                count = int(await watcher.scalar(blocked, {"pid": first_pid}) or 0)
                await watcher.rollback()
                return count

            passes = [asyncio.create_task(deliveries.replay_spooled(sessions, redis, prefix))]
            await eventually(lambda: _at_least(waiting_on_first, 1), what="pass A waiting")
            await redis.delete(f"{prefix}:deliveries:replaying")  # REPLAY_LEASE_S later
            passes.append(asyncio.create_task(deliveries.replay_spooled(sessions, redis, prefix)))
            await eventually(lambda: _at_least(waiting_on_first, 2), what="pass B waiting")
            assert (await deliver(api, other, event)).status_code == 202  # one more, another row
            [waiting] = await spool_of(redis, settings)

            await first_held.commit()
            done, _ = await asyncio.wait(passes, return_when=asyncio.FIRST_COMPLETED)
            counts = await redis.hgetall(f"{prefix}:deliveries:keys")  # type: ignore[misc]
            size = await redis.get(f"{prefix}:deliveries:bytes")
            await other_held.commit()
            await asyncio.gather(*passes)

    assert (counts.get(key_id.encode()), size) == (b"1", str(len(waiting)).encode())


async def _at_least(count: Callable[[], Awaitable[int]], least: int) -> bool:
    return await count() >= least
