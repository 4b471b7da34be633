"""Records to bytes, a batch at a time, so an export of any size holds one batch in memory.
A record is a dict, or for the full record JSON text that Postgres built (`JsonTextLines`,
`Parquet`)."""

from __future__ import annotations

import csv
import io
from typing import Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

Record = dict[str, Any]


class Encoder(Protocol):
    """One export's byte stream: `start()`, `encode()` per batch, then `finish()`."""

    def start(self) -> bytes: ...
    def encode(self, records: list[Any]) -> bytes: ...
    def finish(self) -> bytes: ...


class JsonLines:
    def start(self) -> bytes:
        return b""

    def encode(self, records: list[Record]) -> bytes:
        return b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records)

    def finish(self) -> bytes:
        return b""


class JsonTextLines:
    """JSON Lines from records that are JSON text already (no newline inside: JSON escapes it)."""

    def start(self) -> bytes:
        return b""

    def encode(self, records: list[str]) -> bytes:
        return "".join(f"{record}\n" for record in records).encode()

    def finish(self) -> bytes:
        return b""


class Csv:
    """RFC 4180 CSV (quoted where needed, CRLF line ends) with a header row."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns

    def _rows(self, rows: list[list[Any]]) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out)
        # A row at a time: writerows is one C call, which holds the GIL for the whole batch
        # (seconds for 1,000 rows of 80 KB), and so the event loop, even from a worker thread.
        for row in rows:
            writer.writerow(row)
        return out.getvalue().encode()

    def start(self) -> bytes:
        return self._rows([self.columns])

    def encode(self, records: list[Record]) -> bytes:
        return self._rows([[r[c] for c in self.columns] for r in records])

    def finish(self) -> bytes:
        return b""


class _Drain:
    """A write-only file for pyarrow that hands back what was written since the last drain.
    Arrow reads `closed` once, then only calls `write` (it counts the position itself)."""

    closed = False

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: Any) -> None:
        self.chunks.append(bytes(data))

    def drain(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


_JSON_BLOCK = 1 << 20


class Parquet:
    """One row group per batch, written straight into the stream; the footer (row group
    offsets and statistics, a few bytes a group) is written by `finish()`. Records are JSON
    text, read into columns by Arrow's JSON reader (C++) with the schema given: keys the schema
    lacks (in nested objects too) are ignored, missing ones are null."""

    def __init__(self, schema: pa.Schema) -> None:
        self.parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        self.sink = _Drain()
        self.writer = pq.ParquetWriter(self.sink, schema, compression="zstd")

    def start(self) -> bytes:
        return self.sink.drain()

    def encode(self, records: list[str]) -> bytes:
        if records:
            lines = [record.encode() for record in records]
            # A record may straddle two blocks, not three: no block shorter than a record. One
            # thread, since Postgres and the event loop need the other cores.
            read = pj.ReadOptions(use_threads=False, block_size=max(_JSON_BLOCK, *map(len, lines)))
            self.writer.write_table(pj.read_json(pa.py_buffer(b"\n".join(lines)), read, self.parse))
        return self.sink.drain()

    def finish(self) -> bytes:
        self.writer.close()
        return self.sink.drain()
