"""The training-data converters without a database: each export record, to the key, from a
stored row (app/exports/records.py), and the bytes each encoder makes of records, read back by
the reader a lab uses (app/exports/encoders.py). The records are the shapes of TRL's dataset
formats: conversational language modeling (`messages`) and conversational preference with an
explicit prompt (`prompt`, `chosen`, `rejected`), each a list of role/content messages.
(tests/test_exports.py and tests/test_export_records.py take them through the API, and load
the files with `datasets` and TRL.)"""

from __future__ import annotations

import csv
import io
import json
from typing import Any
from uuid import UUID

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.exports import formats, records
from app.exports.encoders import Csv, Encoder, JsonLines, JsonTextLines, Parquet
from app.exports.options import CotStyle, ExportOptions
from app.labeling import label_studio
from app.store.export_rows import PairRow, SampleRow

ITEM = UUID("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b")
REFINED = [{"text": "Chosen first", "sources": [1]}, {"text": "Chosen second", "sources": [2, 3]}]
EDIT = {
    "reviewer": "ana",
    "source": "label_studio",
    "annotation_id": "7",
    "edited_at": "2026-12-01T10:00:00Z",
}
USAGE = {
    "llm_calls": 9,
    "prompt_tokens": 1200,
    "cached_prompt_tokens": 300,
    "completion_tokens": 450,
    "cost_usd": 0.25,
}
INTENTS = {
    "explicit_intents": ["Store rice", "Poison someone"],
    "explicit_labels": ["benign", "possibly_harmful"],
    "implicit_intents": ["Avoid food poisoning"],
}


def sample(**fields: Any) -> SampleRow:
    return SampleRow(ITEM, 3, "How do I store rice?", REFINED, "Keep it dry.", **fields)


def pair(human_edit: dict[str, Any] | None = None) -> PairRow:
    return PairRow(
        ITEM, 3, "How do I store rice?", REFINED, "Keep it dry.", ["Rejected first", "Rejected second"],
        "Rejected response", 1.5, human_edit,
    )  # fmt: skip


CHOSEN = {
    CotStyle.THINK: {
        "role": "assistant",
        "content": "<think>\nChosen first\nChosen second\n</think>\n\nKeep it dry.",
    },
    CotStyle.REASONING_CONTENT: {
        "role": "assistant",
        "content": "Keep it dry.",
        "reasoning_content": "Chosen first\nChosen second",
    },
    CotStyle.NONE: {"role": "assistant", "content": "Keep it dry."},
}
REJECTED = {
    CotStyle.THINK: {
        "role": "assistant",
        "content": "<think>\nRejected first\nRejected second\n</think>\n\nRejected response",
    },
    CotStyle.REASONING_CONTENT: {
        "role": "assistant",
        "content": "Rejected response",
        "reasoning_content": "Rejected first\nRejected second",
    },
    CotStyle.NONE: {"role": "assistant", "content": "Rejected response"},
}
USER = {"role": "user", "content": "How do I store rice?"}


# --- records -------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(CotStyle))
def test_an_sft_record_is_the_prompt_then_the_reply_carrying_the_cot_in_the_style_asked(
    style: CotStyle,
) -> None:
    assert records.trl_sft(sample(), ExportOptions(cot=style)) == {"messages": [USER, CHOSEN[style]]}


@pytest.mark.parametrize("style", list(CotStyle))
def test_a_dpo_record_has_an_explicit_prompt_and_each_sides_own_cot(style: CotStyle) -> None:
    assert records.trl_dpo(pair(), ExportOptions(cot=style)) == {
        "prompt": [USER],
        "chosen": [CHOSEN[style]],
        "rejected": [REJECTED[style]],
    }


def test_a_system_message_goes_first_and_an_empty_one_is_left_out() -> None:
    system = {"role": "system", "content": "Be safe."}
    assert records.trl_sft(sample(), ExportOptions(system="Be safe."))["messages"] == [
        system,
        USER,
        CHOSEN[CotStyle.THINK],
    ]
    assert records.trl_dpo(pair(), ExportOptions(system="Be safe."))["prompt"] == [system, USER]
    assert records.trl_sft(sample(), ExportOptions(system=""))["messages"] == [USER, CHOSEN[CotStyle.THINK]]


def test_chat_records_name_the_edit_they_carry_only_when_human_edits_are_asked_for() -> None:
    edits = ExportOptions(human_edits=True)
    assert records.trl_sft(sample(human_edit=EDIT), edits)["human_edit"] == EDIT
    assert records.trl_sft(sample(), edits)["human_edit"] is None  # the model's own response
    assert records.trl_dpo(pair(EDIT), edits)["human_edit"] == EDIT
    assert records.trl_dpo(pair(), edits)["human_edit"] is None
    assert "human_edit" not in records.trl_sft(sample(human_edit=EDIT), ExportOptions())
    assert "human_edit" not in records.trl_dpo(pair(EDIT), ExportOptions())


LOG = [{"stage": "deliberation", "round": 1, "agent": 0, "output": {"thoughts": ["a"]}}]
FALLBACKS = [{"stage": "refinement", "round": 1, "agent": 0, "model": "small"}]


def test_an_aidsafe_row_has_the_published_columns_then_the_intents_fallbacks_and_usage() -> None:
    row = sample(deliberation_log=LOG, intents=INTENTS, fallbacks=FALLBACKS, usage=USAGE)
    assert records.aidsafe_columns(ExportOptions()) == [
        "prompt", "refined_thoughts", "response", "deliberation_log", "explicit_intents", "explicit_labels",
        "fallbacks", "llm_calls", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost_usd",
    ]  # fmt: skip
    record = records.aidsafe_csv(row, ExportOptions())
    assert list(record) == records.aidsafe_columns(ExportOptions())
    assert record == {
        "prompt": "How do I store rice?",
        "refined_thoughts": "Chosen first\nChosen second",
        "response": "Keep it dry.",
        "deliberation_log": '[{"stage":"deliberation","round":1,"agent":0,"output":{"thoughts":["a"]}}]',
        "explicit_intents": '["Store rice","Poison someone"]',
        "explicit_labels": '["benign","possibly_harmful"]',
        "fallbacks": '[{"stage":"refinement","round":1,"agent":0,"model":"small"}]',
        **USAGE,
    }


def test_an_aidsafe_row_without_a_log_or_fallbacks_has_empty_lists_and_unlabelled_intents() -> None:
    unlabelled = {"explicit_intents": ["Store rice"], "implicit_intents": []}  # stored before labels
    record = records.aidsafe_csv(sample(intents=unlabelled, usage=USAGE), ExportOptions())
    assert (record["deliberation_log"], record["fallbacks"]) == ("[]", "[]")
    assert record["explicit_labels"] == '["unlabelled"]'


def test_an_aidsafe_row_with_human_edits_ends_with_the_edit_as_json_text_or_empty() -> None:
    edits = ExportOptions(human_edits=True)
    assert records.aidsafe_columns(edits) == [*records.AIDSAFE_COLUMNS, "human_edit"]
    edited = records.aidsafe_csv(sample(intents=INTENTS, usage=USAGE, human_edit=EDIT), edits)
    assert list(edited) == records.aidsafe_columns(edits)
    assert json.loads(edited["human_edit"]) == EDIT
    assert records.aidsafe_csv(sample(intents=INTENTS, usage=USAGE), edits)["human_edit"] == ""


def test_the_full_records_schema_ends_with_the_edit_only_with_human_edits() -> None:
    assert records.full_cot_schema(ExportOptions()) == records.FULL_COT_SCHEMA
    edits = records.full_cot_schema(ExportOptions(human_edits=True))
    assert edits.names == [*records.FULL_COT_SCHEMA.names, "human_edit"]
    assert edits.field("human_edit").type == records.HUMAN_EDIT


# --- encoders ------------------------------------------------------------------------------


def stream(encoder: Encoder, *batches: list[Any]) -> bytes:
    """An export's bytes: start, each batch (an empty one too), finish."""
    return encoder.start() + b"".join(encoder.encode(batch) for batch in batches) + encoder.finish()


def test_json_lines_are_one_record_a_line_across_batches() -> None:
    body = stream(JsonLines(), [{"a": 1}, {"b": "x\ny"}], [], [{"c": None}])
    assert body == b'{"a":1}\n{"b":"x\\ny"}\n{"c":null}\n'
    assert stream(JsonLines()) == b""


def test_json_text_lines_are_the_texts_one_a_line() -> None:
    assert (
        stream(JsonTextLines(), ['{"a":1}', '{"b":"é"}'], [], ['{"c":2}'])
        == '{"a":1}\n{"b":"é"}\n{"c":2}\n'.encode()
    )
    assert stream(JsonTextLines()) == b""


def test_csv_has_a_header_then_the_columns_in_order_quoted_where_needed_with_crlf() -> None:
    encoder = Csv(["b", "a"])
    body = stream(
        encoder, [{"a": "x,y", "b": 'say "hi"', "extra": "left out"}], [], [{"a": "two\nlines", "b": 2}]
    )
    assert body == b'b,a\r\n"say ""hi""","x,y"\r\n2,"two\nlines"\r\n'
    assert list(csv.reader(io.StringIO(body.decode(), newline=""))) == [
        ["b", "a"],
        ['say "hi"', "x,y"],
        ["2", "two\nlines"],
    ]
    assert stream(Csv(["a"])) == b"a\r\n"  # no rows: the header alone


SCHEMA = pa.schema([("name", pa.string()), ("n", pa.int64()), ("inner", pa.struct([("k", pa.string())]))])


def test_parquet_is_a_row_group_a_batch_zstd_compressed_ignoring_keys_the_schema_lacks() -> None:
    encoder = Parquet(SCHEMA)
    first = ['{"name":"a","n":1,"inner":{"k":"x","unknown":1},"unknown":true}', '{"name":"b"}']
    body = stream(encoder, first, [], ['{"name":"c","n":3,"inner":null}'])
    parquet = pq.ParquetFile(io.BytesIO(body))
    assert parquet.schema_arrow == SCHEMA
    assert parquet.metadata.num_row_groups == 2  # the empty batch made none
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    assert parquet.read().to_pylist() == [
        {"name": "a", "n": 1, "inner": {"k": "x"}},
        {"name": "b", "n": None, "inner": None},
        {"name": "c", "n": 3, "inner": None},
    ]


def test_parquet_streams_its_bytes_as_it_goes_and_the_footer_last() -> None:
    encoder = Parquet(SCHEMA)
    head = encoder.start()
    rows = encoder.encode(['{"name":"a","n":1}'])
    assert encoder.encode([]) == b""
    footer = encoder.finish()
    assert (head + rows)[:4] == b"PAR1" and rows  # the row group is out before the footer
    assert footer.endswith(b"PAR1")
    assert pq.read_table(io.BytesIO(head + rows + footer)).to_pylist() == [
        {"name": "a", "n": 1, "inner": None}
    ]


def test_a_parquet_record_longer_than_a_json_block_is_read_whole() -> None:
    long = "x" * (2 << 20)  # twice Arrow's JSON block
    body = stream(Parquet(SCHEMA), ['{"name":"short"}', json.dumps({"name": long}), '{"name":"after"}'])
    assert [r["name"] for r in pq.read_table(io.BytesIO(body)).to_pylist()] == ["short", long, "after"]


# --- formats -------------------------------------------------------------------------------


def test_each_format_makes_a_fresh_encoder_of_its_kind_per_export() -> None:
    kinds = {name: type(f.encoder(ExportOptions())) for name, f in formats.FORMATS.items()}
    assert kinds == {
        "trl_sft": JsonLines,
        "trl_dpo": JsonLines,
        "aidsafe_csv": Csv,
        "jsonl": JsonTextLines,
        "parquet": Parquet,
        "label_studio": label_studio.JsonArray,
        "argilla": JsonLines,
    }
    label_studio_tasks = formats.FORMATS["label_studio"]
    assert label_studio_tasks.encoder(ExportOptions()) is not label_studio_tasks.encoder(ExportOptions())
