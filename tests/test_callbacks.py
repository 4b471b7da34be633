"""Job callbacks on the real stack: a loopback receiver gets each job's end once, signed;
a failing receiver is retried with back-off; a host off the operator's allow-list is refused
at submission and at sending; and a delivery outlives the worker that finished its job."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import httpx
import orjson
import pytest
import uvicorn
from pydantic import ValidationError
from sqlalchemy import Interval, func, select, type_coerce, update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from app.callbacks import DELIVERY_HEADER, SIGNATURE_HEADER, ListedNameResolver, Sender
from app.config import Settings, refusals
from app.plan import JobConfigIn, resolve
from app.store import callbacks, keys, policy_sets
from app.store.db import Sessions
from app.store.endings import COMPLETED, ending_values
from app.store.models import CallbackAttempt, CallbackDelivery, Item, Job
from bench.callback_claims import explain_claim
from tests.conftest import api_client, eventually, failing_once, new_key, run_worker_burst, start_worker


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A callback receiver on loopback: it logs every request and fails the first
    `failures` of them with a 500."""

    port: int = 0
    failures: int = 0
    answer: str = "ok"
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/aidsafe"

    async def receive(self, request: Request) -> Response:
        self.received.append(Received(dict(request.headers), await request.body()))
        if self.failures > 0:
            self.failures -= 1
            return Response("receiver down " + "x" * 1000, status_code=500)
        return Response(self.answer, status_code=200)


COOKIE = "session=another-tenants; Path=/"  # what a receiver at /hooks/cookie sets


@pytest.fixture(scope="session")
def running_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    receiver.port = sock.getsockname()[1]
    moved = RedirectResponse(receiver.url, status_code=307)
    app = Starlette(
        routes=[
            Route("/hooks/aidsafe", receiver.receive, methods=["POST"]),
            Route("/hooks/moved", lambda _: moved, methods=["POST"]),
            Route(
                "/hooks/cookie", lambda _: Response("ok", headers={"Set-Cookie": COOKIE}), methods=["POST"]
            ),
        ]
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="receiver", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the callback receiver did not start")
            time.sleep(0.01)
        yield receiver
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def receiver(running_receiver: Receiver) -> Receiver:
    running_receiver.failures = 0
    running_receiver.answer = "ok"
    running_receiver.received.clear()
    return running_receiver


@pytest.fixture
def notifying(settings: Settings, receiver: Receiver) -> Settings:
    """The session's settings with the receiver's host:port allowed, and quick retries."""
    return settings.model_copy(
        update={
            "callback_hosts": f"example.org, 127.0.0.1:{receiver.port}",
            "callback_retry_base_s": 0.2,
            "callback_retry_max_s": 1.0,
            "callback_timeout_s": 2.0,
            "callback_poll_interval_s": 0.1,
        }
    )


@pytest.fixture
async def api(notifying: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(notifying) as client:
        yield client


@pytest.fixture
async def auth(sessions: Sessions) -> dict[str, str]:
    return await new_key(sessions, "pipeline")


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300) -> bool:
    """The README's recipe for a receiver."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(time.time() - timestamp) <= tolerance_s and hmac.compare_digest(expected, fields["v1"])


async def submit_notifying(
    api: httpx.AsyncClient, auth: dict[str, str], url: str, n: int = 1
) -> tuple[str, str]:
    """POST a job naming `url`; its id and callback secret."""
    prompts = [f"Prompt {i}: how do tides work?" for i in range(n)]
    response = await api.post("/v1/jobs", json={"prompts": prompts, "callback_url": url}, headers=auth)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["callback_secret"].startswith("aidsafe_cbsec_")
    return job["id"], job["callback_secret"]


async def deliveries(sessions: Sessions, job_id: str) -> list[CallbackDelivery]:
    async with sessions() as session:
        query = select(CallbackDelivery).where(CallbackDelivery.job_id == UUID(job_id))
        return list(await session.scalars(query))


async def send_until(sender: Sender, check: Any, what: str) -> None:
    async def sent() -> Any:
        await sender.send_due()
        return check()

    await eventually(sent, timeout_s=20, what=what)


async def deliver_once(notifying: Settings, sessions: Sessions, receiver: Receiver) -> None:
    """Send what is due until the receiver has a callback, then a few times more (nothing
    more should be due)."""
    sender = Sender(notifying, sessions)
    try:
        await send_until(sender, lambda: receiver.received, "the callback")
        for _ in range(3):
            await sender.send_due()
    finally:
        await sender.aclose()


async def test_a_callback_arrives_once_with_a_valid_signature(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    job_id, secret = await submit_notifying(api, auth, receiver.url, n=3)
    await run_worker_burst(notifying)
    await deliver_once(notifying, sessions, receiver)

    assert len(receiver.received) == 1
    (request,) = receiver.received
    assert verify(secret, request.headers[SIGNATURE_HEADER.lower()], request.body)
    assert not verify("aidsafe_cbsec_another", request.headers[SIGNATURE_HEADER.lower()], request.body)
    body = orjson.loads(request.body)
    assert body["event"] == "job.finished"
    assert body["job_id"] == job_id
    assert body["status"] == "completed"
    assert body["counts"] == {"total": 3, "by_status": {"completed": 3}}
    assert body["finished_at"] is not None
    assert request.headers[DELIVERY_HEADER.lower()] == body["delivery_id"]
    log = (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json()
    assert log["url"] == receiver.url
    (delivery,) = log["deliveries"]
    assert delivery["id"] == body["delivery_id"]
    assert delivery["status"] == "delivered"
    assert delivery["next_attempt_at"] is None
    assert [(a["number"], a["status_code"], a["error"]) for a in delivery["log"]] == [(1, 200, None)]
    assert delivery["log"][0]["response_snippet"] == "ok"


async def test_a_failing_receiver_is_retried_with_back_off_until_it_answers(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    receiver.failures = 2
    job_id, secret = await submit_notifying(api, auth, receiver.url)
    await run_worker_burst(notifying)
    # Back-offs of 0.5 to 1 s: long enough to see the delivery is not due in between.
    sender = Sender(notifying.model_copy(update={"callback_retry_base_s": 1.0}), sessions)
    try:
        await sender.send_due()
        assert len(receiver.received) == 1
        await sender.send_due()  # backed off: not due yet
        assert len(receiver.received) == 1
        await send_until(sender, lambda: len(receiver.received) == 3, "the third attempt")
    finally:
        await sender.aclose()

    ids = {request.headers[DELIVERY_HEADER.lower()] for request in receiver.received}
    assert len(ids) == 1, "every attempt carries the same delivery id"
    assert all(verify(secret, r.headers[SIGNATURE_HEADER.lower()], r.body) for r in receiver.received)
    (delivery,) = (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json()["deliveries"]
    assert delivery["status"] == "delivered"
    assert delivery["attempts"] == 3
    assert [(a["number"], a["status_code"], a["error"]) for a in delivery["log"]] == [
        (1, 500, "answered HTTP 500"),
        (2, 500, "answered HTTP 500"),
        (3, 200, None),
    ]
    assert len(delivery["log"][0]["response_snippet"]) == 200, "only the start of an answer is kept"


async def test_an_answer_postgres_cannot_store_is_logged_replaced_and_the_delivery_ends(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    # A NUL byte in the answer failed the attempt's insert: the delivery stayed claimed and
    # was sent again at every lease, for ever.
    receiver.answer = "ok\x00thanks"
    job_id, _ = await submit_notifying(api, auth, receiver.url)
    await run_worker_burst(notifying)
    await deliver_once(notifying, sessions, receiver)

    assert len(receiver.received) == 1
    (delivery,) = (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json()["deliveries"]
    assert delivery["status"] == "delivered"
    assert [(a["number"], a["status_code"], a["error"]) for a in delivery["log"]] == [(1, 200, None)]
    assert delivery["log"][0]["response_snippet"] == "ok\ufffdthanks"


async def test_an_attempt_postgres_fails_to_record_is_sent_again_after_its_lease_and_the_others_are_recorded(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    notifying: Settings,
    sessions: Sessions,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It escaped the batch's gather: send_due raised while the other sends ran on unawaited.
    job_ids = [(await submit_notifying(api, auth, receiver.url))[0] for _ in range(3)]
    await run_worker_burst(notifying)
    [failing] = await deliveries(sessions, job_ids[0])
    sender = Sender(notifying, sessions)
    try:
        async with failing_once(sessions, "callback_attempts", f"NEW.delivery_id = '{failing.id}'"):
            assert await sender.send_due() == 3

        assert len(receiver.received) == 3
        for job_id in job_ids[1:]:
            [delivered] = await deliveries(sessions, job_id)
            assert (delivered.status, await _attempt_log(sessions, delivered.id)) == ("delivered", [(1, 200)])
        [unrecorded] = await deliveries(sessions, job_ids[0])
        assert (unrecorded.status, await _attempt_log(sessions, failing.id)) == ("pending", [])
        assert f"callback delivery {failing.id} attempt 1 not recorded" in caplog.text
        assert await sender.send_due() == 0, "due again before its claim's lease ran out"

        await _lease_runs_out(sessions, failing.id)
        assert await sender.send_due() == 1
    finally:
        await sender.aclose()

    assert [r.headers[DELIVERY_HEADER.lower()] for r in receiver.received].count(str(failing.id)) == 2
    [redelivered] = await deliveries(sessions, job_ids[0])
    assert (redelivered.status, await _attempt_log(sessions, failing.id)) == ("delivered", [(2, 200)])


async def _attempt_log(sessions: Sessions, delivery_id: UUID) -> list[tuple[int, int | None]]:
    async with sessions() as session:
        rows = await session.execute(
            select(CallbackAttempt.number, CallbackAttempt.status_code)
            .where(CallbackAttempt.delivery_id == delivery_id)
            .order_by(CallbackAttempt.number)
        )
        return [(number, status_code) for number, status_code in rows]


async def _lease_runs_out(sessions: Sessions, delivery_id: UUID) -> None:
    """Move the delivery's claim back to now, as if its lease had run out."""
    async with sessions.begin() as session:
        lease = await session.scalar(
            select(type_coerce(CallbackDelivery.next_attempt_at - func.now(), Interval)).where(
                CallbackDelivery.id == delivery_id
            )
        )
        # The claim's lease: callback_timeout_s + 30 s from when it was claimed.
        assert lease is not None and lease.total_seconds() > 20, "due again before its lease ran out"
        await session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.id == delivery_id)
            .values(next_attempt_at=func.now())
        )


async def send_until_given_up(sender: Sender, sessions: Sessions, job_id: str) -> None:
    async def gave_up() -> bool:
        await sender.send_due()
        return (await deliveries(sessions, job_id))[0].status == "gave_up"

    await eventually(gave_up, timeout_s=20, what="the delivery to give up")


async def test_a_delivery_gives_up_when_the_retry_period_runs_out(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    receiver.failures = 100
    job_id, _ = await submit_notifying(api, auth, receiver.url)
    await run_worker_burst(notifying)
    sender = Sender(notifying.model_copy(update={"callback_retry_for_s": 1.0}), sessions)

    try:
        await send_until_given_up(sender, sessions, job_id)
        await asyncio.sleep(1.5)  # past any back-off
        await sender.send_due()
    finally:
        await sender.aclose()

    (delivery,) = (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json()["deliveries"]
    assert delivery["status"] == "gave_up"
    assert delivery["next_attempt_at"] is None
    assert 2 <= len(delivery["log"]) == len(receiver.received) < 10


async def test_a_delivery_the_client_cannot_send_fails_its_attempts_and_gives_up(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions
) -> None:
    # A host label longer than IDNA's 63 characters passes the allow-list, but aiohttp raises
    # UnicodeError (no ClientError) as it sends: the delivery was claimed again at every
    # lease, no attempt logged, and it never gave up.
    host = "a" * 64 + ".example"
    allowing = notifying.model_copy(update={"callback_hosts": f"{notifying.callback_hosts}, {host}"})
    async with api_client(allowing) as client:
        job_id, _ = await submit_notifying(client, auth, f"http://{host}/hook")
    await run_worker_burst(notifying)
    sender = Sender(allowing.model_copy(update={"callback_retry_for_s": 1.0}), sessions)

    try:
        await sender.send_due()
        (delivery,) = (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json()["deliveries"]
        assert delivery["status"] == "pending", "one failed attempt is retried"
        await send_until_given_up(sender, sessions, job_id)
    finally:
        await sender.aclose()

    (delivery,) = (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json()["deliveries"]
    assert delivery["next_attempt_at"] is None
    assert 2 <= len(delivery["log"]) == delivery["attempts"] < 10
    assert all(a["status_code"] is None and "UnicodeError" in a["error"] for a in delivery["log"])


@pytest.mark.parametrize(
    ("hosts", "url", "code"),
    [
        ("", "http://127.0.0.1:9/hook", "callbacks_disabled"),
        ("127.0.0.1:9", "http://127.0.0.1:10/hook", "callback_host_not_allowed"),
        ("127.0.0.1:9", "http://10.0.0.1:9/hook", "callback_host_not_allowed"),
        ("127.0.0.1", "https://localhost/hook", "callback_host_not_allowed"),
        ("example.org:443", "http://example.org/hook", "callback_host_not_allowed"),
        ("127.0.0.1:9", "ftp://127.0.0.1:9/hook", "invalid_callback_url"),
        ("127.0.0.1:9", "http://user:pw@127.0.0.1:9/hook", "invalid_callback_url"),
        ("127.0.0.1:9", "127.0.0.1:9/hook", "invalid_callback_url"),
    ],
)
async def test_a_callback_off_the_allow_list_is_refused_at_submission(
    settings: Settings, sessions: Sessions, auth: dict[str, str], hosts: str, url: str, code: str
) -> None:
    async with api_client(settings.model_copy(update={"callback_hosts": hosts})) as api:
        job = await api.post("/v1/jobs", json={"prompts": ["Hi"], "callback_url": url}, headers=auth)
        comparison = await api.post(
            "/v1/comparisons",
            json={"baseline_job_id": str(uuid4()), "candidate_job_id": str(uuid4()), "callback_url": url},
            headers=auth,
        )
    for refused in (job, comparison):
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == code
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(CallbackDelivery)) == 0


async def test_an_allowed_host_names_any_port_and_is_matched_without_case(
    settings: Settings, sessions: Sessions, auth: dict[str, str]
) -> None:
    async with api_client(settings.model_copy(update={"callback_hosts": "Example.ORG"})) as api:
        job = await api.post(
            "/v1/jobs", json={"prompts": ["Hi"], "callback_url": "https://EXAMPLE.org:8443/h"}, headers=auth
        )
    assert job.status_code == 202, job.text


async def test_a_delivery_is_refused_at_sending_once_its_host_left_the_allow_list(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    job_id, _ = await submit_notifying(api, auth, receiver.url)
    await run_worker_burst(notifying)
    sender = Sender(notifying.model_copy(update={"callback_hosts": "example.org"}), sessions)
    try:
        await sender.send_due()
    finally:
        await sender.aclose()

    assert receiver.received == []
    (delivery,) = (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json()["deliveries"]
    assert delivery["status"] == "refused"
    (attempt,) = delivery["log"]
    assert attempt["status_code"] is None
    assert "allow-list" in attempt["error"]


async def test_cancelling_a_job_before_it_ran_announces_it_cancelled(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    job_id, secret = await submit_notifying(api, auth, receiver.url, n=2)
    assert await deliveries(sessions, job_id) == []
    cancelled = await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert cancelled.json()["status"] == "cancelled"
    await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)  # twice: still one delivery
    sender = Sender(notifying, sessions)
    try:
        await send_until(sender, lambda: receiver.received, "the callback")
    finally:
        await sender.aclose()

    assert len(await deliveries(sessions, job_id)) == 1
    (request,) = receiver.received
    body = orjson.loads(request.body)
    assert (body["status"], body["counts"]) == ("cancelled", {"total": 2, "by_status": {"cancelled": 2}})
    assert verify(secret, request.headers[SIGNATURE_HEADER.lower()], request.body)


async def test_another_keys_job_has_no_callback_log_for_you(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, receiver: Receiver
) -> None:
    job_id, _ = await submit_notifying(api, auth, receiver.url, n=1)
    stranger = await new_key(sessions, "stranger")

    answer = await api.get(f"/v1/jobs/{job_id}/callbacks", headers=stranger)

    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert receiver.url not in answer.text


async def test_a_job_without_a_callback_writes_no_delivery(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions
) -> None:
    response = await api.post("/v1/jobs", json={"prompts": ["Hi", "Hello"]}, headers=auth)
    job_id = response.json()["id"]
    assert response.json()["callback_secret"] is None
    await run_worker_burst(notifying)
    assert await deliveries(sessions, job_id) == []
    assert (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json() == {
        "url": None,
        "deliveries": [],
    }


async def test_a_callback_arrives_after_the_worker_was_killed_between_the_jobs_end_and_its_delivery(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    notifying: Settings,
    sessions: Sessions,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    # The first worker runs the job, but looks for due deliveries only when it starts.
    workers.append(start_worker(notifying.model_copy(update={"callback_poll_interval_s": 3600})))
    job_id, secret = await submit_notifying(api, auth, receiver.url, n=2)

    async def ended() -> bool:
        status: str = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["status"]
        return status == "completed"

    await eventually(ended, timeout_s=60, what="the job to end")
    (delivery,) = await deliveries(sessions, job_id)
    assert delivery.status == "pending"
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    assert receiver.received == []

    workers.append(start_worker(notifying))
    await eventually(lambda: _received(receiver), timeout_s=30, what="the callback")
    (request,) = receiver.received
    assert orjson.loads(request.body)["job_id"] == job_id
    assert verify(secret, request.headers[SIGNATURE_HEADER.lower()], request.body)


async def _received(receiver: Receiver) -> bool:
    return bool(receiver.received)


async def test_a_redirect_is_not_followed(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    job_id, _ = await submit_notifying(api, auth, receiver.url.replace("/aidsafe", "/moved"))
    await run_worker_burst(notifying)
    sender = Sender(notifying, sessions)
    try:
        await sender.send_due()
    finally:
        await sender.aclose()

    assert receiver.received == []
    (delivery,) = (await api.get(f"/v1/jobs/{job_id}/callbacks", headers=auth)).json()["deliveries"]
    assert delivery["status"] == "pending"
    assert [(a["status_code"], a["error"]) for a in delivery["log"]] == [(307, "answered HTTP 307")]


async def test_a_comparison_announces_its_end(
    api: httpx.AsyncClient, auth: dict[str, str], notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    prompts = {"prompts": ["How do tides work?", "Why is the sky blue?"]}
    job_ids = [(await api.post("/v1/jobs", json=prompts, headers=auth)).json()["id"] for _ in range(2)]
    await run_worker_burst(notifying)
    assert receiver.received == [] and await deliveries(sessions, job_ids[0]) == []
    made = await api.post(
        "/v1/comparisons",
        json={"baseline_job_id": job_ids[0], "candidate_job_id": job_ids[1], "callback_url": receiver.url},
        headers=auth,
    )
    assert made.status_code == 202, made.text
    comparison_id, secret = made.json()["id"], made.json()["callback_secret"]
    await run_worker_burst(notifying)
    sender = Sender(notifying, sessions)
    try:
        await send_until(sender, lambda: receiver.received, "the callback")
    finally:
        await sender.aclose()

    (request,) = receiver.received
    body = orjson.loads(request.body)
    assert (body["job_id"], body["mode"], body["status"]) == (comparison_id, "comparison", "completed")
    assert body["counts"] == {"total": 2, "by_status": {"completed": 2}}
    assert verify(secret, request.headers[SIGNATURE_HEADER.lower()], request.body)


async def test_of_two_transactions_ending_a_jobs_last_items_one_writes_its_delivery(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, receiver: Receiver
) -> None:
    """Each sees the other's item unfinished while neither has committed: the second waits
    for the first, then sees the job finished."""
    job_id, _ = await submit_notifying(api, auth, receiver.url, n=2)
    async with sessions() as session:
        item_ids = list(await session.scalars(select(Item.id).where(Item.job_id == UUID(job_id))))
    first, second = sessions(), sessions()
    try:
        for session, item_id in ((first, item_ids[0]), (second, item_ids[1])):
            await session.execute(update(Item).where(Item.id == item_id).values(ending_values(COMPLETED)))
        await callbacks.record_if_finished(first, UUID(job_id))  # the other item still runs
        waiting = asyncio.create_task(callbacks.record_if_finished(second, UUID(job_id)))
        await asyncio.sleep(0.5)
        assert not waiting.done(), "the second must wait for the first to commit"
        await first.commit()
        await waiting
        await second.commit()
    finally:
        await first.close()
        await second.close()
    (delivery,) = await deliveries(sessions, job_id)
    assert delivery.payload["counts"] == {"total": 2, "by_status": {"completed": 2}}


async def stored_secret(sessions: Sessions, job_id: str) -> str | None:
    async with sessions() as session:
        return await session.scalar(select(Job.callback_secret).where(Job.id == UUID(job_id)))


@pytest.mark.parametrize(
    ("outcome", "failures", "sending"),
    [
        ("delivered", 0, {}),
        ("gave_up", 100, {"callback_retry_for_s": 1.0}),
        ("refused", 0, {"callback_hosts": "example.org"}),
    ],
)
async def test_a_jobs_callback_secret_is_erased_once_its_delivery_is_over(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    notifying: Settings,
    sessions: Sessions,
    receiver: Receiver,
    outcome: str,
    failures: int,
    sending: dict[str, Any],
) -> None:
    receiver.failures = failures
    body = {"prompts": ["How do tides work?"], "callback_url": receiver.url}
    headers = {**auth, "Idempotency-Key": f"erased-{outcome}"}
    submitted = await api.post("/v1/jobs", json=body, headers=headers)
    job_id = submitted.json()["id"]
    await run_worker_burst(notifying)
    assert await stored_secret(sessions, job_id) == submitted.json()["callback_secret"]
    sender = Sender(notifying.model_copy(update=sending), sessions)

    async def over() -> bool:
        await sender.send_due()
        return (await deliveries(sessions, job_id))[0].status == outcome

    try:
        await eventually(over, timeout_s=20, what=f"the delivery to end {outcome}")
    finally:
        await sender.aclose()

    assert await stored_secret(sessions, job_id) is None
    replay = await api.post("/v1/jobs", json=body, headers=headers)
    assert (replay.status_code, replay.json()["id"], replay.json()["callback_secret"]) == (200, job_id, None)


async def test_no_answer_or_log_line_shows_a_pending_deliverys_secret(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    notifying: Settings,
    sessions: Sessions,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.failures = 100
    job_id, secret = await submit_notifying(api, auth, receiver.url)
    await run_worker_burst(notifying)
    sender = Sender(notifying.model_copy(update={"callback_retry_base_s": 60.0}), sessions)
    try:
        await send_until(sender, lambda: receiver.received, "a failed attempt")
    finally:
        await sender.aclose()
    assert (await deliveries(sessions, job_id))[0].status == "pending"

    for path in (
        "/v1/jobs",
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/items",
        f"/v1/jobs/{job_id}/callbacks",
        f"/v1/jobs/{job_id}/export?format=jsonl",
        f"/v1/jobs/{job_id}/export?format=aidsafe_csv",
    ):
        answer = await api.get(path, headers=auth)
        assert answer.status_code == 200, (path, answer.text)
        assert secret not in answer.text, path
    assert caplog.records and secret not in caplog.text


async def test_one_keys_backlog_of_deliveries_does_not_hold_up_another_keys(
    settings: Settings, sessions: Sessions
) -> None:
    """A key whose jobs all name a receiver that never answers (each attempt then takes the
    whole timeout) must not take every claim: another key's delivery, due after them, is
    claimed among the first, not once the backlog is through."""
    unanswered = "http://127.0.0.1:9/hooks/aidsafe"  # nothing listens on the discard port
    flooder, other = await new_key(sessions, "flooder"), await new_key(sessions, "other")
    async with api_client(settings.model_copy(update={"callback_hosts": "127.0.0.1:9"})) as api:
        backlog = [await submit_notifying(api, flooder, unanswered) for _ in range(6)]
        waiting, _ = await submit_notifying(api, other, unanswered)
        cancels = [*((job_id, flooder) for job_id, _ in backlog), (waiting, other)]
        for job_id, auth in cancels:  # each ends, before it ran, with a delivery due
            assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200
    flooders = {UUID(job_id) for job_id, _ in backlog}

    claimed_first: list[UUID] = []
    while UUID(waiting) not in claimed_first:
        claimed = await callbacks.claim_due(sessions, limit=2, lease_s=600)
        assert claimed, "the other key's delivery was never claimed"
        claimed_first += [due.job_id for due in claimed]
    assert len(flooders.intersection(claimed_first)) <= 2, claimed_first


async def test_a_cookie_one_receiver_set_is_not_sent_with_another_keys_delivery(
    notifying: Settings, sessions: Sessions, receiver: Receiver
) -> None:
    """The workers' sender is shared by every key: what one key's receiver asks it to keep
    (a cookie, sent again to that host on any port and path) must not reach another's."""
    by_name = notifying.model_copy(update={"callback_hosts": f"localhost:{receiver.port}"})
    at = f"http://localhost:{receiver.port}/hooks"
    setter, reader = await new_key(sessions, "cookie-setter"), await new_key(sessions, "cookie-reader")
    sender = Sender(by_name, sessions)
    try:
        async with api_client(by_name) as api:
            for auth, url in ((setter, f"{at}/cookie"), (reader, f"{at}/aidsafe")):
                job_id, _ = await submit_notifying(api, auth, url)
                assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 200

                async def delivered(job_id: str = job_id) -> bool:
                    await sender.send_due()
                    return [d.status for d in await deliveries(sessions, job_id)] == ["delivered"]

                await eventually(delivered, timeout_s=20, what=f"the delivery to {url}")
    finally:
        await sender.aclose()

    (request,) = receiver.received
    assert "cookie" not in request.headers, request.headers["cookie"]


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "fe80::1", "224.0.0.1", "ff02::1", "0.0.0.0", "240.0.0.1"]
)
async def test_a_listed_name_is_never_resolved_to_a_link_local_multicast_or_reserved_address(
    address: str,
) -> None:
    """A tenant whose own domain is on the allow-list controls what it resolves to: pointed at
    the cloud's metadata service, its callbacks would read it. The address resolves as such a
    name would (the system's resolver, no DNS needed); loopback stays, for receivers there."""
    resolver = ListedNameResolver()
    try:
        with pytest.raises(OSError, match="resolves to no address a callback may be sent to"):
            await resolver.resolve(address, 80, socket.AF_UNSPEC)
        assert {r["host"] for r in await resolver.resolve("localhost", 80)} == {"127.0.0.1"}
    finally:
        await resolver.close()


@pytest.mark.parametrize(
    "entry", ["example.com:99999", "example.com:http", "me@example.com", "example.com/hook", ":8080"]
)
def test_a_callback_host_entry_that_is_no_host_is_refused_as_the_settings_load(entry: str) -> None:
    """Read only at the first submission naming a callback, it was a 500 there, and at every
    send of the workers a delivery claimed again and again, never recorded."""
    with pytest.raises(ValidationError) as refused:
        Settings(callback_hosts=f"localhost, {entry}")
    assert refusals(refused.value) == [("AIDSAFE_CALLBACK_HOSTS", f"{entry!r} is not a host or host:port")]


async def due_deliveries(sessions: Sessions, settings: Settings, per_key: list[int]) -> list[list[UUID]]:
    """Keys with that many ended jobs each, every job's delivery written as its end writes it
    and due: key by key, the ids of its deliveries, oldest first. Older than any other test's,
    so that these keys' first turns come first."""
    plan = resolve(JobConfigIn(), settings)
    by_key: list[list[UUID]] = []
    async with sessions.begin() as session:
        for count in per_key:
            key, _ = await keys.create_key(session, "due")
            policy_set = await policy_sets.resolve_for_job(session, key.id, "aidsafe-default", None)
            jobs = [
                Job(
                    owner_key_id=key.id,
                    policy_set_id=policy_set.id,
                    plan=plan,
                    request_hash="h",
                    item_count=0,
                    callback_url="http://127.0.0.1:9/hooks",
                    callback_secret="s",
                )
                for _ in range(count)
            ]
            session.add_all(jobs)
            await session.flush()
            for job in jobs:
                await callbacks.record_if_finished(session, job.id)
            by_key.append(
                list(
                    await session.scalars(
                        select(CallbackDelivery.id).where(CallbackDelivery.job_id.in_(j.id for j in jobs))
                    )
                )
            )
        # Due times a second apart, in the order of the flat list of all keys' deliveries.
        order = [delivery_id for ids in by_key for delivery_id in ids]
        for n, delivery_id in enumerate(order):
            await session.execute(
                update(CallbackDelivery)
                .where(CallbackDelivery.id == delivery_id)
                .values(next_attempt_at=func.now() - timedelta(days=1) + timedelta(seconds=n))
            )
    return by_key


def rows_read(plan: list[str], table: str) -> int:
    """Rows the plan's scans of `table` returned, over all their loops."""
    scans = re.findall(
        rf"Scan (?:using \S+ )?on {table}\b.*actual time=\S+ rows=(\d+) loops=(\d+)", "\n".join(plan)
    )
    return sum(int(rows) * int(loops) for rows, loops in scans)


async def test_a_claim_behind_one_keys_backlog_reads_a_batch_of_each_first_key_not_the_backlog(
    settings: Settings, sessions: Sessions
) -> None:
    """Numbered whole, a backlog of 100,000 took 0.7-1.8 s a claim (bench/callback_claims.py):
    a claim now reads each key's soonest delivery, then at most a batch of each of the keys
    whose first turns are the oldest. With more keys due than a batch, the batch is their
    first turns: not the backlog's second, nor the first turns of keys due later."""
    flooder, *others = await due_deliveries(sessions, settings, [400, 2, 2, 2, 2, 2, 2])
    async with sessions() as session:
        keys_pending = await session.scalar(
            select(func.count(func.distinct(Job.owner_key_id)).label("keys"))
            .join(CallbackDelivery, CallbackDelivery.job_id == Job.id)
            .where(CallbackDelivery.status == "pending")
        )
    batch = 5

    claimed = {due.id for due in await callbacks.claim_due(sessions, batch, lease_s=600)}
    plan = await explain_claim(sessions, batch, generic=True)  # of the next claim

    assert claimed == {flooder[0], *(ids[0] for ids in others[:4])}
    assert keys_pending is not None
    # one per key pending and the end of the keys, a batch per first key, the batch and a spare
    assert rows_read(plan, "callback_deliveries") <= keys_pending + 1 + batch * batch + 2 * batch, "\n".join(
        plan
    )


async def test_concurrent_claims_take_each_due_delivery_once(settings: Settings, sessions: Sessions) -> None:
    """SKIP LOCKED: a claim passes over the rows another one is taking, and takes none twice."""
    ours = {
        delivery_id
        for ids in await due_deliveries(sessions, settings, [30, 10, 10, 5, 1])
        for delivery_id in ids
    }
    claimed: list[UUID] = []
    while True:
        rounds = await asyncio.gather(*(callbacks.claim_due(sessions, 4, lease_s=600) for _ in range(8)))
        taken = [due.id for batch in rounds for due in batch]
        if not taken and not await callbacks.claim_due(sessions, 4, lease_s=600):
            break
        claimed += taken

    assert len(claimed) == len(set(claimed))
    assert ours <= set(claimed)
