"""An export as a byte stream: the store's rows, a batch at a time, through the format's
record function and encoder, with Postgres and the API working at the same time, and no
database connection held while the client takes the bytes."""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from uuid import UUID

from app.exports.formats import ExportFormat
from app.exports.options import ExportOptions
from app.store import exports
from app.store.db import Sessions
from app.store.export_rows import ExportFilter
from app.threads import in_thread


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is parsed and encoded: the batch's thousands of
    young objects would set it off over and over, each time traversing them all (up to a
    third of an export's CPU), and records hold no cycles for it to find. The block awaits
    nothing, so no other request runs while it is paused."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
            if fmt.to_record is None:
                # The rows are the records, as JSON text. Encoding them is mostly C++ that
                # releases the GIL (Arrow's JSON reader and Parquet writer), so it runs in a
                # thread and the event loop keeps reading the next batch meanwhile (Parquet:
                # 19,000 -> 24,000-27,000 rows/s measured in-process).
                chunk = await in_thread(encoder.encode, [row[0] for row in rows])  # (record, position)
            else:
                with _collector_paused():
                    typed = exports.typed_rows(fmt.source, rows, options.human_edits)
                    chunk = encoder.encode([fmt.to_record(row, options) for row in typed])
            yield chunk
    finally:
        # A client gone mid-export: a batch still being read is cancelled, and the cancellation
        # ends `batches` inside that read (giving its connection back). Closed from here then,
        # it would be "already running" (a RuntimeError in place of the client's going).
        following.cancel()
        if inspect.getasyncgenstate(batches) != inspect.AGEN_RUNNING:
            await batches.aclose()
    yield encoder.finish()
