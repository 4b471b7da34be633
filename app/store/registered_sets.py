"""What policy sets and prompt sets share: immutable rows registered by content, built-in
(no owner) or a key's own, read through the owner filter, kept per process by id."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar
from uuid import UUID

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import load_only

from app.errors import NotFound
from app.store import key_limits, keys
from app.store.models import PolicySetRow, PromptSetRow

Row = TypeVar("Row", PolicySetRow, PromptSetRow)


async def register(
    session: AsyncSession,
    model: type[Row],
    owner_key_id: UUID | None,
    name: str,
    version: str,
    description: str,
    content: dict[str, Any],
    max_versions: int | None,
) -> tuple[Row, bool]:
    """Store a version of `name`, or find the owner's row of that version (known content);
    `content`: the model's own columns. The row, and whether it is new. A new version when
    the owner has `max_versions` of this model's already is LimitReached (None: no cap, for
    built-in sets)."""
    owner = model.owner_key_id.is_(None) if owner_key_id is None else model.owner_key_id == owner_key_id
    known = select(model).where(owner, model.name == name, model.version == version)
    if owner_key_id is not None and max_versions is not None:
        await keys.hold(session, owner_key_id)
        if (row := await session.scalar(known)) is not None:
            return row, False
        cap = key_limits.SET_VERSIONS[model]
        await key_limits.refuse_at_cap(
            session, cap, max_versions, key_limits.set_versions(model, owner_key_id)
        )
    inserted = await session.scalar(
        insert(model)
        .values(owner_key_id=owner_key_id, name=name, version=version, description=description, **content)
        .on_conflict_do_nothing()
        .returning(model.id)
    )
    row = await session.scalar(known)
    assert row is not None
    return row, inserted is not None


def _visible_to(model: type[Row], owner_key_id: UUID) -> ColumnElement[bool]:
    return or_(model.owner_key_id.is_(None), model.owner_key_id == owner_key_id)


async def list_visible(session: AsyncSession, model: type[Row], owner_key_id: UUID) -> list[Row]:
    """Built-in sets and the key's own, every version, by name then age: without their content
    (policies, templates), which a key's versions would bring by the hundred megabytes, decoded
    on the event loop, for a listing that shows none of it (reading it raises)."""
    listed = (model.id, model.owner_key_id, model.name, model.version, model.description, model.created_at)
    rows = await session.scalars(
        select(model)
        .options(load_only(*listed, raiseload=True))
        .where(_visible_to(model, owner_key_id))
        .order_by(model.name, model.created_at)
    )
    return list(rows)


async def get_visible(
    session: AsyncSession, model: type[Row], owner_key_id: UUID, row_id: UUID, what: str
) -> Row:
    row = await session.scalar(select(model).where(model.id == row_id, _visible_to(model, owner_key_id)))
    if row is None:
        raise NotFound(f"{what} {row_id} not found")
    return row


async def newest_visible(
    session: AsyncSession,
    model: type[Row],
    owner_key_id: UUID,
    name: str,
    version: str | None,
    shipped: Callable[[AsyncSession], Awaitable[Row]] | None = None,
) -> Row | None:
    """The given version of `name`, or its newest (the key's own before built-in ones). With
    `shipped`, for a built-in set's name, no version and none of the key's own: the row it
    gives, this process's built-in set, not the newest stored, which may be another release's
    (a newer one beside this in a rolling upgrade, or the one rolled back from)."""
    query = select(model).where(_visible_to(model, owner_key_id), model.name == name)
    if version:
        query = query.where(model.version == version)
    query = query.order_by(model.owner_key_id.is_(None), model.created_at.desc()).limit(1)
    row = await session.scalar(query)
    if shipped is not None and not version and (row is None or row.owner_key_id is None):
        return await shipped(session)
    return row


class ById(Generic[Row]):
    """Rows never change (new content is a new row), so a process may keep those it read: the
    `keep` most recently used, so that a long-lived worker serving tenants with many versions
    (an ablation registers one per variant) does not grow with every version it ever ran."""

    def __init__(self, model: type[Row], what: str, keep: int = 256) -> None:
        self._model: type[Row] = model
        self._what = what
        self._keep = keep
        self._rows: OrderedDict[UUID, Row] = OrderedDict()

    async def get(self, session: AsyncSession, row_id: UUID) -> Row:
        """The row with this id, from this process's copy when it holds it."""
        if (kept := self._rows.get(row_id)) is not None:
            self._rows.move_to_end(row_id)
            return kept
        row = await session.get(self._model, row_id)
        if row is None:
            raise NotFound(f"{self._what} {row_id} not found")
        # Out of the session: its rollback would expire the row, unreadable to later callers.
        session.expunge(row)
        self._rows[row_id] = row
        if len(self._rows) > self._keep:
            self._rows.popitem(last=False)
        return row
