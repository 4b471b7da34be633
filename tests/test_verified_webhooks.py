"""The webhooks verified lately (app/api/verified_webhooks.py), against the real Redis: what an
API process holds, what another one reads from Redis, for how long, and what it does while
Redis is away. A delivery is spooled in an outage only if one of these knows its webhook."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import pytest
from redis.asyncio import Redis

from app.api.verified_webhooks import VERIFIED_FOR_S, VerifiedWebhooks
from app.config import Settings
from app.store.keys import hash_key
from tests.test_silent_connections import SilencingProxy, _proxy_to, _through

SECRET_HASH, OTHER_HASH = hash_key("aidsafe_whsec_right"), hash_key("aidsafe_whsec_other")
OWNER = uuid4()


def redis_key(settings: Settings, webhook_id: UUID) -> str:
    return f"{settings.redis_key_prefix}:webhooks:{webhook_id}:verified"


@pytest.fixture
async def hanging_redis(settings: Settings) -> AsyncIterator[tuple[Redis, SilencingProxy]]:
    """A Redis client through a proxy that can be made to hang (and recover): its calls then
    fail after half a second, as over a connection to a Redis that went away."""
    proxy = await _proxy_to(settings.redis_url, 6379)
    client = Redis.from_url(_through(proxy, settings).redis_url, socket_timeout=0.5)
    yield client, proxy
    await client.aclose()
    await proxy.close()


async def test_a_webhook_verified_here_is_held_for_its_secret_only(settings: Settings, redis: Redis) -> None:
    verified, webhook_id = VerifiedWebhooks(redis, settings.redis_key_prefix), uuid4()
    await verified.remember(webhook_id, SECRET_HASH, OWNER)

    held = verified.held(webhook_id, SECRET_HASH)

    assert held is not None and (held.secret_hash, held.owner_key_id) == (SECRET_HASH, OWNER)
    assert verified.held(webhook_id, OTHER_HASH) is None
    assert verified.held(webhook_id, None) is None  # no secret sent
    assert verified.held(uuid4(), SECRET_HASH) is None  # another webhook


async def test_another_process_reads_a_webhook_verified_here_from_redis_for_its_secret_only(
    settings: Settings, redis: Redis
) -> None:
    """A process started during an outage, or one a load balancer sends the tool to for the
    first time, still spools its deliveries."""
    here, webhook_id = VerifiedWebhooks(redis, settings.redis_key_prefix), uuid4()
    await here.remember(webhook_id, SECRET_HASH, OWNER)
    elsewhere = VerifiedWebhooks(redis, settings.redis_key_prefix)

    found = await elsewhere.get(webhook_id, SECRET_HASH)

    assert found is not None and (found.secret_hash, found.owner_key_id) == (SECRET_HASH, OWNER)
    assert elsewhere.held(webhook_id, SECRET_HASH) is None  # not verified in this process
    assert await elsewhere.get(webhook_id, OTHER_HASH) is None
    assert await elsewhere.get(webhook_id, None) is None
    assert await elsewhere.get(uuid4(), SECRET_HASH) is None
    another_deployment = VerifiedWebhooks(redis, f"{settings.redis_key_prefix}:other")
    assert await another_deployment.get(webhook_id, SECRET_HASH) is None


async def test_redis_keeps_the_secrets_hash_and_owner_for_an_hour_never_the_secret(
    settings: Settings, redis: Redis
) -> None:
    verified, webhook_id = VerifiedWebhooks(redis, settings.redis_key_prefix), uuid4()

    await verified.remember(webhook_id, SECRET_HASH, OWNER)

    assert await redis.get(redis_key(settings, webhook_id)) == f"{SECRET_HASH} {OWNER}".encode()
    assert VERIFIED_FOR_S - 5 <= await redis.ttl(redis_key(settings, webhook_id)) <= VERIFIED_FOR_S == 3600


async def test_a_webhook_verified_longer_ago_than_its_age_is_known_no_more(
    settings: Settings, redis: Redis
) -> None:
    here = VerifiedWebhooks(redis, settings.redis_key_prefix, max_age_s=1)
    elsewhere, webhook_id = VerifiedWebhooks(redis, settings.redis_key_prefix, max_age_s=1), uuid4()
    await here.remember(webhook_id, SECRET_HASH, OWNER)
    assert here.held(webhook_id, SECRET_HASH) is not None

    await asyncio.sleep(1.2)

    assert here.held(webhook_id, SECRET_HASH) is None
    assert await here.get(webhook_id, SECRET_HASH) is None
    assert await elsewhere.get(webhook_id, SECRET_HASH) is None


async def test_a_process_holds_the_webhooks_verified_latest_up_to_its_most(
    settings: Settings, redis: Redis
) -> None:
    verified = VerifiedWebhooks(redis, settings.redis_key_prefix, max_held=2)
    first, second, third = uuid4(), uuid4(), uuid4()
    for webhook_id in (first, second, first, third):  # `first` verified again: `second` is the oldest
        await verified.remember(webhook_id, SECRET_HASH, OWNER)

    held = [verified.held(webhook_id, SECRET_HASH) is not None for webhook_id in (first, second, third)]

    assert held == [True, False, True]


async def test_a_webhook_delivered_to_often_is_stored_in_redis_again_only_after_a_while_or_a_new_secret(
    settings: Settings, redis: Redis
) -> None:
    """A busy tool's every delivery would otherwise cost a Redis write; a secret rotated must
    reach the other processes at once."""
    verified, webhook_id = VerifiedWebhooks(redis, settings.redis_key_prefix), uuid4()
    await verified.remember(webhook_id, SECRET_HASH, OWNER)
    await redis.delete(redis_key(settings, webhook_id))

    await verified.remember(webhook_id, SECRET_HASH, OWNER)
    assert await redis.get(redis_key(settings, webhook_id)) is None  # within the minute

    await verified.remember(webhook_id, OTHER_HASH, OWNER)
    assert await redis.get(redis_key(settings, webhook_id)) == f"{OTHER_HASH} {OWNER}".encode()
    assert verified.held(webhook_id, OTHER_HASH) is not None
    assert verified.held(webhook_id, SECRET_HASH) is None


async def test_while_redis_is_away_a_verification_is_held_here_logged_and_stored_again_a_minute_later(
    settings: Settings,
    redis: Redis,
    hanging_redis: tuple[Redis, SilencingProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, proxy = hanging_redis
    verified, webhook_id = VerifiedWebhooks(client, settings.redis_key_prefix), uuid4()
    proxy.hang()

    with caplog.at_level(logging.WARNING, logger="aidsafe.webhooks"):
        await verified.remember(webhook_id, SECRET_HASH, OWNER)  # the delivery goes on

    assert verified.held(webhook_id, SECRET_HASH) is not None
    assert await verified.get(webhook_id, SECRET_HASH) is not None  # without asking Redis
    [warning] = [message for message in caplog.messages if message.startswith(f"webhook {webhook_id}:")]
    assert warning.startswith(f"webhook {webhook_id}: its verification was not stored in Redis: TimeoutError")
    proxy.recover()
    # Tried again a minute later, not by every delivery meanwhile: each would wait for Redis.
    await verified.remember(webhook_id, SECRET_HASH, OWNER)
    assert await VerifiedWebhooks(redis, settings.redis_key_prefix).get(webhook_id, SECRET_HASH) is None


async def test_while_redis_is_away_another_process_cannot_tell_and_knows_no_webhook(
    settings: Settings,
    redis: Redis,
    hanging_redis: tuple[Redis, SilencingProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    webhook_id = uuid4()
    await VerifiedWebhooks(redis, settings.redis_key_prefix).remember(webhook_id, SECRET_HASH, OWNER)
    client, proxy = hanging_redis
    proxy.hang()

    with caplog.at_level(logging.WARNING, logger="aidsafe.webhooks"):
        found = await VerifiedWebhooks(client, settings.redis_key_prefix).get(webhook_id, SECRET_HASH)

    assert found is None
    [warning] = [message for message in caplog.messages if message.startswith(f"webhook {webhook_id}:")]
    assert warning.startswith(
        f"webhook {webhook_id}: Redis could not tell whether it was verified: TimeoutError"
    )
