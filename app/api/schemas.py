"""Request and response bodies of the HTTP API (what the OpenAPI document shows)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.pipeline_config import JobConfigIn

MAX_PROMPTS_PER_JOB = 10_000
MAX_PROMPT_CHARS = 20_000
ItemStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S")]


def storable_input(data: Any) -> Any:
    """Refuse at the edge what PostgreSQL would refuse with a 500: U+0000 and lone
    surrogates in text, NaN and infinities in JSON."""
    if isinstance(data, str):
        if "\x00" in data:
            raise ValueError("text must not contain the NUL character (U+0000)")
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    elif isinstance(data, float) and not math.isfinite(data):
        raise ValueError("numbers must be finite (no NaN or Infinity)")
    elif isinstance(data, dict):
        for key, value in data.items():
            storable_input(key)
            storable_input(value)
    elif isinstance(data, list):
        for value in data:
            storable_input(value)
    return data


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="What went wrong, for humans.")
    details: Any = None


class ErrorOut(BaseModel):
    error: ErrorBody


class PromptIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: PromptText
    metadata: dict[str, Any] = Field(default_factory=dict, description="Kept with the item.")


class PolicySetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="aidsafe-default", max_length=100)
    version: str | None = Field(default=None, description="Content hash; newest if omitted.")


class JobIn(BaseModel):
    """Give either `prompts` (plain strings) or `items` (prompts with metadata)."""

    model_config = ConfigDict(
        extra="forbid",
        # What `_one_source_of_prompts` enforces, so the OpenAPI document says it too.
        json_schema_extra={
            "oneOf": [
                {"required": ["prompts"], "properties": {"prompts": {"type": "array"}}},
                {"required": ["items"], "properties": {"items": {"type": "array"}}},
            ]
        },
    )
    prompts: list[PromptText] | None = Field(default=None, min_length=1, max_length=MAX_PROMPTS_PER_JOB)
    items: list[PromptIn] | None = Field(default=None, min_length=1, max_length=MAX_PROMPTS_PER_JOB)
    policy_set: PolicySetRef = Field(default_factory=PolicySetRef)
    config: JobConfigIn = Field(default_factory=JobConfigIn)

    _storable = model_validator(mode="before")(storable_input)

    @model_validator(mode="after")
    def _one_source_of_prompts(self) -> JobIn:
        if (self.prompts is None) == (self.items is None):
            raise ValueError("give exactly one of 'prompts' or 'items'")
        return self

    def prompt_items(self) -> list[PromptIn]:
        return self.items or [PromptIn(prompt=p) for p in self.prompts or []]


class PolicySetOut(BaseModel):
    id: UUID
    name: str
    version: str
    description: str
    builtin: bool
    created_at: datetime


class PolicySetDetailOut(PolicySetOut):
    policies: list[dict[str, Any]]


class BorderlineExample(BaseModel):
    prompt: str = Field(min_length=1, max_length=2000)
    guidance: str = Field(min_length=1, max_length=2000)


class PolicyIn(BaseModel):
    id: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    title: str = Field(min_length=1, max_length=200)
    scope: str = Field(min_length=1, max_length=5000)
    allowed: list[str] = Field(default_factory=list, max_length=50)
    not_allowed: list[str] = Field(default_factory=list, max_length=50)
    borderline_examples: list[BorderlineExample] = Field(default_factory=list, max_length=20)


class PolicySetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = Field(default="", max_length=5000)
    policies: list[PolicyIn] = Field(min_length=1, max_length=50)

    _storable = model_validator(mode="before")(storable_input)


class PolicySetBrief(BaseModel):
    id: UUID
    name: str
    version: str


class JobCounts(BaseModel):
    total: int
    by_status: dict[str, int] = Field(description="Items per status.")
    by_stage: dict[str, dict[str, int]] = Field(
        description="Items per last stage reached (intent, seed, deliberation, refine, done) and status."
    )


class Usage(BaseModel):
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int


class JobOut(BaseModel):
    id: UUID
    status: Literal["queued", "running", "completed", "cancelling", "cancelled"]
    created_at: datetime
    cancelled_at: datetime | None
    policy_set: PolicySetBrief
    config: dict[str, Any]
    counts: JobCounts
    usage: Usage


class ItemOut(BaseModel):
    id: UUID
    job_id: UUID
    position: int
    prompt: str
    metadata: dict[str, Any]
    status: ItemStatus
    stage: str
    attempts: int
    error_code: str | None
    error_message: str | None
    created_at: datetime
    finished_at: datetime | None


class TurnOut(BaseModel):
    stage: str
    round: int
    agent: int
    attempt: int
    role: str
    endpoint: str
    model: str
    outcome: Literal["ok", "malformed", "truncated", "refused"]
    error: str | None
    agreed: bool | None
    raw_output: str
    parsed: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    request_hash: str
    created_at: datetime


class ThoughtOut(BaseModel):
    id: int
    text: str
    stage: str
    round: int
    agent: int


class RefinedThoughtOut(BaseModel):
    text: str
    sources: list[int] = Field(description="Ids of the deliberation thoughts it keeps or merges.")


class DroppedThoughtOut(BaseModel):
    id: int
    text: str
    reason: Literal["redundant", "deceptive", "policy_inconsistent"]
    explanation: str


class CotOut(BaseModel):
    item_id: UUID
    position: int
    prompt: str
    intents: dict[str, list[str]]
    refined_thoughts: list[RefinedThoughtOut]
    response: str
    dropped_thoughts: list[DroppedThoughtOut]
    unaccounted_thought_ids: list[int] = Field(description="Neither kept nor dropped by the refiner.")
    thoughts: list[ThoughtOut] = Field(description="Every thought before refinement, with its author.")
    rounds_used: int
    agreed: bool
    agreed_by: dict[str, int] | None
    policy_set: PolicySetBrief
    created_at: datetime


class ItemDetailOut(ItemOut):
    cot: CotOut | None
    turns: list[TurnOut]


class ItemPage(BaseModel):
    data: list[ItemOut]
    next_cursor: str | None


class CotPage(BaseModel):
    data: list[CotOut]
    next_cursor: str | None
