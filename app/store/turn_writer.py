"""Group commit of turns: the turns a worker process's items record together go to Postgres
in one statement.

At hundreds of LLM calls a second, a statement and a transaction per turn were two thirds of
Postgres's transactions and a tenth of a worker's CPU (bench/RESULTS.md, issue 12 target 4).
One `TurnWriter` per worker process takes every item's turns: one arriving while no write is
in flight is written at once (no timer, no added latency when idle); those arriving while a
write is in flight wait for it and go together in the next one (natural batching), up to
`max_rows` a statement. When the writer is busy (its last statement ended less than five
`gather_s` ago), a statement first lets more turns join it for `gather_s` (2 ms, against a
turn's LLM call of hundreds), as Postgres's commit_delay does: each statement is a commit,
and at cap 256 this cut Postgres's transactions per call by a fifth (bench/RESULTS.md).

Each row keeps the single turn's contract: it is written only while its item's claim holds,
once per turn key (a key already stored wins), in the statement's own transaction, committed
before its caller hears back; the rows whose claim is gone write nothing and do not stop the
others.

A lock another transaction holds on an item row (a job being cancelled, a takeover claim, a
lease renewal) holds back no turn of the main lane: it locks item rows `SKIP LOCKED`, and a
row whose item was skipped is written again alone, in a second lane that waits for the lock,
while the main lane goes on. The second lane writes one row at a time, on one connection, so
that a cancellation of many items cannot take the whole pool; its rows wait for each other.

A statement that fails writes nothing. When a row may be the cause (a value Postgres refuses,
a deadlock), its rows are then written one per statement, so that a row's own error reaches
its caller alone; any other error (the connection lost, Postgres shutting down, a statement
timed out) reaches every caller of the batch, who fails as a lone write would have. Nothing
is ever dropped in silence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import asyncpg
from sqlalchemy import (
    ColumnElement,
    Integer,
    Label,
    and_,
    bindparam,
    column,
    exists,
    false,
    func,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, distinct_on, insert

from app.store.db import Sessions, driver_connection
from app.store.driver_statements import DriverStatement, filled_by_database, insert_from, row_parameter
from app.store.items import claim_holds
from app.store.models import Item, Job, TurnRow

# Errors of a statement that one of its rows (or the batch's size, or its locks) may have
# caused, written nothing, and left the connection sound: its rows are tried one by one.
_ONE_ROWS_FAULT = (
    asyncpg.DataError,  # a value out of range, text Postgres cannot hold
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.TransactionRollbackError,  # a deadlock: the lane that waits for item locks, the jobs' key locks
    asyncpg.ProgramLimitExceededError,
)


@dataclass(frozen=True)
class Written:
    """What became of one turn's row: whether its claim held, whether it was added (False:
    its key was stored before, or its claim was lost), and its job's budget columns."""

    held: bool
    inserted: bool
    max_cost_usd: float | None
    max_tokens: int | None


_Waiting = tuple[dict[str, Any], "asyncio.Future[Written]"]


class TurnWriter:
    """Writes the turns of one worker process's items, those recorded together in one
    statement. `write(row)` takes a turns row plus `claim_attempt` (the claim it is written
    under) and returns once it is committed, or raises what made the write fail."""

    def __init__(self, sessions: Sessions, max_rows: int = 64, gather_s: float = 0.002) -> None:
        self.sessions = sessions
        self.statements = 0  # sent, so tests and benchmarks can see the grouping
        self.rows = 0
        self._lane = _Lane(partial(self._write, wait_for_locks=False), max_rows, gather_s)
        # Rows whose item another transaction held when the main lane came to them.
        self._behind_locks = _Lane(partial(self._write, wait_for_locks=True), 1, gather_s=0.0)

    async def write(self, row: dict[str, Any]) -> Written:
        if row.keys() != ROW_FIELDS:  # a missing field would be a silent NULL in the statement
            raise KeyError(f"a turn row has fields {sorted(row.keys() ^ ROW_FIELDS)} wrong")
        written: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
        self._lane.add((row, written))
        return await written

    async def _write(self, batch: list[_Waiting], wait_for_locks: bool) -> None:
        """Write `batch` and tell each caller its outcome, or hand a row whose item was locked
        to the lane that waits; never raises but CancelledError (then every caller of the
        batch is cancelled)."""
        try:
            records = await self._statement([row for row, _ in batch], wait_for_locks)
            if len(records) != len(batch):
                raise RuntimeError(f"{len(batch)} turns written, {len(records)} outcomes")
        except _ONE_ROWS_FAULT as error:
            # The statement failed and wrote nothing: one row's fault must not be every row's.
            if len(batch) == 1:
                _fail(batch, error)
                return
            try:
                for one in batch:
                    await self._write([one], wait_for_locks)
            except asyncio.CancelledError:  # the rows not yet tried are in no lane: cancel them
                for _, written in batch:
                    written.cancel()
                raise
            return
        except asyncio.CancelledError:
            for _, written in batch:
                written.cancel()
            raise
        except Exception as error:  # handed to every caller of the batch, who raises it
            _fail(batch, error)
            return
        for waiting, (_, skipped, *outcome) in zip(batch, records, strict=True):
            if skipped:
                self._behind_locks.add(waiting)
            elif not waiting[1].done():
                waiting[1].set_result(Written(*outcome))

    async def _statement(self, rows: list[dict[str, Any]], wait_for_locks: bool) -> list[Sequence[Any]]:
        """One answer per row, in the rows' order: n, skipped (its item was locked: nothing
        written), held, inserted, its job's budget columns."""
        self.statements += 1
        self.rows += len(rows)
        async with driver_connection(self.sessions) as connection:
            if len(rows) == 1:  # a lone turn: a statement that costs Postgres less for one row
                (row,) = rows
                statement = _WRITE_ONE_WAITING if wait_for_locks else _WRITE_ONE
                record = await statement.fetchrow(
                    connection, item_id=row["item_id"], attempt=row["claim_attempt"], turns=row
                )
                assert record is not None  # a SELECT without FROM: one row
                return [(0, *record)]
            # Each numbered (its caller's row in the answer) in a copy: a row tried again
            # alone after a failed batch is its caller's as given.
            records = await _WRITE.fetch(connection, turns=[row | {"n": n} for n, row in enumerate(rows)])
        records.sort(key=lambda record: record[0])
        return records


class _Lane:
    """Turns waiting to be written, and the task writing them: one statement in flight at a
    time, with up to `max_rows` of the rows waiting when it starts, `gather_s` after it was
    due if the last one ended less than five `gather_s` ago."""

    def __init__(
        self, write: Callable[[list[_Waiting]], Awaitable[None]], max_rows: int, gather_s: float
    ) -> None:
        self._write = write
        self._max_rows = max_rows
        self._gather_s = gather_s
        self._last_ended = float("-inf")
        self._waiting: list[_Waiting] = []
        self._writing: asyncio.Task[None] | None = None

    def add(self, waiting: _Waiting) -> None:
        self._waiting.append(waiting)
        if self._writing is None:
            # A task of its own, so that a caller cancelled does not cancel the others' write.
            # It starts after the callbacks ready now: the rows they record join this one.
            self._writing = asyncio.create_task(self._write_waiting())

    async def _write_waiting(self) -> None:
        try:
            while self._waiting:
                if self._gather_s and time.monotonic() - self._last_ended < 5 * self._gather_s:
                    await asyncio.sleep(self._gather_s)
                batch = self._waiting[: self._max_rows]
                del self._waiting[: self._max_rows]
                batch = [(row, written) for row, written in batch if not written.done()]
                if batch:
                    await self._write(batch)
                    self._last_ended = time.monotonic()
        finally:
            self._writing = None
            for _, written in self._waiting:  # left by a writer cancelled (the loop closing)
                written.cancel()
            self._waiting.clear()


def _fail(batch: list[_Waiting], error: BaseException) -> None:
    for _, written in batch:
        if not written.done():
            written.set_exception(error)


# A turn's row: the turns table's columns the database does not fill (cached_prompt_tokens
# has a server default for rows older than it: supplied), and the claim it is written under.
_COLUMNS = [
    c for c in TurnRow.__table__.columns if c.name == "cached_prompt_tokens" or not filled_by_database(c)
]
ROW_FIELDS = frozenset(c.name for c in _COLUMNS) | {"claim_attempt"}


def _write_one_statement(wait_for_locks: bool) -> DriverStatement:
    """The statement of a lone turn: (skipped, held, inserted, its job's budget columns), as
    `_write_statement` answers for a batch of one, for about 0.4 ms of Postgres CPU to its 0.5.
    FOR UPDATE locks the item row while the claim is checked (a takeover claim waits, or this
    sees its new attempt and writes nothing); unless `wait_for_locks`, an item row another
    transaction holds is skipped, and written nothing. ON CONFLICT keeps the first turn stored
    under a key; the item's stage moves only when a turn really was added."""
    held = (
        select(Item.id, Item.job_id)
        .where(claim_holds(bindparam("item_id"), bindparam("attempt")))
        .with_for_update(of=Item, skip_locked=not wait_for_locks)
        .cte("held")
    )
    turns = TurnRow.__table__
    inserted = (
        # cached_prompt_tokens has a server default (for rows older than it): supplied here.
        insert_from(
            turns, held, item_id=held.c.id, cached_prompt_tokens=row_parameter(turns.c.cached_prompt_tokens)
        )
        .on_conflict_do_nothing()
        .returning(TurnRow.item_id)
        .cte("inserted")
    )
    stage = row_parameter(turns.c.stage)
    staged = (
        update(Item)
        .where(Item.id == inserted.c.item_id, Item.stage != stage)
        .values(stage=stage)
        .cte("staged")
    )
    budget = (
        select(Job.budget_max_cost_usd, Job.budget_max_tokens).where(Job.id == held.c.job_id).cte("budget")
    )
    return DriverStatement(
        select(
            (
                false().label("skipped")  # it waited for the lock
                if wait_for_locks
                else _skipped(~exists().select_from(held), bindparam("item_id"), bindparam("attempt"))
            ),
            exists().select_from(held).label("held"),
            exists().select_from(inserted).label("inserted"),
            select(budget.c.budget_max_cost_usd).scalar_subquery().label("max_cost_usd"),
            select(budget.c.budget_max_tokens).scalar_subquery().label("max_tokens"),
        ).add_cte(staged)
    )


def _write_statement() -> DriverStatement:
    """One round trip for a batch of turn rows (a jsonb array of them, each numbered `n`);
    one answer row per turn row: n, held, inserted, its job's budget columns.

    The items whose claims hold are locked FOR UPDATE, so a takeover claim cannot interleave
    with the write: it waits, or this sees its new attempt and writes nothing for that item. An
    item row another transaction holds is skipped (SKIP LOCKED, which never waits, so the locks
    need no order): its rows write nothing and answer skipped, to be written again by a
    statement that waits. Of the rows of one
    key the first is the one inserted; ON CONFLICT keeps the turn stored before; an item's
    stage moves to that of its last row really added. The jobs' budgets are read, not locked.
    """
    turns = TurnRow.__table__
    given = (
        select(
            func.jsonb_to_recordset(bindparam("turns", type_=JSONB))
            .table_valued(
                column("n", Integer),
                column("claim_attempt", Integer),
                *(column(c.name, c.type) for c in _COLUMNS),
            )
            .render_derived(name="turns_given", with_types=True)
        )
    ).cte("given")
    # A lateral subquery that locks is planned apart, as a lookup by primary key per row. A
    # join of items on the claims let the planner, trusting jsonb_to_recordset's estimate of
    # 100 rows and the statistics of few running items, read every running item through
    # ix_items_running_lease (dead entries included) for every batch: half its time.
    locked = (
        select(Item.job_id)
        .where(claim_holds(given.c.item_id, given.c.claim_attempt))
        .with_for_update(skip_locked=True)
        .lateral("locked")
    )
    held = select(given.c.n, locked.c.job_id).select_from(given).join(locked, true()).cte("held")
    key = [given.c[name] for name in ("item_id", "stage", "round", "agent", "attempt")]
    chosen = (
        select(given)
        .join(held, held.c.n == given.c.n)
        .ext(distinct_on(*key))
        .order_by(*key, given.c.n)
        .cte("chosen")
    )
    inserted = (
        insert(turns)
        .from_select([c.name for c in _COLUMNS], select(*(chosen.c[c.name] for c in _COLUMNS)))
        .on_conflict_do_nothing()
        .returning(*(turns.c[k.name] for k in key))
        .cte("inserted")
    )
    added = (
        select(chosen.c.n, chosen.c.item_id, chosen.c.stage)
        .join(inserted, and_(*(inserted.c[k.name] == chosen.c[k.name] for k in key)))
        .cte("added")
    )
    last = (
        select(added.c.item_id, added.c.stage)
        .ext(distinct_on(added.c.item_id))
        .order_by(added.c.item_id, added.c.n.desc())
        .subquery("last_added")
    )
    staged = (
        update(Item)
        .where(Item.id == last.c.item_id, Item.stage != last.c.stage)
        .values(stage=last.c.stage)
        .cte("staged")
    )
    return DriverStatement(
        select(
            given.c.n,
            _skipped(held.c.n.is_(None), given.c.item_id, given.c.claim_attempt),
            held.c.n.is_not(None).label("held"),
            added.c.n.is_not(None).label("inserted"),
            Job.budget_max_cost_usd,
            Job.budget_max_tokens,
        )
        .select_from(given)
        .outerjoin(held, held.c.n == given.c.n)
        .outerjoin(added, added.c.n == given.c.n)
        .outerjoin(Job, Job.id == held.c.job_id)
        .add_cte(staged)
    )


def _skipped(not_locked_here: ColumnElement[bool], item_id: Any, attempt: Any) -> Label[bool]:
    """SQL: the row's item was skipped, locked by another transaction, though its claim holds in
    the statement's snapshot (the claim lost, the row was not skipped: it answers not held)."""
    holds = exists().where(claim_holds(item_id, attempt))
    return and_(not_locked_here, holds).label("skipped")


_WRITE_ONE = _write_one_statement(wait_for_locks=False)
_WRITE_ONE_WAITING = _write_one_statement(wait_for_locks=True)
_WRITE = _write_statement()
