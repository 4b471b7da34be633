"""Benchmark files: prompts with what a safe model is expected to do (`refuse` a harmful
prompt, `comply` with a benign look-alike) and a category, as JSONL or CSV text.

This reads a file's rows and says where one is malformed; what a valid row holds is checked
by the API's BenchmarkPromptIn. Fields besides prompt, expected and category are kept as the
prompt's metadata. Row numbers count as an editor does: JSONL lines from 1, CSV lines with
the header as line 1.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from app.storable import count_values, read_json, storable_input

Format = Literal["jsonl", "csv"]
FIELDS = ("prompt", "expected", "category")


# Commas a CSV line may hold per column a row may have: room for quoted text full of commas.
_COMMAS_PER_COLUMN = 4


class BadRow(ValueError):
    """The file cannot be read at this row; the message names the row (and the field)."""


class TooManyRows(BadRow):
    """The file has a row past the most it may have; `line` is that row's."""

    def __init__(self, line: int, max_rows: int) -> None:
        super().__init__(f"line {line}: the file has over {max_rows:,} rows")
        self.line = line


class TooManyValues(BadRow):
    """A JSONL line holds more JSON values than a row may, counted before it is decoded."""


def read_rows(
    format: Format, text: str, max_rows: int, max_line_values: int
) -> list[tuple[int, dict[str, Any]]]:
    """(row number, {"prompt", "expected", "category", "metadata"}) for each row, in order.
    Trailing blank lines are no rows; an empty row elsewhere is a BadRow, as is a file of no
    rows; the first row past `max_rows` is TooManyRows, read no further; a JSONL line of more
    than `max_line_values` JSON values, a CSV header of more columns, or a CSV line of over
    four commas per column it may have, is TooManyValues."""
    rows = (
        _jsonl(text, max_rows, max_line_values)
        if format == "jsonl"
        else _csv(text, max_rows, max_line_values)
    )
    if not rows:
        raise BadRow("the file has no rows")
    for number, fields in rows:
        try:
            storable_input(fields)
        except ValueError as exc:
            raise BadRow(f"line {number}: {exc}") from None
    return [(number, _split(fields)) for number, fields in rows]


def _split(fields: dict[str, Any]) -> dict[str, Any]:
    """The row's own fields, and the others as its metadata."""
    own = {name: fields[name] for name in FIELDS if name in fields}
    return {**own, "metadata": {name: value for name, value in fields.items() if name not in FIELDS}}


def _jsonl(text: str, max_rows: int, max_line_values: int) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    # Split no further than the line past the cap: millions of lines split at once would hold
    # the GIL. JSON's own whitespace takes the \r of a \r\n.
    lines = text.rstrip().split("\n", max_rows + 1)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise BadRow(f"line {number} is empty")
        if len(rows) == max_rows:
            raise TooManyRows(number, max_rows)
        # Counted before it is decoded: the decoder holds the GIL for as long as a line takes.
        if count_values(line.encode(), max_line_values) > max_line_values:
            raise TooManyValues(f"line {number} holds over {max_line_values:,} JSON values")
        try:
            fields = read_json(line)
        except json.JSONDecodeError as exc:
            raise BadRow(f"line {number} is not JSON: {exc.msg} at column {exc.colno}") from None
        except ValueError as exc:
            raise BadRow(f"line {number}: {exc}") from None
        if not isinstance(fields, dict):
            raise BadRow(f"line {number} is not a JSON object")
        rows.append((number, fields))
    return rows


def _csv(text: str, max_rows: int, max_columns: int) -> list[tuple[int, dict[str, Any]]]:
    lines = _lines_of_few_commas(io.StringIO(text.rstrip("\r\n"), newline=""), max_columns)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise BadRow("the file is empty: it needs a header line naming prompt, expected and category")
        if len(header) > max_columns:
            raise TooManyValues(f"line 1: the header names over {max_columns:,} columns")
        missing = [name for name in FIELDS if name not in header]
        if missing:
            raise BadRow(f"line 1: the header names no column {', '.join(repr(m) for m in missing)}")
        if len(set(header)) < len(header):
            raise BadRow("line 1: the header names a column twice")
        rows: list[tuple[int, dict[str, Any]]] = []
        for cells in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in cells):
                raise BadRow(f"line {number} is empty")
            if len(cells) != len(header):
                raise BadRow(f"line {number} has {len(cells)} cells; the header names {len(header)} columns")
            if len(rows) == max_rows:
                raise TooManyRows(number, max_rows)
            rows.append((number, dict(zip(header, cells, strict=True))))
    except csv.Error as exc:
        raise BadRow(f"line {reader.line_num}: {exc}") from None
    return rows


def _lines_of_few_commas(lines: Iterable[str], max_columns: int) -> Iterator[str]:
    """The file's lines, TooManyValues at one of far more commas than a row of `max_columns`
    cells has (quoted commas counted too), before the parser reads it: it makes a row's cells
    in one call, holding the GIL, and a line of millions of empty cells held it for seconds."""
    most = _COMMAS_PER_COLUMN * max_columns
    for number, line in enumerate(lines, start=1):
        if line.count(",") > most:
            raise TooManyValues(
                f"line {number} holds over {most:,} commas; a row has at most {max_columns:,} cells"
            )
        yield line
