"""An export's rows, read a batch at a time, each by a statement of its own. What becomes of
them (records, bytes) is app.exports' business."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from uuid import UUID

import orjson
from asyncpg import Record
from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    Float,
    Integer,
    Select,
    Text,
    Uuid,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by, array
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.selectable import Subquery

from app.deliberation.parsing import UNLABELLED
from app.deliberation.ports import Stage
from app.deliberation.results import METRICS
from app.errors import JobDeleted
from app.store.annotations import human_approved, human_rejected, latest_edit
from app.store.db import Sessions, driver_connection
from app.store.driver_statements import DriverStatement
from app.store.export_rows import DATASET_FIELDS, CotRow, ExportFilter, PairRow, SampleRow, Source
from app.store.models import Cot, Item, Job, PreferencePair, TurnRow
from app.store.quality import kept_at

BATCH_ROWS = 1000
# A batch also stops at this many bytes of its rows' large stored columns: 1,000 rows of 80 KB
# held 334 MB (jsonl) to 827 MB (trl_sft) of Python objects at once, for each export under way.
BATCH_BYTES = 8 * 1024 * 1024
# The last column of a batch's rows: the batch's bytes (`_stored_bytes`) up to and including
# that row, so the last row's are the batch's.
BYTES_SO_FAR = "bytes_so_far"

# The turns a deliberation log shows: the AIDSAFE stages only. A whitelist, so that a stage
# added later (hazardous or not) stays out until someone decides it belongs.
LOG_STAGES = (Stage.INTENT, Stage.SEED, Stage.DELIBERATION, Stage.REFINE, Stage.ZERO_SHOT)


def _json(column: Any) -> Any:
    """A JSON column read as text: `typed_rows` parses it with orjson, three times faster than
    the json module the driver would use (parsing is most of an export's CPU)."""
    return cast(column, Text)


def _deliberation_log(item_id: Any) -> Any:
    """The item's successful deliberation turns as one JSON array, oldest first."""
    turn = func.jsonb_build_object(
        "stage", TurnRow.stage, "round", TurnRow.round, "agent", TurnRow.agent, "output", TurnRow.parsed
    )
    return _json(
        select(func.coalesce(func.jsonb_agg(aggregate_order_by(turn, TurnRow.id)), text("'[]'::jsonb")))
        .where(TurnRow.item_id == item_id, TurnRow.stage.in_(LOG_STAGES), TurnRow.outcome == "ok")
        .scalar_subquery()
    )


def _item_usage(job_id: Any, item_id: Any) -> Any:
    """The item's turns summed, as a JSON object: calls, tokens, and the cost, which is null
    unless every turn has one (an unpriced endpoint's calls cost an unknown amount, not 0).
    By job and item: an index-only scan of ix_turns_job_usage."""
    priced = func.count(TurnRow.cost_usd) == func.count()
    usage = {
        "llm_calls": func.count(),
        "prompt_tokens": func.coalesce(func.sum(TurnRow.prompt_tokens), 0),
        "cached_prompt_tokens": func.coalesce(func.sum(TurnRow.cached_prompt_tokens), 0),
        "completion_tokens": func.coalesce(func.sum(TurnRow.completion_tokens), 0),
        "cost_usd": case((priced, func.sum(TurnRow.cost_usd))),
    }
    return (
        select(_json_object(usage))
        .where(TurnRow.job_id == job_id, TurnRow.item_id == item_id)
        .scalar_subquery()
    )


def _explicit_labels(intents: Any) -> Any:
    """Each explicit intent's label; intents stored before labels existed are unlabelled."""
    explicit = func.coalesce(intents["explicit_intents"], _jsonb("[]"))
    label = cast(_sql_text(UNLABELLED), Text)
    unlabelled = func.to_jsonb(func.array_fill(label, array([func.jsonb_array_length(explicit)])))
    return func.coalesce(intents["explicit_labels"], unlabelled, type_=JSONB)


def _sql_text(value: str) -> Any:
    assert "'" not in value and "\\" not in value, value
    return literal_column(f"'{value}'")


def _as_json(value: Any) -> Any:
    """A SQL value as JSON text, SQL NULL as null (concat would write nothing). JSON columns
    are written by their own output function (the stored JSON's text), integers as they
    print, the rest (text, booleans) by to_json: to_json on every value costs as much as
    json_build_object."""
    written = value if isinstance(value.type, (JSON, Integer)) else func.to_json(value)
    return func.coalesce(cast(written, Text), _sql_text("null"))


def _json_object(fields: dict[str, Any]) -> Any:
    """A JSON object as text with the keys in this order (no spaces between them; nested
    stored JSON as Postgres prints it, with spaces), built by one concat: about 15 % less
    Postgres CPU a full record than json_build_object (which also keeps the order, but
    dispatches on each value's type every row)."""
    parts: list[Any] = []
    for n, (key, value) in enumerate(fields.items()):
        parts += [_sql_text(("{" if n == 0 else ",") + orjson.dumps(key).decode() + ":"), _as_json(value)]
    return type_coerce(func.concat(*parts, _sql_text("}")), JSON)


def _jsonb(literal: str) -> Any:
    return literal_column(f"'{literal}'::jsonb")


def _utc_isoformat(column: Any) -> Any:
    """A timestamptz as text, as Python's datetime.isoformat() writes it in UTC (what asyncpg
    returns): microseconds only when there are some."""
    utc = func.timezone("UTC", column)
    whole = func.date_trunc("second", utc) == utc
    return case(
        (whole, func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')),
        else_=func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
    )


def _per_metric(scores: Any, key: str) -> Any:
    """{metric: scores[metric][key]} in METRICS order, or null when not graded."""
    graded = scores.not_in([_jsonb("null"), _jsonb("{}")])  # NULL too: NOT IN gives NULL
    return type_coerce(case((graded, _json_object({m: scores[m][key] for m in METRICS}))), JSON)


def _human_edit(edit: Any) -> Any:
    """The reviewer's edit a row carries, as JSON ({"reviewer", "source", "annotation_id",
    "edited_at"}), from `latest_edit()`'s columns `edit`; SQL NULL when there is none."""
    described = func.json_build_object(  # json, not jsonb: the keys stay in this order
        "reviewer",
        edit.reviewer,
        "source",
        edit.source,
        "annotation_id",
        edit.annotation_id,
        "edited_at",
        _utc_isoformat(edit.edited_at),
    )
    return type_coerce(case((edit.reviewer.is_not(None), described)), JSON)


def _full_cot(c: Any, human_edits: bool) -> dict[str, Any]:
    """The full record, key by key in the order of app.exports.records.full_cot_schema (which
    tests/test_exports.py holds it to), from the stored columns `c` (of `_full_cot_query`'s
    subquery): its one definition. With `human_edits`, the latest reviewer's edited response
    replaces the model's, and `human_edit` (last) names it."""
    record = {
        "item_id": cast(c.item_id, Text),
        "position": c.position,
        "prompt": c.prompt,
        "metadata": cast(c.metadata, Text),  # JSON text (a string in the record), as stored
        "explicit_intents": func.coalesce(c.intents["explicit_intents"], _jsonb("[]")),
        "explicit_labels": _explicit_labels(c.intents),
        "implicit_intents": func.coalesce(c.intents["implicit_intents"], _jsonb("[]")),
        "refined_thoughts": c.refined_thoughts,
        "response": c.response,
        "dropped_thoughts": c.dropped_thoughts,
        "unaccounted_thought_ids": c.unaccounted_thought_ids,
        "thoughts": c.thoughts,
        "rounds_used": c.rounds_used,
        "agreed": c.agreed,
        "fallbacks": c.fallbacks,
        "usage": _item_usage(c.job_id, c.item_id),
        "scores": _per_metric(c.scores, "score"),
        "score_rationales": _per_metric(c.scores, "rationale"),
        "grade_error": c.grade_error,
        "accepted": c.accepted,
        "gate_reasons": func.coalesce(func.nullif(c.gate_reasons, _jsonb("null")), _jsonb("[]"), type_=JSONB),
        "policy_set_name": c.policy_set_name,
        "policy_set_version": c.policy_set_version,
        "prompt_set_name": c.prompt_set_name,
        "prompt_set_version": c.prompt_set_version,
        "created_at": _utc_isoformat(c.created_at),
    }
    if human_edits:
        record["response"] = func.coalesce(c.edited_response, c.response)
        record["human_edit"] = _human_edit(c)
    return record


# The CoT's stored columns every export's output is made from (with the latest edit's and
# the pair's where it needs them): `_stored`.
_STORED = [
    Cot.item_id,
    Cot.job_id,
    Cot.position,
    Item.prompt,
    Item.item_metadata.label("metadata"),
    Cot.intents,
    Cot.refined_thoughts,
    Cot.response,
    Cot.dropped_thoughts,
    Cot.unaccounted_thought_ids,
    Cot.thoughts,
    Cot.rounds_used,
    Cot.agreed,
    Cot.fallbacks,
    Cot.scores,
    Cot.grade_error,
    Cot.accepted,
    Cot.gate_reasons,
    Cot.policy_set_name,
    Cot.policy_set_version,
    Cot.prompt_set_name,
    Cot.prompt_set_version,
    Cot.created_at,
]
_PAIR_STORED = [
    PreferencePair.rejected_thoughts,
    PreferencePair.rejected_response,
    PreferencePair.gap,
]


def _stored(
    job_id: UUID | BindParameter[UUID],
    source: Source,
    filters: ExportFilter,
    human_edits: bool,
    batch: _Batch,
) -> Subquery:
    """The stored columns of the job's CoTs that `source` exports (`_STORED`; with
    `human_edits`, `latest_edit()`'s too; for Source.KEPT_PAIRS, the kept pair's), the batch's
    rows of them in prompt order. The output is made from these in the query above, that is
    above the batch's byte filter: only for the rows it sends, as they are fetched. Made
    inside, Postgres would make them for every row read (up to the row limit, however many
    the bytes leave out), and all before the first is sent, with Postgres and the API taking
    turns instead of working at the same time."""
    query: Select[*tuple[Any, ...]] = select(*_STORED).join(Item, Item.id == Cot.item_id)
    if human_edits:
        edit = latest_edit()
        query = query.add_columns(*edit.c).outerjoin(edit, true())
    query = query.where(Cot.job_id == job_id, *_conditions(filters))
    if source is Source.KEPT_PAIRS:
        query = query.add_columns(*_PAIR_STORED).join(PreferencePair, PreferencePair.item_id == Cot.item_id)
        # A purged pair (app/store/deletions.py purge_hazardous) has no rejected side left.
        query = query.where(kept_at(filters.min_gap), PreferencePair.rejected_response.is_not(None))
    return batch.of(query.order_by(Cot.position)).subquery("stored")


def _made_from(stored: Subquery, columns: list[Any]) -> Select[Any]:
    """`columns` (made from `stored`'s), in prompt order, and BYTES_SO_FAR last when batched."""
    batch_bytes = [stored.c[BYTES_SO_FAR]] if BYTES_SO_FAR in stored.c else []
    return select(*columns, *batch_bytes).order_by(stored.c.position)


def _full_cot_query(
    job_id: UUID | BindParameter[UUID], filters: ExportFilter, human_edits: bool, batch: _Batch
) -> Select[Any]:
    """The job's full records as JSON text, one a row with its position (and BYTES_SO_FAR
    when batched), in prompt order. Postgres writes each straight from the stored JSON (the
    API neither parses nor re-encodes it), above the batch's byte filter (`_stored`)."""
    stored = _stored(job_id, Source.FULL_COT_JSON, filters, human_edits, batch)
    record = cast(_json_object(_full_cot(stored.c, human_edits)), Text)
    return _made_from(stored, [record, stored.c.position])


_JSON_FIELDS = frozenset(
    {
        "intents",
        "thoughts",
        "refined_thoughts",
        "dropped_thoughts",
        "unaccounted_thought_ids",
        "scores",
        "gate_reasons",
        "rejected_thoughts",
        "deliberation_log",
        "human_edit",
        "fallbacks",
        "usage",
    }
)


# The row sources' columns by field name, each made from the stored columns `c` (of `_stored`).
_COLUMNS: dict[str, Callable[[Any], Any]] = {
    "item_id": lambda c: c.item_id,
    "position": lambda c: c.position,
    "prompt": lambda c: c.prompt,
    "metadata": lambda c: cast(c.metadata, Text),  # exported as JSON text, never parsed
    "intents": lambda c: _json(c.intents),
    "thoughts": lambda c: _json(c.thoughts),
    "refined_thoughts": lambda c: _json(c.refined_thoughts),
    "dropped_thoughts": lambda c: _json(c.dropped_thoughts),
    "unaccounted_thought_ids": lambda c: _json(c.unaccounted_thought_ids),
    "response": lambda c: c.response,
    "rounds_used": lambda c: c.rounds_used,
    "agreed": lambda c: c.agreed,
    "scores": lambda c: _json(c.scores),
    "grade_error": lambda c: c.grade_error,
    "accepted": lambda c: c.accepted,
    "gate_reasons": lambda c: _json(c.gate_reasons),
    "policy_set_name": lambda c: c.policy_set_name,
    "policy_set_version": lambda c: c.policy_set_version,
    "prompt_set_name": lambda c: c.prompt_set_name,
    "prompt_set_version": lambda c: c.prompt_set_version,
    "created_at": lambda c: c.created_at,
    "rejected_thoughts": lambda c: _json(c.rejected_thoughts),
    "rejected_response": lambda c: c.rejected_response,
    "gap": lambda c: c.gap,
    "deliberation_log": lambda c: _deliberation_log(c.item_id),
    "fallbacks": lambda c: _json(c.fallbacks),
    "usage": lambda c: _json(_item_usage(c.job_id, c.item_id)),
    # Selected only with human edits (`_selected`), when `c` has latest_edit()'s columns.
    "human_edit": lambda c: _json(_human_edit(c)),
}
_ROW_TYPES: dict[Source, type[Any]] = {
    Source.SAMPLES: SampleRow,
    Source.SAMPLES_WITH_LOG: SampleRow,
    Source.COTS: CotRow,
    Source.KEPT_PAIRS: PairRow,
}


def _conditions(filters: ExportFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if filters.accepted_only:
        conditions.append(Cot.accepted.is_(True))
    for metric, lowest in filters.min_scores:
        conditions.append(cast(Cot.scores[metric]["score"].astext, Float) >= lowest)
    if filters.human_approved:
        conditions.append(human_approved())
    if filters.exclude_human_rejected:
        conditions.append(~human_rejected())
    return conditions


def _selected(source: Source, human_edits: bool) -> list[str]:
    """The source's row fields read from the database, in order (the rest keep defaults)."""
    names = [f.name for f in fields(_ROW_TYPES[source])]
    if source is Source.SAMPLES:  # a chat record's fields, not a dataset's
        names = [n for n in names if n not in DATASET_FIELDS]
    return [n for n in names if n != "human_edit" or human_edits]


_Query = TypeVar("_Query", bound="Select[*tuple[Any, ...]]")


def _stored_bytes(source: Source) -> ColumnElement[int]:
    """SQL: about how many bytes a CoT's row of `source` comes to, from its large stored
    columns without reading them: a text's length (octet_length reads only its header), a
    JSON's stored size (pg_column_size: compressed JSON counts less than it renders)."""
    texts: list[Any] = [Item.prompt, Cot.response]
    jsons: list[Any] = [Item.item_metadata, Cot.intents, Cot.thoughts, Cot.refined_thoughts]
    jsons += [Cot.dropped_thoughts, Cot.scores]
    if source is Source.KEPT_PAIRS:
        texts.append(PreferencePair.rejected_response)
        jsons.append(PreferencePair.rejected_thoughts)
    sizes = [func.octet_length(c) for c in texts] + [func.pg_column_size(c) for c in jsons]
    return sum((func.coalesce(size, 0) for size in sizes[1:]), func.coalesce(sizes[0], 0))


@dataclass(frozen=True)
class _Batch:
    """Which of the query's rows, in prompt order: those after the position bound to
    parameter `after` (None: from the first), at most the number bound to parameter `rows`
    of them (None: all, and no BYTES_SO_FAR column) and no more than BATCH_BYTES of them by
    `_stored_bytes` (a first row larger than that comes alone)."""

    source: Source
    after: BindParameter[int] | None = None
    rows: BindParameter[int] | None = None

    def of(self, query: _Query) -> _Query:
        if self.after is not None:
            query = query.where(Cot.position > self.after)
        if self.rows is None:
            return query
        # The running sum is taken as the rows are read, in the same pass (the window's order is
        # the index's): the rows past BATCH_BYTES are read as far as the row limit but never
        # sent. Only their stored columns are read: every export's output (full record or row
        # source's columns, deliberation logs and usages included) is made above this filter
        # (`_stored`), for the rows it sends.
        candidates = query.add_columns(
            func.row_number().over(order_by=Cot.position, rows=(None, 0)).label("nth"),
            func.sum(_stored_bytes(self.source))
            .over(order_by=Cot.position, rows=(None, 0))
            .label(BYTES_SO_FAR),
        )
        read = candidates.limit(self.rows).subquery("candidates")
        fits = or_(read.c.nth == 1, read.c[BYTES_SO_FAR] <= BATCH_BYTES)
        sent = [column for column in read.c if column.name != "nth"]
        return select(*sent).where(fits).order_by(read.c.position)  # type: ignore[return-value]


def next_batch_rows(batch: Sequence[Record], batch_rows: int) -> int:
    """The row limit of the batch after `batch` (rows of a batched `rows_query`): as many rows
    as fit in BATCH_BYTES at `batch`'s bytes a row, 1 to `batch_rows`. Ordinary rows come
    `batch_rows` at a time; long ones in batches of about their count in BATCH_BYTES, so the
    statement does not read a thousand rows to send a hundred. Rows longer than the last
    batch's are cut at BATCH_BYTES all the same (`_Batch`)."""
    batch_bytes: int = max(batch[-1][BYTES_SO_FAR], 1)
    return max(1, min(batch_rows, BATCH_BYTES * len(batch) // batch_bytes))


def rows_query(
    job_id: UUID | BindParameter[UUID],
    source: Source,
    filters: ExportFilter,
    human_edits: bool = False,
    after: BindParameter[int] | None = None,
    rows: BindParameter[int] | None = None,
) -> Select[Any]:
    """The columns of the source's row type, in its field order, for the job's CoTs in prompt
    order; JSON columns as text. For Source.FULL_COT_JSON, two columns: the record as JSON
    text, and its position. With `human_edits`, the response is the latest reviewer's edit
    where there is one, and the row says whose (not for Source.COTS, the labeling tools' rows:
    what reviewers review). Only the CoTs after the position bound to parameter `after` (None:
    from the first), at most the number bound to parameter `rows` of them (None: all) and
    BATCH_BYTES (see `_Batch`), and then with a last column BYTES_SO_FAR."""
    batch = _Batch(source, after, rows)
    if source is Source.FULL_COT_JSON:
        return _full_cot_query(job_id, filters, human_edits, batch)
    assert not (human_edits and source is Source.COTS), "labeling tasks carry the model's output"
    stored = _stored(job_id, source, filters, human_edits, batch)
    columns = dict(_COLUMNS)
    if human_edits:
        columns["response"] = lambda c: func.coalesce(c.edited_response, c.response)
    names = _selected(source, human_edits)
    return _made_from(stored, [columns[name](stored.c).label(name) for name in names])


# Every position (an int4) is after this one, so the first batch's query is the others'.
_BEFORE_ALL_POSITIONS = -(2**31) - 1
_JOB_ID = bindparam("job_id", type_=Uuid)
_AFTER = bindparam("after", type_=BigInteger)  # int8: _BEFORE_ALL_POSITIONS is below int4's range
_ROWS = bindparam("rows", type_=Integer)
_JOB_EXISTS = DriverStatement(select(select(Job.id).where(Job.id == _JOB_ID).exists()))


@functools.lru_cache(maxsize=256)
def batches_statement(source: Source, filters: ExportFilter, human_edits: bool) -> DriverStatement:
    """rows_query compiled for asyncpg, its parameters the job, the last batch's position and
    the batch's row limit:
    built and compiled once per kind of export, not once per export, for that is CPU on the
    event loop (about 19 ms for the full record's statement) which any key could ask for again
    and again."""
    return DriverStatement(rows_query(_JOB_ID, source, filters, human_edits, _AFTER, _ROWS))


async def read_batches(
    sessions: Sessions,
    job_id: UUID,
    source: Source,
    filters: ExportFilter,
    human_edits: bool = False,
    batch_rows: int = BATCH_ROWS,
) -> AsyncGenerator[Sequence[Record], None]:
    """The job's rows of `rows_query` in prompt order, a batch at a time (`batch_rows` of them,
    fewer if they come to more than BATCH_BYTES): memory holds one batch whatever the job's
    size, and whatever its rows'. Each batch's row limit is sized from the last one's bytes
    (`next_batch_rows`), and the statement reads its rows once, summing their bytes as it goes
    (`_Batch`): sizing each batch in a subquery of the same joins cost ordinary exports 6-28 %
    of their speed (bench/RESULTS.md). Each batch is read by one statement on a pooled
    connection of its own, which is back in the pool before the batch is yielded, so an
    export whose client reads slowly (or not at all) holds none of the pool's connections
    while it waits.

    The query is compiled for asyncpg (app/store/driver_statements.py) once per kind of
    export (batches_statement), its parameters the job, the last batch's position and its row
    limit, and
    each batch is a single statement in autocommit: a transaction and an ORM session a batch
    (checkout, BEGIN, the query built and compiled again, ROLLBACK) cost large exports 7-32 %
    of their speed (bench/RESULTS.md).

    Each batch is the next rows after the last one's position (unique in a job), read
    when it is due: no row is sent twice, and none that existed when the export began is
    left out. A job still running may gain CoTs meanwhile: a reader gets those completed
    after its export began if their position is past the batch it had reached then, and
    each row as it was when its batch was read (reviews and grades included). JobDeleted if
    the job is deleted meanwhile: ending early, the file would look complete."""
    query = batches_statement(source, filters, human_edits)
    last, rows = _BEFORE_ALL_POSITIONS, batch_rows
    while True:
        async with driver_connection(sessions) as connection:
            batch = await query.fetch(connection, job_id=job_id, after=last, rows=rows)
            # An empty batch ends the file (one cut short by its bytes says nothing): asked after
            # its rows whether the job is still there (a deletion takes the job and its rows in
            # one transaction, so then it had them all), lest a deletion end the file early and
            # it look complete.
            if not batch and not await _JOB_EXISTS.fetchval(connection, job_id=job_id):
                raise JobDeleted(f"job {job_id} was deleted during its export")
        if not batch:
            return
        yield batch
        last, rows = batch[-1]["position"], next_batch_rows(batch, batch_rows)


def typed_rows(source: Source, batch: Sequence[Record], human_edits: bool = False) -> list[Any]:
    """Batched rows of `rows_query` as the source's row type, their JSON text parsed."""
    row_type = _ROW_TYPES[source]
    names = _selected(source, human_edits)
    parsed = [i for i, name in enumerate(names) if name in _JSON_FIELDS]
    typed = []
    for row in batch:
        *values, _bytes_so_far = row
        for i in parsed:
            if values[i] is not None:
                values[i] = orjson.loads(values[i])
        typed.append(row_type(**dict(zip(names, values, strict=True))))
    return typed
