"""/v1/deletions: the trace every job deleted by this key leaves (DELETE /v1/jobs/{id})."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import CurrentKey, SessionDep
from app.api.errors import documented
from app.api.schemas import JobDeletionOut
from app.store import deletions

router = APIRouter(prefix="/v1/deletions", tags=["jobs"])


@router.get("", responses=documented(401, 422, 503))
async def list_deletions(
    session: SessionDep,
    key: CurrentKey,
    before_id: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="Only deletions before this `id`.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="How many, newest first.")] = 100,
) -> list[JobDeletionOut]:
    """Jobs this key deleted, newest first: when, and how many rows of each table went."""
    rows = await deletions.list_deletions(session, key.id, before_id, limit)
    return [JobDeletionOut.model_validate(row, from_attributes=True) for row in rows]
