"""The engine's TurnLog port on Postgres."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any
from uuid import UUID

from sqlalchemy import bindparam, exists, select, update

from app.costs import Budget, call_cost
from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.metrics import LLM_COST_USD
from app.plan import GenerationPlan
from app.store.budgets import Meter
from app.store.db import Sessions, driver_connection
from app.store.driver_statements import DriverStatement, insert_from, row_parameter
from app.store.items import Claim, ClaimLost, claim_holds
from app.store.models import Item, Job, TurnRow


class PostgresTurnLog:
    """The turn log of one claimed item. `record` writes only while the claim holds (a
    worker that lost its lease gets ClaimLost), and is idempotent on the turn key: if the
    key is already stored, the stored turn wins and is returned. A turn is stored with its
    cost at the job's pinned prices (a batch job's turns in `sent_online`, asked online, at
    its online prices), and told to the item's `meter` (app/store/budgets.py)."""

    def __init__(
        self,
        sessions: Sessions,
        claim: Claim,
        meter: Meter | None = None,
        sent_online: Collection[TurnKey] = frozenset(),
    ) -> None:
        self._sessions = sessions
        self._claim = claim
        self._meter = meter
        self._sent_online = sent_online
        self._recorded: dict[TurnKey, Turn] = {}

    async def done(self, item_id: UUID) -> list[Turn]:
        # Turns are written only under a claim, so under the first claim of an item the
        # stored turns are the ones this log recorded: no query needed. (One log per claim.)
        if self._claim.attempt == 1:
            return list(self._recorded.values())
        async with self._sessions() as session:
            rows = (await session.scalars(select(TurnRow).where(TurnRow.item_id == item_id))).all()
        return [to_turn(row) for row in rows]

    async def record(self, turn: Turn) -> Turn:
        turn = replace(
            turn,
            raw_output=storable(turn.raw_output),
            parsed=storable(turn.parsed),
            error=storable(turn.error),
        )
        key = turn.key
        row = self._row(turn)
        async with driver_connection(self._sessions) as connection:
            recorded = await _RECORD.fetchrow(
                connection, item_id=turn.item_id, attempt=self._claim.attempt, turns=row
            )
        assert recorded is not None  # a SELECT without FROM: one row
        held, inserted, max_cost_usd, max_tokens = recorded
        if not held:
            raise ClaimLost(f"lease on item {turn.item_id} lost")
        if inserted:
            cost = row["cost_usd"]
            if cost is not None:
                LLM_COST_USD.labels(turn.endpoint).inc(cost)
            if self._meter is not None:
                tokens = turn.prompt_tokens + turn.completion_tokens
                await self._meter.recorded(Budget.of(max_cost_usd, max_tokens), tokens, cost)
            self._recorded[key] = turn
            return turn
        async with self._sessions() as session:  # the key was stored before: that turn wins
            existing = await session.scalar(
                select(TurnRow).where(
                    TurnRow.item_id == turn.item_id,
                    TurnRow.stage == key.stage.value,
                    TurnRow.round == key.round,
                    TurnRow.agent == key.agent,
                    TurnRow.attempt == key.attempt,
                )
            )
        assert existing is not None
        self._recorded[key] = to_turn(existing)
        return self._recorded[key]

    def _row(self, turn: Turn) -> dict[str, Any]:
        """The turn's row, but for its item_id (the statement takes the claimed item's)."""
        key, plan = turn.key, self._claim.plan
        pinned = plan.prices
        if isinstance(plan, GenerationPlan) and key in self._sent_online:
            pinned = plan.online_prices
        prices = pinned.get(turn.endpoint)
        return {
            "job_id": self._claim.job_id,
            "stage": key.stage.value,
            "round": key.round,
            "agent": key.agent,
            "attempt": key.attempt,
            "role": turn.role,
            "endpoint": turn.endpoint,
            "model": turn.model,
            "request_hash": turn.request_hash,
            "raw_output": turn.raw_output,
            "parsed": turn.parsed,
            "outcome": turn.outcome.value,
            "error": turn.error,
            "agreed": turn.agreed,
            "prompt_tokens": turn.prompt_tokens,
            "completion_tokens": turn.completion_tokens,
            "cached_prompt_tokens": turn.cached_prompt_tokens,
            "cost_usd": call_cost(
                prices, turn.prompt_tokens, turn.cached_prompt_tokens, turn.completion_tokens
            ),
            "latency_ms": turn.latency_ms,
        }


def _record_statement() -> DriverStatement:
    """One round trip. FOR UPDATE locks the item row while the claim is checked, so a
    takeover claim cannot interleave with the write (it waits, or this sees its new attempt
    and writes nothing); ON CONFLICT keeps the first turn stored under a key; the item's
    stage moves only when a turn really was added. The job's budget is read, not locked:
    turns of one job never wait for each other (app/store/budgets.py)."""
    held = (
        select(Item.id, Item.job_id)
        .where(claim_holds(bindparam("item_id"), bindparam("attempt")))
        .with_for_update(of=Item)
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
    stage = row_parameter(TurnRow.__table__.c.stage)
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
            exists().select_from(held).label("held"),
            exists().select_from(inserted).label("inserted"),
            select(budget.c.budget_max_cost_usd).scalar_subquery().label("max_cost_usd"),
            select(budget.c.budget_max_tokens).scalar_subquery().label("max_tokens"),
        ).add_cte(staged)
    )


_RECORD = _record_statement()


def storable(value: Any) -> Any:
    """PostgreSQL text and jsonb hold neither NUL nor lone surrogates; an LLM may send both."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def to_turn(row: TurnRow) -> Turn:
    return Turn(
        item_id=row.item_id,
        key=TurnKey(Stage(row.stage), row.round, row.agent, row.attempt),
        role=row.role,
        endpoint=row.endpoint,
        model=row.model,
        request_hash=row.request_hash,
        raw_output=row.raw_output,
        outcome=TurnOutcome(row.outcome),
        parsed=row.parsed,
        error=row.error,
        agreed=row.agreed,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        latency_ms=row.latency_ms,
        cached_prompt_tokens=row.cached_prompt_tokens,
    )
