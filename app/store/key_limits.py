"""What one API key may pile up: open jobs (each may queue 10,000 prompts' worth of LLM
calls), live webhooks, and policy and prompt set versions, each up to a setting.

The caller holds the key's row (keys.hold) from the count until its transaction commits the
row it adds: two requests of one key at the same time take turns, and cannot both take the
last place; other keys' requests never wait. (In one API process they take turns before
they take a connection: app/api/key_turns.py.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import LimitReached
from app.store.models import UNFINISHED, Item, Job, PolicySetRow, PromptSetRow, Webhook, sql_constant


@dataclass(frozen=True)
class Cap:
    limit: str  # the refusal's details name it
    setting: str  # the Settings field that sets it
    counted: str  # what the key has as many of as it may, for the message
    remedy: str  # what frees room

    @property
    def variable(self) -> str:
        return f"AIDSAFE_{self.setting.upper()}"


OPEN_JOBS = Cap(
    "open_jobs",
    "max_open_jobs_per_key",
    "open jobs (jobs, comparisons and evaluations with queued, running or waiting items)",
    "wait for some to end, or cancel those no longer wanted (POST /v1/jobs/{id}/cancel)",
)
WEBHOOKS = Cap(
    "webhooks",
    "max_webhooks_per_key",
    "webhooks not revoked",
    "revoke those no longer used (POST /v1/webhooks/{id}/revoke)",
)
# Versions cannot be deleted: jobs pin them, and their results are read in their words.
SET_REMEDY = "have jobs name the versions it has, or ask the operator to raise the limit"
POLICY_SET_VERSIONS = Cap(
    "policy_set_versions",
    "max_set_versions_per_key",
    "policy set versions",
    SET_REMEDY,
)
PROMPT_SET_VERSIONS = Cap(
    "prompt_set_versions",
    "max_set_versions_per_key",
    "prompt set versions",
    SET_REMEDY,
)
SET_VERSIONS = {PolicySetRow: POLICY_SET_VERSIONS, PromptSetRow: PROMPT_SET_VERSIONS}


def open_jobs(key_id: UUID) -> Select[Any]:
    # The statuses as constants: so Postgres may use ix_items_unfinished_job (sql_constant says
    # why), and not read every item of the key's ended jobs, 10,000 each.
    statuses = [sql_constant(status) for status in UNFINISHED]
    unfinished = select(Item.id).where(Item.job_id == Job.id, Item.status.in_(statuses)).exists()
    return select(Job.id).where(Job.owner_key_id == key_id, unfinished)


def live_webhooks(key_id: UUID) -> Select[Any]:
    return select(Webhook.id).where(Webhook.owner_key_id == key_id, Webhook.revoked_at.is_(None))


def set_versions(model: type[PolicySetRow] | type[PromptSetRow], key_id: UUID) -> Select[Any]:
    return select(model.id).where(model.owner_key_id == key_id)


async def refuse_at_cap(session: AsyncSession, cap: Cap, most: int, rows: Select[Any]) -> None:
    """LimitReached if `rows` (the key's, of what `cap` counts) are `most` already. Counted up
    to `most` only: a key past it (a lowered setting) costs no more to refuse."""
    count = await session.scalar(select(func.count()).select_from(rows.limit(most).subquery()))
    if count is not None and count >= most:
        raise LimitReached(
            f"this API key has {most} {cap.counted}, the most one key may have "
            f"({cap.variable}): {cap.remedy}",
            {"limit": cap.limit, "setting": cap.variable, "max": most},
        )
