"""Unknown API keys and deliveries to unknown webhooks, counted per client address: past the
limit they are refused without a lookup each, and a known key or webhook is still served."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any
from uuid import uuid4

import httpx
import pytest
from redis.asyncio import Redis

from app.api.failures import Failures
from app.api.known_keys import KnownKeys
from app.api.known_values import MAX_AGE_S
from app.config import Settings
from app.errors import Unauthorized
from app.store.db import Sessions
from tests.conftest import checkouts
from tests.test_api import error_of
from tests.test_viewer import secret_of
from tests.test_webhooks import SKIPPED_EVENT, deliver, from_addresses, new_webhook

Headers = dict[str, str]
GUESSES = 20
# The counts live in the session's Redis for their window: each test has addresses of its own.


def unknown_key() -> Headers:
    return {"Authorization": f"Bearer aidsafe_{uuid4().hex}"}


def elsewhere(webhook: dict[str, Any]) -> dict[str, Any]:
    """`webhook` with the URL of one that is not."""
    return {**webhook, "url": webhook["url"].replace(webhook["id"], str(uuid4()))}


def refused(response: httpx.Response, window_s: int) -> None:
    error_of(response, 429, "too_many_wrong_keys")
    assert 1 <= int(response.headers["Retry-After"]) <= window_s


async def test_an_address_past_its_unknown_keys_is_refused_them_without_lookups_but_never_a_known_key(
    settings: Settings, auth: Headers
) -> None:
    """Else anyone could cost the database a lookup per request, as fast as the API answers.
    A known key goes through: a guesser behind a tenant's proxy must not cost it its requests.
    Not even from memory: with no key remembered, the live keys' hashes are read, at most
    once a second, not once a guess."""
    overrides = {"wrong_keys_per_address": 3, "api_key_cache_s": 0}
    async with from_addresses(settings, "203.0.113.10", **overrides) as (shared,):
        for _ in range(3):
            error_of(await shared.get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")
        refused(await shared.get("/v1/webhooks", headers=unknown_key()), 60)

        started = time.monotonic()
        with checkouts() as taken:
            guesses = [shared.get("/v1/webhooks", headers=unknown_key()) for _ in range(GUESSES)]
            answers = await asyncio.gather(*guesses)
        took_s = time.monotonic() - started
        known = await shared.get("/v1/webhooks", headers=auth)

    for answer in answers:
        refused(answer, 60)
    assert len(taken) <= 1 + took_s / MAX_AGE_S, (len(taken), took_s)
    assert known.status_code == 200, known.text


async def test_another_addresss_unknown_keys_leave_its_neighbours_alone(settings: Settings) -> None:
    async with from_addresses(settings, "203.0.113.11", "198.51.100.11", wrong_keys_per_address=3) as (
        guesser,
        neighbour,
    ):
        for _ in range(3):
            await guesser.get("/v1/webhooks", headers=unknown_key())
        refusal = await guesser.get("/v1/webhooks", headers=unknown_key())

        error_of(await neighbour.get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")

    refused(refusal, 60)
    message = error_of(refusal, 429, "too_many_wrong_keys")["message"]
    assert message.startswith("this address sent 3 unknown or revoked API keys")


async def test_ipv6_addresses_are_counted_by_their_64_network(settings: Settings) -> None:
    """A host is usually given a whole /64: counted per address, it sent each guess from a
    fresh one. The next /64 is another's."""
    guessers = [f"2001:db8:0:10::{host:x}" for host in range(1, 5)]
    async with from_addresses(settings, *guessers, "2001:db8:0:11::1", wrong_keys_per_address=3) as clients:
        for guesser in clients[:3]:
            error_of(await guesser.get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")
        refusal = await clients[3].get("/v1/webhooks", headers=unknown_key())

        error_of(await clients[4].get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")

    refused(refusal, 60)
    # Not "this address": this one had sent a single key.
    assert error_of(refusal, 429, "too_many_wrong_keys")["message"].startswith(
        "this address's /64 network (2001:db8:0:10::/64) sent 3 unknown or revoked API keys"
    )


async def test_an_ipv4_mapped_ipv6_address_is_counted_as_its_ipv4_address(settings: Settings) -> None:
    """A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: the same client either way."""
    async with from_addresses(settings, "203.0.113.15", "::ffff:203.0.113.15", wrong_keys_per_address=3) as (
        ipv4,
        mapped,
    ):
        for _ in range(3):
            error_of(await ipv4.get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")
        refused(await mapped.get("/v1/webhooks", headers=unknown_key()), 60)


async def test_an_address_refused_for_unknown_keys_is_counted_anew_once_its_window_ends(
    settings: Settings,
) -> None:
    overrides = {"wrong_keys_per_address": 1, "wrong_keys_window_s": 1}
    async with from_addresses(settings, "203.0.113.12", **overrides) as (client,):
        error_of(await client.get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")
        refused(await client.get("/v1/webhooks", headers=unknown_key()), 1)

        await asyncio.sleep(1.1)
        error_of(await client.get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")


async def test_an_address_past_its_unknown_webhooks_is_refused_them_without_lookups_but_never_a_known_one(
    settings: Settings, auth: Headers
) -> None:
    """Each such delivery was a lookup, which anyone may send. Label Studio may go on
    delivering to a webhook deleted here: its deliveries to the others must go through.
    Deliveries to unknown webhooks and unknown keys count together (an id guessed is a key
    guessed); wrong secrets to a webhook that is count apart, per webhook."""
    async with from_addresses(settings, "203.0.113.13", wrong_keys_per_address=3) as (shared,):
        webhook = await new_webhook(shared, auth)
        unknown = elsewhere(webhook)
        error_of(await shared.get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")
        for _ in range(2):
            error_of(await deliver(shared, unknown, SKIPPED_EVENT), 404, "not_found")
        refused(await deliver(shared, unknown, SKIPPED_EVENT), 60)

        started = time.monotonic()
        with checkouts() as taken:
            guesses = [deliver(shared, elsewhere(webhook), SKIPPED_EVENT) for _ in range(GUESSES)]
            answers = await asyncio.gather(*guesses)
        took_s = time.monotonic() - started
        right = await deliver(shared, webhook, SKIPPED_EVENT)
        wrong_secret = await deliver(shared, webhook, SKIPPED_EVENT, "guess")
        key = await shared.get("/v1/webhooks", headers=auth)

    for answer in answers:
        refused(answer, 60)
    assert len(taken) <= 1 + took_s / MAX_AGE_S, (len(taken), took_s)
    assert right.status_code == 200, right.text
    error_of(wrong_secret, 401, "unauthorized")  # the webhook's own count, not this one
    assert key.status_code == 200, key.text


async def test_unknown_keys_are_not_counted_while_redis_is_away_and_none_is_refused(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis holds no record: while it is away, unknown keys are looked up as they were."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = Redis(host="127.0.0.1", port=closed_port, socket_connect_timeout=1)
    failures = Failures(unreachable, "aidsafe:test", "unknown keys", limit=1, window_s=60)
    known_keys = KnownKeys(sessions, 0, failures)

    with caplog.at_level(logging.WARNING, logger="aidsafe.api"):
        for _ in range(3):
            with pytest.raises(Unauthorized):  # not TooManyWrongKeys, a 429
                await known_keys.authenticate(f"aidsafe_{uuid4().hex}", "203.0.113.9")
    await known_keys.aclose()
    await unreachable.aclose()

    assert failures.refused_for_s("203.0.113.9") is None
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["could not count the unknown keys sent by 203.0.113.9"] * 3


async def test_the_viewers_login_counts_unknown_keys_with_the_apis_and_never_refuses_a_known_one(
    settings: Settings, auth: Headers
) -> None:
    """The login form looked every key it was sent up, unlimited: a way round the API's limit."""
    overrides = {"wrong_keys_per_address": 3, "api_key_cache_s": 0}
    async with from_addresses(settings, "203.0.113.14", **overrides) as (browser,):
        error_of(await browser.get("/v1/webhooks", headers=unknown_key()), 401, "unauthorized")
        for _ in range(2):
            wrong = await browser.post("/view/login", data={"api_key": f"aidsafe_{uuid4().hex}"})
            assert wrong.status_code == 401 and "Unknown or revoked API key." in wrong.text
        refused_login = await browser.post("/view/login", data={"api_key": f"aidsafe_{uuid4().hex}"})
        known = await browser.post("/view/login", data={"api_key": secret_of(auth)})

    assert refused_login.status_code == 429, refused_login.text
    assert 1 <= int(refused_login.headers["Retry-After"]) <= 60
    assert "unknown or revoked API keys" in refused_login.text
    assert (known.status_code, known.headers["location"]) == (303, "/view/jobs")
