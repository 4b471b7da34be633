"""Label Studio sends each delivery once: one that carried its webhook's secret while Postgres
was away is spooled to Redis (202) and recorded by a worker once Postgres is back, exactly as a
live delivery would be (app/labeling/deliveries.py). The API's Postgres goes away through a proxy
that is closed; the shared Postgres itself stays up, and the replays go to it directly."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.sql.dml import Update

from app.config import Settings
from app.labeling import deliveries
from app.labeling.deliveries import DeadDelivery, Delivery, SpoolLimits
from app.metrics import API_REGISTRY
from app.store.db import Sessions, make_engine, make_sessions
from app.store.keys import hash_key
from app.store.models import ApiKey, Webhook, WebhookRejection
from tests.conftest import WebhookTarget, api_client, eventually, new_key, start_worker, worker_env
from tests.test_api import error_of
from tests.test_cli import AIDSAFE
from tests.test_labeling import PROMPTS, fixture, graded_job, item_ids, stored
from tests.test_silent_connections import SilencingProxy, _database_through, _proxy_to
from tests.test_webhooks import HEADER, SKIPPED_EVENT, Headers, deliver, new_webhook, rejections

OTHER_EVENT = {"action": "TASKS_CREATED", "tasks": [{"id": 1, "data": {}}], "project": {"id": 3}}


@asynccontextmanager
async def api_whose_postgres_goes(
    settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, SilencingProxy]]:
    """An API whose Postgres connections go through a proxy: closing it takes the database away
    from this API alone (its connections are cut, new ones refused)."""
    proxy = await _proxy_to(settings.database_url, 5432)
    try:
        async with api_client(_database_through(proxy, settings, database_timeout_s=2.0)) as api:
            yield api, proxy
    finally:
        await proxy.close()


async def verified_webhook(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A webhook this API verified a delivery of, and a Label Studio event reviewing an item."""
    webhook = await new_webhook(api, auth)
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])
    event = fixture("label_studio_webhook.json", await item_ids(api, auth, job_id))
    assert (await deliver(api, webhook, OTHER_EVENT)).status_code == 200
    return webhook, event


def counted(what: str, **labels: str) -> float:
    """A delivery counter: the API's (spooled) or the workers' (replayed)."""
    registry = API_REGISTRY if what == "spooled" else REGISTRY
    return registry.get_sample_value(f"aidsafe_webhook_deliveries_{what}_total", labels) or 0.0


async def spool_of(redis: Redis, settings: Settings) -> list[bytes]:
    return list(await redis.lrange(f"{settings.redis_key_prefix}:deliveries:spooled", 0, -1))  # type: ignore[misc]


async def test_a_delivery_while_postgres_is_away_is_spooled_and_recorded_once_when_it_is_back(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    spooled_before, recorded_before = counted("spooled"), counted("replayed", outcome="recorded")
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()

        response = await deliver(api, webhook, event)

        assert response.status_code == 202, response.text
        assert counted("spooled") == spooled_before + 1
        assert response.json() == {"status": "spooled"}
        [entry] = await spool_of(redis, settings)
        assert webhook["secret"].encode() not in entry  # its hash only
        assert await stored(sessions) == []

    with caplog.at_level(logging.INFO, logger="aidsafe.deliveries"):
        assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1
    [recorded] = [m for m in caplog.messages if m.startswith(f"a delivery to webhook {webhook['id']}")]
    assert re.fullmatch(
        r"a delivery to webhook \S+ spooled [0-5] s ago was recorded: 1 imported, 0 duplicates", recorded
    )
    [row] = await stored(sessions)
    assert (row.external_id, row.verdict, str(row.webhook_id)) == ("601", "accept", webhook["id"])
    assert await deliveries.spooled_count(redis, settings.redis_key_prefix) == 0
    assert counted("replayed", outcome="recorded") == recorded_before + 1

    # A worker killed after recording it, before removing it: the next pass replays it again.
    await redis.rpush(f"{settings.redis_key_prefix}:deliveries:processing", entry)  # type: ignore[misc]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aidsafe.deliveries"):
        assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1
    assert any(m.endswith("was recorded: 0 imported, 1 duplicates") for m in caplog.messages)
    assert [r.id for r in await stored(sessions)] == [row.id]
    assert await deliveries.spooled_count(redis, settings.redis_key_prefix) == 0


async def test_a_replay_while_postgres_is_still_away_leaves_the_delivery_for_later(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()
        assert (await deliver(api, webhook, event)).status_code == 202
        assert (await deliver(api, webhook, OTHER_EVENT)).status_code == 202
        entries = await spool_of(redis, settings)

        engine = make_engine(_database_through(proxy, settings).database_url, 2.0, 2)
        try:
            with caplog.at_level(logging.WARNING, logger="aidsafe.deliveries"):
                replayed = await deliveries.replay_spooled(
                    make_sessions(engine), redis, settings.redis_key_prefix
                )
        finally:
            await engine.dispose()

    assert replayed == 0
    [waits] = [m for m in caplog.messages if m.startswith("a spooled delivery waits for the database: ")]
    assert "Error" in waits  # the database's error, named
    assert (
        await spool_of(redis, settings) == entries
    )  # the first still first: replayed in the order they came
    assert await stored(sessions) == []


async def test_a_wrong_secret_or_a_webhook_not_verified_lately_is_503_while_postgres_is_away_unspooled(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        unverified = await new_webhook(api, auth, "ls-other")  # never delivered to here
        await proxy.close()
        event["annotation"]["id"] = 999  # told apart from the right one's

        wrong = await deliver(api, webhook, event, secret="aidsafe_whsec_wrong")
        missing = await api.post(httpx.URL(webhook["url"]).path, json=event)
        not_verified = await deliver(api, unverified, event)
        event["annotation"]["id"] = 601
        right = await deliver(api, webhook, event)

    assert [r.status_code for r in (wrong, missing, not_verified, right)] == [503, 503, 503, 202]
    [entry] = await spool_of(redis, settings)
    assert b'"id": 601' in entry or b'"id":601' in entry
    assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1
    assert [r.external_id for r in await stored(sessions)] == ["601"]


async def test_a_webhook_revoked_before_the_replay_gets_the_refusal_kept_with_its_body(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()
        assert (await deliver(api, webhook, event)).status_code == 202
    async with api_client(settings) as api:
        assert (await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)).status_code == 200

        with caplog.at_level(logging.WARNING, logger="aidsafe.deliveries"):
            assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1

        [refusal] = await rejections(api, auth, webhook)
    # The worker's log says which webhook refused it and why.
    assert (
        f"webhook {webhook['id']} refused a delivery: unauthorized this webhook was revoked"
        in caplog.messages
    )
    assert (refusal["code"], refusal["message"]) == ("unauthorized", "this webhook was revoked")
    assert refusal["body"] is not None and '"ANNOTATION_CREATED"' in refusal["body"]
    assert await stored(sessions) == []
    assert await deliveries.spooled_count(redis, settings.redis_key_prefix) == 0


async def test_a_refusal_at_replay_is_kept_for_the_webhooks_owner_whatever_the_entry_says(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    """The spool's entries are only as trustworthy as Redis: the owner a refusal is kept for
    comes from the webhook's row, never from the entry."""
    other = await new_key(sessions, "other")
    async with api_client(settings) as api:
        webhook, theirs = await new_webhook(api, auth), await new_webhook(api, other, "theirs")
        assert (await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)).status_code == 200
    async with sessions() as session:
        owner, other_owner = [
            await session.scalar(select(Webhook.owner_key_id).where(Webhook.id == UUID(made["id"])))
            for made in (webhook, theirs)
        ]
    assert owner is not None and other_owner is not None and owner != other_owner
    forged = Delivery(UUID(webhook["id"]), other_owner, None, json.dumps(SKIPPED_EVENT).encode(), 0.0)
    limits = deliveries.SpoolLimits.of(settings)
    assert await deliveries.spool(redis, settings.redis_key_prefix, limits, forged)

    assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1

    async with sessions() as session:
        kept = select(WebhookRejection.owner_key_id).where(WebhookRejection.webhook_id == UUID(webhook["id"]))
        kept_for = list(await session.scalars(kept))
    assert kept_for == [owner]


@pytest.mark.parametrize(
    ("meanwhile", "refusal"),
    [
        (update(ApiKey).values(revoked_at=func.now()), "the API key this webhook belongs to was revoked"),
        (
            update(Webhook).values(secret_hash=hash_key("aidsafe_whsec_new")),
            f"send the webhook's secret in the {deliveries.SECRET_HEADER} header",
        ),
    ],
    ids=["its key revoked", "its secret changed"],
)
async def test_a_delivery_whose_key_or_secret_changed_before_the_replay_is_refused_and_kept(
    meanwhile: Update, refusal: str, settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()
        assert (await deliver(api, webhook, event)).status_code == 202
    async with sessions.begin() as session:
        await session.execute(meanwhile)

    assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1

    async with sessions() as session:
        kept = (await session.scalars(select(WebhookRejection))).all()
    assert [(str(r.webhook_id), r.message) for r in kept] == [(webhook["id"], refusal)]
    assert await stored(sessions) == []


async def test_a_full_spool_answers_503(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    one_key = settings.model_copy(update={"delivery_spool_max": 2, "delivery_spool_key_share": 1.0})
    async with api_whose_postgres_goes(one_key) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()

        answers = [(await deliver(api, webhook, event)).status_code for _ in range(3)]

    assert answers == [202, 202, 503]
    assert len(await spool_of(redis, settings)) == 2


async def test_a_spool_of_its_most_bytes_answers_503_and_counts_them_anew_once_recorded(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    """Bounded by count alone, 10,000 deliveries of up to 4 MiB each could fill Redis."""
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()
        assert (await deliver(api, webhook, event)).status_code == 202
        [entry] = await spool_of(redis, settings)
    # Room for two, give or take their times' digits, not three.
    room = settings.model_copy(
        update={"delivery_spool_max_bytes": 2 * len(entry) + len(entry) // 2, "delivery_spool_key_share": 1.0}
    )
    await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix)

    async with api_whose_postgres_goes(room) as (api, proxy):
        assert (await deliver(api, webhook, OTHER_EVENT)).status_code == 200  # verified here too
        await proxy.close()
        answers = [(await deliver(api, webhook, event)).status_code for _ in range(3)]
        assert answers == [202, 202, 503]

        assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 2
        assert (await deliver(api, webhook, event)).status_code == 202  # room again


async def test_one_keys_deliveries_take_only_their_share_of_the_spool(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    """Bounded for the deployment alone, one key's Label Studio could take the whole spool in an
    outage, and every other key's deliveries were lost (503, never sent again)."""
    other = await new_key(sessions, "other")
    halves = settings.model_copy(update={"delivery_spool_max": 4, "delivery_spool_key_share": 0.5})
    async with api_whose_postgres_goes(halves) as (api, proxy):
        noisy, noisy_event = await verified_webhook(api, auth, settings)
        theirs, their_event = await verified_webhook(api, other, settings)
        await proxy.close()

        noisy_answers = [(await deliver(api, noisy, noisy_event)).status_code for _ in range(3)]
        their_answers = [(await deliver(api, theirs, their_event)).status_code for _ in range(3)]

    assert (noisy_answers, their_answers) == ([202, 202, 503], [202, 202, 503])
    assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 4
    async with api_whose_postgres_goes(halves) as (api, proxy):
        assert (await deliver(api, noisy, OTHER_EVENT)).status_code == 200
        await proxy.close()
        # Its share counted anew once its spooled deliveries were recorded.
        assert [(await deliver(api, noisy, noisy_event)).status_code for _ in range(2)] == [202, 202]


async def test_an_api_process_started_in_the_outage_spools_a_webhook_another_verified(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    """Each process knew only the webhooks it had verified: one restarted during the outage, or
    one a load balancer sent the tool to, answered its deliveries 503, and they were lost."""
    async with api_whose_postgres_goes(settings) as (api, _):
        webhook, event = await verified_webhook(api, auth, settings)
    async with api_whose_postgres_goes(settings) as (restarted, proxy):
        await proxy.close()

        spooled = await deliver(restarted, webhook, event)
        wrong = await deliver(restarted, webhook, event, secret="aidsafe_whsec_wrong")

    assert (spooled.status_code, wrong.status_code) == (202, 503), spooled.text
    assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1
    assert [row.external_id for row in await stored(sessions)] == ["601"]


async def test_a_delivery_of_a_webhook_verified_lately_is_read_before_it_waits_for_the_database(
    api: httpx.AsyncClient, sessions: Sessions, ls_webhook: WebhookTarget
) -> None:
    """A delivery looked its webhook up before reading its body: with the pool in use, or the
    row held, it waited unread past Label Studio's 1 s timeout, and Label Studio never sends a
    delivery again. Here the webhook's row is held."""
    assert (
        await api.post(ls_webhook.path, json=SKIPPED_EVENT, headers=ls_webhook.headers)
    ).status_code == 200
    delivery_read = asyncio.Event()

    async def watched_delivery() -> AsyncIterator[bytes]:
        delivery_read.set()
        yield json.dumps(SKIPPED_EVENT).encode()

    async with sessions.begin() as session:
        webhook_id = UUID(ls_webhook.path.rsplit("/", 1)[1])
        await session.execute(select(Webhook.id).where(Webhook.id == webhook_id).with_for_update())
        delivery = asyncio.create_task(
            api.post(ls_webhook.path, content=watched_delivery(), headers=ls_webhook.headers)
        )
        await asyncio.wait_for(delivery_read.wait(), 1.0)
    assert (await delivery).status_code == 200


def test_a_pool_with_no_connection_free_spools_a_delivery_as_postgres_away_does() -> None:
    assert deliveries.unrecordable_now(PoolTimeoutError("QueuePool limit of size 20 reached"))
    assert deliveries.unrecordable_now(ConnectionRefusedError())
    assert not deliveries.unrecordable_now(ValueError("a bug"))


async def test_a_worker_process_records_a_spooled_delivery_once_postgres_is_back(
    settings: Settings,
    sessions: Sessions,
    auth: Headers,
    redis: Redis,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()
        assert (await deliver(api, webhook, event)).status_code == 202

    workers.append(start_worker(settings))  # its replay loop, every sweep interval

    async def recorded() -> bool:
        return [r.external_id for r in await stored(sessions)] == ["601"]

    await eventually(recorded, what="the spooled delivery recorded")
    await eventually(
        lambda: _none_left(redis, settings), what="the spool emptied after the review was recorded"
    )


async def _none_left(redis: Redis, settings: Settings) -> bool:
    return await deliveries.spooled_count(redis, settings.redis_key_prefix) == 0


async def test_a_refused_body_of_a_webhook_delivered_to_lately_is_still_kept(
    api: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    """Read before the lookup: a body not JSON, too large or stalled must be refused as any
    other, its refusal kept (Label Studio does not send it again)."""
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
    """A process that knew the webhook through Redis alone (new, or new to the tool behind a
    load balancer) looked it up first, and waited unread behind a held row or a starved pool
    past Label Studio's 1 s."""
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


async def test_a_refusal_replayed_again_after_a_killed_pass_is_kept_once(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    async with api_whose_postgres_goes(settings) as (api, proxy):
        webhook, event = await verified_webhook(api, auth, settings)
        await proxy.close()
        assert (await deliver(api, webhook, event)).status_code == 202
        [entry] = await spool_of(redis, settings)
        came_by = datetime.now(UTC)
    async with api_client(settings) as api:
        assert (await api.post(f"/v1/webhooks/{webhook['id']}/revoke", headers=auth)).status_code == 200
        assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1

        # A worker killed after keeping the refusal, before removing the entry: replayed again.
        await redis.rpush(f"{settings.redis_key_prefix}:deliveries:processing", entry)  # type: ignore[misc]
        assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 1

        [refusal] = await rejections(api, auth, webhook)
    assert refusal["code"] == "unauthorized"
    assert datetime.fromisoformat(refusal["received_at"]) < came_by  # when it came, not its replay
    assert await deliveries.spooled_count(redis, settings.redis_key_prefix) == 0


def to_no_webhook(owner_key_id: UUID) -> Delivery:
    """A delivery spooled for a webhook the database does not hold: its replay drops it, as one
    deleted meanwhile (counted "refused", nothing kept). Its time fixed: all are the same size."""
    return Delivery(
        uuid4(), owner_key_id, hash_key("aidsafe_whsec_x"), json.dumps(OTHER_EVENT).encode(), 1_765_000_000.5
    )


def spool_prefix(settings: Settings) -> str:
    """A spool of the test's own, under the session's prefix (deleted with it)."""
    return f"{settings.redis_key_prefix}:{uuid4().hex}"


def test_a_spooled_delivery_comes_back_whole_its_body_byte_for_byte() -> None:
    raw = b'{"action": "ANNOTATION_CREATED",\n "text": "\xff\x00"}\n'  # not UTF-8, lines of its own
    delivery = Delivery(uuid4(), uuid4(), hash_key("aidsafe_whsec_x"), raw, 1_765_000_000.25)

    assert Delivery.decoded(delivery.encoded()) == delivery
    assert delivery.body == '{"action": "ANNOTATION_CREATED",\n "text": "\ufffd\x00"}\n'


def test_the_spool_limits_are_the_settings(settings: Settings) -> None:
    mine = settings.model_copy(
        update={"delivery_spool_max": 7, "delivery_spool_max_bytes": 9000, "delivery_spool_key_share": 0.3}
    )
    assert SpoolLimits.of(mine) == SpoolLimits(entries=7, bytes=9000, key_share=0.3)
    assert SpoolLimits.of(mine).per_key == (3, 2700)  # 2.1 entries: a key may spool 3


async def test_a_keys_share_of_the_spool_is_rounded_up_and_bounds_its_bytes_too(
    settings: Settings, redis: Redis
) -> None:
    """A share of 1.5 deliveries is 2: rounded down, a small spool would take none of a key's."""
    one, other = uuid4(), uuid4()
    by_count, prefix = SpoolLimits(entries=3, bytes=1 << 20, key_share=0.5), spool_prefix(settings)
    assert [await deliveries.spool(redis, prefix, by_count, to_no_webhook(one)) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert await deliveries.spool(redis, prefix, by_count, to_no_webhook(other))
    assert not await deliveries.spool(redis, prefix, by_count, to_no_webhook(other))  # the spool is full

    ones, others = (to_no_webhook(one), to_no_webhook(one)), to_no_webhook(other)
    by_bytes, prefix = (
        SpoolLimits(entries=100, bytes=3 * len(others.encoded()), key_share=0.5),
        spool_prefix(settings),
    )
    assert [await deliveries.spool(redis, prefix, by_bytes, delivery) for delivery in ones] == [True, False]
    assert await deliveries.spool(redis, prefix, by_bytes, others)
    assert await spool_of(redis, settings.model_copy(update={"redis_key_prefix": prefix})) == [
        ones[0].encoded(),
        others.encoded(),
    ]


async def test_the_spooled_count_includes_the_deliveries_being_replayed(
    settings: Settings, redis: Redis
) -> None:
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    for _ in range(3):
        assert await deliveries.spool(redis, prefix, limits, to_no_webhook(uuid4()))
    await redis.lmove(f"{prefix}:deliveries:spooled", f"{prefix}:deliveries:processing", "LEFT", "RIGHT")

    assert await deliveries.spooled_count(redis, prefix) == 3


async def test_a_replay_takes_a_killed_passs_deliveries_first_then_the_others_oldest_first(
    settings: Settings, sessions: Sessions, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    spooled = [to_no_webhook(uuid4()) for _ in range(4)]
    for delivery in spooled:
        assert await deliveries.spool(redis, prefix, limits, delivery)
    for _ in range(2):  # a pass killed after taking the first two
        await redis.lmove(f"{prefix}:deliveries:spooled", f"{prefix}:deliveries:processing", "LEFT", "RIGHT")
    refused_before = counted("replayed", outcome="refused")

    with caplog.at_level(logging.WARNING, logger="aidsafe.deliveries"):
        assert await deliveries.replay_spooled(sessions, redis, prefix) == 4

    dropped = [r.getMessage() for r in caplog.records if r.getMessage().endswith("was deleted: dropped")]
    assert dropped == [f"a spooled delivery's webhook {d.webhook_id} was deleted: dropped" for d in spooled]
    assert counted("replayed", outcome="refused") == refused_before + 4
    assert await deliveries.spooled_count(redis, prefix) == 0


async def test_a_replay_while_another_worker_holds_the_lease_leaves_the_spool_to_it(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    assert await deliveries.spool(redis, prefix, limits, to_no_webhook(uuid4()))
    await redis.set(f"{prefix}:deliveries:replaying", "another worker's pass", px=5000)

    assert await deliveries.replay_spooled(sessions, redis, prefix) == 0
    assert await deliveries.spooled_count(redis, prefix) == 1

    await redis.delete(f"{prefix}:deliveries:replaying")  # its pass ended
    assert await deliveries.replay_spooled(sessions, redis, prefix) == 1
    assert await deliveries.spool(redis, prefix, limits, to_no_webhook(uuid4()))
    assert await deliveries.replay_spooled(sessions, redis, prefix) == 1  # each pass gives the lease back


def edited(delivery: Delivery, drop: str | None = None, **changes: Any) -> bytes:
    """`delivery` spooled, its head's fields changed or one dropped: an entry of another release."""
    head, _, raw = delivery.encoded().partition(b"\n")
    fields = json.loads(head) | changes
    fields.pop(drop or "", None)
    return json.dumps(fields).encode() + b"\n" + raw


async def dead_ones(redis: Redis, prefix: str) -> list[DeadDelivery]:
    """The dead list, newest first, each one a worker put there."""
    kept = await redis.lrange(f"{prefix}:deliveries:dead", 0, -1)  # type: ignore[misc]
    return [DeadDelivery.decoded(dead) for dead in kept]


@pytest.mark.parametrize(
    ("unreadable", "reason"),
    [
        (b"not a spooled delivery", "head: Invalid JSON"),
        (edited(to_no_webhook(uuid4()), drop="sent_hash"), "sent_hash: Field required"),
        (edited(to_no_webhook(uuid4()), received_at="now"), "received_at: Input should be a valid number"),
        (edited(to_no_webhook(uuid4()), webhook_id=7), "webhook_id: UUID input should be a string"),
        # Read, its refusal failed every replay: no datetime holds it.
        (edited(to_no_webhook(uuid4()), received_at=1e300), "received_at: Input should be less than"),
        # Deeper than json.loads can follow: RecursionError, which left it first in the spool.
        (b"[" * 100_000, "head: Invalid JSON: recursion limit exceeded"),
    ],
    ids=[
        "not JSON",
        "a field missing",
        "a time of the wrong type",
        "an id of the wrong type",
        "no datetime",
        "nested",
    ],
)
async def test_a_spooled_entry_that_cannot_be_read_goes_to_the_dead_list_once_with_why(
    unreadable: bytes,
    reason: str,
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It waited at the back of the spool for good: every pass failed on it (and said so), and
    it held its share of the spool's bounds."""
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    await redis.rpush(f"{prefix}:deliveries:spooled", unreadable)  # type: ignore[misc]
    assert await deliveries.spool(redis, prefix, limits, to_no_webhook(uuid4()))

    with caplog.at_level(logging.WARNING, logger="aidsafe.deliveries"):
        assert await deliveries.replay_spooled(sessions, redis, prefix) == 1  # the readable one
        assert await deliveries.replay_spooled(sessions, redis, prefix) == 0

    [said] = [r for r in caplog.records if "could not be read" in r.getMessage()]
    assert said.levelno == logging.ERROR
    moved = f"a spooled delivery could not be read, moved to {prefix}:deliveries:dead: "
    assert said.getMessage().startswith(moved + reason)
    assert await deliveries.spooled_count(redis, prefix) == 0
    [dead] = await dead_ones(redis, prefix)
    assert (dead.entry, dead.reason.startswith(reason)) == (unreadable, True)
    assert await deliveries.dead_count(redis, prefix) == 1


async def test_the_dead_list_keeps_the_newest_and_says_when_it_drops_the_oldest(
    settings: Settings, sessions: Sessions, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = spool_prefix(settings)
    older = [DeadDelivery("older", 0.0, b"%d" % n).encoded() for n in range(deliveries.DEAD_KEPT)]
    await redis.rpush(f"{prefix}:deliveries:dead", *older)  # type: ignore[misc]
    await redis.rpush(f"{prefix}:deliveries:spooled", b"not a spooled delivery")  # type: ignore[misc]

    with caplog.at_level(logging.WARNING, logger="aidsafe.deliveries"):
        await deliveries.replay_spooled(sessions, redis, prefix)

    assert await deliveries.dead_count(redis, prefix) == deliveries.DEAD_KEPT
    newest, *kept = await redis.lrange(f"{prefix}:deliveries:dead", 0, -1)  # type: ignore[misc]
    assert DeadDelivery.decoded(newest).entry == b"not a spooled delivery"
    assert kept == older[:-1]
    kept_most = f"{deliveries.DEAD_KEPT}, {deliveries.DEAD_KEPT_BYTES} bytes at most"
    assert f"the dead list keeps the newest {kept_most}: its 1 oldest were dropped" in caplog.messages


async def test_the_dead_list_keeps_no_more_bytes_than_its_most(
    settings: Settings, sessions: Sessions, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Its entries leave the spool's bounds: 2,000 deliveries of the most a body may be (4 MiB)
    would take 8 GiB of Redis."""
    prefix, most = spool_prefix(settings), settings.max_import_bytes
    unread = [b"unread %d\n" % n + b"x" * most for n in range(deliveries.DEAD_KEPT_BYTES // most + 2)]
    await redis.rpush(f"{prefix}:deliveries:spooled", *unread)  # type: ignore[misc]
    try:
        with caplog.at_level(logging.WARNING, logger="aidsafe.deliveries"):
            await deliveries.replay_spooled(sessions, redis, prefix)
        kept = await dead_ones(redis, prefix)
    finally:  # its 64 MiB, at once
        await redis.delete(f"{prefix}:deliveries:dead", f"{prefix}:deliveries:dead_bytes")

    fits = deliveries.DEAD_KEPT_BYTES // len(kept[0].encoded())
    assert [dead.entry for dead in kept] == unread[::-1][:fits]
    assert sum(len(dead.encoded()) for dead in kept) <= deliveries.DEAD_KEPT_BYTES
    assert any(message.endswith("its 1 oldest were dropped") for message in caplog.messages)


@asynccontextmanager
async def a_pass_held_on_one_more(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis, prefix: str
) -> AsyncIterator[asyncio.Task[int]]:
    """A pass over the spool at `prefix` that has replayed what it held, and waits on one more
    entry, spooled now, whose webhook's row is held until the block ends: the counts as a pass
    leaves them while deliveries still wait (once the spool is empty, they start over)."""
    async with api_client(settings) as api:
        webhook = await new_webhook(api, auth, "ls-held")
    last = Delivery(UUID(webhook["id"]), uuid4(), None, json.dumps(SKIPPED_EVENT).encode(), 0.0)
    assert await deliveries.spool(redis, prefix, SpoolLimits(entries=100, bytes=1 << 20, key_share=1.0), last)

    async def waiting_on_last() -> bool:
        in_processing = await redis.lrange(f"{prefix}:deliveries:processing", 0, -1)  # type: ignore[misc]
        return bool(in_processing == [last.encoded()])

    async with sessions() as holder:
        await holder.execute(select(Webhook.id).where(Webhook.id == UUID(webhook["id"])).with_for_update())
        replay = asyncio.create_task(deliveries.replay_spooled(sessions, redis, prefix))
        try:
            await eventually(waiting_on_last, timeout_s=10, what="the pass waiting on the last entry")
            yield replay
        finally:
            await holder.rollback()
            await asyncio.wait([replay])


async def counts_of(redis: Redis, prefix: str) -> tuple[dict[bytes, bytes], int]:
    """Each key's spooled entries and bytes, and the spool's bytes."""
    per_key = await redis.hgetall(f"{prefix}:deliveries:keys")  # type: ignore[misc]
    return per_key, int(await redis.get(f"{prefix}:deliveries:bytes") or 0)


async def test_a_replay_gives_a_keys_share_back_while_other_deliveries_still_wait(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    """The counts start over when the spool empties; before that, each delivery recorded gives
    back its entry and its bytes, of its key's share and of the spool's."""
    owner, prefix = uuid4(), spool_prefix(settings)
    two_a_key = SpoolLimits(entries=100, bytes=1 << 20, key_share=0.02)
    assert [await deliveries.spool(redis, prefix, two_a_key, to_no_webhook(owner)) for _ in range(3)] == [
        True,
        True,
        False,
    ]

    async with a_pass_held_on_one_more(settings, sessions, auth, redis, prefix) as replay:
        per_key, size = await counts_of(redis, prefix)
        [waiting] = await redis.lrange(f"{prefix}:deliveries:processing", 0, -1)  # type: ignore[misc]
        admitted = [await deliveries.spool(redis, prefix, two_a_key, to_no_webhook(owner)) for _ in range(3)]

    assert (str(owner).encode() in per_key, size) == (False, len(waiting))
    assert admitted == [True, True, False]
    assert replay.result() == 5


async def test_an_entry_that_cannot_be_read_gives_back_its_keys_share_and_its_bytes(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    """One spooled by this release, of a key at its share, then unread (another release read
    it the same): its key's deliveries were refused for good."""
    owner, prefix = uuid4(), spool_prefix(settings)
    one_a_key = SpoolLimits(entries=100, bytes=1 << 20, key_share=0.01)
    assert await deliveries.spool(redis, prefix, one_a_key, to_no_webhook(owner))
    [entry] = await spool_of(redis, settings.model_copy(update={"redis_key_prefix": prefix}))
    unreadable = entry.replace(b'"sent_hash"', b'"sent_hasx"')  # as long: the bytes counted
    await redis.lset(f"{prefix}:deliveries:spooled", 0, unreadable)  # type: ignore[arg-type, misc]
    assert not await deliveries.spool(redis, prefix, one_a_key, to_no_webhook(owner))

    async with a_pass_held_on_one_more(settings, sessions, auth, redis, prefix) as replay:
        per_key, size = await counts_of(redis, prefix)
        [waiting] = await redis.lrange(f"{prefix}:deliveries:processing", 0, -1)  # type: ignore[misc]
        admitted = [await deliveries.spool(redis, prefix, one_a_key, to_no_webhook(owner)) for _ in range(2)]

    assert (str(owner).encode() in per_key, size) == (False, len(waiting))
    assert admitted == [True, False]
    assert [dead.entry for dead in await dead_ones(redis, prefix)] == [unreadable]
    assert replay.result() == 2  # the held one, and the one admitted


async def test_an_entry_spooled_before_the_per_key_counts_takes_no_keys_count_below_zero(
    settings: Settings, sessions: Sessions, auth: Headers, redis: Redis
) -> None:
    """A release without the per-key counts spooled it uncounted: replayed, it took its key's
    count below zero, and the key could spool that many more than its share."""
    owner, prefix = uuid4(), spool_prefix(settings)
    one_a_key = SpoolLimits(entries=100, bytes=1 << 20, key_share=0.01)
    await redis.rpush(f"{prefix}:deliveries:spooled", to_no_webhook(owner).encoded())  # type: ignore[misc]

    async with a_pass_held_on_one_more(settings, sessions, auth, redis, prefix) as replay:
        per_key, size = await counts_of(redis, prefix)
        admitted = [await deliveries.spool(redis, prefix, one_a_key, to_no_webhook(owner)) for _ in range(2)]

    assert [count for count in (*map(int, per_key.values()), size) if count < 0] == []
    assert admitted == [True, False]
    assert replay.result() == 3


async def test_a_pass_holds_its_lease_two_minutes_at_most_so_a_killed_workers_lapses(
    settings: Settings, migrated: str, redis: Redis
) -> None:
    """A lease without an end, left by a worker killed mid-pass, would stop every replay for good."""
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    assert await deliveries.spool(redis, prefix, limits, to_no_webhook(uuid4()))
    engine = make_engine(migrated, 10.0, 1)
    try:
        async with engine.connect():  # the pool's one connection: the pass waits for it, its lease held
            replay = asyncio.create_task(deliveries.replay_spooled(make_sessions(engine), redis, prefix))

            async def lease_left_ms() -> int | None:
                left_ms = int(await redis.pttl(f"{prefix}:deliveries:replaying"))
                return None if left_ms == -2 else left_ms  # -2: not taken yet; -1: no end

            left_ms = await eventually(lease_left_ms, what="the pass's lease")
        assert await replay == 1
    finally:
        await engine.dispose()
    assert 110_000 < left_ms <= deliveries.REPLAY_LEASE_S * 1000 == 120_000


async def test_the_apis_metrics_show_how_many_deliveries_are_dead(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    await redis.rpush(f"{settings.redis_key_prefix}:deliveries:spooled", b"not a spooled delivery")  # type: ignore[misc]
    assert await deliveries.replay_spooled(sessions, redis, settings.redis_key_prefix) == 0
    try:
        async with api_client(settings) as api:
            scraped = await api.get("/metrics")
    finally:
        newest = (await deliveries.dead_deliveries(redis, settings.redis_key_prefix, 1)).newest_fingerprint
        assert newest is not None
        assert await deliveries.drop_dead(redis, settings.redis_key_prefix, newest) == 1

    assert "aidsafe_webhook_deliveries_dead 1.0" in scraped.text


def aidsafe_deliveries(settings: Settings, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`aidsafe deliveries ...` run as an operator would, on the spool at `prefix`."""
    env = worker_env(settings.model_copy(update={"redis_key_prefix": prefix})) | {"COLUMNS": "200"}
    return subprocess.run(
        [AIDSAFE, "deliveries", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def told_to_drop(listed: subprocess.CompletedProcess[str]) -> str:
    """What `aidsafe deliveries dead` says to give `drop-dead`, to drop what it counted."""
    [told] = re.findall(r"`aidsafe deliveries drop-dead (\S+)`", listed.stdout)
    return str(told)


async def test_an_operator_sees_the_dead_deliveries_newest_first_cut_short_and_drops_them(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    prefix = spool_prefix(settings)
    long_one = edited(to_no_webhook(uuid4()), drop="owner_key_id") + b"x" * 1000
    unread = (b"the oldest", b"[red]not JSON", long_one)
    await redis.rpush(f"{prefix}:deliveries:spooled", *unread)  # type: ignore[misc]
    await deliveries.replay_spooled(sessions, redis, prefix)
    newest = deliveries.dead_fingerprint(await redis.lindex(f"{prefix}:deliveries:dead", 0))  # type: ignore[misc]

    listed = aidsafe_deliveries(settings, prefix, "dead", "--limit", "2")
    dropped = aidsafe_deliveries(settings, prefix, "drop-dead", told_to_drop(listed))
    after = aidsafe_deliveries(settings, prefix, "dead")

    assert listed.returncode == 0, listed.stderr
    head, reason, shown, markup_reason, markup, how_to_drop = listed.stdout.splitlines()
    assert head == "3 dead deliveries; the newest 2:"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d  owner_key_id: Field required", reason)
    assert shown.startswith("""  '{"webhook_id": """)
    assert shown.endswith(f"xxx' ... ({len(long_one)} bytes in all)")
    assert len(shown) < 400
    assert markup_reason.endswith("  head: Invalid JSON: expected value at line 1 column 2")
    assert markup == "  '[red]not JSON'"  # the entry's text, not markup
    assert how_to_drop == (
        f"The newest is {newest}: `aidsafe deliveries drop-dead {newest}` drops these 3, the newest "
        "and those older, not one that comes after."
    )
    assert (dropped.returncode, dropped.stdout) == (0, "Dropped 3 dead deliveries.\n")
    assert after.stdout == "0 dead deliveries.\n"
    assert await deliveries.dead_count(redis, prefix) == 0


@pytest.mark.parametrize(
    "url",
    ["http://x", "redis://127.0.0.1:6379/0?timeout=3"],
    ids=["another scheme", "an option it does not take"],
)
def test_an_operator_is_told_the_redis_url_is_one_redis_refuses_not_shown_a_traceback(
    url: str, settings: Settings
) -> None:
    refused = settings.model_copy(update={"redis_url": url})

    listed = aidsafe_deliveries(refused, spool_prefix(settings), "dead")

    assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
    [said] = listed.stdout.splitlines()
    assert said.startswith("Cannot use Redis: ") and said.endswith("(see AIDSAFE_REDIS_URL)"), said


def test_an_operator_is_told_which_redis_the_cli_cannot_use_not_shown_a_traceback(settings: Settings) -> None:
    unreachable = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})

    listed = aidsafe_deliveries(unreachable, spool_prefix(settings), "dead")

    assert listed.returncode == 1
    assert listed.stdout.startswith("Cannot use Redis: ") and "(see AIDSAFE_REDIS_URL)" in listed.stdout
    assert "Traceback" not in listed.stderr


async def died(redis: Redis, prefix: str, limits: SpoolLimits, *spooled: Delivery) -> list[bytes]:
    """`spooled` spooled, then moved to the dead list by a worker that could not read them (an
    older release, in a rolling upgrade), oldest first: their entries."""
    keys = deliveries._Spool.of(prefix)
    entries = [delivery.encoded() for delivery in spooled]
    for entry, delivery in zip(entries, spooled, strict=True):
        assert await deliveries.spool(redis, prefix, limits, delivery)
        assert await redis.lmove(keys.waiting, keys.processing, "LEFT", "RIGHT") == entry
        await deliveries._dead_letter(redis, keys, entry, "an older release could not read it")
    return entries


async def dead_bytes_of(redis: Redis, prefix: str) -> tuple[int, int]:
    """The dead list's bytes, as counted and as they are."""
    kept = await redis.lrange(f"{prefix}:deliveries:dead", 0, -1)  # type: ignore[misc]
    return int(await redis.get(f"{prefix}:deliveries:dead_bytes") or 0), sum(map(len, kept))


async def test_the_dead_requeued_are_spooled_again_counted_as_spooled_and_replayed_by_the_next_pass(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    owner, prefix = uuid4(), spool_prefix(settings)
    limits = SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    entries = await died(redis, prefix, limits, to_no_webhook(owner), to_no_webhook(owner))
    assert await deliveries.spool(redis, prefix, limits, waiting := to_no_webhook(uuid4()))

    assert await deliveries.requeue_dead(redis, prefix, limits) == deliveries.Requeued(requeued=2)

    spooled = settings.model_copy(update={"redis_key_prefix": prefix})
    assert await spool_of(redis, spooled) == [waiting.encoded(), *entries]  # behind it, oldest first
    per_key, size = await counts_of(redis, prefix)
    assert per_key[str(owner).encode()] == b"2"
    assert int(per_key[f"{owner}:bytes".encode()]) == sum(map(len, entries))
    assert size == sum(map(len, entries)) + len(waiting.encoded())
    assert await deliveries.dead_count(redis, prefix) == 0
    assert await dead_bytes_of(redis, prefix) == (0, 0)
    assert await deliveries.replay_spooled(sessions, redis, prefix) == 3
    assert await counts_of(redis, prefix) == ({}, 0)


async def test_a_dead_one_the_spool_has_no_room_for_stays_dead_and_is_counted_so(
    settings: Settings, redis: Redis
) -> None:
    """The spool's bounds and a key's share hold for the requeued as for deliveries spooled:
    an operator cannot fill Redis with them."""
    one, other, prefix = uuid4(), uuid4(), spool_prefix(settings)
    room = SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    past_share, requeued, past_bound = await died(
        redis, prefix, room, to_no_webhook(one), to_no_webhook(other), to_no_webhook(uuid4())
    )
    assert await deliveries.spool(redis, prefix, room, to_no_webhook(one))

    two_one_a_key = SpoolLimits(entries=2, bytes=1 << 20, key_share=0.5)
    done = await deliveries.requeue_dead(redis, prefix, two_one_a_key)

    assert done == deliveries.Requeued(requeued=1, no_room=2)
    assert (await spool_of(redis, settings.model_copy(update={"redis_key_prefix": prefix})))[1:] == [requeued]
    assert [dead.entry for dead in await dead_ones(redis, prefix)] == [past_bound, past_share]
    counted_bytes, kept_bytes = await dead_bytes_of(redis, prefix)
    assert counted_bytes == kept_bytes > 0


async def test_a_requeue_leaves_every_foreign_one_dead_and_counted_and_goes_on_past_it(
    settings: Settings, redis: Redis
) -> None:
    """Foreign ones (not dead deliveries: pushed by hand, by another tool) older than, between
    and newer than the dead deliveries: each is counted and stays, and none ends the requeue."""
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    dead = f"{prefix}:deliveries:dead"
    oldest, between, just_after, newest = (b"set by hand %d" % n for n in range(4))
    await redis.lpush(dead, oldest)  # type: ignore[misc]
    older = await died(redis, prefix, limits, to_no_webhook(uuid4()))
    await redis.lpush(dead, between, just_after)  # type: ignore[misc]
    newer = await died(redis, prefix, limits, to_no_webhook(uuid4()))
    await redis.lpush(dead, newest)  # type: ignore[misc]

    requeued = await deliveries.requeue_dead(redis, prefix, limits)

    assert requeued == deliveries.Requeued(requeued=2, foreign=4)
    spooled = settings.model_copy(update={"redis_key_prefix": prefix})
    assert await spool_of(redis, spooled) == [*older, *newer]
    assert await redis.lrange(dead, 0, -1) == [newest, just_after, between, oldest]  # type: ignore[misc]


async def test_requeues_run_at_once_move_each_dead_one_once(settings: Settings, redis: Redis) -> None:
    """Each is moved in one step that first checks it is still dead: two operators (or one run
    again after it was killed) neither spool one twice nor lose one."""
    owner, prefix = uuid4(), spool_prefix(settings)
    limits = SpoolLimits(entries=100, bytes=1 << 20, key_share=1.0)
    entries = await died(redis, prefix, limits, *(to_no_webhook(owner) for _ in range(30)))

    runs = await asyncio.gather(*(deliveries.requeue_dead(redis, prefix, limits) for _ in range(3)))

    assert sum(run.requeued for run in runs) == 30 and not any(run.no_room for run in runs)
    spooled = await spool_of(redis, settings.model_copy(update={"redis_key_prefix": prefix}))
    assert sorted(spooled) == sorted(entries)
    per_key, size = await counts_of(redis, prefix)
    assert (per_key[str(owner).encode()], size) == (b"30", sum(map(len, entries)))
    assert await dead_bytes_of(redis, prefix) == (0, 0)


async def test_the_dead_one_a_fingerprint_names_and_those_older_are_dropped_with_their_bytes(
    settings: Settings, redis: Redis
) -> None:
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    await died(redis, prefix, limits, to_no_webhook(uuid4()), to_no_webhook(uuid4()))
    counted = await deliveries.dead_deliveries(redis, prefix, 1)
    [came_after] = await died(redis, prefix, limits, to_no_webhook(uuid4()))
    assert counted.count == 2 and counted.newest_fingerprint is not None

    assert await deliveries.drop_dead(redis, prefix, counted.newest_fingerprint) == 2

    [left] = await dead_ones(redis, prefix)
    assert left.entry == came_after
    counted_bytes, kept_bytes = await dead_bytes_of(redis, prefix)
    assert counted_bytes == kept_bytes > 0
    assert await deliveries.drop_dead(redis, prefix, deliveries.dead_fingerprint(left.encoded())) == 1
    assert await dead_bytes_of(redis, prefix) == (0, 0)
    assert await redis.exists(f"{prefix}:deliveries:dead", f"{prefix}:deliveries:dead_bytes") == 0


async def test_a_fingerprint_cut_short_is_refused_not_taken_for_every_one_it_starts(
    settings: Settings, redis: Redis
) -> None:
    """Compared as a prefix, "" named the oldest dead one, whatever it was."""
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    [entry] = await died(redis, prefix, limits, to_no_webhook(uuid4()))

    with pytest.raises(ValueError, match="not a dead one's fingerprint"):
        await deliveries.drop_dead(redis, prefix, "")

    assert [dead.entry for dead in await dead_ones(redis, prefix)] == [entry]


async def test_an_operator_drops_the_dead_counted_not_one_that_came_after_and_requeues_the_rest(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    await died(redis, prefix, limits, to_no_webhook(uuid4()))
    listed = aidsafe_deliveries(settings, prefix, "dead")
    [came_after] = await died(redis, prefix, limits, to_no_webhook(uuid4()))

    dropped = aidsafe_deliveries(settings, prefix, "drop-dead", told_to_drop(listed))
    requeued = aidsafe_deliveries(settings, prefix, "requeue-dead")

    assert listed.stdout.startswith("1 dead delivery; the newest 1:"), listed.stdout
    assert listed.stdout.endswith("drops this one, not one that comes after.\n"), listed.stdout
    assert (dropped.returncode, dropped.stdout) == (0, "Dropped 1 dead delivery.\n"), dropped.stderr
    assert (requeued.returncode, requeued.stdout) == (0, "Requeued 1 dead delivery.\n"), requeued.stderr
    assert await spool_of(redis, settings.model_copy(update={"redis_key_prefix": prefix})) == [came_after]
    assert await deliveries.replay_spooled(sessions, redis, prefix) == 1


async def test_drop_dead_run_again_drops_none_of_those_that_came_after(
    settings: Settings, redis: Redis
) -> None:
    """Counted by position, the second run dropped the two that came after the listing."""
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    await died(redis, prefix, limits, to_no_webhook(uuid4()), to_no_webhook(uuid4()))
    listed = aidsafe_deliveries(settings, prefix, "dead")
    came_after = await died(redis, prefix, limits, to_no_webhook(uuid4()), to_no_webhook(uuid4()))

    dropped = aidsafe_deliveries(settings, prefix, "drop-dead", told_to_drop(listed))
    again = aidsafe_deliveries(settings, prefix, "drop-dead", told_to_drop(listed))

    assert [dead.entry for dead in await dead_ones(redis, prefix)] == came_after[::-1]
    counted_bytes, kept_bytes = await dead_bytes_of(redis, prefix)
    assert counted_bytes == kept_bytes > 0
    assert (dropped.returncode, dropped.stdout) == (0, "Dropped 2 dead deliveries.\n"), dropped.stderr
    assert again.returncode == 1, again.stderr
    assert again.stdout.startswith(f"No dead delivery is {told_to_drop(listed)} "), again.stdout
    assert "none dropped" in again.stdout


async def test_drop_dead_after_a_requeue_drops_none_that_went_dead_after(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """The one counted was requeued (and read this time), a new one went dead: counted by
    position, the new one was dropped."""
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    await died(redis, prefix, limits, to_no_webhook(uuid4()))
    listed = aidsafe_deliveries(settings, prefix, "dead")
    assert await deliveries.requeue_dead(redis, prefix, limits) == deliveries.Requeued(requeued=1)
    await redis.rpush(f"{prefix}:deliveries:spooled", b"unread after the listing")  # type: ignore[misc]
    assert await deliveries.replay_spooled(sessions, redis, prefix) == 1  # the requeued one

    dropped = aidsafe_deliveries(settings, prefix, "drop-dead", told_to_drop(listed))

    assert [dead.entry for dead in await dead_ones(redis, prefix)] == [b"unread after the listing"]
    counted_bytes, kept_bytes = await dead_bytes_of(redis, prefix)
    assert counted_bytes == kept_bytes > 0
    assert dropped.returncode == 1 and "none dropped" in dropped.stdout, dropped.stdout


async def test_drop_dead_at_the_lists_bound_drops_none_that_came_after(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """The list full, one more went dead and the oldest was trimmed: counted by position, the
    count took the new one too."""
    prefix = spool_prefix(settings)
    older = [DeadDelivery("older", 0.0, b"%d" % n).encoded() for n in range(deliveries.DEAD_KEPT)]
    await redis.rpush(f"{prefix}:deliveries:dead", *older)  # type: ignore[misc]
    await redis.set(f"{prefix}:deliveries:dead_bytes", sum(map(len, older)))
    listed = aidsafe_deliveries(settings, prefix, "dead", "--limit", "1")
    await redis.rpush(f"{prefix}:deliveries:spooled", b"unread after the listing")  # type: ignore[misc]
    await deliveries.replay_spooled(sessions, redis, prefix)

    dropped = aidsafe_deliveries(settings, prefix, "drop-dead", told_to_drop(listed))

    assert [dead.entry for dead in await dead_ones(redis, prefix)] == [b"unread after the listing"]
    counted_bytes, kept_bytes = await dead_bytes_of(redis, prefix)
    assert counted_bytes == kept_bytes > 0
    assert listed.stdout.startswith(f"{deliveries.DEAD_KEPT} dead deliveries; the newest 1:"), listed.stdout
    expected = f"Dropped {deliveries.DEAD_KEPT - 1} dead deliveries.\n"
    assert (dropped.returncode, dropped.stdout) == (0, expected), dropped.stderr


@pytest.mark.parametrize("given", ["3", "0123456789abcdeX"], ids=["a count", "not hex"])
def test_drop_dead_takes_a_fingerprint_alone(given: str, settings: Settings) -> None:
    """A count, as the command took before, would drop by position."""
    refused = aidsafe_deliveries(settings, spool_prefix(settings), "drop-dead", given)

    assert refused.returncode == 2, refused.stdout
    assert "expected 16 hex digits" in refused.stderr, refused.stderr


async def test_an_empty_entry_requeued_goes_dead_again_and_holds_up_no_delivery_behind_it(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    """A dead one of a head alone (written by hand, or cut short) is requeued as an empty entry:
    a pass reads it as one unread, not as the end of the spool, which left it first for good."""
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    await redis.lpush(f"{prefix}:deliveries:dead", b'{"reason": "by hand", "dead_at": 1765000000.0}')  # type: ignore[misc]
    assert await deliveries.requeue_dead(redis, prefix, limits) == deliveries.Requeued(requeued=1)
    assert await deliveries.spool(redis, prefix, limits, to_no_webhook(uuid4()))

    assert await deliveries.replay_spooled(sessions, redis, prefix) == 1

    assert await deliveries.spooled_count(redis, prefix) == 0
    [dead] = await dead_ones(redis, prefix)
    assert (dead.entry, dead.reason.startswith("head: Invalid JSON")) == (b"", True)


@pytest.mark.parametrize(
    ("foreign", "reason"),
    [
        (b"set by hand", "head: Invalid JSON"),
        (b'["reason", "dead_at"]\nan entry', "head: Input should be an object"),
        (b'{"reason": "unread"}\nan entry', "dead_at: Field required"),
        (b'{"reason": "unread", "dead_at": 1e300}\nan entry', "dead_at: Input should be less than"),
        (b"\xff\xfe" * 200, "head: Invalid JSON"),
    ],
    ids=["not JSON", "no object", "a field missing", "no datetime", "not UTF-8"],
)
async def test_the_dead_list_shows_what_a_worker_did_not_put_there_as_unreadable(
    foreign: bytes, reason: str, settings: Settings, redis: Redis
) -> None:
    prefix, limits = spool_prefix(settings), SpoolLimits(entries=10, bytes=1 << 20, key_share=1.0)
    [entry] = await died(redis, prefix, limits, to_no_webhook(uuid4()))
    await redis.lpush(f"{prefix}:deliveries:dead", foreign)  # type: ignore[misc]

    listed = aidsafe_deliveries(settings, prefix, "dead")
    requeued = await deliveries.requeue_dead(redis, prefix, limits)

    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    head, said, shown, dead_said, dead_shown, _ = listed.stdout.splitlines()
    assert head == "2 dead deliveries; the newest 2:"
    assert said.startswith(f"(no time)  not a dead delivery: {reason}"), said
    assert shown.startswith("  " + repr(foreign[:40].decode("utf-8", errors="replace"))[:-1]), shown
    assert dead_said.endswith("  an older release could not read it")
    assert dead_shown.startswith("  '" + entry[:20].decode())
    assert requeued == deliveries.Requeued(requeued=1, foreign=1)
    assert await redis.lrange(f"{prefix}:deliveries:dead", 0, -1) == [foreign]  # type: ignore[misc]
