"""The engine's TurnLog port on Postgres."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert

from app.deliberation.ports import Stage, Turn, TurnKey, TurnOutcome
from app.store.db import Sessions
from app.store.models import Item, TurnRow


class PostgresTurnLog:
    """Turns of the items of one job. `record` is idempotent on the turn key, so a replay
    racing a zombie worker still stores each turn once."""

    def __init__(self, sessions: Sessions, job_id: UUID) -> None:
        self._sessions = sessions
        self._job_id = job_id

    async def done(self, item_id: UUID) -> list[Turn]:
        async with self._sessions() as session:
            rows = (await session.scalars(select(TurnRow).where(TurnRow.item_id == item_id))).all()
        return [to_turn(row) for row in rows]

    async def record(self, turn: Turn) -> None:
        key = turn.key
        values = {
            "item_id": turn.item_id,
            "job_id": self._job_id,
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
            await session.execute(insert(TurnRow).values(values).on_conflict_do_nothing())
            await session.execute(update(Item).where(Item.id == turn.item_id).values(stage=key.stage.value))


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
