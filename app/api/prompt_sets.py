"""/v1/prompt-sets: the built-in templates and each key's own, all versioned by content."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Response, status

from app.api import views
from app.api.bodies import JsonBody
from app.api.deps import CurrentKey, KeyWriteSession, SessionDep, SettingsDep
from app.api.errors import documented
from app.api.jobs import ERRORS
from app.api.schemas import (
    MAX_TEMPLATES,
    PromptSetDetailOut,
    PromptSetIn,
    PromptSetOut,
    RegisteredPromptSetOut,
)
from app.config import Settings
from app.deliberation.prompt_sets import prompt_set, validate
from app.plan import check_prompt_set_fits
from app.store import prompt_sets
from app.threads import in_thread

router = APIRouter(prefix="/v1/prompt-sets", tags=["prompt sets"])
PROMPT_SET_BODY = JsonBody[PromptSetIn](PromptSetIn, max_values=2 * MAX_TEMPLATES + 10)


def _check(name: str, templates: dict[str, str], settings: Settings) -> None:
    """Raise InvalidPromptSet unless every stage can use the templates on some endpoint."""
    if problems := validate(templates):
        raise prompt_sets.refused(f"prompt set '{name}' cannot be used", problems)
    check_prompt_set_fits(prompt_set(name, templates), settings)


@router.get("", responses=documented(401, 503))
async def list_prompt_sets(session: SessionDep, key: CurrentKey) -> list[PromptSetOut]:
    """The built-in set and this key's own, every version."""
    await prompt_sets.ensure_default(session)
    await session.commit()
    return [views.prompt_set_out(row) for row in await prompt_sets.list_visible(session, key.id)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": RegisteredPromptSetOut, "description": "This exact content is already registered."},
        **documented(400, 401, 409, 413, 422, 503),
    },
    openapi_extra=PROMPT_SET_BODY.openapi,
)
async def register_prompt_set(
    key: CurrentKey,
    body: Annotated[PromptSetIn, Depends(PROMPT_SET_BODY)],
    response: Response,
    session: KeyWriteSession,
    settings: SettingsDep,
) -> RegisteredPromptSetOut:
    """Register a version: every template the stages use (a full set), or with `base` the
    templates that differ from a visible set. Either way the whole set is stored, so versions
    never change: new templates under a name are a new version, and jobs keep the version
    they pinned. 422 `unknown_prompt_set` for a base this key cannot see;
    `invalid_prompt_set` names the template, its stage and the placeholder at fault; 409
    `limit_reached` for a new version when the key has `AIDSAFE_MAX_SET_VERSIONS_PER_KEY`
    prompt set versions."""
    templates, base = body.templates, None
    if body.base is not None:
        base = await prompt_sets.find_visible(session, key.id, body.base.name, body.base.version)
        templates = {**base.templates, **body.templates}
    await in_thread(_check, body.name, templates, settings)
    row, created = await prompt_sets.register(
        session, key.id, body.name, body.description, templates, settings.max_set_versions_per_key
    )
    await session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return views.prompt_set_registered(row, base, body.templates)


@router.get("/{prompt_set_id}", responses=ERRORS)
async def get_prompt_set(prompt_set_id: UUID, session: SessionDep, key: CurrentKey) -> PromptSetDetailOut:
    return views.prompt_set_detail(await prompt_sets.get_visible(session, key.id, prompt_set_id))
