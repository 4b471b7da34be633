"""The engine's TurnLog port on Postgres."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any
from uuid import UUID

from sqlalchemy import select

from app.costs import Budget, call_cost
from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.metrics import LLM_COST_USD
from app.plan import GenerationPlan
from app.storable import replace_unstorable
from app.store.budgets import Meter
from app.store.items import Claim, ClaimLost
from app.store.models import TurnRow
from app.store.turn_writer import TurnWriter


class PostgresTurnLog:
    """The turn log of one claimed item. `record` writes only while the claim holds (a
    worker that lost its lease gets ClaimLost), and is idempotent on the turn key: if the
    key is already stored, the stored turn wins and is returned. A turn is stored with its
    cost at the job's pinned prices (a batch job's turns in `sent_online`, asked online, at
    its online prices), and told to the item's `meter` (app/store/budgets.py). It is written
    by the worker process's `writer`, with the turns other items record at the same time
    (app/store/turn_writer.py)."""

    def __init__(
        self,
        writer: TurnWriter,
        claim: Claim,
        meter: Meter | None = None,
        sent_online: Collection[TurnKey] = frozenset(),
    ) -> None:
        self._writer = writer
        self._sessions = writer.sessions
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
            raw_output=replace_unstorable(turn.raw_output),
            parsed=replace_unstorable(turn.parsed),
            error=replace_unstorable(turn.error),
        )
        key = turn.key
        row = self._row(turn)
        written = await self._writer.write(row)
        if not written.held:
            raise ClaimLost(f"lease on item {turn.item_id} lost")
        if written.inserted:
            cost = row["cost_usd"]
            if cost is not None:
                LLM_COST_USD.labels(turn.endpoint).inc(cost)
            if self._meter is not None:
                tokens = turn.prompt_tokens + turn.completion_tokens
                await self._meter.recorded(Budget.of(written.max_cost_usd, written.max_tokens), tokens, cost)
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
        """The turn's row, and the claim it is written under."""
        key, plan = turn.key, self._claim.plan
        pinned = plan.prices
        if isinstance(plan, GenerationPlan) and key in self._sent_online:
            pinned = plan.online_prices
        prices = pinned.get(turn.endpoint)
        return {
            "claim_attempt": self._claim.attempt,
            "item_id": turn.item_id,
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
