"""Recent: values an API process remembers briefly (found keys, job summaries)."""

from __future__ import annotations

import asyncio

import pytest

from app.api.recent import MAX_STRETCH, Recent


class Source:
    """Counts reads; each read answers the next number, after `delay_s`."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.reads = 0
        self.delay_s = delay_s

    async def read(self) -> int:
        self.reads += 1
        await asyncio.sleep(self.delay_s)
        return self.reads


async def test_a_value_is_read_again_only_after_max_age() -> None:
    recent: Recent[str, int] = Recent(max_age_s=0.2)
    source = Source()

    first = [await recent.get("k", source.read) for _ in range(3)]
    await asyncio.sleep(0.25)
    later = await recent.get("k", source.read)

    assert (first, later, source.reads) == ([1, 1, 1], 2, 2)


async def test_past_max_age_the_callers_wait_for_one_read_again() -> None:
    recent: Recent[str, int] = Recent(max_age_s=0.05)
    source = Source(delay_s=0.2)
    await recent.get("k", source.read)
    await asyncio.sleep(0.1)

    results = await asyncio.gather(*(recent.get("k", source.read) for _ in range(5)))

    assert results == [2, 2, 2, 2, 2]
    assert source.reads == 2


async def test_within_stale_s_no_caller_waits_while_a_value_is_read_again() -> None:
    recent: Recent[str, int] = Recent(max_age_s=0.05, stale_s=1.0)
    source = Source(delay_s=0.2)
    await recent.get("k", source.read)
    await asyncio.sleep(0.1)

    results = await asyncio.gather(*(recent.get("k", source.read) for _ in range(5)))

    assert results == [1, 1, 1, 1, 1]  # all answered before the read again (0.2 s) ended
    assert source.reads == 2
    await asyncio.sleep(0.25)
    assert await recent.get("k", source.read) == 2
    assert source.reads == 2


async def test_a_value_older_than_max_age_and_stale_s_is_read_in_front_of_its_caller() -> None:
    recent: Recent[str, int] = Recent(max_age_s=0.05, stale_s=0.05)
    source = Source()
    await recent.get("k", source.read)
    await asyncio.sleep(0.15)

    assert await recent.get("k", source.read) == 2


async def test_a_value_that_fails_when_read_behind_is_dropped_and_its_next_caller_gets_the_error() -> None:
    recent: Recent[str, int] = Recent(max_age_s=0.05, stale_s=1.0)
    await recent.get("k", Source().read)
    await asyncio.sleep(0.1)

    async def deleted() -> int:
        raise LookupError("no such job")

    assert await recent.get("k", deleted) == 1
    await asyncio.sleep(0.01)
    with pytest.raises(LookupError):
        await recent.get("k", deleted)


async def test_a_value_forgotten_while_it_is_read_behind_keeps_nothing_of_that_read() -> None:
    recent: Recent[str, int] = Recent(max_age_s=0.05, stale_s=1.0)
    source = Source(delay_s=0.1)
    await recent.get("k", source.read)
    await asyncio.sleep(0.1)
    await recent.get("k", source.read)  # starts reading 2 behind

    recent.forget("k")  # e.g. the job was cancelled through this process
    await asyncio.sleep(0.15)

    assert await recent.get("k", source.read) == 3


async def test_closing_stops_the_reads_behind_callers() -> None:
    recent: Recent[str, int] = Recent(max_age_s=0.05, stale_s=1.0)
    source = Source(delay_s=0.2)
    await recent.get("k", source.read)
    await asyncio.sleep(0.1)
    await recent.get("k", source.read)
    await asyncio.sleep(0.05)  # reading 2, for 0.2 s

    await recent.aclose()
    await asyncio.sleep(0.25)

    assert source.reads == 2
    assert await recent.get("k", source.read) == 1  # the read behind never finished


async def test_a_failed_read_is_not_remembered() -> None:
    recent: Recent[str, int] = Recent(max_age_s=60)

    async def fail() -> int:
        raise LookupError("no such key")

    with pytest.raises(LookupError):
        await recent.get("k", fail)

    assert await recent.get("k", Source().read) == 1


async def test_a_forgotten_value_is_read_afresh() -> None:
    recent: Recent[str, int] = Recent(max_age_s=60)
    source = Source()
    await recent.get("k", source.read)

    recent.forget("k")

    assert await recent.get("k", source.read) == 2


class Clock:
    """A clock the test moves: ages without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_values_held_follow_the_keys_read_within_max_age_not_every_key_ever_read() -> None:
    clock = Clock()
    recent: Recent[tuple[int, int], int] = Recent(max_age_s=1.0, clock=clock)
    source = Source()
    held = []

    # 10 new keys every 0.1 s, as a stream of jobs each polled once: 20,000 keys in all, at
    # most 110 of them read within max_age at any moment.
    for tick in range(2_000):
        clock.now = tick / 10
        for k in range(10):
            await recent.get((tick, k), source.read)
        held.append(len(recent))

    assert max(held) <= 2 * 110
    assert min(held[10:]) >= 100  # the fresh ones are kept...
    reads = source.reads
    for tick in range(1_991, 2_000):
        for k in range(10):
            await recent.get((tick, k), source.read)
    assert source.reads == reads  # ...and answered without reading again


async def test_with_no_max_age_every_caller_reads() -> None:
    recent: Recent[str, int] = Recent(max_age_s=0)
    source = Source()

    assert [await recent.get("k", source.read) for _ in range(3)] == [1, 2, 3]


class SlowSource(Source):
    """Each read moves `clock` on by `takes_s`, as a read that long would."""

    def __init__(self, clock: Clock, takes_s: float) -> None:
        super().__init__()
        self.clock = clock
        self.takes_s = takes_s

    async def read(self) -> int:
        self.clock.now += self.takes_s
        return await super().read()


@pytest.mark.parametrize(
    ("takes_s", "fresh_for_s"),
    [
        (0.005, 0.5),  # 0.005 / 0.02 = 0.25 s: max_age_s stands
        (0.05, 2.5),  # 0.05 / 0.02: five times max_age_s
        (0.5, 5.0),  # 25 s, but at most MAX_STRETCH times max_age_s
    ],
)
async def test_a_value_whose_read_took_long_is_kept_in_proportion_to_it(
    takes_s: float, fresh_for_s: float
) -> None:
    clock = Clock()
    clock.now = 100.0
    recent: Recent[str, int] = Recent(max_age_s=0.5, clock=clock, read_share=0.02)
    source = SlowSource(clock, takes_s)
    await recent.get("k", source.read)  # read at 100, kept from then

    clock.now = 100 + fresh_for_s - 0.001
    assert await recent.get("k", source.read) == 1
    await asyncio.sleep(0)  # a read started behind the caller would have run
    assert source.reads == 1
    clock.now = 100 + fresh_for_s + 0.001
    assert (await recent.get("k", source.read), source.reads) == (2, 2)


async def test_the_stale_period_of_a_slow_read_grows_alike_and_its_value_outlives_drops() -> None:
    clock = Clock()
    recent: Recent[str, int] = Recent(max_age_s=1.0, stale_s=1.0, clock=clock, read_share=0.02)
    slow = SlowSource(clock, 0.1)  # kept fresh 5 s, then stale 5 s more
    await recent.get("slow", slow.read)
    quick = Source()
    for n in range(8):  # other keys, read quickly, prune the expired ones as they double
        clock.now = 1 + n
        await recent.get(f"quick{n}", quick.read)

    clock.now = 9.9
    assert await recent.get("slow", slow.read) == 1  # stale: answered, and read again behind
    await asyncio.sleep(0)
    assert slow.reads == 2


async def test_callers_that_come_while_a_key_with_no_value_is_read_wait_for_that_read() -> None:
    """Polls of a new job every 20 ms, each count taking 50 ms: one read for them all. (Each
    caller read its own, and only the latest was kept: none ever was, while callers came.)"""
    recent: Recent[str, int] = Recent(max_age_s=1.0, stale_s=1.0)
    source = Source(delay_s=0.05)

    async def poll_after(delay_s: float) -> int:
        await asyncio.sleep(delay_s)
        return await recent.get("k", source.read)

    answers = await asyncio.gather(*(poll_after(n * 0.02) for n in range(25)))

    assert source.reads == 1
    assert set(answers) == {1}


async def test_a_caller_that_goes_away_leaves_the_read_to_the_others() -> None:
    recent: Recent[str, int] = Recent(max_age_s=1.0)
    source = Source(delay_s=0.1)
    first = asyncio.create_task(recent.get("k", source.read))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(recent.get("k", source.read))
    await asyncio.sleep(0.02)

    first.cancel()

    assert await second == 1
    assert (await recent.get("k", source.read), source.reads) == (1, 1)


async def test_a_slow_read_keeps_its_value_at_most_max_stretch_times_longer() -> None:
    clock = Clock()
    recent: Recent[str, int] = Recent(max_age_s=1.0, clock=clock, read_share=0.02)
    source = SlowSource(clock, 3.0)  # 3 / 0.02 = 150 s, but a read's time counts its waits too
    await recent.get("k", source.read)

    clock.now = MAX_STRETCH + 0.01

    assert (await recent.get("k", source.read), source.reads) == (2, 2)


async def test_a_value_older_than_both_periods_is_not_answered_while_it_is_read_again() -> None:
    """As a key revoked long ago: the callers that come while it is read again wait for it."""
    clock = Clock()
    recent: Recent[str, int] = Recent(max_age_s=1.0, stale_s=1.0, clock=clock)
    source = Source(delay_s=0.05)
    await recent.get("k", source.read)
    clock.now = 3600.0

    answers = await asyncio.gather(*(recent.get("k", source.read) for _ in range(3)))

    assert (answers, source.reads) == ([2, 2, 2], 2)


async def test_closing_just_after_a_read_failed_does_not_raise() -> None:
    """aclose runs in the API's shutdown, before its Redis and database pools close."""
    recent: Recent[str, int] = Recent(max_age_s=1.0)

    async def fail() -> int:
        raise LookupError("job deleted")

    failed = asyncio.ensure_future(recent.get("gone", fail))
    await asyncio.sleep(0)  # the get starts its read
    await asyncio.sleep(0)  # the read fails; its done callbacks have not run yet

    await recent.aclose()

    with pytest.raises(LookupError):
        await failed


async def test_a_read_cancelled_before_it_ran_is_not_waited_on_later() -> None:
    recent: Recent[str, int] = Recent(max_age_s=1.0)
    source = Source()
    first = asyncio.ensure_future(recent.get("k", source.read))
    await asyncio.sleep(0)  # the get starts its read, which has not run yet

    await recent.aclose()

    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await recent.get("k", source.read), source.reads) == (1, 1)
