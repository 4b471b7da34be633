"""Where an export's batches end: at BATCH_BYTES of their rows' large stored columns, each of
which counts, the bound itself included (app/store/exports.py `_Batch`, `_stored_bytes`).
tests/test_exports.py has the long CoTs' batches and their memory; these pin what mutation
testing found them not to (bench/MUTATION-exports.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import pairwise
from typing import Any
from uuid import UUID

import pytest
from asyncpg import Record
from sqlalchemy import insert, select, update

from app.store.db import Sessions
from app.store.export_rows import ExportFilter, Source
from app.store.exports import BATCH_BYTES, BYTES_SO_FAR, read_batches
from app.store.models import Cot, Item, PreferencePair

# statements_built_afresh (autouse): each test builds the batch statement from the code as it
# is, not from the cache mutmut's clean run left every mutant's process.
from tests.test_exports import bulk_job, statements_built_afresh  # noqa: F401

# A long column's bytes: two rows of it fit in a batch, three do not.
LONG = BATCH_BYTES * 3 // 8


async def batches_of(
    sessions: Sessions, job_id: UUID, source: Source = Source.COTS, batch_rows: int = 1000
) -> list[Sequence[Record]]:
    return [b async for b in read_batches(sessions, job_id, source, ExportFilter(), batch_rows=batch_rows)]


def positions(batches: list[Sequence[Record]]) -> list[list[int]]:
    return [[row["position"] for row in batch] for batch in batches]


async def set_prompt_bytes(sessions: Sessions, job_id: UUID, position: int, grow_by: int) -> None:
    """Makes the prompt at `position` `grow_by` bytes (ASCII characters) longer."""
    item = Item.job_id == job_id, Item.position == position
    async with sessions.begin() as session:
        prompt = await session.scalar(select(Item.prompt).where(*item))
        assert prompt is not None and prompt.isascii()
        await session.execute(update(Item).where(*item).values(prompt=prompt + "p" * grow_by))


async def test_a_batch_takes_rows_up_to_exactly_batch_bytes(sessions: Sessions) -> None:
    """A row's bytes are its own, whichever batch it is read in; a batch takes rows while their
    bytes come to at most BATCH_BYTES, the bound included, and one byte more starts the next."""
    job_id = await bulk_job(sessions, 3)
    (whole,) = await batches_of(sessions, job_id)
    sizes = [whole[0][BYTES_SO_FAR], *(b[BYTES_SO_FAR] - a[BYTES_SO_FAR] for a, b in pairwise(whole))]
    assert [batch[0][BYTES_SO_FAR] for batch in await batches_of(sessions, job_id, batch_rows=1)] == sizes

    half = BATCH_BYTES // 2
    await set_prompt_bytes(sessions, job_id, 0, half - sizes[0])
    await set_prompt_bytes(sessions, job_id, 1, BATCH_BYTES - half - sizes[1])
    at_the_bound = await batches_of(sessions, job_id)

    assert positions(at_the_bound) == [[0, 1], [2]]
    assert [row[BYTES_SO_FAR] for row in at_the_bound[0]] == [half, BATCH_BYTES]

    await set_prompt_bytes(sessions, job_id, 1, 1)
    assert positions(await batches_of(sessions, job_id)) == [[0], [1, 2]]


def incompressible_json(size: int) -> Any:
    """JSON of about `size` bytes that Postgres stores uncompressed (random hex): the batch
    counts a JSON column's stored size."""
    return [{"text": os.urandom(size // 2).hex()}]


async def add_kept_pairs(sessions: Sessions, job_id: UUID) -> None:
    """A kept preference pair for each of the job's CoTs, its rejected side short."""
    async with sessions.begin() as session:
        items = (await session.execute(select(Item.id, Item.position).where(Item.job_id == job_id))).all()
        pairs = [
            {
                "item_id": item_id,
                "job_id": job_id,
                "position": position,
                "paired": True,
                "gap": 3.0,
                "rejected_thoughts": [{"text": "Rejected thought"}],
                "rejected_response": "Rejected response",
                "tries": [],
            }
            for item_id, position in items
        ]
        await session.execute(insert(PreferencePair), pairs)


LONG_COLUMNS: dict[str, tuple[Source, Any, Any]] = {
    "prompt": (Source.COTS, Item.prompt, "p" * LONG),
    "response": (Source.COTS, Cot.response, "r" * LONG),
    "thoughts": (Source.COTS, Cot.thoughts, incompressible_json(LONG)),
    "rejected_response": (Source.KEPT_PAIRS, PreferencePair.rejected_response, "r" * LONG),
    "rejected_thoughts": (Source.KEPT_PAIRS, PreferencePair.rejected_thoughts, incompressible_json(LONG)),
}


@pytest.mark.parametrize("column", list(LONG_COLUMNS))
async def test_each_large_stored_column_counts_toward_a_batchs_bytes(sessions: Sessions, column: str) -> None:
    """Five rows whose one long column is three eighths of BATCH_BYTES come two a batch,
    whichever of the large columns it is (the rejected side's for the kept pairs' exports)."""
    source, stored, value = LONG_COLUMNS[column]
    job_id = await bulk_job(sessions, 5)
    if source is Source.KEPT_PAIRS:
        await add_kept_pairs(sessions, job_id)
    table = stored.class_
    async with sessions.begin() as session:
        await session.execute(update(table).where(table.job_id == job_id).values({stored: value}))

    batches = await batches_of(sessions, job_id, source)

    assert positions(batches) == [[0, 1], [2, 3], [4]]
    assert all(LONG * 2 <= batch[-1][BYTES_SO_FAR] <= BATCH_BYTES for batch in batches[:2])


async def test_a_kept_pair_whose_rejected_side_was_purged_is_left_out(sessions: Sessions) -> None:
    """The hazardous purge blanks a pair's rejected side (app/store/deletions.py): a DPO
    export leaves the pair out rather than send a record with no rejected side."""
    job_id = await bulk_job(sessions, 3)
    await add_kept_pairs(sessions, job_id)
    purged = PreferencePair.job_id == job_id, PreferencePair.position == 1
    async with sessions.begin() as session:
        await session.execute(
            update(PreferencePair).where(*purged).values(rejected_thoughts=None, rejected_response=None)
        )

    assert positions(await batches_of(sessions, job_id, Source.KEPT_PAIRS)) == [[0, 2]]
