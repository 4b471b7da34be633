"""Prompt sets: immutable rows like policy sets; the built-in set is the engine's prompt files
(app/deliberation/prompts/), registered as a row when first needed."""

from __future__ import annotations

from dataclasses import asdict
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.policies import content_version
from app.deliberation.prompt_sets import BUILTIN_NAME, Problem, builtin, template_slots, validate
from app.deliberation.prompting import PromptSet
from app.errors import MAX_LISTED_PROBLEMS, InvalidPromptSet, UnknownPromptSet
from app.store import registered_sets
from app.store.models import PromptSetRow

BUILTIN_DESCRIPTION = (
    "The templates this service ships: this project's wording of the AIDSAFE stages "
    "(the paper did not publish its prompts)."
)


async def register(
    session: AsyncSession,
    owner_key_id: UUID | None,
    name: str,
    description: str,
    templates: dict[str, str],
    max_versions: int | None,
) -> tuple[PromptSetRow, bool]:
    """Store a version of `name`, or find the owner's row of that content: the row, and
    whether it is new; LimitReached past `max_versions` (None: no cap, for the built-in set).
    The templates are checked by the caller (app.api.prompt_sets)."""
    version = content_version(templates)
    content = {"templates": templates}
    return await registered_sets.register(
        session, PromptSetRow, owner_key_id, name, version, description, content, max_versions
    )


async def ensure_default(session: AsyncSession) -> PromptSetRow:
    """The row of the built-in set this process ships (its version changes with the files)."""
    row, _ = await register(session, None, BUILTIN_NAME, BUILTIN_DESCRIPTION, dict(builtin().templates), None)
    return row


async def list_visible(session: AsyncSession, owner_key_id: UUID) -> list[PromptSetRow]:
    return await registered_sets.list_visible(session, PromptSetRow, owner_key_id)


async def get_visible(session: AsyncSession, owner_key_id: UUID, prompt_set_id: UUID) -> PromptSetRow:
    return await registered_sets.get_visible(session, PromptSetRow, owner_key_id, prompt_set_id, "prompt set")


async def resolve_for_job(
    session: AsyncSession, owner_key_id: UUID, name: str, version: str | None
) -> PromptSetRow:
    """The version a job will use: the given one, or the newest of that name (own first;
    for the built-in name, the set this process ships). Raises UnknownPromptSet, or
    InvalidPromptSet for a set the stages have outgrown since it was registered."""
    return usable(await find_visible(session, owner_key_id, name, version))


def usable(row: PromptSetRow, whose: str = "") -> PromptSetRow:
    """The set, if it passes registration's checks as they are now; InvalidPromptSet for one
    the stages have outgrown since it was registered (a template added since, a check made
    since). `whose` names the set in the message ("the candidate job's ")."""
    if problems := validate(row.templates):
        missing = [name for name in template_slots() if name not in row.templates]
        hint = (
            f". Register it again with base '{BUILTIN_NAME}' to take the new templates "
            f"({', '.join(missing)}) from the built-in set"
            if missing
            else ""
        )
        what = f"{whose}prompt set '{row.name}' version {row.version} no longer fits the stages"
        raise refused(what, problems, hint)
    return row


async def find_visible(
    session: AsyncSession, owner_key_id: UUID, name: str, version: str | None
) -> PromptSetRow:
    """The given version of `name`, or its newest (own first; for the built-in name, the set
    this process ships), unchecked. Raises UnknownPromptSet."""
    shipped = ensure_default if name == BUILTIN_NAME else None
    row = await registered_sets.newest_visible(session, PromptSetRow, owner_key_id, name, version, shipped)
    if row is None:
        suffix = f" version {version}" if version else ""
        raise UnknownPromptSet(f"no prompt set '{name}'{suffix} is visible to this key")
    return row


def refused(what: str, problems: list[Problem], hint: str = "") -> InvalidPromptSet:
    """The refusal of a set with these problems: the first in the message, how many, and
    what to do if the caller knows."""
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return InvalidPromptSet(
        f"{what}: {problems[0].message}{more}{hint}",
        details=[asdict(problem) for problem in problems[:MAX_LISTED_PROBLEMS]],
    )


by_id = registered_sets.ById(PromptSetRow, "prompt set").get


async def pinned(session: AsyncSession, prompt_set_id: UUID | None) -> PromptSetRow | None:
    """The set a job pinned; None for a job from before jobs pinned one."""
    return None if prompt_set_id is None else await by_id(session, prompt_set_id)


async def of_job(session: AsyncSession, prompt_set_id: UUID | None) -> PromptSetRow:
    """A job's pinned set; a job submitted before jobs pinned one runs the built-in set."""
    return await ensure_default(session) if prompt_set_id is None else await by_id(session, prompt_set_id)


def for_engine(row: PromptSetRow) -> PromptSet:
    return PromptSet(name=row.name, version=row.version, templates=row.templates)
