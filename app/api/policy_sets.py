"""/v1/policy-sets: the built-in AIDSAFE set and each key's own, all versioned by content."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Response, status

from app.api import views
from app.api.bodies import JsonBody
from app.api.deps import CurrentKey, KeyWriteSession, SessionDep, SettingsDep
from app.api.errors import documented
from app.api.jobs import ERRORS
from app.api.schemas import PolicySetDetailOut, PolicySetIn, PolicySetOut
from app.store import policy_sets

router = APIRouter(prefix="/v1/policy-sets", tags=["policy sets"])
POLICY_SET_BODY = JsonBody[PolicySetIn](PolicySetIn, max_values=20_000)  # 50 full policies fit


@router.get("", responses=documented(401, 503))
async def list_policy_sets(session: SessionDep, key: CurrentKey) -> list[PolicySetOut]:
    """Built-in sets and this key's own, every version."""
    await policy_sets.ensure_default(session)
    await session.commit()
    return [views.policy_set_out(row) for row in await policy_sets.list_visible(session, key.id)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": PolicySetDetailOut, "description": "This exact content is already registered."},
        **documented(400, 401, 409, 413, 422, 503),
    },
    openapi_extra=POLICY_SET_BODY.openapi,
)
async def register_policy_set(
    key: CurrentKey,
    body: Annotated[PolicySetIn, Depends(POLICY_SET_BODY)],
    response: Response,
    session: KeyWriteSession,
    settings: SettingsDep,
) -> PolicySetDetailOut:
    """Register a version. Versions never change: new content under a name is a new version,
    and jobs keep the exact version they were submitted with. 409 `limit_reached` for a new
    version when the key has `AIDSAFE_MAX_SET_VERSIONS_PER_KEY` policy set versions."""
    policies = [p.model_dump() for p in body.policies]
    row, created = await policy_sets.register(
        session, key.id, body.name, body.description, policies, settings.max_set_versions_per_key
    )
    await session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return views.policy_set_detail(row)


@router.get("/{policy_set_id}", responses=ERRORS)
async def get_policy_set(policy_set_id: UUID, session: SessionDep, key: CurrentKey) -> PolicySetDetailOut:
    return views.policy_set_detail(await policy_sets.get_visible(session, key.id, policy_set_id))
