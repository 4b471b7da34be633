"""One API key's requests hold at most `threads_per_key` of the API process's worker threads at
once (app/threads.py, ApiState.thread_turns): the rest of a key's burst waits for its turn,
never refused, and another key's request takes one of the threads left. Before, every call
took the shared pool first come, first served: a light listing waited 3.5 s behind another
key's 12 viewer item pages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from contextvars import ContextVar, copy_context
from functools import partial
from typing import Any, TypeVar
from uuid import uuid4

import anyio
import httpx
import pytest

from app.api.key_turns import KeyTurns
from app.config import Settings
from app.main import create_app
from app.store.db import Sessions
from app.threads import in_thread, in_turns
from tests.conftest import api_client, new_key, submit
from tests.scripted_llm import ScriptedLLM
from tests.test_api import error_of, items_of
from tests.test_comparison_reports import finished_comparison
from tests.test_thread_waits import BusyThreads, busy_threads
from tests.test_viewer import logged_in
from tests.test_webhooks import HEADER, new_webhook

T = TypeVar("T")

# Set in the burst's requests: their work in the thread pool is held (BusyThreads' `holds`).
IN_BURST: ContextVar[bool] = ContextVar("in_burst", default=False)
BURST = 6


def in_burst(request: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """`request` sent in a task of its own, as part of the burst."""
    context = copy_context()
    context.run(IN_BURST.set, True)
    return asyncio.create_task(request, context=context)


@pytest.mark.parametrize("page", ["/v1/items/{item}", "/view/items/{item}"])
async def test_a_keys_burst_holds_its_share_of_threads_and_another_keys_request_takes_one_at_once(
    settings: Settings, sessions: Sessions, auth: dict[str, str], page: str
) -> None:
    share = settings.threads_per_key
    other = await new_key(sessions, "other")
    # None of the burst's calls waiting for a thread is refused, past the most waiting too.
    async with api_client(settings.model_copy(update={"max_waiting_per_key": 1})) as api:
        [item] = await items_of(api, auth, await submit(api, auth, ["How do I store rice?"]))
        await logged_in(api, auth)  # the viewer's pages: as the burst's key
        url = page.format(item=item["id"])
        # The pool has a thread more than the key's share: before, the burst took it.
        with busy_threads(share + 1, holds=IN_BURST.get) as threads:
            burst = [in_burst(api.get(url, headers=auth)) for _ in range(BURST)]
            listing, answers = await answered_beside(
                burst, share, threads, api.get("/v1/jobs", headers=other)
            )
    assert listing.status_code == 200, listing.text
    assert [answer.status_code for answer in answers] == [200] * BURST


async def test_a_keys_burst_of_webhook_deliveries_is_read_in_its_share_of_threads(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, settings: Settings
) -> None:
    """A delivery is read in its webhook's key's turns, as that key's requests are: each took a
    thread as it came, so one key's flood of deliveries held every thread of the process."""
    share = settings.threads_per_key
    other = await new_key(sessions, "other")
    webhook = await new_webhook(api, auth)
    to_webhook = httpx.URL(webhook["url"]).path
    secret = {HEADER: webhook["secret"]}
    event = {"action": "PROJECT_UPDATED", "project": {"id": 3}}  # acknowledged, once read
    with busy_threads(share + 1, holds=IN_BURST.get) as threads:
        burst = [in_burst(api.post(to_webhook, json=event, headers=secret)) for _ in range(BURST)]
        listing, answers = await answered_beside(burst, share, threads, api.get("/v1/jobs", headers=other))
    assert listing.status_code == 200, listing.text
    assert [answer.status_code for answer in answers] == [200] * BURST


async def test_a_keys_sample_file_is_read_in_its_turns_for_a_thread(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings
) -> None:
    """An uploaded file of samples is read (seconds of CPU for a large one) in its key's turns,
    as a body is decoded: read in anyio's threads, beside the key's share, a key's burst of
    uploads read as many files at once as it had bodies in memory. With the key's share taken,
    an upload waits, even one whose file is refused."""
    share = settings.threads_per_key
    [item] = await items_of(api, auth, await submit(api, auth, ["How do I store rice?"]))
    with busy_threads(share + 1, holds=IN_BURST.get) as threads:
        burst = [in_burst(api.get(f"/v1/items/{item['id']}", headers=auth)) for _ in range(share)]
        await asyncio.wait_for(threads.until_handed(share), timeout=30)
        upload = asyncio.ensure_future(
            api.post(
                "/v1/sample-evaluations/upload",
                params={"options": '{"grade": {}}', "file_type": "jsonl"},
                content=b"not JSON\n",
                headers=auth,
            )
        )
        await asyncio.wait([upload], timeout=2)
        assert not upload.done(), upload.result().text
        threads.free()
        answers = await asyncio.gather(*burst)
    error_of(await upload, 422, "invalid_sample_file")
    assert [answer.status_code for answer in answers] == [200] * share


async def answered_beside(
    burst: list[asyncio.Task[httpx.Response]],
    share: int,
    threads: BusyThreads,
    request: Awaitable[httpx.Response],
) -> tuple[httpx.Response, list[httpx.Response]]:
    """`request`'s answer, sent once the burst has handed its share of calls to the held pool,
    and the burst's answers once the pool is freed. `request` is answered while the burst's other
    calls wait for their turn, none handed to the pool."""
    await asyncio.wait_for(threads.until_handed(share), timeout=30)
    answer = asyncio.ensure_future(request)
    one_more = asyncio.ensure_future(threads.until_handed(1))
    await asyncio.wait([answer, one_more], return_when=asyncio.FIRST_COMPLETED)
    assert not one_more.done()  # the burst's other calls wait for a turn, not in the pool
    one_more.cancel()
    assert answer.done()
    threads.free()
    return answer.result(), await asyncio.gather(*burst)


# Per request of a burst of plots, its calls for a thread so far: the first computes the
# comparison's figures, the next draws.
THREAD_CALLS: ContextVar[list[None]] = ContextVar("thread_calls")


def drawing_in_burst() -> bool:
    """Whether the work handed to the thread pool now is a burst request's drawing."""
    if not IN_BURST.get():
        return False
    calls = THREAD_CALLS.get()
    calls.append(None)
    return len(calls) > 1


async def test_a_keys_burst_of_plots_draws_in_its_share_of_threads_and_another_keys_plot_at_once(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    sessions: Sessions,
    settings: Settings,
    scripted_llm: ScriptedLLM,
) -> None:
    other = await new_key(sessions, "other")
    mine = await finished_comparison(api, auth, sessions, settings, scripted_llm)
    theirs = await finished_comparison(api, other, sessions, settings, scripted_llm)
    share = settings.threads_per_key

    def plot_in_burst() -> asyncio.Task[httpx.Response]:
        THREAD_CALLS.set([])  # in the copy of this context in_burst's task runs in
        return in_burst(api.get(f"/v1/comparisons/{mine}/plots/scores.png", headers=auth))

    with busy_threads(share + 1, holds=drawing_in_burst) as threads:
        # Before, plots were drawn in anyio's threads, two at a time for the whole process: none
        # reached the pool, the burst took both drawing turns, and another key's plot waited
        # behind all of it.
        plots = [copy_context().run(plot_in_burst) for _ in range(BURST)]
        theirs_drawn = api.get(f"/v1/comparisons/{theirs}/plots/scores.png", headers=other)
        plot, answers = await answered_beside(plots, share, threads, theirs_drawn)
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert [answer.status_code for answer in answers] == [200] * BURST


async def test_a_keys_turns_for_threads_end_with_its_request(
    settings: Settings, auth: dict[str, str]
) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            # Answered in this task, in its context, as a test's requests are.
            assert (await api.get("/v1/jobs", headers=auth)).status_code == 200
        with busy_threads() as threads:
            call = asyncio.ensure_future(in_thread(str))
            await threads.until_handed(1)
            assert len(app.state.api.thread_turns) == 0  # a call without a key, as a worker's
            threads.free()
            assert await call == ""


@pytest.mark.parametrize("cancels", ["once", "twice", "in_a_cancelled_anyio_scope"])
async def test_a_call_cancelled_while_its_thread_works_keeps_its_turn_until_the_thread_is_done(
    cancels: str,
) -> None:
    """Given back at the cancel, the turn let a key that hangs up on its requests (an upload
    cancelled while its file is decoded) start more work than its share of threads. So it was
    at a second cancel while the call waited for its thread: anyio cancels a cancelled scope's
    task again at every await (Starlette's, as a client hangs up on a streamed response)."""
    turns, key, scope = KeyTurns(1, max_waiting=None), uuid4(), anyio.CancelScope()
    with busy_threads() as threads, in_turns(partial(turns.turn, key)):
        cancelled = asyncio.ensure_future(_in_scope(scope, in_thread(str, "cancelled")))
        await threads.until_handed(1)
        if cancels == "in_a_cancelled_anyio_scope":
            scope.cancel()
        else:
            cancelled.cancel()
        if cancels == "twice":
            await asyncio.sleep(0.05)
            cancelled.cancel()
        after = asyncio.ensure_future(in_thread(str, "after"))
        await asyncio.sleep(0.2)
        assert threads.handed.empty() and not cancelled.done()  # both wait for the first thread

        threads.free()

        assert await after == "after"
        await asyncio.wait([cancelled])
        assert cancelled.cancelled() or (scope.cancelled_caught and cancelled.result() is None)
        assert len(turns) == 0


async def _in_scope(scope: anyio.CancelScope, call: Awaitable[T]) -> T | None:
    """`call`'s result, or None if `scope` cancelled it."""
    with scope:
        return await call
    return None


async def test_turns_with_no_bound_on_the_waiting_refuse_none_and_come_in_order() -> None:
    turns, key = KeyTurns(2, max_waiting=None), uuid4()
    order: list[int] = []

    async def call(n: int) -> None:
        async with turns.turn(key):
            order.append(n)
            await asyncio.sleep(0)

    await asyncio.gather(*(call(n) for n in range(100)))
    assert order == list(range(100))
    assert len(turns) == 0
