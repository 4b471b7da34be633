"""Pages of listings whose rows can be large: a page stops at PAGE_ROW_BYTES of its rows as
JSON as well as at its `limit`, sized in the statement that reads it (one snapshot), each row
by its id in the listing's order until the page is full."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import reduce
from typing import Any

from sqlalchemy import CTE, BigInteger, ColumnElement, Select, Text, cast, func, literal, or_, select
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.sql.expression import ScalarSelect

# Of the rows one page of items, CoTs, preference pairs or samples reads, as JSON: 500 rows of
# prompts of 20,000 characters (or of CoTs, pairs, samples as long) were read and encoded in one
# answer on the event loop, 30-60 MB that held every other request for 0.14-0.2 s. A page stops
# short of its `limit` at this size; clients follow `next_cursor` as they did.
PAGE_ROW_BYTES = 2_000_000
# What a listing reads: its rows, joined to what they show.
Read = Select[*tuple[Any, ...]]


def on_page(
    read: Read,
    row_id: Any,
    candidates: CTE,
    order: Sequence[ColumnElement[Any]],
    limit: int,
    row_bytes: ColumnElement[int] | None = None,
) -> tuple[Select[tuple[Any]], ScalarSelect[int]]:
    """SQL: the ids of `candidates` (a CTE of the ids, as `id`, of the rows `read` reads, and
    what `order` orders them by) on the page, and how many that is: the first of at most
    `limit` that come to PAGE_ROW_BYTES (1 if the first is larger). A row's size is
    `row_bytes` (SQL over what `read` reads), by default the JSON of the whole rows of the
    entities `read` reads."""
    # Subscripted by the walk, which sizes the candidates one by one by `row_id`.
    ids_in_order = select(
        func.array_agg(aggregate_order_by(candidates.c.id, *order), type_=ARRAY(row_id.type))
    ).scalar_subquery()
    fitting = _rows_within_size(
        read, row_id, ids_in_order, limit, _json_bytes(read) if row_bytes is None else row_bytes
    )
    return select(candidates.c.id).order_by(*order).limit(fitting), fitting


def _rows_within_size(
    read: Read, row_id: Any, ids_in_order: ColumnElement[list[Any]], limit: int, row_bytes: ColumnElement[int]
) -> ScalarSelect[int]:
    """SQL: how many of the first `limit` rows `ids_in_order` of `read` make a page of
    PAGE_ROW_BYTES (1 if the first is larger). Each is sized by its id, in order, until the
    page is full: sizing every row of a page of 500 large ones would render gigabytes of JSON
    to page through them all."""
    start = select(literal(0).label("sized"), cast(literal(0), BigInteger).label("page_bytes")).cte(
        "walk", recursive=True
    )
    next_size = (
        read.with_only_columns(row_bytes).where(row_id == ids_in_order[start.c.sized + 1]).scalar_subquery()
    )
    walk = start.union_all(
        select(start.c.sized + 1, start.c.page_bytes + next_size).where(
            start.c.sized < limit,
            func.cardinality(ids_in_order) > start.c.sized,
            start.c.page_bytes <= PAGE_ROW_BYTES,
        )
    )
    fit = or_(walk.c.page_bytes <= PAGE_ROW_BYTES, walk.c.sized == 1)
    return select(func.max(walk.c.sized)).where(fit).scalar_subquery()


def _json_bytes(read: Read) -> ColumnElement[int]:
    """SQL: the bytes, as JSON, of the whole rows `read` reads (each entity's table row; none
    for an outer join's missing row), what the API decodes and encodes again."""
    tables = [d["entity"].__table__ for d in read.column_descriptions if d["expr"] is d["entity"]]
    return reduce(
        operator.add,
        (func.coalesce(func.octet_length(cast(func.row_to_json(t.table_valued()), Text)), 0) for t in tables),
    )
