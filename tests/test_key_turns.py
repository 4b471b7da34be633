"""One API key's requests that lock its row (submissions, webhooks, set versions, deletions)
wait for their turn in the API process before they take a database connection
(app/api/key_turns.py): a key's burst cannot hold the pool while it waits on its own row, and
other keys' requests are answered meanwhile."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import select

from app.api.bodies import JsonBody
from app.api.deps import _key_write_session
from app.api.key_turns import KeyTurns
from app.api.sample_evaluations import _uploaded
from app.config import Settings
from app.errors import TooManyWaiting
from app.main import create_app
from app.store import keys
from app.store.db import Sessions
from app.store.models import ApiKey, Webhook
from tests.conftest import WebhookTarget, api_client, eventually, new_key, submit
from tests.test_api import error_of
from tests.test_key_limits import lock_waiters, waiting_for_locks
from tests.test_sample_evaluations import upload
from tests.test_webhooks import SKIPPED_EVENT

POOL = 20  # the API's Postgres connections (make_engine's default)
BURST = POOL + 5
CAP = 10  # the noisy key's open jobs: the burst past it is refused, not lost
# How long the other key's requests may take. They take tens of ms, some 100s on a busy
# machine; before the turns they waited as long as the noisy key's row was held (for good here).
PROMPT_S = 5.0


async def test_a_keys_burst_waiting_on_its_row_leaves_connections_to_other_keys(
    settings: Settings, sessions: Sessions
) -> None:
    noisy, other = await new_key(sessions, "noisy"), await new_key(sessions, "other")
    async with api_client(settings.model_copy(update={"max_open_jobs_per_key": CAP})) as api:
        job_id = await submit(api, other, ["hello"])
        async with row_held(sessions, noisy):
            burst = [
                asyncio.create_task(api.post("/v1/jobs", json={"prompts": [f"p{n}"]}, headers=noisy))
                for n in range(BURST)
            ]
            await eventually(lambda: lock_waiters(sessions), what="the burst waiting on its key's row")
            await asyncio.sleep(1)  # for the rest of the burst to reach its wait, wherever that is
            read = await asyncio.wait_for(api.get(f"/v1/jobs/{job_id}", headers=other), PROMPT_S)
            posted = await asyncio.wait_for(
                api.post("/v1/jobs", json={"prompts": ["hi"]}, headers=other), PROMPT_S
            )
            assert await lock_waiters(sessions) == 1  # one connection of the noisy key's waits
        answers = await asyncio.gather(*burst)
    assert read.status_code == 200, read.text
    assert posted.status_code == 202, posted.text
    refused = [answer for answer in answers if answer.status_code != 202]
    assert len(answers) - len(refused) == CAP, [answer.text for answer in answers]
    for answer in refused:
        error_of(answer, 409, "limit_reached")


async def test_a_keys_slow_upload_holds_up_none_of_its_other_writes(
    api: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    reading, rest_sent = asyncio.Event(), asyncio.Event()

    async def slow_file() -> AsyncIterator[bytes]:
        yield b'{"prompt": "Hi", "response": "Hello."}\n'
        reading.set()  # asked for more: the upload is being read
        await rest_sent.wait()
        yield b'{"prompt": "Bye", "response": "Goodbye."}\n'

    uploading = asyncio.create_task(upload(api, auth, slow_file(), "jsonl", grade={}))
    await reading.wait()
    made = await asyncio.wait_for(api.post("/v1/webhooks", json={"name": "ls"}, headers=auth), PROMPT_S)
    rest_sent.set()
    assert made.status_code == 201, made.text
    uploaded = await uploading
    assert uploaded.status_code == 202, uploaded.text


async def test_a_keys_bodies_are_read_a_few_at_a_time_and_another_keys_meanwhile(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, sessions: Sessions
) -> None:
    """A body is held whole, and decoded, before its route runs: some 100 MB at the peak for one
    of 32 MiB. One key's 24 sent at once took the API from 0.9 to 2.2 GB, and nothing bounded
    how many it could send. Past its slots, a key's bodies wait unread."""
    other = await new_key(sessions, "other")
    reading = [asyncio.Event() for _ in range(settings.max_bodies_per_key)]
    rest_sent = asyncio.Event()

    async def slow_body(read: asyncio.Event) -> AsyncIterator[bytes]:
        yield b'{"name": '
        read.set()  # asked for more: the body is being read
        await rest_sent.wait()
        yield b'"ls"}'

    json_auth = {**auth, "Content-Type": "application/json"}
    slow = [
        asyncio.create_task(api.post("/v1/webhooks", content=slow_body(r), headers=json_auth))
        for r in reading
    ]
    for read in reading:
        await asyncio.wait_for(read.wait(), PROMPT_S)
    waiting = asyncio.create_task(api.post("/v1/webhooks", json={"name": "next"}, headers=auth))
    theirs = await asyncio.wait_for(
        api.post("/v1/webhooks", json={"name": "theirs"}, headers=other), PROMPT_S
    )
    await asyncio.sleep(0.5)
    waited = not waiting.done()
    rest_sent.set()
    assert theirs.status_code == 201, theirs.text
    assert waited  # its body unread while the key's slots were taken
    assert (await asyncio.wait_for(waiting, PROMPT_S)).status_code == 201
    assert [made.status_code for made in await asyncio.gather(*slow)] == [201] * len(reading)


async def test_a_delivery_waiting_on_the_database_for_its_webhook_holds_up_none_of_its_keys_bodies(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    ls_webhook: WebhookTarget,
) -> None:
    """A delivery looked its webhook up again inside its body turn: with the pool in use that
    waits for a connection (up to the database timeout, 30 s), and the key's other bodies
    waited, unread, as long. Here the lookups wait for the webhook's row instead."""
    reading = [asyncio.Event() for _ in range(settings.max_bodies_per_key)]
    rest_sent = asyncio.Event()

    async def slow_body(read: asyncio.Event) -> AsyncIterator[bytes]:
        yield b'{"action": '
        read.set()  # asked for more: the delivery holds a body turn
        await rest_sent.wait()
        yield b'"TASKS_CREATED"}'

    deliveries = [
        asyncio.create_task(api.post(ls_webhook.path, content=slow_body(r), headers=ls_webhook.headers))
        for r in reading
    ]
    for read in reading:
        await asyncio.wait_for(read.wait(), PROMPT_S)
    async with sessions.begin() as session:
        webhook_id = UUID(ls_webhook.path.rsplit("/", 1)[1])
        await session.execute(select(Webhook.id).where(Webhook.id == webhook_id).with_for_update())
        rest_sent.set()
        await eventually(
            lambda: waiting_for_locks(sessions, len(reading)), what="each delivery's lookup waiting"
        )
        made = await asyncio.wait_for(api.post("/v1/webhooks", json={"name": "next"}, headers=auth), PROMPT_S)
    assert made.status_code == 201, made.text
    assert [delivered.status_code for delivered in await asyncio.gather(*deliveries)] == [200] * len(reading)


async def test_a_delivery_is_read_at_once_while_its_keys_bodies_take_every_turn(
    settings: Settings, sessions: Sessions, auth: dict[str, str], ls_webhook: WebhookTarget
) -> None:
    """A delivery waited, unread, for one of its key's body turns, which the key's requests
    hold to their answers (a second or more for a large submission): Label Studio gives up
    after 1 s and never sends it again, and a body unread then is lost."""
    delivery_read = asyncio.Event()

    async def watched_delivery() -> AsyncIterator[bytes]:
        delivery_read.set()
        yield json.dumps(SKIPPED_EVENT).encode()

    async with api_client(settings.model_copy(update={"max_bodies_per_key": 1})) as api:
        async with row_held(sessions, auth):
            first = asyncio.create_task(api.post("/v1/webhooks", json={"name": "first"}, headers=auth))
            await eventually(lambda: lock_waiters(sessions), what="the first waiting on its key's row")
            delivery = asyncio.create_task(
                api.post(ls_webhook.path, content=watched_delivery(), headers=ls_webhook.headers)
            )
            await asyncio.wait_for(delivery_read.wait(), 1.0)
            delivered = await asyncio.wait_for(delivery, PROMPT_S)
        assert (await asyncio.wait_for(first, PROMPT_S)).status_code == 201
    assert delivered.status_code == 200, delivered.text


@asynccontextmanager
async def row_held(sessions: Sessions, headers: dict[str, str]) -> AsyncIterator[None]:
    """The key's row locked, as a write of the key's under way in another API process holds
    it (a submission of 10,000 prompts: a second or more)."""
    key_hash = keys.hash_key(headers["Authorization"].removeprefix("Bearer "))
    async with sessions.begin() as session:
        await session.execute(
            select(ApiKey.id).where(ApiKey.key_hash == key_hash).with_for_update(key_share=True)
        )
        yield


async def test_a_keys_turn_is_forgotten_with_its_last_request_even_one_given_up() -> None:
    turns, key_id, order = KeyTurns(max_waiting=2), uuid4(), []
    released = asyncio.Event()

    async def request(name: str) -> None:
        async with turns.turn(key_id):
            order.append(name)
            await released.wait()

    first, given_up, last = (asyncio.create_task(request(name)) for name in ("first", "given up", "last"))
    await asyncio.sleep(0)  # each runs to its wait: the first holds the turn, the others queue
    assert order == ["first"] and len(turns) == 1
    given_up.cancel()  # its client went away while it waited
    released.set()
    await asyncio.gather(first, last, given_up, return_exceptions=True)
    assert order == ["first", "last"]
    assert len(turns) == 0  # as many locks as keys with requests under way: none now


async def test_a_keys_decoded_body_keeps_its_turn_while_it_waits_for_the_keys_row(
    settings: Settings, sessions: Sessions, auth: dict[str, str]
) -> None:
    """A body's turn ended once it was decoded, and the body waited in memory for the key's
    row: a key's bodies sent at once were all read, some 100 MB each at the largest, however
    few turns it had. Now its next body is read only once the one before is answered."""
    body_read = asyncio.Event()

    async def watched_body() -> AsyncIterator[bytes]:
        body_read.set()
        yield b'{"name": "second"}'

    json_auth = {**auth, "Content-Type": "application/json"}
    async with api_client(settings.model_copy(update={"max_bodies_per_key": 1})) as api:
        async with row_held(sessions, auth):
            first = asyncio.create_task(api.post("/v1/webhooks", json={"name": "first"}, headers=auth))
            await eventually(lambda: lock_waiters(sessions), what="the first waiting on its key's row")
            second = asyncio.create_task(api.post("/v1/webhooks", content=watched_body(), headers=json_auth))
            await asyncio.sleep(0.5)
            read_while_first_waited = body_read.is_set()
        answers = await asyncio.wait_for(asyncio.gather(first, second), PROMPT_S)
    assert not read_while_first_waited
    assert [answer.status_code for answer in answers] == [201, 201], [a.text for a in answers]


async def test_a_key_past_its_waiting_requests_is_refused_at_once_and_the_waiting_go_on(
    settings: Settings, sessions: Sessions, auth: dict[str, str]
) -> None:
    """Each waiting request holds a connection and a task: a key's burst would take every
    connection the API process may open."""
    bounded = settings.model_copy(update={"max_bodies_per_key": 1, "max_waiting_per_key": 1})
    async with api_client(bounded) as api:
        async with row_held(sessions, auth):
            first = asyncio.create_task(api.post("/v1/webhooks", json={"name": "first"}, headers=auth))
            await eventually(lambda: lock_waiters(sessions), what="the first waiting on its key's row")
            second = asyncio.create_task(api.post("/v1/webhooks", json={"name": "second"}, headers=auth))
            await asyncio.sleep(0.3)  # the second waits for the first's body turn
            refused = await asyncio.wait_for(
                api.post("/v1/webhooks", json={"name": "third"}, headers=auth), PROMPT_S
            )
        answers = await asyncio.wait_for(asyncio.gather(first, second), PROMPT_S)
    error_of(refused, 429, "too_many_waiting")
    assert refused.headers["Retry-After"] == "1"
    assert [answer.status_code for answer in answers] == [201, 201], [a.text for a in answers]


async def test_turns_past_the_most_waiting_are_refused_unless_the_caller_never_sends_again() -> None:
    turns, key_id, released = KeyTurns(at_once=1, max_waiting=1), uuid4(), asyncio.Event()

    async def request(**options: bool) -> None:
        async with turns.turn(key_id, **options):
            await released.wait()

    holding, waiting = asyncio.create_task(request()), asyncio.create_task(request())
    await asyncio.sleep(0)
    with pytest.raises(TooManyWaiting):
        await asyncio.wait_for(request(), PROMPT_S)  # refused at once, else it would wait forever
    delivery = asyncio.create_task(request(refuse_past_max=False))  # a webhook delivery
    await asyncio.sleep(0)
    released.set()
    await asyncio.gather(holding, waiting, delivery)
    assert len(turns) == 0


def _in_resolution_order(dependant: Dependant) -> list[Any]:
    """The calls of a route's dependencies in the order FastAPI runs them."""
    calls = []
    for sub in dependant.dependencies:
        calls += [*_in_resolution_order(sub), sub.call]
    return calls


def test_every_route_reads_its_body_before_it_takes_its_keys_turn(settings: Settings) -> None:
    """A body holds its turn until the answer: a route taking the key's turn first, then
    waiting for a body turn, would deadlock with the key's requests holding every body turn
    while they wait for the key's."""
    both = {}
    for route in iter_route_contexts(create_app(settings).routes):
        if not isinstance(route.route, APIRoute):
            continue
        calls = _in_resolution_order(route.route.dependant)
        turns = [
            "body" if isinstance(call, JsonBody) or call is _uploaded else "key"
            for call in calls
            if isinstance(call, JsonBody) or call in (_uploaded, _key_write_session)
        ]
        if "key" in turns and len(turns) > 1:
            both[route.path] = turns
    assert len(both) >= 8, both  # submissions, comparisons, evaluations, uploads, sets, webhooks
    assert all(turns == ["body", "key"] for turns in both.values()), both
