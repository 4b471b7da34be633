"""A process keeps the policy and prompt set rows it read by id, but only the most recently
used: a long-lived worker must not grow with every version any tenant ever ran."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import delete

from app.errors import NotFound
from app.store.db import Sessions
from app.store.models import PolicySetRow
from app.store.policy_sets import register
from app.store.registered_sets import ById


async def _policy_sets(sessions: Sessions, count: int) -> list[uuid.UUID]:
    name = f"kept-{uuid.uuid4().hex[:8]}"
    async with sessions.begin() as session:
        rows = [
            (await register(session, None, name, "", [{"name": f"p{n}", "text": f"rule {n}"}], None))[0]
            for n in range(count)
        ]
    return [row.id for row in rows]


async def _forget_in_database(sessions: Sessions, ids: list[uuid.UUID]) -> None:
    """Rows never change or go in service; a test deletes them to see which reads reach the
    database (a kept row still answers, one read again is not found)."""
    async with sessions.begin() as session:
        await session.execute(delete(PolicySetRow).where(PolicySetRow.id.in_(ids)))


async def _kept(sessions: Sessions, by_id: ById[PolicySetRow], row_id: uuid.UUID) -> bool:
    try:
        async with sessions.begin() as session:
            await by_id.get(session, row_id)
    except NotFound:
        return False
    return True


async def test_only_the_most_recently_used_rows_are_kept(sessions: Sessions) -> None:
    first, second, third, fourth = await _policy_sets(sessions, 4)
    by_id = ById(PolicySetRow, "policy set", keep=3)
    for row_id in (first, second, third, first):  # first used again: second is now the oldest
        assert await _kept(sessions, by_id, row_id)
    assert await _kept(sessions, by_id, fourth)  # a fourth: the least recently used goes
    await _forget_in_database(sessions, [first, second, third, fourth])

    assert await _kept(sessions, by_id, first)
    assert await _kept(sessions, by_id, third)
    assert await _kept(sessions, by_id, fourth)
    assert not await _kept(sessions, by_id, second), "second was read again: it was not kept"


async def test_an_unknown_id_is_not_found_and_keeps_nothing(sessions: Sessions) -> None:
    (known,) = await _policy_sets(sessions, 1)
    by_id = ById(PolicySetRow, "policy set", keep=1)
    assert await _kept(sessions, by_id, known)
    unknown = uuid.uuid4()
    with pytest.raises(NotFound, match=f"^policy set {unknown} not found$"):
        async with sessions.begin() as session:
            await by_id.get(session, unknown)
    await _forget_in_database(sessions, [known])
    assert await _kept(sessions, by_id, known), "a miss does not push out the row kept"


async def test_a_row_kept_stays_readable_after_the_session_that_read_it_rolled_back(
    sessions: Sessions,
) -> None:
    (row_id,) = await _policy_sets(sessions, 1)
    by_id = ById(PolicySetRow, "policy set")
    with pytest.raises(RuntimeError):
        async with sessions.begin() as session:
            await by_id.get(session, row_id)
            raise RuntimeError("the caller's transaction fails after the read")
    async with sessions.begin() as session:
        kept = await by_id.get(session, row_id)
    assert kept.policies == [{"name": "p0", "text": "rule 0"}]
