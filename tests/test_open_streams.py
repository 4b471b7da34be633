"""Seats of open streams (app/api/open_streams.py): the caps per API key and per process, and
the process's last seats kept for keys holding none, so a few keys cannot hold every other
tenant's streams off."""

from __future__ import annotations

from contextlib import ExitStack
from uuid import UUID, uuid4

import pytest

from app.api.open_streams import OpenStreams
from app.errors import TooManyStreams


def exports(per_key: int = 4, in_all: int = 10) -> OpenStreams:
    return OpenStreams(per_key, in_all, "exports", "wait for one to end")


def take(streams: OpenStreams, held: ExitStack, key_id: UUID, wanted: int) -> list[str]:
    """Ask for `wanted` seats for the key, holding those given: the refusals' messages."""
    refusals = []
    for _ in range(wanted):
        try:
            held.enter_context(streams.seat(key_id))
        except TooManyStreams as refused:
            refusals.append(refused.message)
    return refusals


def test_keys_holding_all_they_may_leave_seats_for_keys_holding_none() -> None:
    """Three keys' 4 exports each took all 10 seats: every other key was refused until one
    ended. The first two take the 8 outside the reserve, and the 2 in it go to keys holding
    none, one each: the third, then a fourth."""
    streams = exports()
    with ExitStack() as held:
        greedy = [take(streams, held, uuid4(), 4) for _ in range(3)]
        assert take(streams, held, uuid4(), 1) == []
        [full] = take(streams, held, uuid4(), 1)
        assert [len(refusals) for refusals in greedy] == [0, 0, 3]  # 4 + 4 + 1 (its first)
        assert "keeps its last 2 of 10 exports for API keys that have none open" in greedy[2][0]
        assert "this API key has 1; close one, or wait for one to end" in greedy[2][0]
        assert full.startswith("this API server has as many exports open as it may")


def test_a_key_beyond_its_first_seat_is_refused_only_in_the_reserve() -> None:
    streams = exports()
    with ExitStack() as held:
        first, second = uuid4(), uuid4()
        assert take(streams, held, first, 4) == []
        assert take(streams, held, second, 4) == []  # the 8th seat: outside the reserve
        assert len(take(streams, held, second, 1)) == 1  # its cap
        assert len(take(streams, held, uuid4(), 2)) == 1  # its second would be in the reserve
    assert streams.reserve == 2
    with ExitStack() as held:  # all given back: the reserve is free again
        assert take(streams, held, first, 4) == []


def test_a_lone_key_gets_its_whole_cap() -> None:
    for streams in (exports(), OpenStreams(32, 1024, "progress streams", "poll instead")):
        with ExitStack() as held:
            key_id = uuid4()
            assert take(streams, held, key_id, streams.per_key) == []
            [capped] = take(streams, held, key_id, 1)
            assert capped.startswith(
                f"this API key already has as many {streams.what} open as it may ({streams.per_key}); "
            )


@pytest.mark.parametrize("per_key", [1, 2, 5])
@pytest.mark.parametrize("in_all", [1, 2, 3, 4, 5, 9])
def test_with_small_caps_keys_holding_none_get_the_seats_a_greedy_key_leaves(
    per_key: int, in_all: int
) -> None:
    """However few the seats, and a key's cap past them, a key that takes all it may, and asks
    again after each other key's, leaves at least a seat (the reserve) to keys holding none,
    unless there is only one."""
    streams = exports(per_key, in_all)
    greedy = uuid4()
    with ExitStack() as held:
        given = per_key - len(take(streams, held, greedy, per_key))
        assert given == min(per_key, max(1, in_all - streams.reserve))
        others = 0
        while not (refusals := take(streams, held, uuid4(), 1)):
            others += 1
            assert take(streams, held, greedy, 1) != []  # asks again: refused
        assert refusals[0].startswith("this API server has as many exports open as it may")
        assert given + others == in_all
        assert others >= streams.reserve or in_all == 1


def test_each_refusal_names_the_seats_it_is_about_and_what_to_do_instead() -> None:
    """The key's cap, the reserve and the process's cap each refuse in their own words, with the
    numbers a client can act on and what it may do instead (the streams' own `instead`)."""
    streams = OpenStreams(2, 5, "progress streams", "poll instead")  # a reserve of 1
    with ExitStack() as held:
        assert take(streams, held, uuid4(), 3) == [
            "this API key already has as many progress streams open as it may (2); close one, or poll instead"
        ]
        assert take(streams, held, uuid4(), 1) == []
        assert take(streams, held, uuid4(), 2) == [  # its second would be the 5th seat, the reserve's
            "this API server keeps its last 1 of 5 progress streams for API keys that have none open, and "
            "this API key has 1; close one, or poll instead, or try again shortly"
        ]
        assert take(streams, held, uuid4(), 1) == []
        assert take(streams, held, uuid4(), 1) == [
            "this API server has as many progress streams open as it may; poll instead, or try again shortly"
        ]


def test_a_stream_ending_gives_back_its_own_seat_and_no_other() -> None:
    """A key holding two seats that ends one may open one more, not two."""
    streams = exports(per_key=2)
    key_id = uuid4()
    with ExitStack() as held:
        with streams.seat(key_id):
            assert take(streams, held, key_id, 1) == []
        assert len(take(streams, held, key_id, 2)) == 1
