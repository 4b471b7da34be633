"""What each export record holds, to the character, for CoTs shaped like real ones: several
refined thoughts, both sides of a DPO pair, scores at the ends of the scale, stored JSON with
fields the Parquet schema does not know, and records larger than Arrow's JSON block.
(tests/test_exports.py reads the same files with `datasets` and TRL.)"""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any
from uuid import UUID

import httpx
import pyarrow.parquet as pq
import pytest
from sqlalchemy import update

from app.deliberation.results import METRICS, PairOutcome, Sample
from app.store.db import Sessions
from app.store.keys import create_key
from app.store.models import Cot
from bench.export import insert_finished_job
from tests.conftest import new_key
from tests.test_api import error_of
from tests.test_exports import csv_rows, export, exported, json_lines
from tests.test_quality_api import PAIRED, a_grade, completed, finished_job, kept_pair

Headers = dict[str, str]


@pytest.fixture
async def scoped(sessions: Sessions) -> Headers:
    return await new_key(sessions, "red-team", ("hazardous:read",))


def two_thoughts() -> Any:
    """An item's engine result whose refined CoT has two thoughts, and whose kept pair's
    rejected CoT has two as well."""
    rejected = Sample(["Rejected first", "Rejected second"], "Rejected response")
    flagged = replace(kept_pair().tries[-1], rejected=rejected)
    refined = [{"text": "Chosen first", "sources": [1]}, {"text": "Chosen second", "sources": [1]}]
    return replace(
        completed(a_grade(), PairOutcome(None, [flagged])),
        refined_thoughts=refined,
    )


CHOSEN_THINK = "<think>\nChosen first\nChosen second\n</think>\n\nChosen response"
CHOSEN_FIELD = {"content": "Chosen response", "reasoning_content": "Chosen first\nChosen second"}


async def test_chat_records_put_one_refined_thought_a_line(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, scoped, sessions, [two_thoughts()], PAIRED)

    think, field = [
        json_lines(await exported(api, scoped, job_id, "trl_sft", cot=style))[0]
        for style in ("think", "reasoning_content")
    ]
    (csv_row,) = csv_rows(await exported(api, scoped, job_id, "aidsafe_csv"))

    user = {"role": "user", "content": "Prompt 0"}
    assert think == {"messages": [user, {"role": "assistant", "content": CHOSEN_THINK}]}
    assert field == {"messages": [user, {"role": "assistant", **CHOSEN_FIELD}]}
    assert csv_row["refined_thoughts"] == "Chosen first\nChosen second"


@pytest.mark.parametrize(
    ("cot", "chosen", "rejected"),
    [
        (
            "think",
            {"content": CHOSEN_THINK},
            {"content": "<think>\nRejected first\nRejected second\n</think>\n\nRejected response"},
        ),
        (
            "reasoning_content",
            CHOSEN_FIELD,
            {"content": "Rejected response", "reasoning_content": "Rejected first\nRejected second"},
        ),
    ],
)
async def test_dpo_records_carry_both_sides_cots_in_the_style_asked(
    api: httpx.AsyncClient,
    scoped: Headers,
    sessions: Sessions,
    cot: str,
    chosen: dict[str, str],
    rejected: dict[str, str],
) -> None:
    job_id = await finished_job(api, scoped, sessions, [two_thoughts()], PAIRED)

    records = json_lines(await exported(api, scoped, job_id, "trl_dpo", cot=cot))

    assert records == [
        {
            "prompt": [{"role": "user", "content": "Prompt 0"}],
            "chosen": [{"role": "assistant", **chosen}],
            "rejected": [{"role": "assistant", **rejected}],
        }
    ]


async def test_min_score_takes_the_ends_of_the_scale_and_the_strictest_of_a_repeated_metric(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    results = [completed(a_grade(relevance=score)) for score in (1, 5, 3)]
    job_id = await finished_job(api, auth, sessions, results)

    async def positions(*min_score: str) -> list[int]:
        records = json_lines(await exported(api, auth, job_id, "jsonl", min_score=list(min_score)))
        return [record["position"] for record in records]

    assert await positions("relevance:1") == [0, 1, 2]
    assert await positions("relevance:5") == [1]
    assert await positions("relevance:3", "relevance:5") == [1]
    assert await positions("relevance:5", "relevance:3") == [1]
    for outside in ("relevance:0.99", "relevance:5.01"):
        error_of(await export(api, auth, job_id, "jsonl", min_score=outside), 422, "invalid_filter")


@pytest.mark.parametrize("min_score", ["helpfulness:4", "relevance", "relevance:4:5"])
async def test_a_min_score_without_one_known_metric_is_refused_with_the_metrics_there_are(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, min_score: str
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed(a_grade())])

    error = error_of(await export(api, auth, job_id, "jsonl", min_score=min_score), 422, "invalid_filter")

    assert error["details"] == {"metrics": list(METRICS)}


async def test_parquet_leaves_out_stored_fields_its_schema_does_not_have(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A CoT stored with more than the schema knows (a newer engine's field, say) still
    exports to Parquet, without that field."""
    job_id = await finished_job(api, auth, sessions, [completed()])
    thought = {"text": "Chosen thought", "sources": [1]}
    async with sessions.begin() as session:
        await session.execute(
            update(Cot)
            .where(Cot.job_id == UUID(job_id))
            .values(refined_thoughts=[{**thought, "confidence": 0.9}])
        )

    (record,) = pq.read_table(io.BytesIO(await exported(api, auth, job_id, "parquet"))).to_pylist()

    assert record["refined_thoughts"] == [thought]
    assert record["response"] == "Chosen response"


async def test_a_record_larger_than_arrows_json_block_exports_to_parquet(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """600,000 four-byte characters: 2.4 MB of UTF-8 in one record. Arrow's JSON reader reads
    1 MiB blocks by default and a record may straddle one block boundary, not two."""
    response = "\U0001f642" * 600_000
    small = completed()
    job_id = await finished_job(api, auth, sessions, [replace(small, response=response), small])

    records = pq.read_table(io.BytesIO(await exported(api, auth, job_id, "parquet"))).to_pylist()

    assert [record["response"] for record in records] == [response, "Chosen response"]


async def test_parquet_is_zstd_compressed_with_a_row_group_per_1000_rows(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    """As the README says: readers need zstd, and a row group is what they read at a time."""
    async with sessions.begin() as session:
        key, secret = await create_key(session, "bulk")
        job_id = await insert_finished_job(session, key.id, 1_500)

    body = await exported(api, {"Authorization": f"Bearer {secret}"}, str(job_id), "parquet")

    metadata = pq.ParquetFile(io.BytesIO(body)).metadata
    groups = [metadata.row_group(n) for n in range(metadata.num_row_groups)]
    assert [group.num_rows for group in groups] == [1000, 500]
    assert {group.column(n).compression for group in groups for n in range(group.num_columns)} == {"ZSTD"}
