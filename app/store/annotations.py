"""Human reviews from labeling tools, and what they mean for exports."""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, exists, select
from sqlalchemy.orm import aliased

from app.store.models import Annotation, Cot


def _current() -> ColumnElement[bool]:
    """The latest version of each annotation (an edit in the tool adds a row)."""
    newer = aliased(Annotation)
    return ~exists().where(
        newer.source == Annotation.source,
        newer.external_id == Annotation.external_id,
        newer.annotated_at > Annotation.annotated_at,
    )


def human_approved() -> ColumnElement[bool]:
    """A condition on Cot: some reviewer accepts it and no reviewer (currently) rejects it."""

    def any_current(verdict: str) -> ColumnElement[bool]:
        return exists(
            select(Annotation.id).where(
                Annotation.item_id == Cot.item_id, Annotation.verdict == verdict, _current()
            )
        )

    return and_(any_current("accept"), ~any_current("reject"))
