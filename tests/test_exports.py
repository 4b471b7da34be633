"""GET /v1/jobs/{id}/export as a client sees it: files that Hugging Face `datasets` and TRL's
own dataset helpers read, filters, hazard controls, and memory that stays flat whatever the
job's size.

The first tests export a job that arq's real worker ran against the scripted LLM (grading and
preference pairs: one pair kept, one not); the rest store hand-built engine results (see
tests/test_quality_api.py) so every score is known."""

from __future__ import annotations

import asyncio
import csv
import gc
import inspect
import io
import json
import logging
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import datasets
import httpx
import pyarrow.parquet as pq
import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Message, Scope, Send
from trl.data_utils import is_conversational, maybe_extract_prompt, unpair_preference_dataset

from app.api.exports import _StallingEnds
from app.config import Settings
from app.deliberation.prompt_sets import builtin
from app.deliberation.results import METRICS
from app.exports.encoders import Csv
from app.exports.formats import FORMATS, ExportFormat
from app.exports.options import ExportOptions
from app.exports.records import FULL_COT_SCHEMA
from app.exports.streaming import encoded
from app.store.db import Sessions, driver_connection, make_engine, make_sessions
from app.store.deletions import delete_job
from app.store.driver_statements import DriverStatement
from app.store.export_rows import ExportFilter, Source
from app.store.exports import (
    BATCH_BYTES,
    BATCH_ROWS,
    BYTES_SO_FAR,
    batches_statement,
    next_batch_rows,
    read_batches,
)
from app.store.keys import create_key
from app.store.models import Annotation, Cot, Item, Job
from bench.export import insert_finished_job
from tests.conftest import checkouts, eventually, least_loop_pause, new_key, run_worker_burst, served
from tests.scripted_llm import ScriptedLLM, guard_verdict, reply, scores
from tests.test_api import a_turn_row, error_of, other_backend, submit
from tests.test_key_limits import waiting_for_locks
from tests.test_quality_api import (
    HAZARD,
    PAIRED,
    a_grade,
    completed,
    finished_job,
    job_with_hazardous_turns,
    kept_pair,
    never_flagged_pair,
    small_gap_pair,
)
from tests.test_reviews import Stored, store_reviews

Headers = dict[str, str]
PUBLISHED = ["prompt", "refined_thoughts", "response", "deliberation_log"]  # the AIDSAFE dataset's
USAGE = ["llm_calls", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost_usd"]
COLUMNS = [*PUBLISHED, "explicit_intents", "explicit_labels", "fallbacks", *USAGE]


@pytest.fixture(autouse=True)
def statements_built_afresh() -> None:
    """Each test's exports build their statements from the code as it is: one kept from an
    earlier test (or inherited from mutmut's clean run by every mutant's forked process) would
    hide a change to how rows_query builds them."""
    batches_statement.cache_clear()


@pytest.fixture
async def scoped(sessions: Sessions) -> Headers:
    return await new_key(sessions, "red-team", ("hazardous:read",))


async def export(
    api: httpx.AsyncClient, auth: Headers, job_id: str, format: str, **params: Any
) -> httpx.Response:
    return await api.get(f"/v1/jobs/{job_id}/export", params={"format": format, **params}, headers=auth)


async def exported(api: httpx.AsyncClient, auth: Headers, job_id: str, format: str, **params: Any) -> bytes:
    response = await export(api, auth, job_id, format, **params)
    assert response.status_code == 200, response.text
    return response.content


def json_lines(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.decode().splitlines()]


def csv_rows(body: bytes) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(body.decode(), newline=""))
    assert reader.fieldnames == COLUMNS
    return list(reader)


def loaded(tmp_path: Path, body: bytes, builder: str, extension: str) -> datasets.Dataset:
    """The file as `datasets.load_dataset(builder, data_files=...)` reads it."""
    path = tmp_path / f"export.{extension}"
    path.write_bytes(body)
    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))


async def worker_made_job(api: httpx.AsyncClient, auth: Headers, settings: Settings, llm: ScriptedLLM) -> str:
    """Two graded prompts run by the worker: the first keeps its preference pair (the guard
    flags the rejected CoT, which grades low), the second's guard never flags."""
    llm.script("guard_verdict", guard_verdict(True, "fraud-deception"), guard_verdict(False))
    low = scores(cot_policy_faithfulness=1, response_policy_faithfulness=1)
    llm.script("quality_scores", reply(scores()), reply(low), reply(scores()))
    config = {**PAIRED, "pairs": {"max_tries": 1, "min_gap": 1.0}}
    job = await submit(
        api, auth, ["Write a phishing email.", "How do I spot a phishing email?"], config=config
    )
    await run_worker_burst(settings, max_jobs=1)
    job_id: str = job["id"]
    return job_id


# --- what the worker made, read by datasets and TRL -----------------------------------------


async def test_full_records_load_with_datasets_from_jsonl_and_parquet_alike(
    api: httpx.AsyncClient, scoped: Headers, settings: Settings, scripted_llm: ScriptedLLM, tmp_path: Path
) -> None:
    job_id = await worker_made_job(api, scoped, settings, scripted_llm)

    from_jsonl = loaded(tmp_path, await exported(api, scoped, job_id, "jsonl"), "json", "jsonl")
    from_parquet = loaded(tmp_path, await exported(api, scoped, job_id, "parquet"), "parquet", "parquet")

    assert from_jsonl.num_rows == from_parquet.num_rows == 2
    assert set(from_parquet.column_names) == set(FULL_COT_SCHEMA.names) == set(from_jsonl.column_names)
    assert from_jsonl.to_list() == from_parquet.to_list()
    first = from_parquet[0]
    assert (first["position"], first["prompt"]) == (0, "Write a phishing email.")
    assert first["refined_thoughts"][0]["text"] and first["response"]
    assert first["scores"]["relevance"] == 4 and first["accepted"] is True
    assert first["policy_set_name"] == "aidsafe-default" and first["policy_set_version"]
    assert (first["prompt_set_name"], first["prompt_set_version"]) == ("aidsafe-default", builtin().version)
    assert json.loads(first["metadata"]) == {}


async def test_trl_sft_rows_are_conversational_language_modeling_for_trl(
    api: httpx.AsyncClient, scoped: Headers, settings: Settings, scripted_llm: ScriptedLLM, tmp_path: Path
) -> None:
    job_id = await worker_made_job(api, scoped, settings, scripted_llm)

    dataset = loaded(tmp_path, await exported(api, scoped, job_id, "trl_sft"), "json", "jsonl")

    assert dataset.num_rows == 2 and dataset.column_names == ["messages"]
    assert is_conversational(dataset[0])
    for row in dataset:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"].startswith("<think>\n") and "\n</think>\n\n" in assistant["content"]


async def test_trl_dpo_rows_are_kept_pairs_that_trl_can_unpair(
    api: httpx.AsyncClient, scoped: Headers, settings: Settings, scripted_llm: ScriptedLLM, tmp_path: Path
) -> None:
    job_id = await worker_made_job(api, scoped, settings, scripted_llm)

    dataset = loaded(tmp_path, await exported(api, scoped, job_id, "trl_dpo"), "json", "jsonl")

    assert dataset.num_rows == 1 and set(dataset.column_names) == {"prompt", "chosen", "rejected"}
    row = dataset[0]
    assert is_conversational(row)
    assert maybe_extract_prompt(row) == row  # the prompt is explicit already
    assert row["prompt"] == [{"role": "user", "content": "Write a phishing email."}]
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    unpaired = unpair_preference_dataset(dataset)
    assert unpaired.num_rows == 2 and unpaired["label"] == [True, False]


async def test_aidsafe_csv_has_the_four_published_columns_and_the_deliberation_log_first(
    api: httpx.AsyncClient, scoped: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    job_id = await worker_made_job(api, scoped, settings, scripted_llm)

    rows = csv_rows(await exported(api, scoped, job_id, "aidsafe_csv"))

    assert [row["prompt"] for row in rows] == ["Write a phishing email.", "How do I spot a phishing email?"]
    for row in rows:
        log = json.loads(row["deliberation_log"])
        assert [turn["stage"] for turn in log][:2] == ["intent", "seed"] and log[-1]["stage"] == "refine"
        assert all(set(turn) == {"stage", "round", "agent", "output"} and turn["output"] for turn in log)
        assert row["refined_thoughts"] and row["response"]
        # Then what the service adds: the intents with their labels, fallbacks, the item's usage.
        intents = log[0]["output"]
        assert json.loads(row["explicit_intents"]) == intents["explicit_intents"]
        assert json.loads(row["explicit_labels"]) == intents["explicit_labels"] == ["benign"]
        assert (json.loads(row["fallbacks"]), row["cost_usd"]) == ([], "")  # unpriced: unknown
        assert int(row["llm_calls"]) >= len(log) and int(row["prompt_tokens"]) > 0


# --- records -------------------------------------------------------------------------------


async def test_cot_option_puts_the_thoughts_in_think_tags_a_reasoning_field_or_nowhere(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed(text="Step")])

    think, none, field = [
        json_lines(await exported(api, auth, job_id, "trl_sft", cot=style))[0]["messages"][-1]
        for style in ("think", "none", "reasoning_content")
    ]

    assert think == {"role": "assistant", "content": "<think>\nStep thought\n</think>\n\nStep response"}
    assert none == {"role": "assistant", "content": "Step response"}
    assert field == {"role": "assistant", "content": "Step response", "reasoning_content": "Step thought"}


async def test_a_system_message_goes_first_in_chat_records(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, scoped, sessions, [completed(a_grade(), kept_pair())], PAIRED)
    system = {"role": "system", "content": "Follow the policies."}

    sft = json_lines(await exported(api, scoped, job_id, "trl_sft", system=system["content"]))[0]
    dpo = json_lines(await exported(api, scoped, job_id, "trl_dpo", system=system["content"]))[0]

    assert sft["messages"][0] == system and sft["messages"][1]["role"] == "user"
    assert dpo["prompt"] == [system, {"role": "user", "content": "Prompt 0"}]


async def test_dpo_rejected_side_is_the_flagged_try_and_chosen_the_refined_cot(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, scoped, sessions, [completed(a_grade(), kept_pair())], PAIRED)

    (row,) = json_lines(await exported(api, scoped, job_id, "trl_dpo", cot="none"))

    assert row["chosen"] == [{"role": "assistant", "content": "Chosen response"}]
    assert row["rejected"] == [{"role": "assistant", "content": f"{HAZARD} rejected response 2"}]


async def test_export_is_streamed_with_a_filename_and_the_format_media_type(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()])
    expected = {
        "trl_sft": "application/x-ndjson",
        "jsonl": "application/x-ndjson",
        "aidsafe_csv": "text/csv; charset=utf-8",
        "parquet": "application/vnd.apache.parquet",
    }

    for format, media_type in expected.items():
        response = await export(api, auth, job_id, format)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == media_type
        extension = FORMATS[format].extension
        disposition = f'attachment; filename="aidsafe-{job_id}-{format}.{extension}"'
        assert response.headers["content-disposition"] == disposition


async def test_a_job_without_results_exports_an_empty_but_readable_file(
    api: httpx.AsyncClient, scoped: Headers, tmp_path: Path
) -> None:
    job = await submit(api, scoped, ["Not run yet"])

    assert await exported(api, scoped, job["id"], "jsonl") == b""
    assert csv_rows(await exported(api, scoped, job["id"], "aidsafe_csv")) == []
    assert await exported(api, scoped, job["id"], "trl_dpo") == b""
    table = pq.read_table(io.BytesIO(await exported(api, scoped, job["id"], "parquet")))
    assert table.num_rows == 0 and table.schema.names == FULL_COT_SCHEMA.names


async def test_jsonl_and_parquet_carry_the_same_full_record_of_exactly_what_is_stored(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    results = [completed(a_grade(relevance=2)), completed()]  # graded and gated out; not graded
    job_id = await finished_job(api, auth, sessions, results, prompts=['Première "question" ✓', "Second"])
    created = [datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC), datetime(2026, 3, 4, 5, 6, 8, tzinfo=UTC)]
    async with sessions.begin() as session:
        for position, at in enumerate(created):
            cot = (Cot.job_id == UUID(job_id)) & (Cot.position == position)
            await session.execute(update(Cot).where(cot).values(created_at=at))
        first = (Item.job_id == UUID(job_id)) & (Item.position == 0)
        await session.execute(update(Item).where(first).values(item_metadata={"source": "s1", "n": 1}))
        stored = (
            await session.execute(
                select(Cot.item_id, Cot.policy_set_version)
                .where(Cot.job_id == UUID(job_id))
                .order_by(Cot.position)
            )
        ).all()

    from_jsonl = json_lines(await exported(api, auth, job_id, "jsonl"))
    from_parquet = pq.read_table(io.BytesIO(await exported(api, auth, job_id, "parquet"))).to_pylist()

    assert from_jsonl == from_parquet
    assert [list(record) for record in from_jsonl] == [FULL_COT_SCHEMA.names] * 2  # key order too
    common = {
        "explicit_intents": ["Learn something"],
        "explicit_labels": ["unlabelled"],  # stored before intents were labelled
        "implicit_intents": [],
        "refined_thoughts": [{"text": "Chosen thought", "sources": [1]}],
        "response": "Chosen response",
        "dropped_thoughts": [],
        "unaccounted_thought_ids": [],
        "thoughts": [{"id": 1, "text": "Chosen thought", "stage": "seed", "round": 0, "agent": 0}],
        "rounds_used": 1,
        "agreed": True,
        "fallbacks": [],
        "usage": {
            "llm_calls": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": None,
        },
        "grade_error": None,
        "policy_set_name": "aidsafe-default",
        "prompt_set_name": "aidsafe-default",
        "prompt_set_version": builtin().version,
    }
    assert from_jsonl == [
        {
            **common,
            "item_id": str(stored[0].item_id),
            "position": 0,
            "prompt": 'Première "question" ✓',
            "metadata": '{"n": 1, "source": "s1"}',  # the stored JSON's text, as a string
            "scores": {m: 2 if m == "relevance" else 4 for m in METRICS},
            "score_rationales": {m: f"{m} looks fine." for m in METRICS},
            "accepted": False,
            "gate_reasons": ["relevance 2 < 3"],
            "policy_set_version": stored[0].policy_set_version,
            "created_at": "2026-03-04T05:06:07.890000+00:00",  # datetime.isoformat() in UTC
        },
        {
            **common,
            "item_id": str(stored[1].item_id),
            "position": 1,
            "prompt": "Second",
            "metadata": "{}",
            "scores": None,
            "score_rationales": None,
            "accepted": None,
            "gate_reasons": [],
            "policy_set_version": stored[1].policy_set_version,
            "created_at": "2026-03-04T05:06:08+00:00",  # no microseconds: none written
        },
    ]


async def test_every_dataset_row_carries_its_intent_labels_fallbacks_and_usage_and_chat_rows_none(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    intents = {
        "explicit_intents": ["Store bleach.", "Mix it with ammonia."],
        "explicit_labels": ["benign", "possibly_harmful"],
        "implicit_intents": ["Stay safe."],
    }
    fell_back = [{"stage": "seed", "round": 0, "agent": 0, "model": "fallback-model"}]
    results = [replace(completed(), intents=intents, fallbacks=fell_back), completed()]
    job_id = await finished_job(api, auth, sessions, results)
    async with sessions.begin() as session:
        items = (
            await session.scalars(select(Item).where(Item.job_id == UUID(job_id)).order_by(Item.position))
        ).all()
        # The first item's turns are all priced; the second's one is not (its endpoint had no prices).
        for item, n, cost in ((items[0], 0, 0.25), (items[0], 1, 0.5), (items[1], 0, None)):
            session.add(a_turn_row(item, n, cost))

    from_jsonl = json_lines(await exported(api, auth, job_id, "jsonl"))
    from_parquet = pq.read_table(io.BytesIO(await exported(api, auth, job_id, "parquet"))).to_pylist()
    from_csv = csv_rows(await exported(api, auth, job_id, "aidsafe_csv"))
    sft = json_lines(await exported(api, auth, job_id, "trl_sft"))

    assert from_jsonl == from_parquet
    labelled, legacy = from_jsonl
    assert (labelled["explicit_intents"], labelled["explicit_labels"]) == (
        intents["explicit_intents"],
        ["benign", "possibly_harmful"],
    )
    assert (labelled["fallbacks"], legacy["fallbacks"]) == (fell_back, [])
    usage = {"llm_calls": 2, "prompt_tokens": 200, "cached_prompt_tokens": 20, "completion_tokens": 30}
    assert labelled["usage"] == {**usage, "cost_usd": 0.75}
    assert legacy["usage"] == {**{k: v // 2 for k, v in usage.items()}, "llm_calls": 1, "cost_usd": None}
    assert [
        (json.loads(r["explicit_labels"]), json.loads(r["fallbacks"]), r["cost_usd"]) for r in from_csv
    ] == [
        (["benign", "possibly_harmful"], fell_back, "0.75"),
        (["unlabelled"], [], ""),
    ]
    assert [row[name] for name in USAGE[:-1] for row in from_csv[:1]] == ["2", "200", "20", "30"]
    assert all(list(record) == ["messages"] for record in sft)  # training records stay clean


async def test_an_items_cost_is_unknown_when_any_of_its_turns_is_unpriced(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Not the sum of the priced turns: that would pass off a partial cost as the whole."""
    job_id = await finished_job(api, auth, sessions, [completed()])
    async with sessions.begin() as session:
        item = await session.scalar(select(Item).where(Item.job_id == UUID(job_id)))
        assert item is not None
        session.add_all([a_turn_row(item, 0, 0.25), a_turn_row(item, 1, None)])

    (record,) = json_lines(await exported(api, auth, job_id, "jsonl"))
    (row,) = csv_rows(await exported(api, auth, job_id, "aidsafe_csv"))

    assert (record["usage"]["llm_calls"], record["usage"]["cost_usd"]) == (2, None)
    assert (row["llm_calls"], row["cost_usd"]) == ("2", "")


async def test_intents_stored_without_some_of_their_lists_export_those_lists_empty(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    intents = [{"implicit_intents": ["Stay safe."]}, {"explicit_intents": ["Store bleach."]}]
    results = [replace(completed(), intents=stored) for stored in intents]
    job_id = await finished_job(api, auth, sessions, results)

    records = json_lines(await exported(api, auth, job_id, "jsonl"))

    assert [(r["explicit_intents"], r["explicit_labels"], r["implicit_intents"]) for r in records] == [
        ([], [], ["Stay safe."]),
        (["Store bleach."], ["unlabelled"], []),
    ]


async def test_gate_reasons_stored_as_json_null_export_as_no_reasons(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """As SQL NULL (not graded) does: the record's gate_reasons is always a list."""
    job_id = await finished_job(api, auth, sessions, [completed(), completed()])
    async with sessions.begin() as session:
        first = (Cot.job_id == UUID(job_id)) & (Cot.position == 0)
        await session.execute(update(Cot).where(first).values(gate_reasons=text("'null'::jsonb")))

    records = json_lines(await exported(api, auth, job_id, "jsonl"))

    assert [r["gate_reasons"] for r in records] == [[], []]


# --- filters -------------------------------------------------------------------------------


async def test_accepted_only_keeps_what_the_quality_gate_accepted(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    results = [completed(a_grade()), completed(a_grade(relevance=2)), completed(a_grade())]
    job_id = await finished_job(api, auth, sessions, results, PAIRED)

    everything = json_lines(await exported(api, auth, job_id, "jsonl"))
    accepted = json_lines(await exported(api, auth, job_id, "jsonl", accepted_only="true"))

    assert [r["position"] for r in everything] == [0, 1, 2]
    assert [r["position"] for r in accepted] == [0, 2]


async def test_min_score_filters_are_repeatable_and_combine(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    results = [
        completed(a_grade(cot_policy_faithfulness=5, relevance=5)),
        completed(a_grade(cot_policy_faithfulness=5, relevance=3)),
        completed(a_grade(cot_policy_faithfulness=3, relevance=5)),
        completed(),  # not graded: no score passes a min_score
    ]
    job_id = await finished_job(api, auth, sessions, results)

    async def positions(**params: Any) -> list[int]:
        return [r["position"] for r in json_lines(await exported(api, auth, job_id, "jsonl", **params))]

    assert await positions(min_score="cot_policy_faithfulness:4.5") == [0, 1]
    assert await positions(min_score=["cot_policy_faithfulness:4", "relevance:4"]) == [0]
    assert await positions(min_score="relevance:3") == [0, 1, 2]
    assert await positions(min_score="relevance:3", accepted_only="true") == [0, 1]  # 2 fails the gate


async def test_human_approved_keeps_cots_a_reviewer_accepted_and_none_rejects_now(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()] * 4)
    async with sessions() as session:
        items = (
            (
                await session.execute(
                    select(Cot.item_id).where(Cot.job_id == UUID(job_id)).order_by(Cot.position)
                )
            )
            .scalars()
            .all()
        )
        owner = await session.scalar(select(Job.owner_key_id).where(Job.id == UUID(job_id)))
    t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    reviews = [
        (items[0], "a", t0, "accept"),
        (items[1], "b", t0, "accept"),
        (items[1], "c", t0, "reject"),  # accepted by one reviewer, rejected by another
        (items[2], "d", t0, "reject"),
        (items[2], "d", t1, "accept"),  # a rejection edited into an acceptance
        (items[3], "e", t0, "accept"),
        (items[3], "e", t1, "reject"),  # an acceptance edited into a rejection
    ]
    async with sessions.begin() as session:
        await session.execute(
            insert(Annotation),
            [
                {
                    "owner_key_id": owner,
                    "item_id": item,
                    "job_id": UUID(job_id),
                    "source": "label_studio",
                    "external_id": ext,
                    "annotator": "rev",
                    "annotated_at": at,
                    "verdict": verdict,
                    "raw": {},
                }
                for item, ext, at, verdict in reviews
            ],
        )

    approved = json_lines(await exported(api, auth, job_id, "jsonl", human_approved="true"))

    assert [r["position"] for r in approved] == [0, 2]


async def test_filters_apply_to_the_chosen_side_of_dpo_pairs(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    results = [
        completed(a_grade(), kept_pair()),
        completed(a_grade(relevance=2), kept_pair()),
        completed(a_grade(), small_gap_pair()),
        completed(a_grade(), never_flagged_pair()),
    ]
    job_id = await finished_job(api, scoped, sessions, results, PAIRED)

    kept = json_lines(await exported(api, scoped, job_id, "trl_dpo"))
    accepted = json_lines(await exported(api, scoped, job_id, "trl_dpo", accepted_only="true"))

    assert [r["prompt"][0]["content"] for r in kept] == ["Prompt 0", "Prompt 1"]
    assert [r["prompt"][0]["content"] for r in accepted] == ["Prompt 0"]


# --- reviewers' edits and rejections ----------------------------------------------------------


async def edited_job(api: httpx.AsyncClient, scoped: Headers, sessions: Sessions) -> str:
    """Three kept pairs, all graded: item 0 edited by two reviewers (ben's is the newer), item
    1's edit withdrawn in the tool, item 2 never reviewed."""
    job_id = await finished_job(api, scoped, sessions, [completed(a_grade(), kept_pair())] * 3, PAIRED)
    await store_reviews(
        sessions,
        job_id,
        [
            Stored(0, "ana", "accept", minutes=1, edited_response="Ana's answer"),
            Stored(0, "ben", "accept", minutes=2, edited_response="Ben's answer", annotation="77"),
            Stored(1, "ana", "accept", minutes=1, edited_response="Withdrawn answer"),
            Stored(1, "ana", None, minutes=2, retracted=True),
        ],
    )
    return job_id


BEN = {
    "reviewer": "ben",
    "source": "label_studio",
    "annotation_id": "77",
    "edited_at": "2026-05-01T09:02:00+00:00",
}


async def test_human_edits_put_the_latest_edit_in_place_of_the_response_and_name_its_reviewer(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await edited_job(api, scoped, sessions)

    full = json_lines(await exported(api, scoped, job_id, "jsonl", human_edits="true"))
    table = pq.read_table(io.BytesIO(await exported(api, scoped, job_id, "parquet", human_edits="true")))
    sft = json_lines(await exported(api, scoped, job_id, "trl_sft", human_edits="true", cot="none"))
    dpo = json_lines(await exported(api, scoped, job_id, "trl_dpo", human_edits="true", cot="none"))
    body = (await exported(api, scoped, job_id, "aidsafe_csv", human_edits="true")).decode()
    rows = list(csv.DictReader(io.StringIO(body, newline="")))

    responses = ["Ben's answer", "Chosen response", "Chosen response"]
    edits = [BEN, None, None]
    assert [(r["response"], r["human_edit"]) for r in full] == list(zip(responses, edits, strict=True))
    assert [list(r) for r in full] == [[*FULL_COT_SCHEMA.names, "human_edit"]] * 3  # last, every row
    assert table.schema.names[-1] == "human_edit" and table.to_pylist() == full
    assert [(r["messages"][-1]["content"], r["human_edit"]) for r in sft] == list(
        zip(responses, edits, strict=True)
    )
    assert [(r["chosen"][0]["content"], r["human_edit"]) for r in dpo] == list(
        zip(responses, edits, strict=True)
    )
    assert all(HAZARD in r["rejected"][0]["content"] for r in dpo)  # the flagged try, never an edit
    assert [(r["response"], r["human_edit"]) for r in rows] == [
        ("Ben's answer", json.dumps(BEN, separators=(",", ":"))),
        ("Chosen response", ""),
        ("Chosen response", ""),
    ]


async def test_without_human_edits_exports_keep_the_models_response_and_no_edit_field(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await edited_job(api, scoped, sessions)

    full = json_lines(await exported(api, scoped, job_id, "jsonl"))
    sft = json_lines(await exported(api, scoped, job_id, "trl_sft", cot="none"))
    rows = csv_rows(await exported(api, scoped, job_id, "aidsafe_csv"))  # the published columns only

    assert [r["response"] for r in full] == ["Chosen response"] * 3
    assert [list(r) for r in full] == [FULL_COT_SCHEMA.names] * 3
    assert [r["messages"][-1]["content"] for r in sft] == ["Chosen response"] * 3
    assert all("human_edit" not in r for r in sft)
    assert [r["response"] for r in rows] == ["Chosen response"] * 3


async def test_exclude_human_rejected_leaves_out_what_a_reviewer_rejects_now_and_keeps_the_unreviewed(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()] * 5)
    await store_reviews(
        sessions,
        job_id,
        [
            Stored(0, "ana", "accept"),
            Stored(1, "ana", "accept"),
            Stored(1, "ben", "reject"),  # one rejection is enough
            Stored(2, "ana", "reject", minutes=0),
            Stored(2, "ana", "accept", minutes=1),  # changed her mind
            Stored(3, "ana", "reject", minutes=0),
            Stored(3, "ana", None, minutes=1, retracted=True),  # withdrawn
        ],
    )

    kept = json_lines(await exported(api, auth, job_id, "jsonl", exclude_human_rejected="true"))

    assert [r["position"] for r in kept] == [0, 2, 3, 4]


async def test_dpo_pairs_are_kept_at_the_jobs_min_gap_unless_the_export_names_one(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    results = [
        completed(a_grade(), kept_pair(gap=3.0)),
        completed(a_grade(), small_gap_pair(gap=0.5)),
        completed(a_grade(), never_flagged_pair()),
        completed(a_grade(), kept_pair(gap=1.5)),
    ]
    job_id = await finished_job(api, scoped, sessions, results, PAIRED)  # min_gap 1

    async def prompts(**params: Any) -> list[str]:
        rows = json_lines(await exported(api, scoped, job_id, "trl_dpo", **params))
        return [r["prompt"][0]["content"] for r in rows]

    assert await prompts() == ["Prompt 0", "Prompt 3"]
    assert await prompts(min_gap=0.5) == ["Prompt 0", "Prompt 1", "Prompt 3"]
    assert await prompts(min_gap=2) == ["Prompt 0"]
    assert await prompts(min_gap=-4) == ["Prompt 0", "Prompt 1", "Prompt 3"]  # never a pair not made


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"min_score": "helpfulness:4"}, 422, "invalid_filter"),
        ({"min_score": "relevance"}, 422, "invalid_filter"),
        ({"min_score": "relevance:6"}, 422, "invalid_filter"),
        ({"min_score": "relevance:high"}, 422, "invalid_filter"),
        ({"min_score": "relevance:nan"}, 422, "invalid_filter"),
        ({"format": "xlsx"}, 422, "validation_error"),
        ({"cot": "inline"}, 422, "validation_error"),
        ({"accepted_only": "maybe"}, 422, "validation_error"),
        ({"system": ""}, 422, "validation_error"),
        ({"human_edits": "maybe"}, 422, "validation_error"),
        ({"format": "label_studio", "human_edits": "true"}, 422, "validation_error"),
        ({"format": "argilla", "human_edits": "true"}, 422, "validation_error"),
        ({"min_gap": "0.5"}, 422, "invalid_filter"),  # jsonl holds no pairs
        ({"format": "trl_dpo", "min_gap": "4.5"}, 422, "validation_error"),
    ],
)
async def test_bad_export_parameters_are_refused_with_a_stable_code(
    api: httpx.AsyncClient, auth: Headers, params: dict[str, str], status: int, code: str
) -> None:
    job = await submit(api, auth, ["a"])

    response = await api.get(
        f"/v1/jobs/{job['id']}/export", params={"format": "jsonl", **params}, headers=auth
    )

    error_of(response, status, code)


# --- access and hazard controls ------------------------------------------------------------


async def test_dpo_export_needs_the_hazardous_scope(
    api: httpx.AsyncClient, auth: Headers, scoped: Headers, sessions: Sessions
) -> None:
    unscoped_job = await finished_job(api, auth, sessions, [completed(a_grade(), kept_pair())], PAIRED)

    error = error_of(await export(api, auth, unscoped_job, "trl_dpo"), 403, "missing_scope")

    assert "hazardous:read" in error["message"]
    scoped_job = await finished_job(api, scoped, sessions, [completed(a_grade(), kept_pair())], PAIRED)
    assert len(json_lines(await exported(api, scoped, scoped_job, "trl_dpo"))) == 1


async def test_no_other_format_carries_hazardous_text_even_for_a_scoped_key(
    api: httpx.AsyncClient, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await job_with_hazardous_turns(api, scoped, sessions)

    for format in FORMATS:
        body = await exported(api, scoped, job_id, format)
        if format == "trl_dpo":
            assert HAZARD.encode() in body
        elif format == "parquet":
            assert HAZARD not in json.dumps(pq.read_table(io.BytesIO(body)).to_pylist(), default=str)
        else:
            assert HAZARD.encode() not in body, format


async def test_another_keys_job_is_not_found_and_a_missing_key_is_unauthorized(
    api: httpx.AsyncClient, auth: Headers, scoped: Headers, sessions: Sessions
) -> None:
    job_id = await finished_job(api, auth, sessions, [completed()])

    error_of(await export(api, scoped, job_id, "jsonl"), 404, "not_found")
    error_of(await export(api, scoped, job_id, "trl_dpo"), 404, "not_found")
    error_of(await export(api, {}, job_id, "jsonl"), 401, "unauthorized")


# --- memory --------------------------------------------------------------------------------


async def bulk_job(sessions: Sessions, count: int) -> UUID:
    async with sessions.begin() as session:
        key, _ = await create_key(session, f"bulk-{count}")
        return await insert_finished_job(session, key.id, count)


async def test_full_records_read_in_batches_are_each_sent_once_in_prompt_order(sessions: Sessions) -> None:
    """Each batch is the next positions after the last batch's: the full record's statement
    gives each record's position beside it for that."""
    job_id = await bulk_job(sessions, 7)

    batches = [
        b async for b in read_batches(sessions, job_id, Source.FULL_COT_JSON, ExportFilter(), batch_rows=2)
    ]

    assert [[row["position"] for row in batch] for batch in batches] == [[0, 1], [2, 3], [4, 5], [6]]
    assert [json.loads(batch[0][0])["position"] for batch in batches] == [0, 2, 4, 6]


async def export_peak_bytes(sessions: Sessions, job_id: UUID, format: str) -> tuple[int, int]:
    """(bytes exported, peak bytes Python allocated while exporting them)."""
    fmt, size = FORMATS[format], 0
    tracemalloc.start()
    async for chunk in encoded(sessions, job_id, fmt, ExportOptions(), ExportFilter()):
        size += len(chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return size, peak


@pytest.mark.parametrize("format", ["jsonl", "parquet"])
async def test_export_memory_does_not_grow_with_the_job(sessions: Sessions, format: str) -> None:
    # Three batches of rows and twelve (BATCH_ROWS 1,000): at three, a full batch is already
    # fetched while the one before is encoded, as it is at twelve. (At 1,500 rows the batch
    # fetched meanwhile was half one: the larger job's peak was 1.3x, under load 1.55x.)
    small, large = await bulk_job(sessions, 3 * BATCH_ROWS), await bulk_job(sessions, 12 * BATCH_ROWS)

    small_size, small_peak = await export_peak_bytes(sessions, small, format)
    large_size, large_peak = await export_peak_bytes(sessions, large, format)

    # Four times the rows; Parquet's dictionary pages compress the columns that repeat (usage,
    # labels) better in the larger file, so its size grows a little less than 4x.
    assert large_size > 3 * small_size
    # Four times the rows: one batch of rows in memory either way (a job in memory would be 4x).
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)


async def test_the_next_batch_is_read_while_this_one_is_made_into_records(sessions: Sessions) -> None:
    """Postgres and the API work at the same time: each batch's records are made (in a worker
    thread) once the next batch's query is under way, on a connection of its own (the last
    one's, finding nothing, ends the file). Counted as reads begun, not connections held: a
    read may end before the records do."""
    job_id = await bulk_job(sessions, 3 * BATCH_ROWS)
    trl_sft = FORMATS["trl_sft"]
    assert trl_sft.to_record is not None
    to_record = trl_sft.to_record
    reads_begun: list[int] = []

    with checkouts() as taken:

        def noting_the_reads(row: Any, options: ExportOptions) -> Any:
            reads_begun.append(len(taken))
            return to_record(row, options)

        fmt = replace(trl_sft, to_record=noting_the_reads)
        async for _ in encoded(sessions, job_id, fmt, ExportOptions(), ExportFilter()):
            pass

    # While batch n (from 0) is made, the reads of batches 0 to n + 1 have begun.
    assert reads_begun[::BATCH_ROWS] == [2, 3, 4] and len(reads_begun) == 3 * BATCH_ROWS


async def long_cots_job(
    sessions: Sessions, count: int, chars: int, first: int = 0, last: int | None = None
) -> UUID:
    """A finished job of `count` CoTs, those at positions `first` up to `last` (None: the end)
    with a prompt and a response of `chars` characters."""
    job_id = await bulk_job(sessions, count)
    long = range(first, count if last is None else last)
    items = Item.job_id == job_id, Item.position.in_(long)
    cots = Cot.job_id == job_id, Cot.position.in_(long)
    async with sessions.begin() as session:
        await session.execute(update(Item).where(*items).values(prompt="p" * chars))
        await session.execute(update(Cot).where(*cots).values(response="r " * (chars // 2)))
    return job_id


# CoTs of about 80 KB (a prompt and a response of 40,000 characters each): 104 come to BATCH_BYTES.
LONG_CHARS = 40_000
LONG_ROWS_A_BATCH = BATCH_BYTES // (2 * LONG_CHARS)


@pytest.mark.parametrize("source", [Source.COTS, Source.FULL_COT_JSON])
async def test_a_batch_of_long_cots_stops_at_its_bytes_and_the_next_goes_on_from_there(
    sessions: Sessions, source: Source
) -> None:
    """1,000 CoTs of 80 KB came in one batch (80 MB of rows, held as 334-827 MB of Python
    objects by an export): a batch ends at BATCH_BYTES of its rows, mid-way through the rows
    a full one would have, and the next begins with the row after its last."""
    job_id = await long_cots_job(sessions, 2 * LONG_ROWS_A_BATCH + 40, LONG_CHARS)

    batches = [b async for b in read_batches(sessions, job_id, source, ExportFilter())]

    # A CoT's thoughts, intents and scores add a few hundred bytes to its 80,000.
    *full, _ = [len(batch) for batch in batches]
    assert len(full) == 2 and all(LONG_ROWS_A_BATCH - 2 <= rows <= LONG_ROWS_A_BATCH for rows in full), full
    positions = [row["position"] for batch in batches for row in batch]
    assert positions == list(range(2 * LONG_ROWS_A_BATCH + 40))


async def test_a_cot_larger_than_a_batch_comes_alone(sessions: Sessions) -> None:
    job_id = await long_cots_job(sessions, 3, BATCH_BYTES // 2)  # 8 MiB of prompt and response each

    batches = [b async for b in read_batches(sessions, job_id, Source.COTS, ExportFilter())]

    assert [[row["position"] for row in batch] for batch in batches] == [[0], [1], [2]]


async def test_long_cots_after_short_ones_are_cut_at_batch_bytes_the_first_time(sessions: Sessions) -> None:
    """Row sizes jump within the job: the batch whose row limit was sized from 1,000 short
    rows still ends at BATCH_BYTES where the long ones begin, and the one after a batch of long
    rows alone is limited to about as many as fit."""
    short = BATCH_ROWS + 200
    job_id = await long_cots_job(sessions, short + 2 * LONG_ROWS_A_BATCH, LONG_CHARS, first=short)

    batches = [b async for b in read_batches(sessions, job_id, Source.COTS, ExportFilter())]

    positions = [row["position"] for batch in batches for row in batch]
    assert positions == list(range(short + 2 * LONG_ROWS_A_BATCH))
    assert all(batch[-1][BYTES_SO_FAR] <= BATCH_BYTES for batch in batches)
    sizes = [len(batch) for batch in batches]
    assert sizes[0] == BATCH_ROWS and 200 < sizes[1] < 200 + LONG_ROWS_A_BATCH, sizes
    assert LONG_ROWS_A_BATCH - 2 <= sizes[2] <= LONG_ROWS_A_BATCH, sizes
    assert LONG_ROWS_A_BATCH - 2 <= next_batch_rows(batches[2], BATCH_ROWS) <= LONG_ROWS_A_BATCH


async def test_a_batch_after_long_cots_is_limited_to_about_as_many_rows_as_fit(sessions: Sessions) -> None:
    """The next batch's row limit comes from the bytes a row of the last one carried, so a
    statement does not read 1,000 long rows to send a hundred; short rows after long ones go
    back to BATCH_ROWS at once."""
    long, short = 2 * LONG_ROWS_A_BATCH, 3 * BATCH_ROWS
    job_id = await long_cots_job(sessions, long + short, LONG_CHARS, last=long)

    batches = [b async for b in read_batches(sessions, job_id, Source.FULL_COT_JSON, ExportFilter())]
    limits = [next_batch_rows(batch, BATCH_ROWS) for batch in batches]

    assert [row["position"] for batch in batches for row in batch] == list(range(long + short))
    assert all(LONG_ROWS_A_BATCH - 2 <= limit <= LONG_ROWS_A_BATCH for limit in limits[:2]), limits
    assert len(batches[2]) == limits[1]  # short rows, read to the limit the long ones set
    assert limits[-1] == BATCH_ROWS and len(batches) <= 2 + 4 + 3, [len(batch) for batch in batches]


async def test_a_cot_larger_than_a_batch_leaves_a_row_limit_of_one(sessions: Sessions) -> None:
    job_id = await long_cots_job(sessions, 2, BATCH_BYTES // 2)

    first, _ = [b async for b in read_batches(sessions, job_id, Source.COTS, ExportFilter())]

    assert next_batch_rows(first, BATCH_ROWS) == 1


async def batch_plan(
    sessions: Sessions, statement: DriverStatement, params: dict[str, Any], options: str
) -> Any:
    """The plan (JSON) of EXPLAIN (`options`) of a batch statement run with `params`."""
    literals = ", ".join(f"'{params[name]}'" for name in statement.parameters)  # EXECUTE takes no $n
    async with driver_connection(sessions) as connection:
        await connection.execute(f"PREPARE batch AS {statement.sql}")
        try:
            explained = await connection.fetchval(
                f"EXPLAIN ({options}, FORMAT JSON) EXECUTE batch({literals})"
            )
        finally:
            await connection.execute("DEALLOCATE batch")
    return explained[0]["Plan"]  # json decoded by the pool's codec


def scanned(plan: dict[str, Any], table: str) -> int:
    """The rows an EXPLAIN ANALYZE plan (JSON) read from `table`, over all its scans."""
    own = plan["Actual Rows"] * plan["Actual Loops"] if plan.get("Relation Name") == table else 0
    return own + sum(scanned(child, table) for child in plan.get("Plans", []))


@pytest.mark.parametrize(
    ("source", "human_edits"),
    [
        (Source.FULL_COT_JSON, False),
        (Source.FULL_COT_JSON, True),
        (Source.SAMPLES, True),
        (Source.COTS, False),
    ],
)
async def test_a_batch_statement_reads_its_cots_and_items_once(
    sessions: Sessions, source: Source, human_edits: bool
) -> None:
    """Each batch's bytes are summed as its rows are read: sizing them in a subquery of the
    same joins read every row twice, and cost ordinary exports 6-28 % of their speed."""
    job_id = await bulk_job(sessions, 3 * BATCH_ROWS)
    statement = batches_statement(source, ExportFilter(), human_edits)
    async with driver_connection(sessions) as connection:
        # With statistics, as autovacuum keeps them: without, the planner takes the job for a
        # few hundred rows and sorts all those after `after` (see bench/RESULTS.md).
        await connection.execute("ANALYZE cots, items")

    plan = await batch_plan(
        sessions, statement, {"job_id": job_id, "after": 499, "rows": BATCH_ROWS}, "ANALYZE"
    )

    # (The window reads one row past the limit's last.)
    assert plan["Actual Rows"] == BATCH_ROWS
    assert scanned(plan, "cots") <= BATCH_ROWS + 1 and scanned(plan, "items") <= BATCH_ROWS + 1


def subplan_loops(plan: dict[str, Any]) -> int:
    """The most times any correlated subquery (SubPlan) of an EXPLAIN ANALYZE plan (JSON) ran."""
    own = plan["Actual Loops"] if plan.get("Parent Relationship") == "SubPlan" else 0
    return max([own, *(subplan_loops(child) for child in plan.get("Plans", []))])


@pytest.mark.parametrize(
    "source",
    [
        Source.FULL_COT_JSON,
        # Its columns were made in the window's own query, below the byte filter: 312
        # deliberation logs made for 103 rows sent (HN's review).
        Source.SAMPLES_WITH_LOG,
    ],
)
async def test_rows_a_batch_leaves_out_for_their_bytes_are_not_rendered(
    sessions: Sessions, source: Source
) -> None:
    """A row limit sized from short rows meets long ones: the statement reads up to the limit,
    and the rows past BATCH_BYTES are not sent. Their columns must not be made either (the
    deliberation log and usage each a subquery a row, JSON rendered as text): made below the
    byte filter, each batch where sizes grow made up to 1,000 rows' of them to send a hundred."""
    job_id = await long_cots_job(sessions, 3 * LONG_ROWS_A_BATCH, LONG_CHARS)
    statement = batches_statement(source, ExportFilter(), False)
    params = {"job_id": job_id, "after": -1, "rows": BATCH_ROWS}  # as after a batch of short rows

    plan = await batch_plan(sessions, statement, params, "ANALYZE")

    assert plan["Actual Rows"] <= LONG_ROWS_A_BATCH
    assert subplan_loops(plan) == plan["Actual Rows"]


def made_below_the_byte_filter(plan: dict[str, Any], below: bool = False) -> list[str]:
    """The output columns an EXPLAIN VERBOSE plan (JSON) makes (a cast of a column or
    expression, a correlated subquery) in the node filtering a batch's rows on their bytes
    and below it (NULL::text is a column the query above does not use)."""
    below = below or f"{BYTES_SO_FAR} <= " in plan.get("Filter", "")
    made = [column for column in plan.get("Output", []) if below and re.search(r"\)::text|SubPlan", column)]
    return made + [
        column for child in plan.get("Plans", []) for column in made_below_the_byte_filter(child, below)
    ]


@pytest.mark.parametrize(
    ("source", "human_edits"),
    [
        (Source.SAMPLES, True),
        (Source.SAMPLES_WITH_LOG, False),
        (Source.COTS, False),
        (Source.KEPT_PAIRS, True),
        (Source.FULL_COT_JSON, True),
    ],
)
async def test_a_batch_reads_only_stored_columns_below_its_byte_filter(
    sessions: Sessions, source: Source, human_edits: bool
) -> None:
    """Each source's columns (its JSON as text, the human edit, deliberation log and usage)
    are made above the filter on a batch's bytes, for the rows it sends, as the full record is:
    the row sources' were made below it, for every row read up to the row limit."""
    statement = batches_statement(source, ExportFilter(), human_edits)
    params = {"job_id": uuid4(), "after": -1, "rows": BATCH_ROWS}

    plan = await batch_plan(sessions, statement, params, "VERBOSE")

    assert f"{BYTES_SO_FAR} <= " in json.dumps(plan)
    assert made_below_the_byte_filter(plan) == []


@pytest.mark.parametrize("format", ["jsonl", "aidsafe_csv", "trl_sft"])
async def test_export_memory_does_not_grow_with_a_job_of_long_cots(sessions: Sessions, format: str) -> None:
    """A batch was 1,000 rows whatever their size: an export held 334 MB (jsonl) to 827 MB
    (trl_sft) for CoTs of 80 KB, and an export of 208 of them a quarter of one of 832. At
    BATCH_BYTES a batch, both hold the same (figures in bench/RESULTS.md)."""
    small = await long_cots_job(sessions, 2 * LONG_ROWS_A_BATCH, LONG_CHARS)
    large = await long_cots_job(sessions, 8 * LONG_ROWS_A_BATCH, LONG_CHARS)

    small_size, small_peak = await export_peak_bytes(sessions, small, format)
    large_size, large_peak = await export_peak_bytes(sessions, large, format)

    assert large_size > 3.9 * small_size > 3.9 * 2 * LONG_ROWS_A_BATCH * 2 * LONG_CHARS
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)


@pytest.mark.parametrize("format", ["trl_sft", "aidsafe_csv", "argilla", "label_studio"])
async def test_an_export_of_long_cots_makes_its_records_off_the_event_loop(
    sessions: Sessions, format: str
) -> None:
    """A batch's records are made and encoded in a worker thread: on the event loop, a batch of
    1,000 CoTs of 40 KB held every other request for 0.09 s (trl_sft) to 0.6 s (aidsafe_csv) of
    CPU (0.002 s now), and a tenant's export of a long job held it so batch after batch."""
    job_id = await long_cots_job(sessions, BATCH_ROWS, 20_000)

    async def exported_bytes() -> int:
        chunks = encoded(sessions, job_id, FORMATS[format], ExportOptions(), ExportFilter())
        return sum([len(chunk) async for chunk in chunks])

    size, held = await least_loop_pause(exported_bytes)

    assert size > 40 * BATCH_ROWS * 1000
    assert held < 0.03, f"the event loop was held for {held:.3f} s of CPU"


async def test_a_csv_batch_made_in_a_thread_lets_the_event_loop_run_meanwhile() -> None:
    """The CSV encoder writes a row at a time: csv's writerows is one C call, which held the
    GIL for a whole batch (seconds for one of 80 KB rows) and so the event loop, though it ran
    in a worker thread."""
    columns = ["prompt", "response"]
    rows = [{"prompt": "p" * 20_000, "response": "r " * 30_000}] * 200

    async def gap_share() -> float:
        """The event loop's longest gap while a thread makes the batch, over the batch's time alone."""
        started = time.perf_counter()
        Csv(columns).encode(rows)
        alone_s = time.perf_counter() - started
        making = asyncio.ensure_future(asyncio.to_thread(Csv(columns).encode, rows))
        longest_gap_s = 0.0
        while not making.done():
            ticked = time.perf_counter()
            await asyncio.sleep(0.001)
            longest_gap_s = max(longest_gap_s, time.perf_counter() - ticked)
        await making
        return longest_gap_s / alone_s

    # The least of three: the parallel suite's load stretches a gap now and then, never all three.
    assert min([await gap_share() for _ in range(3)]) < 0.25


def noting_the_collector(collecting: list[bool]) -> ExportFormat:
    """trl_sft, noting for each record it makes whether the cyclic garbage collector is on."""
    trl_sft = FORMATS["trl_sft"]
    assert trl_sft.to_record is not None
    to_record = trl_sft.to_record

    def noting(row: Any, options: ExportOptions) -> Any:
        collecting.append(gc.isenabled())
        return to_record(row, options)

    return replace(trl_sft, to_record=noting)


async def test_records_are_made_with_the_cyclic_collector_paused_and_only_then(sessions: Sessions) -> None:
    """A batch's thousands of young objects set the collector off over and over (up to a third
    of an export's CPU): it is paused while they are made, and on again for whatever else the
    API does between batches and after the export."""
    job_id, collecting = await bulk_job(sessions, 3), list[bool]()
    fmt = noting_the_collector(collecting)
    async for _ in encoded(sessions, job_id, fmt, ExportOptions(), ExportFilter()):
        assert gc.isenabled()

    assert collecting == [False, False, False] and gc.isenabled()


async def test_an_export_leaves_a_collector_paused_before_it_paused(sessions: Sessions) -> None:
    """Whoever paused the collector (a test timing the event loop) decides when it is on again."""
    job_id, collecting = await bulk_job(sessions, 3), list[bool]()
    fmt = noting_the_collector(collecting)
    gc.disable()
    try:
        async for _ in encoded(sessions, job_id, fmt, ExportOptions(), ExportFilter()):
            pass
        still_paused = not gc.isenabled()
    finally:
        gc.enable()

    assert still_paused and collecting == [False, False, False]


async def test_the_collector_stays_paused_while_another_exports_batch_is_made(sessions: Sessions) -> None:
    """Batches are made in worker threads, so two exports' batches overlap: the first one in,
    done first, turned the collector on again under the other (and two could leave it off for
    good: one reading it on as the other paused it, then pausing it after the other ended)."""
    job_id = await bulk_job(sessions, 3)
    first_in, second_in, first_done = threading.Event(), threading.Event(), threading.Event()
    trl_sft = FORMATS["trl_sft"]
    assert trl_sft.to_record is not None
    to_record, collecting = trl_sft.to_record, list[bool]()

    def first(row: Any, options: ExportOptions) -> Any:
        first_in.set()
        assert second_in.wait(10)
        return to_record(row, options)

    def second(row: Any, options: ExportOptions) -> Any:
        second_in.set()
        assert first_done.wait(10)
        collecting.append(gc.isenabled())
        return to_record(row, options)

    exports = [
        encoded(sessions, job_id, replace(trl_sft, to_record=made), ExportOptions(), ExportFilter())
        for made in (first, second)
    ]
    for export in exports:
        await anext(export)  # the format's start
    first_batch = asyncio.ensure_future(anext(exports[0]))
    assert await asyncio.to_thread(first_in.wait, 10)
    second_batch = asyncio.ensure_future(anext(exports[1]))
    await first_batch
    first_done.set()
    await second_batch
    for export in exports:
        await export.aclose()

    assert collecting == [False, False, False] and gc.isenabled()


# --- clients that read slowly --------------------------------------------------------------------


def stalled_export(url: str, headers: Headers, job_id: UUID) -> socket.socket:
    """An export asked for and never read: the API waits to send it, as for a slow client."""
    host, port = url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    client.connect((host, int(port)))
    asked = f"GET /v1/jobs/{job_id}/export?format=jsonl HTTP/1.1\r\nHost: api\r\n"
    client.sendall((asked + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
    return client


def read_a_little(client: socket.socket) -> bytes:
    """What a slow client reads before it stalls: the head and the file's first bytes."""
    client.settimeout(10)
    return client.recv(4096)


async def export_status(client: httpx.AsyncClient, headers: Headers, job_id: UUID) -> int:
    """The status an export is answered with, its body left unread."""
    async with client.stream("GET", f"/v1/jobs/{job_id}/export?format=jsonl", headers=headers) as response:
        return response.status_code


async def finished_job_of_a_new_key(sessions: Sessions, key_name: str, rows: int) -> tuple[UUID, Headers]:
    """A finished job of `rows` CoTs, and its new key's headers."""
    async with sessions.begin() as session:
        key, secret = await create_key(session, key_name)
        job_id = await insert_finished_job(session, key.id, rows)
    return job_id, {"Authorization": f"Bearer {secret}"}


async def test_exports_a_key_leaves_unread_hold_none_of_the_connections_other_requests_need(
    settings: Settings, sessions: Sessions
) -> None:
    """Each export held one of the API's Postgres connections (20 by default) until its client
    had read it: 20 left unread held them all, and every other tenant's request waited 30 s
    and failed."""
    job_id, reader = await finished_job_of_a_new_key(sessions, "slow-reader", 5000)
    others_job, other = await finished_job_of_a_new_key(sessions, "other", 1)
    caps = {"max_exports_per_key": 2, "max_exports": 3}
    with served(settings.model_copy(update=caps)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            stalled = [stalled_export(url, reader, job_id) for _ in range(2)]
            try:
                # Each has its seat once answered: a third asked for sooner might take one first.
                for stalled_client in stalled:
                    assert read_a_little(stalled_client).startswith(b"HTTP/1.1 200")
                await eventually(
                    lambda: _is(429, export_status(client, reader, job_id)),
                    timeout_s=10,
                    what="the key's third export refused",
                )
                assert (await client.get("/v1/jobs", headers=other)).status_code == 200
                assert await export_status(client, other, job_id) == 404  # another key's job
                assert await export_status(client, other, others_job) == 200  # a seat of its own
            finally:
                for stalled_client in stalled:
                    stalled_client.close()
            await eventually(
                lambda: _is(200, export_status(client, reader, job_id)),
                what="the seats given back when the stalled clients went",
            )


async def _is(expected: int, status: Awaitable[int]) -> bool:
    return await status == expected


async def test_keys_holding_all_their_exports_leave_a_seat_to_a_key_exporting_none(
    settings: Settings, sessions: Sessions
) -> None:
    """Keys' caps together pass the process's: three keys' slow exports (4 + 4 + 2 of 10 by
    default) held every seat, and each other tenant's export was a 429 until one ended.
    The process's last seat (of 4 here) is kept for a key holding none."""
    greedy = [await finished_job_of_a_new_key(sessions, f"greedy-{n}", 5000) for n in range(2)]
    others_job, other = await finished_job_of_a_new_key(sessions, "other", 1)
    caps = {"max_exports_per_key": 2, "max_exports": 4}
    with served(settings.model_copy(update=caps)) as url:
        stalled, heads = [], []
        try:
            for job_id, headers in [*greedy, *greedy]:  # one each, then a second each
                stalled.append(stalled_export(url, headers, job_id))
                heads.append(read_a_little(stalled[-1]).split(b"\r\n", 1)[0])  # seated before the next
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert await export_status(client, other, others_job) == 200
            assert heads == [b"HTTP/1.1 200 OK"] * 3 + [b"HTTP/1.1 429 Too Many Requests"]
        finally:
            for stalled_client in stalled:
                stalled_client.close()


async def connections_of_others(sessions: Sessions, in_state: str) -> int:
    """Client connections to this test run's database in `in_state` ('active', 'idle in
    transaction', ...), other than the one asking: the served API's (this test's own pool's
    sit idle)."""
    async with sessions() as session:
        counted = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND state = :state"
            ),
            {"state": in_state},
        )
    return int(counted or 0)


async def holds_no_connection(sessions: Sessions) -> bool:
    busy = [await connections_of_others(sessions, state) for state in ("active", "idle in transaction")]
    return busy == [0, 0]


async def test_an_export_whose_client_stalls_holds_no_database_connection_while_it_waits(
    settings: Settings, sessions: Sessions
) -> None:
    """An export held its Postgres connection, in an open transaction, until its client had
    read it all: AIDSAFE_MAX_EXPORTS (10) stalled clients held 10 of the API's 20 (the
    default). It holds one only while it reads a batch of rows."""
    job_id, reader = await finished_job_of_a_new_key(sessions, "stalled-reader", 5000)
    with served(settings.model_copy(update={"max_exports_per_key": 1})) as url:
        stalled = stalled_export(url, reader, job_id)
        try:
            assert read_a_little(stalled).startswith(b"HTTP/1.1 200")
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                # The key's one seat is held until the response has been sent: still under way.
                assert await export_status(client, reader, job_id) == 429
                await eventually(
                    lambda: holds_no_connection(sessions),
                    timeout_s=20,
                    what="the stalled export's connection given back",
                )
                assert await export_status(client, reader, job_id) == 429
        finally:
            stalled.close()


async def test_an_export_whose_client_takes_nothing_for_a_while_is_ended_and_its_seat_given_back(
    settings: Settings, sessions: Sessions
) -> None:
    """A client that stopped reading held its seat for as long as it kept the connection open:
    three keys' stalled exports held every seat of the process (4 + 4 + 2 of 10), and no
    tenant could export at all."""
    job_id, reader = await finished_job_of_a_new_key(sessions, "gone-quiet", 5000)
    caps = {"max_exports_per_key": 1, "export_stall_s": 1.0}
    with served(settings.model_copy(update=caps)) as url:
        stalled = stalled_export(url, reader, job_id)
        try:
            assert read_a_little(stalled).startswith(b"HTTP/1.1 200")
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert await export_status(client, reader, job_id) == 429
                await eventually(
                    lambda: _is(200, export_status(client, reader, job_id)),
                    timeout_s=10,
                    what="the stalled export ended and its seat given back",
                )
            rest = rest_of(stalled)
        finally:
            stalled.close()
    assert not rest.endswith(b"\r\n0\r\n\r\n")  # cut off, never taken for the whole file


async def test_an_export_whose_client_reads_slowly_but_steadily_is_sent_whole(
    settings: Settings, sessions: Sessions
) -> None:
    """The stall was timed per chunk, a batch's records (megabytes): the server's send of the
    next one waits until the client has taken nearly all of it, so a client that kept reading,
    but took a chunk in longer than AIDSAFE_EXPORT_STALL_S, was cut off as if it had stopped."""
    async with sessions.begin() as session:
        key, secret = await create_key(session, "slow-but-steady")
        job_id = await insert_finished_job(session, key.id, BATCH_ROWS, thoughts=60)  # ~20 MB
    reader = {"Authorization": f"Bearer {secret}"}
    with served(settings.model_copy(update={"export_stall_s": 1.0})) as url:
        client = stalled_export(url, reader, job_id)
        try:
            received = read_steadily(client, bytes_per_s=4 * 1024 * 1024)
        finally:
            client.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert len(received) > 8 * 1024 * 1024  # several seconds of reading, each well within the stall
    assert received.endswith(b"\r\n0\r\n\r\n")  # the whole file, its last chunk too


def read_steadily(client: socket.socket, bytes_per_s: float) -> bytes:
    """A response read at about `bytes_per_s`, as over a slow link: until its last chunk, or
    until the server closes the connection."""
    client.settimeout(10)
    received = bytearray()
    started = time.monotonic()
    while not received.endswith(b"\r\n0\r\n\r\n") and (chunk := client.recv(1 << 16)):
        received += chunk
        time.sleep(max(0.0, len(received) / bytes_per_s - (time.monotonic() - started)))
    return bytes(received)


async def test_a_client_gone_while_the_next_batch_is_read_ends_the_export_and_gives_its_connection_back(
    sessions: Sessions,
) -> None:
    """The next batch is read while this one is sent. A client that went meanwhile closed the
    stream with that read under way, and closing it failed ("aclose(): asynchronous generator
    is already running", which the event loop logged for such a dropped export) instead of
    ending the read."""
    job_id = await bulk_job(sessions, 3 * BATCH_ROWS)
    chunks = encoded(sessions, job_id, FORMATS["trl_sft"], ExportOptions(), ExportFilter())
    await anext(chunks)  # the file's start
    await anext(chunks)  # the first batch's records: the second batch is being read
    await chunks.aclose()  # what the client's going does

    pool = sessions.kw["bind"].pool

    async def none_in_use() -> bool:
        return bool(pool.checkedout() == 0)

    await eventually(none_in_use, timeout_s=10, what="the cancelled read's connection given back")


@pytest.fixture
async def export_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine for an export's reads alone, so its pool shows the connections the export holds."""
    engine = make_engine(settings.database_url, settings.database_timeout_s, 2)
    yield engine
    await engine.dispose()


@asynccontextmanager
async def second_read_waiting_for_a_lock(
    sessions: Sessions, export: Coroutine[Any, Any, None]
) -> AsyncIterator[asyncio.Task[None]]:
    """`export` (of a job of three batches of rows) under way in a task: its first batch is
    read, then its second batch's read waits for a lock on cots held until the block ends."""
    released = asyncio.Event()
    queued: asyncio.Task[None] | None = None
    try:
        async with sessions.begin() as first_lock:
            await first_lock.execute(text(LOCK_COTS))
            sending = asyncio.create_task(export)
            await eventually(lambda: waiting_for_locks(sessions, 1), what="the first batch's read waiting")
            queued = asyncio.create_task(cots_locked_until(sessions, released))
            await eventually(lambda: waiting_for_locks(sessions, 2), what="a lock queued behind it")
        # The first batch is read; the queued lock is taken before the second batch's read.
        yield sending
    finally:
        released.set()
        if queued is not None:
            await queued


async def none_checked_out(engine: AsyncEngine) -> bool:
    return bool(engine.pool.checkedout() == 0)  # type: ignore[attr-defined]


async def test_an_export_ended_for_its_stalled_client_gives_back_the_connection_of_a_read_under_way(
    sessions: Sessions, export_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """An export ended because its client took nothing for AIDSAFE_EXPORT_STALL_S was left to be
    closed whenever its response was freed: until then, the next batch's read under way (here
    waiting for a lock) kept its Postgres connection."""
    job_id = await bulk_job(sessions, 3 * BATCH_ROWS)
    chunks = encoded(
        make_sessions(export_engine), job_id, FORMATS["trl_sft"], ExportOptions(), ExportFilter()
    )
    caplog.set_level(logging.INFO, logger="aidsafe.api")
    response = _StallingEnds(chunks, job_id=job_id, stall_s=1.0)
    export = response(UVICORN_SCOPE, never_disconnects, stops_after(2))
    async with second_read_waiting_for_a_lock(sessions, export) as sending:
        # The client takes nothing of the first batch's records while the second batch's read waits.
        await asyncio.wait_for(sending, 20)
        await eventually(
            lambda: none_checked_out(export_engine),
            timeout_s=5,
            what="the read under way given up, its connection back",
        )

    ended = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "aidsafe.api"]
    assert ended == [("INFO", f"the export of job {job_id} was ended: its client took nothing for 1 s")]


async def test_an_export_whose_client_goes_is_closed_at_once_and_gives_back_its_reads_connection(
    sessions: Sessions, export_engine: AsyncEngine
) -> None:
    """A client gone mid-export: Starlette cancels the send it was waiting in, which left the
    export at its yield, to be closed whenever the garbage collector freed the response; until
    then the next batch's read under way (here waiting for a lock) kept its Postgres connection.
    (The test holds the export, so nothing but closing it at once can pass.)"""
    job_id = await bulk_job(sessions, 3 * BATCH_ROWS)
    chunks = encoded(
        make_sessions(export_engine), job_id, FORMATS["trl_sft"], ExportOptions(), ExportFilter()
    )
    stopped = asyncio.Event()

    async def gone_once_the_second_read_waits() -> Message:
        await stopped.wait()
        second_read = "wait_event_type = 'Lock' AND query NOT LIKE 'LOCK%'"
        await eventually(lambda: other_backend(sessions, second_read), what="the second batch's read waiting")
        return {"type": "http.disconnect"}

    response = _StallingEnds(chunks, job_id=job_id, stall_s=30)
    export = response(UVICORN_SCOPE, gone_once_the_second_read_waits, stops_after(2, stopped))
    async with second_read_waiting_for_a_lock(sessions, export) as sending:
        await asyncio.wait_for(sending, 20)

        assert inspect.getasyncgenstate(chunks) == inspect.AGEN_CLOSED
        await eventually(
            lambda: none_checked_out(export_engine),
            timeout_s=5,
            what="the read under way given up, its connection back",
        )


async def test_an_export_the_database_cuts_off_is_a_warning_not_a_traceback(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    """A Postgres restart ended the reads of the exports under way: each raised out of the app,
    logged with a traceback ("Exception in ASGI application") as if it were a bug. It is one
    warning naming the job and the fault; the response is still cut off without its last chunk."""
    job_id = await bulk_job(sessions, 3 * BATCH_ROWS)
    chunks = encoded(sessions, job_id, FORMATS["trl_sft"], ExportOptions(), ExportFilter())
    sent: list[Message] = []

    async def taken(message: Message) -> None:
        sent.append(message)

    async with sessions.begin() as locking:
        await locking.execute(text(LOCK_COTS))
        sending = asyncio.create_task(
            _StallingEnds(chunks, job_id=job_id, stall_s=30)(UVICORN_SCOPE, never_disconnects, taken)
        )
        reading = await eventually(
            lambda: other_backend(sessions, "wait_event_type = 'Lock'"), what="the first batch's read waiting"
        )
        await locking.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": reading})
    await asyncio.wait_for(sending, 20)

    assert sent[0]["type"] == "http.response.start" and sent[-1]["more_body"]  # never the last chunk
    logged = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [(record.levelname, record.exc_info) for record in logged] == [("WARNING", None)]
    warning = logged[0].getMessage()
    assert warning.startswith(f"the export of job {job_id} was cut off: the database went away (")
    assert "terminating connection due to administrator command" in warning  # the fault, named


async def test_an_export_of_a_job_deleted_while_it_is_sent_is_a_warning_not_a_traceback(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    """A job deleted during its export raised JobDeleted out of the app, logged with a traceback
    ("Exception in ASGI application") as if it were a bug. It is one warning naming the job; the
    response is cut off without its last chunk, as when the database goes away."""
    async with sessions.begin() as session:
        key, _ = await create_key(session, "deleting")
        job_id = await insert_finished_job(session, key.id, 3 * BATCH_ROWS)
    chunks = encoded(sessions, job_id, FORMATS["trl_sft"], ExportOptions(), ExportFilter())
    sent: list[Message] = []

    async def deleting_once_the_file_has_begun(message: Message) -> None:
        sent.append(message)
        if len(sent) == 2:  # the head, then the file's start
            async with sessions.begin() as session:
                await delete_job(session, job_id, key.id)

    await asyncio.wait_for(
        _StallingEnds(chunks, job_id=job_id, stall_s=30)(
            UVICORN_SCOPE, never_disconnects, deleting_once_the_file_has_begun
        ),
        20,
    )

    assert sent[0]["type"] == "http.response.start" and sent[-1]["more_body"]  # never the last chunk
    logged = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [(record.levelname, record.exc_info) for record in logged] == [("WARNING", None)]
    assert logged[0].getMessage() == f"the export of job {job_id} was cut off: the job was deleted meanwhile"


async def test_an_export_that_fails_for_a_bug_still_raises_for_its_traceback() -> None:
    """Only the database's going away is quieted: any other failure of an export is a bug,
    which the server must log with its traceback."""

    async def failing() -> AsyncGenerator[bytes, None]:
        yield b"["
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await _StallingEnds(failing(), job_id=uuid4(), stall_s=30)(
            UVICORN_SCOPE, never_disconnects, stops_after(9)
        )


async def test_a_large_chunk_is_sent_in_pieces_that_add_up_to_it() -> None:
    """The server's send of a chunk waits until the client has taken nearly all of it, so a
    chunk is sent 256 KiB at a time (see the slow-but-steady client above): the pieces are the
    chunk, in order, each saying more of the body follows; only the last message ends it."""
    chunk = bytes(range(256)) * 2500  # 640,000 bytes: two whole pieces and part of a third

    async def one_chunk() -> AsyncGenerator[bytes, None]:
        yield chunk

    sent: list[Message] = []

    async def taken(message: Message) -> None:
        sent.append(message)

    await _StallingEnds(one_chunk(), job_id=uuid4(), stall_s=30)(UVICORN_SCOPE, never_disconnects, taken)

    body = sent[1:]
    assert [(len(m["body"]), m["more_body"]) for m in body] == [
        (262_144, True),
        (262_144, True),
        (115_712, True),
        (0, False),
    ]
    assert b"".join(m["body"] for m in body) == chunk


LOCK_COTS = "LOCK TABLE cots IN ACCESS EXCLUSIVE MODE"
UVICORN_SCOPE: Scope = {"type": "http", "asgi": {"spec_version": "2.3"}}  # as uvicorn calls the app


async def cots_locked_until(sessions: Sessions, released: asyncio.Event) -> None:
    async with sessions.begin() as session:
        await session.execute(text(LOCK_COTS))
        await released.wait()


async def never_disconnects() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def stops_after(messages: int, stopped: asyncio.Event | None = None) -> Send:
    """A client that takes `messages` of the response, then nothing (its window stays full);
    `stopped` is set once it does."""
    taken = 0

    async def send(message: Message) -> None:
        nonlocal taken
        taken += 1
        if taken > messages:
            if stopped is not None:
                stopped.set()
            await asyncio.Event().wait()

    return send


def rest_of(client: socket.socket) -> bytes:
    """The rest of a response: until the server closes the connection, or sends nothing for
    10 s (a response sent whole leaves the connection open for the next request)."""
    received = []
    try:
        while chunk := client.recv(1 << 16):
            received.append(chunk)
    except TimeoutError:
        pass
    return b"".join(received)


async def test_an_export_of_a_job_deleted_while_it_is_read_ends_broken_not_short(
    settings: Settings, sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    """Each batch is read by a statement of its own: once the job is deleted, the next one
    finds no rows. The response is cut off without its last chunk (clients report an
    incomplete body), so the file never looks complete with rows missing; the server logs
    no traceback for it."""
    job_id, reader = await finished_job_of_a_new_key(sessions, "deleting-reader", 5000)
    with served(settings) as url:
        stalled = stalled_export(url, reader, job_id)
        try:
            received = read_a_little(stalled)
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                deleted = await client.delete(f"/v1/jobs/{job_id}", headers=reader)
                assert deleted.status_code == 200, deleted.text
            received += rest_of(stalled)
        finally:
            stalled.close()

    assert received.startswith(b"HTTP/1.1 200")
    assert not received.endswith(b"\r\n0\r\n\r\n")  # chunked encoding's last chunk
    assert 0 < received.count(b'"item_id"') < 5000
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []


@pytest.mark.slow
async def test_a_request_that_finds_every_database_connection_in_use_is_a_503(
    settings: Settings, sessions: Sessions
) -> None:
    """With the export caps raised past the API's connections (20 by default), exports that
    each wait for a lock while they read a batch hold them all: another request waits 30 s
    for one, then is a 503 to retry, not a 500."""
    job_id, reader = await finished_job_of_a_new_key(sessions, "locked-out-reader", 10)
    other = await new_key(sessions, "other")
    caps = {"max_exports_per_key": 20, "max_exports": 25}  # the last 5 kept for keys with none
    with served(settings.model_copy(update=caps)) as url:
        async with sessions.begin() as locking, httpx.AsyncClient(base_url=url, timeout=60) as client:
            await locking.execute(text("LOCK TABLE cots IN ACCESS EXCLUSIVE MODE"))
            waiting = [stalled_export(url, reader, job_id) for _ in range(20)]
            try:
                await eventually(
                    lambda: _is(20, connections_of_others(sessions, "active")),
                    what="20 exports waiting for the lock, each with a connection",
                )
                response = await client.get(f"/v1/jobs/{job_id}", headers=other)
            finally:
                for waiting_client in waiting:
                    waiting_client.close()

    error_of(response, 503, "unavailable")


async def test_exports_of_two_jobs_share_one_compiled_statement_and_each_has_its_own_rows(
    sessions: Sessions,
) -> None:
    """The job is a parameter of the statement kept for exports of one kind: built and compiled
    per export, the full record's statement held the event loop about 19 ms each time."""
    first, second = await bulk_job(sessions, 3), await bulk_job(sessions, 4)
    options, fmt = ExportOptions(), FORMATS["jsonl"]
    filters = ExportFilter(min_scores=(("cot_policy_faithfulness", 1.0),))

    async def exported_items(job_id: UUID) -> set[str]:
        chunks = [c async for c in encoded(sessions, job_id, fmt, options, replace(filters))]
        return {json.loads(line)["item_id"] for line in b"".join(chunks).splitlines()}

    async def stored_items(job_id: UUID) -> set[str]:
        async with sessions() as session:
            return {str(i) for i in await session.scalars(select(Item.id).where(Item.job_id == job_id))}

    first_items = await exported_items(first)
    before = batches_statement.cache_info()
    second_items = await exported_items(second)
    after = batches_statement.cache_info()

    assert (after.hits, after.misses) == (before.hits + 1, before.misses)  # the first one's statement
    assert first_items == await stored_items(first) and len(first_items) == 3
    assert second_items == await stored_items(second) and len(second_items) == 4
