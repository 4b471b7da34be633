"""Work run off the event loop (app.threads.in_thread), as routes run their CPU-heavy parts."""

from __future__ import annotations

import asyncio

import pytest

from app.threads import in_thread


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
