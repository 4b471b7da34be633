"""What a job left behind after a run under faults, and whether that is acceptable.

Shared by the short chaos test (tests/test_chaos.py) and the long chaos run
(bench/chaos.py). The targets: no item lost, every item finished (completed, or failed
with a reason), no turn stored twice, and LLM answers bought twice only for calls that a
fault interrupted: an answer the LLM sent whose turn never got stored is re-bought by
the item's next attempt.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from uuid import UUID

from sqlalchemy import func, select

from app.store.db import Sessions
from app.store.models import Item, TurnRow

FINISHED = ("completed", "failed", "cancelled")


async def status_counts(sessions: Sessions, job_id: UUID, within_s: float = 60.0) -> dict[str, int]:
    """Items of the job by status; retries while PostgreSQL restarts, for up to within_s."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            async with sessions() as session:
                rows = await session.execute(
                    select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
                )
                return {status: count for status, count in rows.all()}
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


def finished(counts: dict[str, int]) -> int:
    return sum(counts.get(status, 0) for status in FINISHED)


@dataclass(frozen=True)
class JobAudit:
    statuses: dict[str, int]
    failed_by_code: dict[str, int]  # error_code ("" when none was recorded) -> items
    turns: int  # stored turns of the job
    duplicate_turns: int  # stored turns beyond the first for the same turn key

    @property
    def items(self) -> int:
        return sum(self.statuses.values())

    @property
    def unfinished(self) -> int:
        return self.items - finished(self.statuses)

    def problems(self, expected_items: int, llm_answers: int, re_spend_bound: int) -> list[str]:
        """Every target missed, in words; empty when all are met.

        llm_answers: 200 answers the LLM sent for this job. re_spend_bound: calls in flight
        at the faults, the most answers a correct service may have bought twice.
        """
        found = []
        if self.items != expected_items:
            found.append(f"{expected_items - self.items} items lost")
        if self.unfinished:
            left = {s: n for s, n in self.statuses.items() if s not in FINISHED}
            found.append(f"{self.unfinished} items never finished: {left}")
        if self.failed_by_code.get(""):
            found.append(f"{self.failed_by_code['']} failed items without a reason")
        if self.duplicate_turns:
            found.append(f"{self.duplicate_turns} turns stored twice")
        re_spent = llm_answers - self.turns
        if not 0 <= re_spent <= re_spend_bound:
            found.append(f"{re_spent} LLM answers bought twice, more than the {re_spend_bound} in flight")
        return found


async def audit_job(sessions: Sessions, job_id: UUID) -> JobAudit:
    statuses = await status_counts(sessions, job_id)
    async with sessions() as session:
        failed = await session.execute(
            select(func.coalesce(Item.error_code, ""), func.count())
            .where(Item.job_id == job_id, Item.status == "failed")
            .group_by(Item.error_code)
        )
        keys = (TurnRow.item_id, TurnRow.stage, TurnRow.round, TurnRow.agent, TurnRow.attempt)
        distinct_keys = func.count(func.distinct(func.row(*keys)))
        turns, distinct = (
            await session.execute(select(func.count(), distinct_keys).where(TurnRow.job_id == job_id))
        ).one()
    return JobAudit(
        statuses=statuses,
        failed_by_code={code: count for code, count in failed.all()},
        turns=turns,
        duplicate_turns=turns - distinct,
    )
