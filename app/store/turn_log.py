"""The engine's TurnLog port on Postgres."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert

from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.store.db import Sessions
from app.store.items import Claim, ClaimLost, claimed
from app.store.models import Item, TurnRow


class PostgresTurnLog:
    """The turn log of one claimed item. `record` writes only while the claim holds (a
    worker that lost its lease gets ClaimLost), and is idempotent on the turn key: if the
    key is already stored, the stored turn wins and is returned."""

    def __init__(self, sessions: Sessions, claim: Claim) -> None:
        self._sessions = sessions
        self._claim = claim

    async def done(self, item_id: UUID) -> list[Turn]:
        async with self._sessions() as session:
            rows = (await session.scalars(select(TurnRow).where(TurnRow.item_id == item_id))).all()
        return [to_turn(row) for row in rows]

    async def record(self, turn: Turn) -> Turn:
        turn = replace(turn, raw_output=storable(turn.raw_output), parsed=storable(turn.parsed))
        key = turn.key
        values = {
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
            "latency_ms": turn.latency_ms,
        }
        async with self._sessions.begin() as session:
            # Locks the item row, so a takeover claim cannot interleave with this write.
            if await session.scalar(select(Item.id).where(claimed(self._claim)).with_for_update()) is None:
                raise ClaimLost(f"lease on item {turn.item_id} lost")
            stored_id = await session.scalar(
                insert(TurnRow).values(values).on_conflict_do_nothing().returning(TurnRow.id)
            )
            if stored_id is None:
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
                return to_turn(existing)
            await session.execute(update(Item).where(Item.id == turn.item_id).values(stage=key.stage.value))
        return turn


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
    )
