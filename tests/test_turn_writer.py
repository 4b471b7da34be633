"""Group commit of turns: what items record together is written in one statement, and each
caller hears its own turn's fate, as if it had been written alone."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.ports import Stage, Turn, TurnKey
from app.store import items
from app.store.db import Sessions
from app.store.models import Item, ItemStatus, Job, TurnRow
from app.store.turn_log import PostgresTurnLog
from app.store.turn_writer import ROW_FIELDS, TurnWriter, Written
from tests.test_turn_log import LIMITS, a_turn, taken_over


async def claimed_items(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions, count: int
) -> list[items.Claim]:
    prompts = [f"How do bees see, part {n}?" for n in range(count)]
    response = await api.post("/v1/jobs", json={"prompts": prompts}, headers=auth)
    async with sessions() as session:
        ids = (
            await session.scalars(
                select(Item.id).where(Item.job_id == UUID(response.json()["id"])).order_by(Item.position)
            )
        ).all()
    claims = [await items.claim(sessions, item_id, LIMITS) for item_id in ids]
    assert all(claims)
    return [claim for claim in claims if claim is not None]


async def stored(sessions: Sessions, item_id: UUID) -> list[str]:
    async with sessions() as session:
        rows = await session.scalars(select(TurnRow.raw_output).where(TurnRow.item_id == item_id))
        return sorted(rows.all())


async def test_turns_several_items_record_together_are_written_in_one_statement(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claims = await claimed_items(api, auth, sessions, 5)
    writer = TurnWriter(sessions)
    logs = [PostgresTurnLog(writer, claim) for claim in claims]

    results = await asyncio.gather(
        *(
            log.record(a_turn(claim.item_id, f"raw {n}"))
            for n, (log, claim) in enumerate(zip(logs, claims, strict=True))
        )
    )

    assert (writer.statements, writer.rows) == (1, 5)
    assert [r.raw_output for r in results] == [f"raw {n}" for n in range(5)]
    for n, claim in enumerate(claims):
        assert await stored(sessions, claim.item_id) == [f"raw {n}"]


async def test_an_idle_writer_writes_at_once_and_a_busy_one_lets_turns_gather_for_its_next_statement(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    idle, first, second, third = await claimed_items(api, auth, sessions, 4)
    writer = TurnWriter(sessions, gather_s=0.5)

    def record(claim: items.Claim) -> asyncio.Task[Turn]:
        return asyncio.create_task(PostgresTurnLog(writer, claim).record(a_turn(claim.item_id, "raw")))

    started = time.monotonic()
    await record(idle)
    assert time.monotonic() - started < 0.4, "no gathering when nothing was being written"
    await asyncio.sleep(5 * 0.5)  # idle again

    async with sessions.begin() as holder:  # first's statement waits on its job row's lock
        await holder.execute(select(Job.id).where(Job.id == first.job_id).with_for_update())
        writing_first = record(first)
        await asyncio.sleep(0.2)
        assert writer.statements == 2, "first's statement is in flight, sent at once"
        writing_second = record(second)  # waits for it
    await writing_first
    await asyncio.sleep(0.1)  # the writer is busy: gathering for the next statement
    await asyncio.gather(writing_second, record(third))

    assert (writer.statements, writer.rows) == (3, 4), "second and third went together"
    for claim in (idle, first, second, third):
        assert await stored(sessions, claim.item_id) == ["raw"]


def turn_row(claim: items.Claim) -> dict[str, Any]:
    """A turns row as the turn log hands it to the writer."""
    row = {
        "claim_attempt": claim.attempt,
        "item_id": claim.item_id,
        "job_id": claim.job_id,
        "stage": "intent",
        "round": 0,
        "agent": 0,
        "attempt": 0,
        "role": "intent",
        "endpoint": "default",
        "model": "m",
        "request_hash": "h",
        "raw_output": "raw",
        "parsed": None,
        "outcome": "ok",
        "error": None,
        "agreed": None,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "cached_prompt_tokens": 0,
        "cost_usd": None,
        "latency_ms": 5.0,
    }
    assert row.keys() == ROW_FIELDS
    return row


async def test_each_turn_of_a_batch_hears_its_own_jobs_budget(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    (budgeted,) = await claimed_items(api, auth, sessions, 1)
    (free,) = await claimed_items(api, auth, sessions, 1)
    async with sessions.begin() as session:
        budget = {"budget_max_cost_usd": 2.5, "budget_max_tokens": 1000}
        await session.execute(update(Job).where(Job.id == budgeted.job_id).values(budget))
    writer = TurnWriter(sessions)

    budgeted_outcome, free_outcome = await asyncio.gather(
        writer.write(turn_row(budgeted)), writer.write(turn_row(free))
    )

    assert writer.statements == 1
    assert budgeted_outcome == Written(True, True, 2.5, 1000)
    assert free_outcome == Written(True, True, None, None)


async def test_a_lone_turn_is_written_at_once_and_those_recorded_meanwhile_go_together_next(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    first, *others = await claimed_items(api, auth, sessions, 4)
    writer = TurnWriter(sessions)

    lone = asyncio.create_task(PostgresTurnLog(writer, first).record(a_turn(first.item_id, "lone")))
    for _ in range(3):  # its write starts without waiting for company
        await asyncio.sleep(0)
    assert writer.statements == 1
    meanwhile = [PostgresTurnLog(writer, claim).record(a_turn(claim.item_id, "later")) for claim in others]
    await asyncio.gather(lone, *meanwhile)

    assert (writer.statements, writer.rows) == (2, 4)


async def test_a_turn_whose_caller_is_cancelled_while_it_waits_is_not_written(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    first, gone, kept = await claimed_items(api, auth, sessions, 3)
    writer = TurnWriter(sessions)
    lone = asyncio.create_task(PostgresTurnLog(writer, first).record(a_turn(first.item_id, "lone")))
    for _ in range(3):
        await asyncio.sleep(0)
    waiting = [
        asyncio.create_task(PostgresTurnLog(writer, c).record(a_turn(c.item_id, "later")))
        for c in (gone, kept)
    ]
    await asyncio.sleep(0)  # both wait behind the write in flight

    waiting[0].cancel()
    results = await asyncio.gather(lone, *waiting, return_exceptions=True)

    assert isinstance(results[1], asyncio.CancelledError)
    assert (writer.statements, writer.rows) == (2, 2)
    assert await stored(sessions, gone.item_id) == []
    assert await stored(sessions, kept.item_id) == ["later"]


async def test_a_lost_claim_in_a_batch_is_its_callers_alone(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    held, stale, other = await claimed_items(api, auth, sessions, 3)
    await taken_over(sessions, stale)
    writer = TurnWriter(sessions)

    results = await asyncio.gather(
        *(PostgresTurnLog(writer, c).record(a_turn(c.item_id, "raw")) for c in (held, stale, other)),
        return_exceptions=True,
    )

    assert writer.statements == 1
    assert isinstance(results[1], items.ClaimLost)
    assert [r.raw_output for r in (results[0], results[2]) if isinstance(r, Turn)] == ["raw", "raw"]
    assert await stored(sessions, stale.item_id) == []
    assert await stored(sessions, held.item_id) == await stored(sessions, other.item_id) == ["raw"]


async def test_a_key_stored_before_returns_the_stored_turn_while_the_rest_of_the_batch_is_added(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    again, new = await claimed_items(api, auth, sessions, 2)
    writer = TurnWriter(sessions)
    log = PostgresTurnLog(writer, again)
    await log.record(a_turn(again.item_id, "first"))

    repeated, added = await asyncio.gather(
        log.record(a_turn(again.item_id, "second")),
        PostgresTurnLog(writer, new).record(a_turn(new.item_id, "new")),
    )

    assert (writer.statements, writer.rows) == (2, 3)
    assert (repeated.raw_output, added.raw_output) == ("first", "new")
    assert await stored(sessions, again.item_id) == ["first"]


async def test_an_items_stage_is_that_of_its_last_turn_in_the_batch(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    (claim,) = await claimed_items(api, auth, sessions, 1)
    log = PostgresTurnLog(TurnWriter(sessions), claim)
    seed = replace(a_turn(claim.item_id, "seed"), key=TurnKey(Stage.SEED), role="seed")

    await asyncio.gather(log.record(a_turn(claim.item_id, "intent")), log.record(seed))

    async with sessions() as session:
        assert await session.scalar(select(Item.stage).where(Item.id == claim.item_id)) == Stage.SEED.value


async def test_a_row_postgres_refuses_fails_its_caller_alone(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claims = await claimed_items(api, auth, sessions, 3)
    writer = TurnWriter(sessions)
    turns = [a_turn(c.item_id, "raw") for c in claims]
    turns[1] = replace(turns[1], prompt_tokens=2**31)  # beyond an integer column

    results = await asyncio.gather(
        *(PostgresTurnLog(writer, c).record(t) for c, t in zip(claims, turns, strict=True)),
        return_exceptions=True,
    )

    # Postgres refuses the batch; written alone, the row is refused by asyncpg's own check.
    assert isinstance(results[1], asyncpg.DataError) and "out of int32 range" in str(results[1])
    assert all(isinstance(results[n], Turn) for n in (0, 2))
    assert writer.statements == 1 + 3  # the batch, refused whole; then each row alone
    assert [await stored(sessions, c.item_id) for c in claims] == [["raw"], [], ["raw"]]


async def test_a_batch_whose_connection_dies_raises_to_every_caller_and_writes_nothing(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claims = await claimed_items(api, auth, sessions, 3)
    writer = TurnWriter(sessions)
    async with sessions.begin() as blocker:  # the batch's inserts wait for this lock
        await blocker.execute(text("LOCK TABLE turns IN SHARE MODE"))
        recording = asyncio.gather(
            *(PostgresTurnLog(writer, c).record(a_turn(c.item_id, "raw")) for c in claims),
            return_exceptions=True,
        )
        waiting = text("SELECT pid FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))")
        for _ in range(200):
            await blocker.execute(text("SELECT pg_stat_clear_snapshot()"))  # read once a transaction
            if (pid := (await blocker.execute(waiting)).scalar()) is not None:
                break
            await asyncio.sleep(0.05)
        assert pid is not None
        await blocker.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        results = await recording

    assert writer.statements == 1
    assert all(
        isinstance(r, (asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError)) for r in results
    ), results
    assert [await stored(sessions, c.item_id) for c in claims] == [[], [], []]


async def test_batches_locking_the_same_items_from_two_processes_do_not_deadlock(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claims = await claimed_items(api, auth, sessions, 8)
    writers = [TurnWriter(sessions), TurnWriter(sessions)]  # as two worker processes have
    randomly = random.Random(12)

    for rnd in range(10):
        batches = []
        for side, writer in enumerate(writers):
            shuffled = randomly.sample(claims, len(claims))
            key = TurnKey(Stage.DELIBERATION, rnd, side)
            batches += [
                PostgresTurnLog(writer, c).record(replace(a_turn(c.item_id, f"{rnd} {side}"), key=key))
                for c in shuffled
            ]
        await asyncio.gather(*batches)

    assert all(w.statements >= 10 for w in writers)  # rows skipped while the other held them: more
    async with sessions() as session:
        count = (
            select(func.count()).select_from(TurnRow).where(TurnRow.item_id.in_([c.item_id for c in claims]))
        )
        assert await session.scalar(count) == 8 * 10 * 2


async def item_locked(blocker: AsyncSession, item_id: UUID) -> None:
    """Another transaction holds the item's row, as a job's cancellation or deletion does."""
    await blocker.execute(select(Item.id).where(Item.id == item_id).with_for_update())


async def test_an_item_another_transaction_holds_holds_back_no_other_items_turn(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    locked, *others = await claimed_items(api, auth, sessions, 4)
    writer = TurnWriter(sessions)
    log = PostgresTurnLog(writer, locked)
    async with sessions.begin() as blocker:
        await item_locked(blocker, locked.item_id)
        waiting = asyncio.create_task(log.record(a_turn(locked.item_id, "waited")))
        together = [PostgresTurnLog(writer, c).record(a_turn(c.item_id, "together")) for c in others[:2]]
        # the lone turn and then a batch of two go on while the locked item's turn waits
        await asyncio.wait_for(asyncio.gather(*together), timeout=10)
        lone = PostgresTurnLog(writer, others[2]).record(a_turn(others[2].item_id, "after"))
        await asyncio.wait_for(lone, timeout=10)
        sent = writer.statements
        await asyncio.sleep(0.2)
        assert not waiting.done()
        assert writer.statements == sent, "the row waits for the lock, it does not go round the lanes"
        assert await stored(sessions, locked.item_id) == []
    assert (await asyncio.wait_for(waiting, timeout=10)).raw_output == "waited"

    assert await stored(sessions, locked.item_id) == ["waited"]
    assert [await stored(sessions, c.item_id) for c in others] == [["together"], ["together"], ["after"]]


async def test_a_claim_lost_while_another_transaction_held_its_item_is_its_callers_alone(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    cancelled, other = await claimed_items(api, auth, sessions, 2)
    writer = TurnWriter(sessions)
    async with sessions.begin() as blocker:  # a cancellation: it locks the item, then ends it
        await item_locked(blocker, cancelled.item_id)
        results = asyncio.gather(
            *(PostgresTurnLog(writer, c).record(a_turn(c.item_id, "raw")) for c in (cancelled, other)),
            return_exceptions=True,
        )
        await asyncio.sleep(0.2)
        await blocker.execute(
            update(Item).where(Item.id == cancelled.item_id).values(status=ItemStatus.CANCELLED)
        )
    lost, written = await asyncio.wait_for(results, timeout=10)

    assert isinstance(lost, items.ClaimLost) and isinstance(written, Turn)
    assert writer.statements == 2, "the batch, then the held item's row once, waiting for its lock"
    assert await stored(sessions, cancelled.item_id) == []
    assert await stored(sessions, other.item_id) == ["raw"]


async def test_a_statement_holds_at_most_64_turns(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    (claim,) = await claimed_items(api, auth, sessions, 1)
    writer = TurnWriter(sessions)

    outcomes = await asyncio.gather(*(writer.write(turn_row(claim) | {"agent": n}) for n in range(130)))

    assert (writer.statements, writer.rows) == (3, 130)  # 64, 64, 2
    assert all(o.inserted for o in outcomes)
    async with sessions() as session:
        count = select(func.count()).select_from(TurnRow).where(TurnRow.item_id == claim.item_id)
        assert await session.scalar(count) == 130


async def test_a_writer_idle_again_after_a_write_sends_the_next_turn_at_once(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    first, second = await claimed_items(api, auth, sessions, 2)
    writer = TurnWriter(sessions, gather_s=0.01)
    await writer.write(turn_row(first))
    await asyncio.sleep(5 * 0.01 + 0.05)  # at least its busy window: idle again

    lone = asyncio.create_task(writer.write(turn_row(second)))
    for _ in range(3):
        await asyncio.sleep(0)

    assert writer.statements == 2, "no gathering for a writer idle again"
    assert (await lone).inserted


async def test_a_row_with_a_field_missing_or_unknown_is_refused_before_anything_is_sent(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    (claim,) = await claimed_items(api, auth, sessions, 1)
    writer = TurnWriter(sessions)
    missing = turn_row(claim)
    del missing["latency_ms"]

    with pytest.raises(KeyError, match=r"\['latency_ms'\]"):
        await writer.write(missing)
    with pytest.raises(KeyError, match=r"\['meta'\]"):
        await writer.write(turn_row(claim) | {"meta": {}})
    assert writer.statements == 0


async def test_turns_of_items_another_transaction_holds_wait_one_statement_each_while_the_rest_is_written(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    locked, other, also_locked = await claimed_items(api, auth, sessions, 3)
    writer = TurnWriter(sessions)
    async with sessions.begin() as blocker:
        await item_locked(blocker, locked.item_id)
        await item_locked(blocker, also_locked.item_id)
        writing = [asyncio.create_task(writer.write(turn_row(c))) for c in (locked, other, also_locked)]
        assert (await asyncio.wait_for(writing[1], timeout=10)).inserted
        await asyncio.sleep(0.2)
        # the batch, then the first locked row alone, waiting for its lock; the other waits behind it
        assert writer.statements == 2
        assert not writing[0].done() and not writing[2].done()
        assert await stored(sessions, locked.item_id) == await stored(sessions, also_locked.item_id) == []
    outcomes = await asyncio.wait_for(asyncio.gather(*writing), timeout=10)

    assert [o.inserted for o in outcomes] == [True, True, True]
    assert (writer.statements, writer.rows) == (3, 5)
    assert [await stored(sessions, c.item_id) for c in (locked, other, also_locked)] == [["raw"]] * 3


async def stages(sessions: Sessions, claims: list[items.Claim]) -> list[str | None]:
    async with sessions() as session:
        stage_of = dict(
            (
                await session.execute(
                    select(Item.id, Item.stage).where(Item.id.in_([c.item_id for c in claims]))
                )
            ).all()
        )
    return [stage_of[c.item_id] for c in claims]


async def test_a_turn_added_moves_its_own_items_stage_and_a_key_stored_before_moves_none(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claims = lone, first, second, _ = await claimed_items(api, auth, sessions, 4)  # the last gets no turn
    writer = TurnWriter(sessions)
    seed = {"stage": "seed", "role": "seed"}
    deliberation = {"stage": "deliberation", "role": "deliberator"}

    await writer.write(turn_row(lone) | seed)  # a lone turn, and a batch of two items
    await asyncio.gather(writer.write(turn_row(first) | seed), writer.write(turn_row(second) | deliberation))
    assert await stages(sessions, claims) == ["seed", "seed", "deliberation", "intent"]

    await writer.write(turn_row(lone) | deliberation)
    await writer.write(turn_row(lone) | seed)  # stored before: not added
    await asyncio.gather(writer.write(turn_row(first) | deliberation), writer.write(turn_row(first) | seed))
    assert writer.statements == 5
    assert await stages(sessions, claims) == ["deliberation", "deliberation", "deliberation", "intent"]


async def test_of_the_turns_of_one_key_in_one_statement_the_first_is_stored(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    (claim,) = await claimed_items(api, auth, sessions, 1)
    writer = TurnWriter(sessions)

    outcomes = await asyncio.gather(
        *(writer.write(turn_row(claim) | {"raw_output": f"r{n:02}"}) for n in range(20))
    )

    assert writer.statements == 1
    assert [o.inserted for o in outcomes] == [True] + [False] * 19
    assert await stored(sessions, claim.item_id) == ["r00"]


async def test_a_lone_turn_of_an_item_another_transaction_holds_holds_back_no_later_turn(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    locked, later = await claimed_items(api, auth, sessions, 2)
    writer = TurnWriter(sessions)
    async with sessions.begin() as blocker:
        await item_locked(blocker, locked.item_id)
        waiting = asyncio.create_task(writer.write(turn_row(locked)))
        for _ in range(3):  # its statement is sent alone
            await asyncio.sleep(0)
        assert writer.statements == 1

        assert (await asyncio.wait_for(writer.write(turn_row(later)), timeout=10)).inserted
        assert not waiting.done()
    assert (await asyncio.wait_for(waiting, timeout=10)).inserted
    assert (writer.statements, writer.rows) == (3, 3)  # alone (skipped), later's, then waiting for the lock
