"""The export formats by name. A format is a row source, a row-to-record function and an
encoder; adding one is a module with its record function and one line in FORMATS. The
full-record formats have no record function: Postgres builds their records (as JSON text)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.exports import records
from app.exports.encoders import Csv, Encoder, JsonLines, JsonTextLines, Parquet
from app.exports.options import ExportOptions
from app.labeling import argilla, label_studio
from app.store.export_rows import Source

JSONL = "application/x-ndjson"
JSON = "application/json"
CSV = "text/csv"  # Starlette adds "; charset=utf-8"
PARQUET = "application/vnd.apache.parquet"


# A row of the format's source (its row type) made into a record.
ToRecord = Callable[[Any, ExportOptions], records.Record]


@dataclass(frozen=True)
class ExportFormat:
    source: Source
    # Takes the source's row type; None: the source's rows are the records (JSON text).
    to_record: ToRecord | None
    encoder: Callable[[ExportOptions], Encoder]  # a fresh one per export
    media_type: str
    extension: str
    needs_hazardous_scope: bool = False  # its records hold hazardous text

    @property
    def takes_human_edits(self) -> bool:
        """Training data does; a labeling tool's tasks carry the model's output to review."""
        return self.source is not Source.COTS


def _always(encoder: Callable[[], Encoder]) -> Callable[[ExportOptions], Encoder]:
    """An encoder whatever the options."""
    return lambda _options: encoder()


FORMATS: dict[str, ExportFormat] = {
    "trl_sft": ExportFormat(Source.SAMPLES, records.trl_sft, _always(JsonLines), JSONL, "jsonl"),
    "trl_dpo": ExportFormat(Source.KEPT_PAIRS, records.trl_dpo, _always(JsonLines), JSONL, "jsonl", True),
    "aidsafe_csv": ExportFormat(
        Source.SAMPLES_WITH_LOG, records.aidsafe_csv, lambda o: Csv(records.aidsafe_columns(o)), CSV, "csv"
    ),
    "jsonl": ExportFormat(Source.FULL_COT_JSON, None, _always(JsonTextLines), JSONL, "jsonl"),
    "parquet": ExportFormat(
        Source.FULL_COT_JSON, None, lambda o: Parquet(records.full_cot_schema(o)), PARQUET, "parquet"
    ),
    "label_studio": ExportFormat(
        Source.COTS, label_studio.task, _always(label_studio.JsonArray), JSON, "json"
    ),
    "argilla": ExportFormat(Source.COTS, argilla.record, _always(JsonLines), JSONL, "jsonl"),
}
