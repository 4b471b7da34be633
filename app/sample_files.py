"""Samples written elsewhere, read from a JSONL, CSV or Parquet file (or a JSON list) into
checked samples: a prompt, its thoughts, a response, an optional label and metadata.

A column shape (`format`) says which column holds each field for a common public layout; a
mapping overrides it field by field. Everything is checked before anything is stored, and a
refusal names the row (1-based, a header not counted) and the column. Text must be UTF-8:
a file that is not, or mixes encodings, is refused at the first bad byte's row. CPU-bound:
call `read_samples` off the event loop."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, time
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.errors import (
    EmptyRow,
    InvalidEncoding,
    MissingColumn,
    PayloadTooLarge,
    SampleFileError,
    TooManySamples,
    shown_name,
)
from app.storable import count_values, read_json, storable_input

FileType = Literal["jsonl", "csv", "parquet"]
FIELDS = ("prompt", "thoughts", "response", "label")
METADATA = "metadata."  # a mapping key `metadata.<name>` copies a column into the metadata
MAX_SAMPLES = 10_000
# The values of the largest inline set (a JSON body): each sample with a dozen or so.
MAX_JSON_VALUES = 20 * MAX_SAMPLES
MAX_PROMPT_CHARS = 20_000
MAX_RESPONSE_CHARS = 50_000
MAX_THOUGHTS = 100
MAX_THOUGHT_CHARS = 10_000
# Thoughts as text that opens with "[" are read as a JSON list, of at most this many values:
# few enough to decode in milliseconds, far more than MAX_THOUGHTS (and blank ones), so that
# text one thought a line that merely opens with "[" is not refused for its commas.
MAX_THOUGHT_LIST_VALUES = 100 * MAX_THOUGHTS
MAX_LABEL_CHARS = 200
# The JSON values of one line of a JSONL file, counted before it is decoded (each line is
# decoded alone, holding the GIL as long as it takes): far more than a sample holds (its
# MAX_THOUGHTS thoughts, its fields and room for metadata), few enough to decode in
# milliseconds. A file may hold MAX_SAMPLES such lines, each decoded in its turn.
MAX_LINE_VALUES = 5_000
# A Parquet file's mapped columns: at most the values MAX_SAMPLES samples of MAX_THOUGHTS
# thoughts hold (with their other fields), and at most the caller's `max_bytes` decoded. A file
# of a few hundred bytes may decode to gigabytes (repeated dictionary entries): counted a batch
# at a time before any of it becomes Python objects.
MAX_PARQUET_VALUES = MAX_SAMPLES * (MAX_THOUGHTS + 20)
# The longest list a Parquet file's metadata may hold: its row groups, its columns (each row
# group's, and the schema's nodes). Each is parsed, then read and walked one at a time however
# little it holds: 32 MiB of empty row groups, or of columns, took seconds of CPU and held the
# event loop for up to 0.36 s, for a file of one sample. No file of samples needs more (a row
# group holds a sample at least), and the metadata is read with this limit, so such a file is
# refused as soon as its metadata is read.
MAX_PARQUET_METADATA_LIST = MAX_SAMPLES
# Rows decoded and turned into Python objects at a time, and the most they may decode to: more
# than a row within the per-sample caps needs, few enough to be turned into Python objects in
# milliseconds (one call, holding the GIL).
_PARQUET_BATCH_ROWS = 32
_PARQUET_BATCH_BYTES = 64 * 1024 * 1024
# A line of thoughts text is read in pieces of at most this many characters (a line of
# megabytes matched in one call would hold the GIL); a longer line is no thought.
_LINE_CHARS = 2 * MAX_THOUGHT_CHARS
# Text between the line boundaries of str.splitlines: a line (or its first _LINE_CHARS + 1
# characters), blank ones left out.
_LINE = re.compile(rf"[^\n\r\v\f\x1c-\x1e\x85\u2028\u2029]{{1,{_LINE_CHARS + 1}}}")
# CSV's default cap on a cell is 128 KiB; a response may be longer, no cell need be this long.
_CSV_CELL_CHARS = 4 * MAX_RESPONSE_CHARS


@dataclass(frozen=True)
class Sample:
    prompt: str
    thoughts: list[str]
    response: str
    label: str | None
    metadata: dict[str, Any]


def _as_text(value: Any) -> str | None:
    """A label as text: booleans and numbers as JSON writes them."""
    return value if isinstance(value, str) else json.dumps(value)


_TRUE, _FALSE = {"true", "1", "yes", "safe"}, {"false", "0", "no", "unsafe"}


def _safe_or_unsafe(value: Any) -> str | None:
    """An is_safe column (a boolean, or its text as CSV writes it) as the label safe/unsafe."""
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in _TRUE | _FALSE:
        return "safe" if (value is True or text in _TRUE) else "unsafe"
    raise ValueError(f"expected a boolean (true/false), got {str(value)[:40]!r}")


@dataclass(frozen=True)
class Shape:
    """A common public column layout: the column of each field (a `metadata.<name>` field
    copies its column into the metadata), which fields may be absent, and how its label
    column reads."""

    columns: Mapping[str, str]
    optional: frozenset[str] = frozenset()
    label: Callable[[Any], str | None] = _as_text
    description: str = ""


SHAPES: dict[str, Shape] = {
    "generic": Shape(
        {"prompt": "prompt", "thoughts": "thoughts", "response": "response", "label": "label"},
        frozenset({"thoughts", "label"}),
        description="prompt, response; optional thoughts and label",
    ),
    "cot": Shape(
        {"prompt": "prompt", "thoughts": "thoughts", "response": "response"},
        description="CoT datasets: prompt, thoughts (a list, or text one thought a line), response",
    ),
    "safety": Shape(
        {"prompt": "prompt", "response": "response", "label": "is_safe"},
        label=_safe_or_unsafe,
        description="safety sets: prompt, response, is_safe (the label: safe or unsafe)",
    ),
    "over_refusal": Shape(
        {"prompt": "prompt", "response": "response", "label": "label", "metadata.type": "type"},
        description="over-refusal sets: prompt, type (into the metadata), label, and the response",
    ),
    "jailbreak": Shape(
        {"prompt": "forbidden_prompt", "response": "response", "metadata.category": "category"},
        description="jailbreak sets: forbidden_prompt, category (into the metadata), and the response",
    ),
}
Format = Literal["generic", "cot", "safety", "over_refusal", "jailbreak"]


def is_mapping_field(name: str) -> bool:
    return name in FIELDS or (name.startswith(METADATA) and len(name) > len(METADATA))


@dataclass(frozen=True)
class ColumnMap:
    """The columns to read: the shape's, with the caller's overrides; a column the caller
    names is required."""

    shape: Shape
    columns: dict[str, str] = field(default_factory=dict)
    required: frozenset[str] = frozenset()

    @classmethod
    def of(cls, shape: Shape, overrides: Mapping[str, str]) -> ColumnMap:
        columns = {**shape.columns, **overrides}
        required = frozenset(name for name in columns if name not in shape.optional or name in overrides)
        return cls(shape, columns, required)

    def check_header(self, header: list[str]) -> None:
        present = set(header)
        for name, column in self.columns.items():
            if name in self.required and column not in present:
                raise MissingColumn(
                    f"the file has no column '{column}' (the {name}); its columns: "
                    f"{', '.join(map(shown_name, header[:50])) or '(none)'}; map another with columns",
                    column=column,
                )


def read_samples(
    raw: bytes,
    file_type: FileType,
    format: Format = "generic",
    columns: Mapping[str, str] | None = None,
    *,
    max_bytes: int,
) -> list[Sample]:
    """Every sample of the file, checked; SampleFileError (naming the row and column) for
    the first problem. Slow for a big file: call it off the event loop.

    `max_bytes` caps what the file's samples may decode to: a JSONL or CSV file's text is no
    longer than the file, but a Parquet file's compression may hide gigabytes in kilobytes
    (PayloadTooLarge past it)."""
    mapping = ColumnMap.of(SHAPES[format], columns or {})
    match file_type:
        case "jsonl":
            rows = _jsonl_rows(raw)
        case "csv":
            rows = _csv_rows(raw, mapping)
        case "parquet":
            rows = _parquet_rows(raw, mapping, max_bytes)
    return _samples(rows, mapping)


def samples_of(rows: list[dict[str, Any]], format: Format, columns: Mapping[str, str]) -> list[Sample]:
    """Samples from decoded JSON objects (an inline list), read as the rows of a JSONL file."""
    return _samples(enumerate(rows, 1), ColumnMap.of(SHAPES[format], columns))


Rows = Iterator[tuple[int, Mapping[str, Any]]]  # (row number, values by column)


def _samples(rows: Rows | Any, mapping: ColumnMap) -> list[Sample]:
    samples: list[Sample] = []
    for number, row in rows:
        if len(samples) == MAX_SAMPLES:
            raise TooManySamples(f"the file holds over {MAX_SAMPLES:,} samples", row=number)
        samples.append(_sample(number, row, mapping))
    if not samples:
        raise EmptyRow("the file holds no sample")
    return samples


def _decoded(raw: bytes, row_of: Callable[[str], int | None]) -> str:
    """`raw` as UTF-8 text (a byte-order mark dropped); InvalidEncoding naming the row of the
    first byte that is not, given by `row_of(the valid text before it)`."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        after_mark: bytes = exc.object  # the codec's positions are in the bytes after a mark
        row = row_of(after_mark[: exc.start].decode())
        where = "the header" if row is None else f"row {row}"
        offset = len(raw) - len(after_mark) + exc.start
        raise InvalidEncoding(
            f"{where} is not UTF-8 text (byte {after_mark[exc.start]:#04x} at offset {offset}); "
            "save the file as UTF-8",
            row=row,
        ) from None


def _jsonl_rows(raw: bytes) -> Rows:
    text = _decoded(raw, lambda before: before.count("\n") + 1)
    # Split only once known to make few lines: one split of millions would hold the GIL. The
    # last line's newline and one blank line after it (an empty row, as ever) are let through.
    if text.count("\n") > MAX_SAMPLES + 1:
        raise TooManySamples(f"the file holds over {MAX_SAMPLES:,} samples", row=MAX_SAMPLES + 1)
    lines = text.split("\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the newline that ends the last line
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise EmptyRow(f"row {number} is empty", row=number)
        # Counted before it is decoded: the decoder holds the GIL for as long as a line takes.
        if count_values(line.encode(), MAX_LINE_VALUES) > MAX_LINE_VALUES:
            raise PayloadTooLarge(
                f"row {number} holds over {MAX_LINE_VALUES:,} JSON values, more than a sample needs",
                details={"row": number, "column": None},
            )
        try:
            row = read_json(line)
        except json.JSONDecodeError as exc:
            raise SampleFileError(f"row {number} is not JSON: {exc}", row=number) from None
        except ValueError as exc:
            raise SampleFileError(f"row {number}: {exc}", row=number) from None
        if not isinstance(row, dict):
            raise SampleFileError(f"row {number} is not a JSON object", row=number)
        yield number, row


def _csv_records(text: str) -> Iterator[list[str]]:
    csv.field_size_limit(_CSV_CELL_CHARS)
    return csv.reader(io.StringIO(text, newline=""), strict=True)


def _csv_row_of(before: str) -> int | None:
    """The data row holding the character after `before` (None: the header); SampleFileError
    if `before` is not CSV, the file's first problem then."""
    records = 0
    try:
        for _ in _csv_records(before + "x"):
            records += 1
    except csv.Error as exc:
        raise _not_csv(max(records - 1, 0), exc) from None  # the header is no data row
    return records - 1 or None


def _not_csv(rows_read: int, problem: csv.Error) -> SampleFileError:
    """The refusal of a file whose data rows read as CSV up to `rows_read`, and the next not."""
    row = rows_read + 1
    return SampleFileError(f"row {row} is not CSV: {problem}", row=row)


def _csv_rows(raw: bytes, mapping: ColumnMap) -> Rows:
    records = _csv_records(_decoded(raw, _csv_row_of))
    number = 0
    try:
        header = next(records, [])
        mapping.check_header(header)
        for number, record in enumerate(records, 1):
            if len(record) > len(header):
                raise SampleFileError(
                    f"row {number} has {len(record)} cells, the header {len(header)}", row=number
                )
            yield number, dict(zip(header, record, strict=False))
    except csv.Error as exc:
        raise _not_csv(number, exc) from None


def _parquet_rows(raw: bytes, mapping: ColumnMap, max_bytes: int) -> Rows:
    try:
        yield from _parquet_batch_rows(raw, mapping, max_bytes)
    except (pa.ArrowException, OSError) as exc:
        raise SampleFileError(f"the file is not Parquet: {exc}") from None


def _parquet_batch_rows(raw: bytes, mapping: ColumnMap, max_bytes: int) -> Rows:
    """The mapped columns' rows, read a batch at a time: PayloadTooLarge as soon as they are
    known to hold more values than MAX_SAMPLES samples may, or to decode to more than
    `max_bytes`, counted a batch at a time before any of it is turned into Python objects (a
    first pass, each batch read dictionary-encoded and let go)."""
    metadata = _metadata(raw)
    columns = metadata.schema.to_arrow_schema().names
    if metadata.num_rows > MAX_SAMPLES:
        raise TooManySamples(f"the file holds {metadata.num_rows:,} samples; at most {MAX_SAMPLES:,}")
    mapping.check_header(columns)
    wanted = [c for c in dict.fromkeys(mapping.columns.values()) if c in columns]
    leaves = [metadata.schema.column(i) for i in range(len(metadata.schema))]
    wanted_leaves = [i for i, leaf in enumerate(leaves) if any(_in_column(leaf.path, c) for c in wanted)]
    _check_stored_size(metadata, wanted_leaves, max_bytes)
    # Read dictionary-encoded until counted, so that a value repeated is decoded once.
    encoded = [leaves[i].path for i in wanted_leaves if _is_byte_array(leaves[i])]

    def batches() -> Iterator[pa.RecordBatch]:
        file = pq.ParquetFile(io.BytesIO(raw), metadata=metadata, read_dictionary=encoded)
        batches: Iterator[pa.RecordBatch] = file.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted)
        return batches

    decoded_bytes, rows_before = 0, 0
    for batch in batches():
        batch_bytes = sum(_decoded_bytes(column) for column in batch.columns)
        if batch_bytes > _PARQUET_BATCH_BYTES:
            raise PayloadTooLarge(
                f"rows {rows_before + 1:,} to {rows_before + batch.num_rows:,}: the file's mapped "
                f"columns decode to over {_PARQUET_BATCH_BYTES:,} bytes in {batch.num_rows} rows"
            )
        decoded_bytes += batch_bytes
        if decoded_bytes > max_bytes:
            raise PayloadTooLarge(f"the file's mapped columns decode to over {max_bytes:,} bytes")
        rows_before += batch.num_rows
    rows_before = 0
    for batch in batches():
        values = {column: _parquet_column(batch.column(column), column, rows_before) for column in wanted}
        for index in range(batch.num_rows):
            yield rows_before + index + 1, {column: values[column][index] for column in wanted}
        rows_before += batch.num_rows


def _in_column(leaf_path: str, column: str) -> bool:
    return leaf_path == column or leaf_path.startswith(f"{column}.")  # a list's or struct's leaf


def _is_byte_array(leaf: pq.ColumnSchema) -> bool:
    """Text or bytes, which may be read dictionary-encoded (a decimal so stored may not)."""
    return bool(leaf.physical_type == "BYTE_ARRAY" and leaf.logical_type.type != "DECIMAL")


def _metadata(raw: bytes) -> pq.FileMetaData:
    """The file's metadata; PayloadTooLarge if a list in it is over MAX_PARQUET_METADATA_LIST."""
    try:
        file = pq.ParquetFile(io.BytesIO(raw), thrift_container_size_limit=MAX_PARQUET_METADATA_LIST)
    except OSError as exc:
        if "Exceeded size limit" not in str(exc):  # Thrift's words for a list over the limit
            raise
        raise PayloadTooLarge(
            f"the file's metadata lists over {MAX_PARQUET_METADATA_LIST:,} row groups or columns"
        ) from None
    return file.metadata


def _check_stored_size(metadata: pq.FileMetaData, leaves: list[int], max_bytes: int) -> None:
    """PayloadTooLarge if the file says these leaf columns (by index) hold more values than
    MAX_SAMPLES samples may, or more bytes uncompressed than they may decode to: a page is
    decompressed whole."""
    values, stored = 0, 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in leaves:
            chunk = row_group.column(index)
            values += chunk.num_values
            stored += chunk.total_uncompressed_size
    if values > MAX_PARQUET_VALUES:
        raise PayloadTooLarge(
            f"the file's mapped columns hold {values:,} values; at most {MAX_PARQUET_VALUES:,}"
        )
    if stored > max_bytes:
        limit = f"at most {max_bytes:,}"
        raise PayloadTooLarge(f"the file's mapped columns hold {stored:,} bytes uncompressed; {limit}")


def _decoded_bytes(array: pa.Array) -> int:
    """The bytes `array` holds decoded, a dictionary's value counted each time it is used."""
    if isinstance(array, pa.DictionaryArray):
        used = pc.sum(pc.binary_length(array.dictionary).take(array.indices)).as_py()
        return int(array.indices.nbytes) + (used or 0)
    if isinstance(array, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray):  # a MapArray too
        return _decoded_bytes(array.flatten())
    if isinstance(array, pa.StructArray):
        return sum(_decoded_bytes(field) for field in array.flatten())
    return int(array.nbytes)


def _parquet_column(array: pa.Array, column: str, rows_before: int) -> list[Any]:
    """The column's values in Python; SampleFileError naming the row of one Python cannot hold."""
    try:
        values: list[Any] = array.to_pylist()
        return values
    except (UnicodeDecodeError, OverflowError, pa.ArrowException):
        for index in range(len(array)):
            _check_readable(array[index], rows_before + index + 1, column)
        raise


def _check_readable(value: pa.Scalar, row: int, column: str) -> None:
    """SampleFileError, naming the row and column, if `value` has no Python equivalent."""
    try:
        value.as_py()
    except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8
        raise InvalidEncoding(
            f"row {row}, column '{column}' is not UTF-8 text", row=row, column=column
        ) from None
    except (OverflowError, pa.ArrowException) as exc:  # a date past year 9999, an unknown time zone
        raise SampleFileError(
            f"row {row}, column '{column}': a {value.type} value Python cannot read ({exc})",
            row=row,
            column=column,
        ) from None


def _sample(number: int, row: Mapping[str, Any], mapping: ColumnMap) -> Sample:
    if all(value is None or value == "" for value in row.values()):
        raise EmptyRow(f"row {number} is empty", row=number)

    def value(name: str) -> Any:
        column = mapping.columns[name]
        if column not in row:
            if name in mapping.required:
                raise MissingColumn(
                    f"row {number} has no column '{column}' (the {name})", row=number, column=column
                )
            return None
        return row[column]

    def checked(name: str, read: Callable[[Any], Any]) -> Any:
        column = mapping.columns.get(name)
        if column is None:
            return None
        try:
            return read(storable_input(_as_json(value(name))))
        except EmptyRow as exc:
            raise EmptyRow(
                f"row {number}: the {name} ('{column}') is empty", row=number, column=column
            ) from exc
        except ValueError as exc:
            raise SampleFileError(
                f"row {number}, column '{column}': {exc}", row=number, column=column
            ) from None

    metadata = {
        name.removeprefix(METADATA): checked(name, _json_value)
        for name in mapping.columns
        if name.startswith(METADATA)
    }
    return Sample(
        prompt=checked("prompt", _text(MAX_PROMPT_CHARS)),
        thoughts=checked("thoughts", _thoughts) or [],
        response=checked("response", _text(MAX_RESPONSE_CHARS)),
        label=checked("label", lambda v: None if v is None or v == "" else _label(mapping.shape.label(v))),
        metadata=metadata,
    )


def _text(max_chars: int) -> Callable[[Any], str]:
    def read(value: Any) -> str:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise EmptyRow("empty")
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {type(value).__name__}")
        if len(value) > max_chars:
            raise ValueError(f"{len(value):,} characters; at most {max_chars:,}")
        return value

    return read


def _thoughts(value: Any) -> list[str]:
    """A list of thoughts; text is a JSON array of strings, or one thought a non-blank line."""
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        return _checked_thoughts(value)
    if not value.lstrip().startswith("["):
        return _checked_thoughts(_thought_lines(value))
    # Counted before it is decoded: the decoder holds the GIL for as long as it takes. Text of
    # more values than a list of thoughts needs is read one thought a line, never decoded.
    if count_values(value.encode(), MAX_THOUGHT_LIST_VALUES) > MAX_THOUGHT_LIST_VALUES:
        try:
            return _checked_thoughts(_thought_lines(value))
        except ValueError as exc:
            raise ValueError(
                f"over {MAX_THOUGHT_LIST_VALUES:,} JSON values, more than a list of {MAX_THOUGHTS} "
                f"thoughts needs, and read one thought a line: {exc}"
            ) from None
    # read_json, not json.loads: it refuses a number of over 100 characters unconverted (the
    # decoder converts numbers holding the GIL: 7,000 of 4,300 digits held the event loop for
    # 1.4 s), and nesting too deep to decode as storable_input refuses any past 32 levels.
    try:
        decoded = storable_input(read_json(value))
    except json.JSONDecodeError:
        decoded = _thought_lines(value)
    return _checked_thoughts(decoded)


def _checked_thoughts(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError("expected a list of strings, or text with one thought a line")
    thoughts = [t for t in value if t.strip()]
    if len(thoughts) > MAX_THOUGHTS:
        raise ValueError(f"over {MAX_THOUGHTS} thoughts")
    if any(len(t) > MAX_THOUGHT_CHARS for t in thoughts):
        raise ValueError(f"a thought is over {MAX_THOUGHT_CHARS:,} characters")
    return thoughts


def _thought_lines(text: str) -> list[str]:
    """One thought a non-blank line, up to the first past the cap: text of millions of lines
    split at once would hold the GIL, as would a line of megabytes matched in one call."""
    thoughts: list[str] = []
    for line in _LINE.finditer(text):
        if line.end() - line.start() > _LINE_CHARS:
            raise ValueError(f"a thought is over {MAX_THOUGHT_CHARS:,} characters")
        thought = line.group().strip()
        if thought:
            thoughts.append(thought)
            if len(thoughts) > MAX_THOUGHTS:
                break
    return thoughts


def _label(text: str | None) -> str | None:
    if text is not None and len(text) > MAX_LABEL_CHARS:
        raise ValueError(f"a label of {len(text):,} characters; at most {MAX_LABEL_CHARS}")
    return text


def _as_json(value: Any) -> Any:
    """A Parquet value as JSON can hold it: dates and times as ISO 8601 text; a type JSON has
    none for (a decimal, bytes, a duration) is refused, to be cast in the file."""
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_json(item) for item in value]
    if isinstance(value, date | time):  # datetime is a date
        return value.isoformat()
    if value is not None and not isinstance(value, str | int | float):  # bool is an int
        raise ValueError(f"a {type(value).__name__} value, which JSON has no type for: cast the column")
    return value


def _json_value(value: Any) -> Any:
    return None if value == "" else value
