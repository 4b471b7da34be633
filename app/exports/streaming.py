"""An export as a byte stream: the store's rows, a batch at a time, through the format's
record function and encoder, with Postgres and the API working at the same time, and no
database connection held while the client takes the bytes."""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from uuid import UUID

from asyncpg import Record

from app.exports.encoders import Encoder
from app.exports.formats import ExportFormat, ToRecord
from app.exports.options import ExportOptions
from app.store import exports
from app.store.db import Sessions
from app.store.export_rows import ExportFilter, Source
from app.threads import in_thread


class _CollectorPause:
    """No cyclic garbage collection while a batch is parsed and encoded: the batch's thousands of
    young objects would set it off over and over, each time traversing them all (up to a
    third of an export's CPU), and records hold no cycles for it to find. It is paused for
    the whole process, in the batch's thread: the requests the event loop runs meanwhile
    have their collections put off until the batches being made are made, no longer.

    Batches of several exports overlap in their threads: the first one in pauses it, the last
    one out turns it on again, if it was on. Each pausing and restoring for itself, the first
    done turned it on under the others, and two could leave it off for good (one reading it on
    as another paused it, then pausing it after the other had turned it on again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches = 0
        self._was_enabled = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._batches == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._batches += 1
        try:
            yield
        finally:
            with self._lock:
                self._batches -= 1
                if self._batches == 0 and self._was_enabled:
                    gc.enable()


_collector_paused = _CollectorPause()


def _encoded_records(
    source: Source, to_record: ToRecord, encoder: Encoder, options: ExportOptions, rows: Sequence[Record]
) -> bytes:
    """A batch of the store's rows made into the format's records, encoded: CPU for a thread."""
    with _collector_paused():
        typed = exports.typed_rows(source, rows, options.human_edits)
        return encoder.encode([to_record(row, options) for row in typed])


async def encoded(
    sessions: Sessions, job_id: UUID, fmt: ExportFormat, options: ExportOptions, filters: ExportFilter
) -> AsyncGenerator[bytes, None]:
    """The job's export file, a chunk per batch of rows (see exports.read_batches: each read
    by a statement of its own). The next batch is fetched while this one is encoded, so
    Postgres and the API work at the same time; once fetched, its connection is given back,
    so a chunk the client is slow to take holds none."""
    encoder = fmt.encoder(options)
    yield encoder.start()
    batches = exports.read_batches(sessions, job_id, fmt.source, filters, options.human_edits)
    following = asyncio.ensure_future(anext(batches, None))
    try:
        while (rows := await following) is not None:
            following = asyncio.ensure_future(anext(batches, None))
            await asyncio.sleep(0)  # send the next batch's query before encoding (the CPU-bound part)
            # In a worker thread, so the event loop keeps reading the next batch meanwhile, and
            # every other request runs. The JSON text rows' encoding is mostly C++ that releases
            # the GIL (Arrow's JSON reader and Parquet writer: 19,000 -> 24,000-27,000 rows/s
            # measured in-process). Records are Python: on the event loop, a batch of 1,000 CoTs
            # of 80 KB held it for 0.3 s (trl_sft) to 1.7 s (aidsafe_csv) of CPU.
            if fmt.to_record is None:
                chunk = await in_thread(encoder.encode, [row[0] for row in rows])  # (record, position)
            else:
                chunk = await in_thread(_encoded_records, fmt.source, fmt.to_record, encoder, options, rows)
            yield chunk
    finally:
        # A client gone mid-export: a batch still being read is cancelled, and the cancellation
        # ends `batches` inside that read (giving its connection back). Closed from here then,
        # it would be "already running" (a RuntimeError in place of the client's going).
        following.cancel()
        if inspect.getasyncgenstate(batches) != inspect.AGEN_RUNNING:
            await batches.aclose()
    yield encoder.finish()
