"""Policy sets: immutable rows; registering changed content makes a new version."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.policies import PolicySet, content_version, render_policies
from app.errors import UnknownPolicySet
from app.store import registered_sets
from app.store.models import PolicySetRow

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
DEFAULT_NAME = "aidsafe-default"


def load_file(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


async def register(
    session: AsyncSession,
    owner_key_id: UUID | None,
    name: str,
    description: str,
    policies: list[dict[str, Any]],
    max_versions: int | None,
) -> tuple[PolicySetRow, bool]:
    """Store a version of `name`, or find the owner's row of that content: the row, and
    whether it is new. LimitReached past `max_versions` (None: no cap, for built-in sets)."""
    version = content_version(policies)
    content = {"policies": policies}
    return await registered_sets.register(
        session, PolicySetRow, owner_key_id, name, version, description, content, max_versions
    )


@cache
def _default_file() -> dict[str, Any]:
    return load_file(DEFAULT_FILE)


async def ensure_default(session: AsyncSession) -> PolicySetRow:
    # Parsed once a process: its YAML took 8 ms of the event loop at every call (every GET
    # /v1/policy-sets). A copy: the row keeps the policies it is given.
    data = copy.deepcopy(_default_file())
    row, _ = await register(session, None, data["name"], data.get("description", ""), data["policies"], None)
    return row


async def list_visible(session: AsyncSession, owner_key_id: UUID) -> list[PolicySetRow]:
    return await registered_sets.list_visible(session, PolicySetRow, owner_key_id)


async def get_visible(session: AsyncSession, owner_key_id: UUID, policy_set_id: UUID) -> PolicySetRow:
    return await registered_sets.get_visible(session, PolicySetRow, owner_key_id, policy_set_id, "policy set")


async def resolve_for_job(
    session: AsyncSession, owner_key_id: UUID, name: str, version: str | None
) -> PolicySetRow:
    """The version a job will use: the given one, or the newest of that name (own first; for
    the built-in name, the set this process ships)."""
    shipped = ensure_default if name == DEFAULT_NAME else None
    row = await registered_sets.newest_visible(session, PolicySetRow, owner_key_id, name, version, shipped)
    if row is None:
        suffix = f" version {version}" if version else ""
        raise UnknownPolicySet(f"no policy set '{name}'{suffix} is visible to this key")
    return row


by_id = registered_sets.ById(PolicySetRow, "policy set").get


def for_engine(row: PolicySetRow) -> PolicySet:
    return PolicySet(name=row.name, version=row.version, text=render_policies(row.policies))
