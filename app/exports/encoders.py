"""Records to bytes, a batch at a time, so an export of any size holds one batch in memory."""

from __future__ import annotations

import csv
import io
from typing import Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

Record = dict[str, Any]


class Encoder(Protocol):
    """One export's byte stream: `start()`, `encode()` per batch, then `finish()`."""

    def start(self) -> bytes: ...
    def encode(self, records: list[Record]) -> bytes: ...
    def finish(self) -> bytes: ...


class JsonLines:
    def start(self) -> bytes:
        return b""

    def encode(self, records: list[Record]) -> bytes:
        return b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records)

    def finish(self) -> bytes:
        return b""


class Csv:
    """RFC 4180 CSV (quoted where needed, CRLF line ends) with a header row."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns

    def _rows(self, rows: list[list[Any]]) -> bytes:
        out = io.StringIO()
        csv.writer(out).writerows(rows)
        return out.getvalue().encode()

    def start(self) -> bytes:
        return self._rows([self.columns])

    def encode(self, records: list[Record]) -> bytes:
        return self._rows([[r[c] for c in self.columns] for r in records])

    def finish(self) -> bytes:
        return b""


class _Drain:
    """A write-only file for pyarrow that hands back what was written since the last drain."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.chunks.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def drain(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


class Parquet:
    """One row group per batch, written straight into the stream; the footer (row group
    offsets and statistics, a few bytes a group) is written by `finish()`."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.sink = _Drain()
        self.writer = pq.ParquetWriter(self.sink, schema, compression="zstd")

    def start(self) -> bytes:
        return self.sink.drain()

    def encode(self, records: list[Record]) -> bytes:
        if records:
            self.writer.write_table(pa.Table.from_pylist(records, schema=self.schema))
        return self.sink.drain()

    def finish(self) -> bytes:
        self.writer.close()
        return self.sink.drain()
