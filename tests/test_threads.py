"""Work run off the event loop (app.threads.in_thread), as routes run their CPU-heavy parts."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from functools import partial
from uuid import uuid4

import anyio
import pytest

from app.api.key_turns import KeyTurns
from app.threads import in_thread, in_turns
from tests.test_key_threads import _in_scope


def _next_of_nothing() -> None:
    next(iter(()))  # an iterator's end, as a parser reading past its input raises it


async def test_a_stop_iteration_in_the_thread_comes_out_as_a_runtime_error_not_a_wait_for_good() -> None:
    """asyncio cannot set a StopIteration on a future: asyncio.to_thread's await never ended,
    and the request it served was never answered."""
    with pytest.raises(RuntimeError, match="_next_of_nothing raised StopIteration") as raised:
        await asyncio.wait_for(in_thread(_next_of_nothing), timeout=5)

    assert isinstance(raised.value.__cause__, StopIteration)


async def test_the_work_gets_its_arguments_and_gives_back_its_result_or_its_other_errors_as_they_are() -> (
    None
):
    assert await in_thread(int, "ff", base=16) == 255
    with pytest.raises(ValueError, match="invalid literal"):
        await in_thread(int, "not a number")


async def test_a_stop_iteration_of_work_with_no_qualified_name_comes_out_naming_the_work() -> None:
    """A partial (as callers hand in) has no __qualname__: the error names the partial itself."""
    with pytest.raises(
        RuntimeError, match=r"^functools\.partial\(<built-in function next>, .*\) raised StopIteration$"
    ):
        await asyncio.wait_for(in_thread(partial(next, iter(()))), timeout=5)


async def test_a_call_cancelled_by_anyio_waits_for_its_thread_idle_not_woken_at_every_turn() -> None:
    """anyio cancels a cancelled scope's task again at every turn of the loop: unshielded, the
    wait for the thread started over each time, the event loop's thread busy for the whole
    work. This thread's CPU, not wall-clock time, so a loaded machine does not fail it."""
    scope, release = anyio.CancelScope(), threading.Event()
    with in_turns(partial(KeyTurns(1, max_waiting=None).turn, uuid4())):
        cancelled = asyncio.ensure_future(_in_scope(scope, in_thread(release.wait, 5)))
        await asyncio.sleep(0.05)  # its thread works
        scope.cancel()
        started = time.thread_time()
        await asyncio.sleep(0.5)
        busy = time.thread_time() - started
        release.set()
        assert await cancelled is None  # cancelled, once its thread was done

    assert busy < 0.05


async def test_the_error_of_a_cancelled_calls_thread_is_taken_not_logged_as_never_retrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cancelled caller wants neither a result nor an error: an error left in the thread's
    future was logged as "exception was never retrieved" once the future was collected."""
    release = threading.Event()

    def fails() -> None:
        release.wait(5)
        raise ValueError("after the caller left")

    with in_turns(partial(KeyTurns(1, max_waiting=None).turn, uuid4())):
        cancelled = asyncio.ensure_future(in_thread(fails))
        await asyncio.sleep(0.05)  # its thread works
        cancelled.cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.wait([cancelled])
    del cancelled
    gc.collect()

    assert "never retrieved" not in caplog.text
