"""The engine's TurnLog port in memory, for tests where a database is beside the point."""

from __future__ import annotations

from uuid import UUID

from app.deliberation.ports import Stage, Turn, TurnKey


class InMemoryTurnLog:
    """Turns kept in a dict, in recording order. Like the Postgres log, `record` is
    idempotent on (item_id, key): a second record of a key keeps and returns the first
    turn and bumps `ignored_records`, so a test can prove a replay never asked twice."""

    def __init__(self) -> None:
        self._turns: dict[tuple[UUID, TurnKey], Turn] = {}
        self.ignored_records = 0  # record calls that were no-ops

    async def done(self, item_id: UUID) -> list[Turn]:
        return self.turns(item_id)

    async def record(self, turn: Turn) -> Turn:
        slot = (turn.item_id, turn.key)
        if slot in self._turns:
            self.ignored_records += 1
            return self._turns[slot]
        self._turns[slot] = turn
        return turn

    def turns(self, item_id: UUID, stage: Stage | None = None) -> list[Turn]:
        """The item's turns in recording order, optionally of one stage only."""
        return [
            turn
            for (owner, key), turn in self._turns.items()
            if owner == item_id and (stage is None or key.stage is stage)
        ]
