"""Stored rows to export records (plain dicts ready to encode). Pure functions."""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from app.deliberation.parsing import explicit_labels
from app.deliberation.results import METRICS
from app.exports.options import CotStyle, ExportOptions
from app.store.export_rows import PairRow, SampleRow

Record = dict[str, Any]


def thoughts_text(thoughts: list[str]) -> str:
    """A chain of thought as text: one thought a line."""
    return "\n".join(thoughts)


def refined_texts(row: SampleRow | PairRow) -> list[str]:
    return [thought["text"] for thought in row.refined_thoughts]


def assistant_message(thoughts: list[str], response: str, style: CotStyle) -> dict[str, str]:
    if style is CotStyle.THINK:
        return {"role": "assistant", "content": f"<think>\n{thoughts_text(thoughts)}\n</think>\n\n{response}"}
    if style is CotStyle.REASONING_CONTENT:
        return {"role": "assistant", "content": response, "reasoning_content": thoughts_text(thoughts)}
    return {"role": "assistant", "content": response}


def prompt_messages(prompt: str, options: ExportOptions) -> list[dict[str, str]]:
    system = [{"role": "system", "content": options.system}] if options.system else []
    return [*system, {"role": "user", "content": prompt}]


def with_human_edit(record: Record, row: SampleRow | PairRow, options: ExportOptions) -> Record:
    """The record, naming the reviewer's edit its response is when the export uses them
    (`human_edit`, null: the model's own response); as it is otherwise."""
    return {**record, "human_edit": row.human_edit} if options.human_edits else record


def trl_sft(row: SampleRow, options: ExportOptions) -> Record:
    """TRL's conversational language-modeling record: {"messages": [...]}."""
    reply = assistant_message(refined_texts(row), row.response, options.cot)
    return with_human_edit({"messages": [*prompt_messages(row.prompt, options), reply]}, row, options)


def trl_dpo(row: PairRow, options: ExportOptions) -> Record:
    """TRL's conversational preference record with an explicit prompt."""
    record = {
        "prompt": prompt_messages(row.prompt, options),
        "chosen": [assistant_message(refined_texts(row), row.response, options.cot)],
        "rejected": [assistant_message(row.rejected_thoughts, row.rejected_response, options.cot)],
    }
    return with_human_edit(record, row, options)


USAGE_FIELDS = ["llm_calls", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost_usd"]
# The published AIDSAFE dataset's four columns, then what this service adds about each sample.
AIDSAFE_COLUMNS = [
    "prompt",
    "refined_thoughts",
    "response",
    "deliberation_log",
    "explicit_intents",
    "explicit_labels",
    "fallbacks",
    *USAGE_FIELDS,
]


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def aidsafe_columns(options: ExportOptions) -> list[str]:
    """The columns, and `human_edit` (JSON text, empty for none) with human edits."""
    return [*AIDSAFE_COLUMNS, "human_edit"] if options.human_edits else AIDSAFE_COLUMNS


def aidsafe_csv(row: SampleRow, options: ExportOptions) -> Record:
    """The published AIDSAFE dataset's columns (the log is JSON text of its turns), then the
    intents with their labels and the fallbacks as JSON text, and the item's usage."""
    intents, usage = row.intents, row.usage
    assert intents is not None and usage is not None  # Source.SAMPLES_WITH_LOG reads them
    record = {
        "prompt": row.prompt,
        "refined_thoughts": thoughts_text(refined_texts(row)),
        "response": row.response,
        "deliberation_log": _json_text(row.deliberation_log or []),
        "explicit_intents": _json_text(intents["explicit_intents"]),
        "explicit_labels": _json_text(explicit_labels(intents)),
        "fallbacks": _json_text(row.fallbacks or []),
        **{name: usage[name] for name in USAGE_FIELDS},
    }
    edit = orjson.dumps(row.human_edit).decode() if row.human_edit else ""
    return {**record, "human_edit": edit} if options.human_edits else record


_METRIC_STRUCT = [(metric, pa.int64()) for metric in METRICS]
# The full record: everything stored about a CoT, with the same keys and types on every row
# (so columnar readers get one schema). User metadata, whose keys vary, is JSON text; the
# thought lists keep the shapes the engine stores. Postgres builds each record as JSON text
# (app.store.exports._full_cot, keys in this order); Parquet reads that text with this schema
# (JSON Lines readers infer the same).
FULL_COT_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("position", pa.int64()),
        ("prompt", pa.string()),
        ("metadata", pa.string()),
        ("explicit_intents", pa.list_(pa.string())),
        ("explicit_labels", pa.list_(pa.string())),  # each explicit intent's, in order
        ("implicit_intents", pa.list_(pa.string())),
        ("refined_thoughts", pa.list_(pa.struct([("text", pa.string()), ("sources", pa.list_(pa.int64()))]))),
        ("response", pa.string()),
        (
            "dropped_thoughts",
            pa.list_(
                pa.struct(
                    [
                        ("id", pa.int64()),
                        ("text", pa.string()),
                        ("reason", pa.string()),
                        ("explanation", pa.string()),
                    ]
                )
            ),
        ),
        ("unaccounted_thought_ids", pa.list_(pa.int64())),
        (
            "thoughts",
            pa.list_(
                pa.struct(
                    [
                        ("id", pa.int64()),
                        ("text", pa.string()),
                        ("stage", pa.string()),
                        ("round", pa.int64()),
                        ("agent", pa.int64()),
                    ]
                )
            ),
        ),
        ("rounds_used", pa.int64()),
        ("agreed", pa.bool_()),
        (
            "fallbacks",
            pa.list_(
                pa.struct(
                    [
                        ("stage", pa.string()),
                        ("round", pa.int64()),
                        ("agent", pa.int64()),
                        ("model", pa.string()),
                    ]
                )
            ),
        ),
        (
            "usage",  # the item's turns summed; cost_usd null unless every turn has a cost
            pa.struct(
                [
                    ("llm_calls", pa.int64()),
                    ("prompt_tokens", pa.int64()),
                    ("cached_prompt_tokens", pa.int64()),
                    ("completion_tokens", pa.int64()),
                    ("cost_usd", pa.float64()),
                ]
            ),
        ),
        ("scores", pa.struct(_METRIC_STRUCT)),
        ("score_rationales", pa.struct([(metric, pa.string()) for metric in METRICS])),
        ("grade_error", pa.string()),
        ("accepted", pa.bool_()),
        ("gate_reasons", pa.list_(pa.string())),
        ("policy_set_name", pa.string()),
        ("policy_set_version", pa.string()),
        ("prompt_set_name", pa.string()),  # null for CoTs written before they were recorded
        ("prompt_set_version", pa.string()),
        ("created_at", pa.string()),
    ]
)
HUMAN_EDIT = pa.struct(
    [
        ("reviewer", pa.string()),
        ("source", pa.string()),
        ("annotation_id", pa.string()),
        ("edited_at", pa.string()),
    ]
)


def full_cot_schema(options: ExportOptions) -> pa.Schema:
    """The full record's schema: FULL_COT_SCHEMA, and `human_edit` last with human edits."""
    return (
        FULL_COT_SCHEMA.append(pa.field("human_edit", HUMAN_EDIT)) if options.human_edits else FULL_COT_SCHEMA
    )
