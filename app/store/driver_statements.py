"""Statements for the driver fast path, built from the tables and bound by name.

The hottest statements (claim an item, record a turn, complete an item, authenticate a key)
run on a pooled connection's own asyncpg connection (`db.driver_connection`): one round trip
each, and none of the ORM's per-call CPU (statement cache lookup, parameter and result
processing). They used to be SQL strings that restated the tables by position, and drifted
(key scopes and claim metadata were restored by hand; a completion bound 34 positional
parameters). Now each is a SQLAlchemy Core statement made from the models' tables, compiled
once at import by SQLAlchemy's own asyncpg compiler (so it reads as the ORM's statements do,
`$n::TYPE` placeholders), and a call passes its parameters by name: `DriverStatement` puts them
in asyncpg's positional order with a function generated at compile time, so binding costs
what the hand-written positional arguments did. An inserted table row is one
mapping of its columns (`insert_from`): every column the database does not fill itself is a
parameter, so a column added to a table is one the caller must supply, and a missing one is a
KeyError, never a silent gap. Constants in a statement (`status = 'running'`, NULL) are
written into the SQL, as they were by hand, so only what a call supplies is a parameter.

JSON parameters are encoded with orjson into JSON text, which SQLAlchemy's asyncpg codec (set
on every pooled connection) sends as jsonb; results come back decoded by the same codec.
Python None is SQL NULL in a column declared none_as_null and JSON null otherwise, as
SQLAlchemy's JSON type has it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from sqlalchemy import Column, ColumnElement, FromClause, Table, bindparam, column, func, select, true
from sqlalchemy.dialects.postgresql import JSONB, Insert, insert
from sqlalchemy.dialects.postgresql.asyncpg import PGCompiler_asyncpg, PGDialect_asyncpg
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.expression import ClauseElement
from sqlalchemy.types import JSON, TypeEngine

# SQLAlchemy's compiler internals are untyped: the ignores below say so, nothing more.
_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


class _Compiler(PGCompiler_asyncpg):
    """The asyncpg dialect's compiler, writing constants into the SQL: a bindparam() without
    a value (one a call supplies) is the only kind that stays a parameter."""

    def visit_bindparam(self, bindparam: BindParameter[Any], **kw: Any) -> str:  # type: ignore[override]
        if not bindparam.required:
            kw["literal_binds"] = True
        sql: str = super().visit_bindparam(bindparam, **kw)  # type: ignore[no-untyped-call]
        return sql


Encode = Callable[[Any], Any]


class DriverStatement:
    """A Core statement compiled once for asyncpg. Parameters go by name: `name` for a
    bindparam("name"), and a mapping of column values under the table's name for the row
    parameters of `insert_from` (`turns={"stage": ..., ...}`)."""

    def __init__(self, statement: ClauseElement) -> None:
        compiled = _Compiler(_DIALECT, statement)
        self.sql: str = compiled.string
        self.parameters: tuple[str, ...] = tuple(compiled.positiontup or ())
        # args(params): the positional arguments; a KeyError names a parameter missing.
        self.args = _binder([(name, compiled.binds[name].type) for name in self.parameters])

    async def fetchrow(self, connection: asyncpg.Connection, **params: Any) -> asyncpg.Record | None:
        return await connection.fetchrow(self.sql, *self.args(params))

    async def fetch(self, connection: asyncpg.Connection, **params: Any) -> list[asyncpg.Record]:
        records: list[asyncpg.Record] = await connection.fetch(self.sql, *self.args(params))
        return records

    async def fetchval(self, connection: asyncpg.Connection, **params: Any) -> Any:
        return await connection.fetchval(self.sql, *self.args(params))


def _binder(parameters: list[tuple[str, TypeEngine[Any]]]) -> Callable[[Mapping[str, Any]], list[Any]]:
    """A function reading each parameter from the call's mapping, in position order, JSON
    encoded where the type is JSON: `lambda p: [p["item_id"], _json(p["turns"]["parsed"]), ...]`.
    Generated from our own statements' parameter names (quoted with repr)."""
    namespace: dict[str, Any] = {}
    reads = []
    for position, (name, type_) in enumerate(parameters):
        table, dot, column = name.partition(".")
        read = f"p[{table!r}][{column!r}]" if dot else f"p[{name!r}]"
        if encode := _encoder(type_):
            namespace[f"encode_{position}"] = encode
            read = f"encode_{position}({read})"
        reads.append(read)
    binder: Callable[[Mapping[str, Any]], list[Any]] = eval(f"lambda p: [{', '.join(reads)}]", namespace)
    return binder


def _encoder(type_: TypeEngine[Any]) -> Encode | None:
    if not isinstance(type_, JSON):
        return None
    return _json_or_sql_null if type_.none_as_null else _json


def _json(value: Any) -> str:
    return orjson.dumps(value, default=_uuid_text).decode()


def _json_or_sql_null(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, default=_uuid_text).decode()


def _uuid_text(value: Any) -> str:
    # orjson writes uuid.UUID itself, but not asyncpg's subclass (the ids read from a row).
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def filled_by_database(column: Column[Any]) -> bool:
    """The database gives this column its value on INSERT (a server default, an identity)."""
    return column.server_default is not None or column is column.table.autoincrement_column


def row_parameter(column: Column[Any]) -> BindParameter[Any]:
    """The parameter of `column` in its table's row mapping, typed as the column."""
    return bindparam(f"{column.table.name}.{column.name}", type_=column.type)


def insert_from(table: Table, source: FromClause, **computed: ColumnElement[Any]) -> Insert:
    """INSERT INTO table (...) SELECT ... FROM source: the `computed` columns as given, every
    other column the database does not fill itself a row parameter."""
    columns = [c for c in table.columns if c.name in computed or not filled_by_database(c)]
    values = [computed[c.name] if c.name in computed else row_parameter(c) for c in columns]
    return insert(table).from_select([c.name for c in columns], select(*values).select_from(source))


def insert_rows_from(table: Table, source: FromClause, **computed: ColumnElement[Any]) -> Insert:
    """INSERT INTO table (...) SELECT ... FROM source and one row per element of the JSON
    array parameter named as the table (none for an empty array): the `computed` columns as
    given, every other column the database does not fill itself read from the element."""
    given = [c for c in table.columns if c.name not in computed and not filled_by_database(c)]
    elements = (
        func.jsonb_to_recordset(bindparam(table.name, type_=JSONB))
        .table_valued(*(column(c.name, c.type) for c in given))
        .render_derived(name=f"{table.name}_given", with_types=True)
    )
    values = [*computed.values(), *(elements.c[c.name] for c in given)]
    query = select(*values).select_from(source).join(elements, true())
    return insert(table).from_select([*computed, *(c.name for c in given)], query)
