"""Rows to response bodies: the one place that shapes stored data for HTTP."""

from __future__ import annotations

from typing import Any

from app.api.schemas import (
    CotOut,
    ItemOut,
    JobOut,
    PolicySetBrief,
    PolicySetDetailOut,
    PolicySetOut,
    TurnOut,
)
from app.store.models import Cot, Item, Job, PolicySetRow, TurnRow


def job_out(job: Job, policy_set: PolicySetRow, summary: dict[str, Any]) -> JobOut:
    return JobOut(
        id=job.id,
        created_at=job.created_at,
        cancelled_at=job.cancelled_at,
        policy_set=PolicySetBrief(id=policy_set.id, name=policy_set.name, version=policy_set.version),
        config=job.config,
        **summary,
    )


def item_out(item: Item) -> ItemOut:
    return ItemOut(
        id=item.id,
        job_id=item.job_id,
        position=item.position,
        prompt=item.prompt,
        metadata=item.item_metadata,
        status=item.status,
        stage=item.stage,
        attempts=item.attempts,
        error_code=item.error_code,
        error_message=item.error_message,
        created_at=item.created_at,
        finished_at=item.finished_at,
    )


def turn_out(turn: TurnRow) -> TurnOut:
    return TurnOut.model_validate(turn, from_attributes=True)


def cot_out(cot: Cot, item: Item) -> CotOut:
    return CotOut(
        item_id=cot.item_id,
        position=cot.position,
        prompt=item.prompt,
        intents=cot.intents,
        refined_thoughts=cot.refined_thoughts,
        response=cot.response,
        dropped_thoughts=cot.dropped_thoughts,
        unaccounted_thought_ids=cot.unaccounted_thought_ids,
        thoughts=cot.thoughts,
        rounds_used=cot.rounds_used,
        agreed=cot.agreed,
        agreed_by=cot.agreed_by,
        policy_set=PolicySetBrief(
            id=cot.policy_set_id, name=cot.policy_set_name, version=cot.policy_set_version
        ),
        created_at=cot.created_at,
    )


def policy_set_out(row: PolicySetRow) -> PolicySetOut:
    return PolicySetOut(
        id=row.id,
        name=row.name,
        version=row.version,
        description=row.description,
        builtin=row.owner_key_id is None,
        created_at=row.created_at,
    )


def policy_set_detail(row: PolicySetRow) -> PolicySetDetailOut:
    return PolicySetDetailOut(**policy_set_out(row).model_dump(), policies=row.policies)
