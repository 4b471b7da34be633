"""Routes that end in CPU work in a worker thread give their Postgres connection back first.

The threads are asyncio's default pool, a few for the whole process: behind other requests'
work there, a route that had read what it shows waited holding its connection in an open
transaction, and a key's burst of such requests held the API's whole pool (20), every
tenant's requests waiting for them. The pool is held busy here until every request is waiting
for it, then the connections they hold are counted.

A key's requests take at most its share of the threads at once (AIDSAFE_THREADS_PER_KEY), the
others waiting for its turn in `in_thread`, past the point where their connections were given
back: here the share is as large as a test's burst, so that every request waits in the pool."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

import httpx
import pytest
from sqlalchemy import text

from app import events
from app.config import Settings
from app.store.db import Sessions
from tests.conftest import api_client
from tests.scripted_llm import ScriptedLLM
from tests.test_api import items_of, submit
from tests.test_comparison_reports import finished_comparison
from tests.test_model_evaluation_api import benchmark_prompts, evaluation_body, submit_evaluation
from tests.test_quality_api import compare
from tests.test_sample_evaluations import upload
from tests.test_viewer import logged_in

P = ParamSpec("P")
T = TypeVar("T")
Headers = dict[str, str]


class BusyThreads(ThreadPoolExecutor):
    """A default thread pool (of `max_workers` threads) busy with other work: what is handed to
    it starts once `free` is called. `handed` gets a None as each piece of work is handed over
    (on the event loop). With `holds`, only the work handed over while it is true (asked on the
    event loop, in the caller's context) waits for `free` and is counted in `handed`."""

    def __init__(self, max_workers: int | None = None, holds: Callable[[], bool] = lambda: True) -> None:
        super().__init__(max_workers)
        self.handed: asyncio.Queue[None] = asyncio.Queue()
        self._holds = holds
        self._freed = threading.Event()

    def submit(self, work: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if not self._holds():
            return super().submit(work, *args, **kwargs)
        self.handed.put_nowait(None)
        return super().submit(self._when_freed, work, *args, **kwargs)

    def _when_freed(self, work: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        self._freed.wait()
        return work(*args, **kwargs)

    def free(self) -> None:
        self._freed.set()

    async def until_handed(self, pieces: int) -> None:
        for _ in range(pieces):
            await self.handed.get()


@contextmanager
def busy_threads(
    max_workers: int | None = None, holds: Callable[[], bool] = lambda: True
) -> Iterator[BusyThreads]:
    """The running loop's default thread pool busy (BusyThreads) inside, its own again after."""
    loop = asyncio.get_running_loop()
    own = getattr(loop, "_default_executor", None)  # asyncio has no getter
    busy = BusyThreads(max_workers, holds)
    loop.set_default_executor(busy)
    try:
        yield busy
    finally:
        busy.free()
        loop.set_default_executor(own or ThreadPoolExecutor())
        busy.shutdown(wait=False)


@pytest.fixture
async def api(settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings.model_copy(update={"threads_per_key": 32})) as client:
        yield client


async def held_in_transaction(sessions: Sessions) -> list[str]:
    """The last statement of each connection to this run's database idle in an open transaction."""
    async with sessions() as session:
        rows = await session.scalars(
            text(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND state = 'idle in transaction'"
            )
        )
        return list(rows)


SAMPLES = {"samples": [{"prompt": "Hi", "response": "Hello!"}], "grade": {}, "guard": {}}


@dataclass(frozen=True)
class Jobs:
    """A job of each kind, the key's: a job making preference pairs (its items queued), a
    finished comparison, a model evaluation and a sample evaluation graded and guarded (queued)."""

    job: str
    item: str
    comparison: str
    model_evaluation: str
    sample_evaluation: str


@pytest.fixture
async def every_kind(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> Jobs:
    comparison = await finished_comparison(api, auth, sessions, settings, scripted_llm)
    job = (await submit(api, auth, ["How do I store rice?"], config={"pairs": {}}))["id"]
    [item] = await items_of(api, auth, job)
    benchmark = {"name": "b", "prompts": benchmark_prompts(2)}
    model_evaluation = await submit_evaluation(api, auth, evaluation_body([benchmark], "m"))
    sample_evaluation = await api.post("/v1/sample-evaluations", json=SAMPLES, headers=auth)
    return Jobs(job, item["id"], comparison, model_evaluation["id"], sample_evaluation.json()["id"])


async def held_waiting_for_threads(
    api: httpx.AsyncClient, sessions: Sessions, urls: list[str], headers: Headers
) -> list[str]:
    """What `urls` requested at once hold once each waits for a thread: held_in_transaction's."""
    with busy_threads() as threads:
        answers = [asyncio.ensure_future(api.get(url, headers=headers)) for url in urls]
        await threads.until_handed(len(urls))
        held = await held_in_transaction(sessions)
        threads.free()
        statuses = {url: (await answer).status_code for url, answer in zip(urls, answers, strict=True)}
    assert statuses == dict.fromkeys(urls, 200)
    return held


async def test_routes_waiting_for_a_worker_thread_hold_no_database_connection(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, every_kind: Jobs
) -> None:
    job, comparison = every_kind.job, every_kind.comparison
    urls = [
        "/v1/jobs",
        "/v1/comparisons",
        f"/v1/jobs/{job}/items",
        f"/v1/jobs/{job}/cots",
        f"/v1/jobs/{job}/preference-pairs",
        f"/v1/jobs/{job}/reviews/summary",
        f"/v1/jobs/{job}/report",
        f"/v1/items/{every_kind.item}",
        f"/v1/comparisons/{comparison}",
        f"/v1/comparisons/{comparison}/report",
        f"/v1/model-evaluations/{every_kind.model_evaluation}",
        f"/v1/sample-evaluations/{every_kind.sample_evaluation}",
        f"/v1/sample-evaluations/{every_kind.sample_evaluation}/samples",
    ]
    assert await held_waiting_for_threads(api, sessions, urls, auth) == []


async def test_the_viewers_job_pages_waiting_for_a_worker_thread_hold_no_database_connection(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, every_kind: Jobs
) -> None:
    await logged_in(api, auth)
    shown = (every_kind.job, every_kind.comparison, every_kind.model_evaluation, every_kind.sample_evaluation)
    urls = [f"/view/jobs/{job}" for job in shown]
    assert await held_waiting_for_threads(api, sessions, urls, {}) == []


async def test_a_follower_reading_finished_items_holds_no_database_connection_waiting_for_a_thread(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job = (await submit(api, auth, ["How do I store rice?"]))["id"]
    with busy_threads() as threads:
        finished = asyncio.ensure_future(events.finished_since(sessions, UUID(job), 0))
        await threads.until_handed(1)
        held = await held_in_transaction(sessions)
        threads.free()
        assert await finished == []

    assert held == []


@dataclass
class ThreadCalls:
    """A request's calls for a worker thread so far, and from which one on (1-based) the pool
    holds them (None: none, only counted)."""

    held_from: int | None
    made: int = 0


# Set in a counted request's context (BusyThreads' `holds` asks in the caller's).
THREAD_CALLS: ContextVar[ThreadCalls | None] = ContextVar("thread_calls", default=None)


def held_by_its_request() -> bool:
    calls = THREAD_CALLS.get()
    if calls is None:
        return False
    calls.made += 1
    return calls.held_from is not None and calls.made >= calls.held_from


def counted(calls: ThreadCalls, request: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """`request` sent in a task of its own, its calls for a thread counted in `calls`."""
    context = copy_context()
    context.run(THREAD_CALLS.set, calls)
    return asyncio.create_task(request, context=context)


@pytest.mark.parametrize("route", ["comparison", "model evaluation", "sample evaluation", "upload"])
async def test_a_submission_waiting_for_a_thread_to_show_its_job_holds_no_database_connection(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, every_kind: Jobs, route: str
) -> None:
    """The job committed, the answer's report is made in a worker thread: the submission's
    session was held open, in a new transaction, for as long as it waited for one."""
    compared = (await api.get(f"/v1/comparisons/{every_kind.comparison}", headers=auth)).json()
    baseline, candidate = compared["baseline_job_id"], compared["candidate_job_id"]
    benchmark = {"name": "b", "prompts": benchmark_prompts(2)}
    jsonl = b'{"prompt": "Hi", "response": "Hello!"}\n'
    submissions: dict[str, Callable[[], Coroutine[Any, Any, httpx.Response]]] = {
        "comparison": lambda: compare(api, auth, baseline, candidate, judge={"model": "judge-model"}),
        "model evaluation": lambda: api.post(
            "/v1/model-evaluations", json=evaluation_body([benchmark], "m"), headers=auth
        ),
        "sample evaluation": lambda: api.post("/v1/sample-evaluations", json=SAMPLES, headers=auth),
        "upload": lambda: upload(api, auth, jsonl, "jsonl", grade={}, guard={}),
    }
    submission = submissions[route]
    with busy_threads(holds=held_by_its_request) as threads:
        # A submission like it, unheld, says how many calls for a thread it makes: its last is held.
        calls = ThreadCalls(held_from=None)
        assert (await counted(calls, submission())).status_code == 202
        answer = counted(ThreadCalls(held_from=calls.made), submission())
        await asyncio.wait_for(threads.until_handed(1), timeout=30)
        held = await held_in_transaction(sessions)
        threads.free()
        assert (await answer).status_code == 202, (await answer).text
    assert held == []
