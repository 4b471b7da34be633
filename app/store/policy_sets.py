"""Policy sets: immutable rows; registering changed content makes a new version."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.deliberation.policies import PolicySet, content_version, render_policies
from app.errors import NotFound, UnknownPolicySet
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
) -> PolicySetRow:
    """Store a version of `name` (a no-op returning the existing row for known content)."""
    version = content_version(policies)
    await session.execute(
        insert(PolicySetRow)
        .values(
            owner_key_id=owner_key_id, name=name, version=version, description=description, policies=policies
        )
        .on_conflict_do_nothing()
    )
    row = await session.scalar(
        select(PolicySetRow).where(
            PolicySetRow.owner_key_id.is_(None)
            if owner_key_id is None
            else PolicySetRow.owner_key_id == owner_key_id,
            PolicySetRow.name == name,
            PolicySetRow.version == version,
        )
    )
    assert row is not None
    return row


async def ensure_default(session: AsyncSession) -> PolicySetRow:
    data = load_file(DEFAULT_FILE)
    return await register(session, None, data["name"], data.get("description", ""), data["policies"])


def _visible_to(owner_key_id: UUID) -> ColumnElement[bool]:
    return or_(PolicySetRow.owner_key_id.is_(None), PolicySetRow.owner_key_id == owner_key_id)


async def list_visible(session: AsyncSession, owner_key_id: UUID) -> list[PolicySetRow]:
    rows = await session.scalars(
        select(PolicySetRow)
        .where(_visible_to(owner_key_id))
        .order_by(PolicySetRow.name, PolicySetRow.created_at)
    )
    return list(rows)


async def get_visible(session: AsyncSession, owner_key_id: UUID, policy_set_id: UUID) -> PolicySetRow:
    row = await session.scalar(
        select(PolicySetRow).where(PolicySetRow.id == policy_set_id, _visible_to(owner_key_id))
    )
    if row is None:
        raise NotFound(f"policy set {policy_set_id} not found")
    return row


async def resolve_for_job(
    session: AsyncSession, owner_key_id: UUID, name: str, version: str | None
) -> PolicySetRow:
    """The version a job will use: the given one, or the newest of that name (own first)."""
    query = select(PolicySetRow).where(_visible_to(owner_key_id), PolicySetRow.name == name)
    if version:
        query = query.where(PolicySetRow.version == version)
    query = query.order_by(PolicySetRow.owner_key_id.is_(None), PolicySetRow.created_at.desc()).limit(1)
    row = await session.scalar(query)
    if row is None and name == DEFAULT_NAME and not version:
        row = await ensure_default(session)
    if row is None:
        suffix = f" version {version}" if version else ""
        raise UnknownPolicySet(f"no policy set '{name}'{suffix} is visible to this key")
    return row


# Rows never change (new content is a new row), so a process may keep every one it read.
_by_id: dict[UUID, PolicySetRow] = {}


async def by_id(session: AsyncSession, policy_set_id: UUID) -> PolicySetRow:
    """The policy set with this id, from this process's copy after the first read."""
    if policy_set_id not in _by_id:
        row = await session.get(PolicySetRow, policy_set_id)
        if row is None:
            raise NotFound(f"policy set {policy_set_id} not found")
        _by_id[policy_set_id] = row
    return _by_id[policy_set_id]


def for_engine(row: PolicySetRow) -> PolicySet:
    return PolicySet(name=row.name, version=row.version, text=render_policies(row.policies))
