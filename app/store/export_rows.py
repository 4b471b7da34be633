"""What the store yields for an export, one row per exported sample, and the filters that
choose the samples. Field order is the store's column order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID


class Source(StrEnum):
    """Which rows a format is made from. The store reads only the columns these need:
    turning stored JSON into text is most of what Postgres spends on an export."""

    SAMPLES = "samples"  # one SampleRow per completed item
    # The same, with the item's deliberation log and the dataset's metadata (DATASET_FIELDS).
    SAMPLES_WITH_LOG = "samples_with_log"
    COTS = "cots"  # one CotRow per completed item: everything stored about its CoT
    # One str per completed item: its full record (FULL_COT_SCHEMA) as JSON text, built by
    # Postgres from the stored JSON without the API parsing it.
    FULL_COT_JSON = "full_cot_json"
    KEPT_PAIRS = "kept_pairs"  # one PairRow per preference pair kept at the filter's min_gap


@dataclass(frozen=True, slots=True)
class SampleRow:
    """A prompt and its refined CoT and response."""

    item_id: UUID
    position: int
    prompt: str
    refined_thoughts: list[dict[str, Any]]
    response: str
    # Only for Source.SAMPLES_WITH_LOG: the item's successful turns of the deliberation stages
    # (never a hazardous one), each {"stage", "round", "agent", "output"}, in order.
    deliberation_log: list[dict[str, Any]] | None = None
    # Only with human edits: the edit `response` is, {"reviewer", "source", "annotation_id",
    # "edited_at"}; None: the model's own response.
    human_edit: dict[str, Any] | None = None
    intents: dict[str, Any] | None = None  # the intent stage's output, as stored
    fallbacks: list[dict[str, Any]] | None = None  # {"stage", "round", "agent", "model"}
    # The item's turns summed: llm_calls, prompt_tokens, cached_prompt_tokens,
    # completion_tokens, cost_usd (null unless every turn has a cost).
    usage: dict[str, Any] | None = None


# The SampleRow fields only Source.SAMPLES_WITH_LOG reads: a dataset's, not a chat record's.
DATASET_FIELDS = frozenset({"deliberation_log", "intents", "fallbacks", "usage"})


@dataclass(frozen=True, slots=True)
class CotRow:
    item_id: UUID
    position: int
    prompt: str
    metadata: str  # JSON text, as stored
    intents: dict[str, Any]
    thoughts: list[dict[str, Any]]
    refined_thoughts: list[dict[str, Any]]
    dropped_thoughts: list[dict[str, Any]]
    unaccounted_thought_ids: list[int]
    response: str
    rounds_used: int
    agreed: bool
    scores: dict[str, Any] | None
    grade_error: str | None
    accepted: bool | None
    gate_reasons: list[str] | None
    policy_set_name: str
    policy_set_version: str
    created_at: datetime
    # None for CoTs written before CoTs recorded their prompt set.
    prompt_set_name: str | None = None
    prompt_set_version: str | None = None


@dataclass(frozen=True, slots=True)
class PairRow:
    """A kept preference pair: the item's refined CoT is chosen, the flagged try is rejected."""

    item_id: UUID
    position: int
    prompt: str
    refined_thoughts: list[dict[str, Any]]
    response: str
    rejected_thoughts: list[str]
    rejected_response: str
    gap: float
    human_edit: dict[str, Any] | None = None  # as SampleRow's, of the chosen side's response


@dataclass(frozen=True)
class ExportFilter:
    """Which samples go out. For pairs they apply to the chosen side, the item's own CoT."""

    accepted_only: bool = False  # the quality gate accepted the CoT
    # (metric, lowest grader score kept) pairs, by metric: a tuple, so that a filter is hashable
    # (the statement an export of it compiles is kept: exports.batches_statement).
    min_scores: tuple[tuple[str, float], ...] = ()
    human_approved: bool = False  # a reviewer accepted it and none currently rejects it
    exclude_human_rejected: bool = False  # no reviewer currently rejects it
    min_gap: float | None = None  # pairs: the gap a pair is kept at (None: every pair made)
