"""Request and response bodies of the HTTP API (what the OpenAPI document shows)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config import Prices
from app.costs import Budget
from app.deliberation.config import Mode
from app.deliberation.policies import MAX_POLICY_TEXT_CHARS, render_policies
from app.duplicates import DuplicatesOut, Handling
from app.plan import JobConfigIn, RoleIn
from app.store import models

MAX_PROMPTS_PER_JOB = 10_000
MAX_PROMPT_CHARS = 20_000
# The store's item statuses, as a Literal: the OpenAPI document lists them inline.
ItemStatus = Literal[tuple(status.value for status in models.ItemStatus)]  # type: ignore[valid-type]
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S")]
CallbackUrl = Annotated[
    str | None,
    Field(
        max_length=2000,
        description="An http(s) URL to POST to when the job ends (signed; see the README's "
        "Callbacks). Its host must be on the server's allow-list: 422 `callbacks_disabled`, "
        "`callback_host_not_allowed` or `invalid_callback_url` otherwise.",
    ),
]

MAX_LABEL_CHARS = 100
MAX_JOB_METADATA_BYTES = 8_192
# One line of text without control characters: what a listing matches and a terminal shows.
LABEL_PATTERN = r"^[^\x00-\x1f\x7f]+$"
Label = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_LABEL_CHARS,
        pattern=LABEL_PATTERN,
        description=f"A name of yours for the job: 1 to {MAX_LABEL_CHARS} characters, one line.",
    ),
]
# What GET /v1/jobs and /v1/comparisons list: the job's plan's mode.
JobKind = Literal[(*(mode.value for mode in Mode), "comparison")]  # type: ignore[valid-type]


def _small_json(metadata: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_JOB_METADATA_BYTES:
        raise ValueError(
            f"the metadata is {size:,} bytes of JSON; at most {MAX_JOB_METADATA_BYTES:,} are allowed"
        )
    return metadata


JobMetadata = Annotated[
    dict[str, Any],
    AfterValidator(_small_json),
    Field(description=f"Free-form JSON object of yours, at most {MAX_JOB_METADATA_BYTES:,} bytes."),
]


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


class Labelled(BaseModel):
    """A submitted job's label and metadata. Left out, they are also left out of the request's
    hash, so a body without them is the same request it was before jobs had them."""

    label: Label | None = Field(default=None, exclude_if=lambda label: label is None)
    metadata: JobMetadata = Field(default_factory=dict, exclude_if=lambda metadata: not metadata)


class JobLabelsIn(BaseModel):
    """PATCH /v1/jobs/{id}: a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")
    label: Label | None = Field(default=None, description="null clears the label.")
    metadata: JobMetadata = Field(
        default_factory=dict, description="Replaces the job's metadata whole; {} clears it."
    )
    budget: Budget | None = Field(
        default=None,
        description="Replaces the job's budget whole; null removes it. Items waiting as "
        "`budget_exhausted` resume if the new budget is not spent. 422 `budget_too_small` below "
        "what one call may cost, `unpriced_endpoint` for money with an unpriced endpoint.",
    )


class JobIn(Labelled):
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
    # Left out of the request's hash when unset, as label and metadata are.
    preset: str | None = Field(
        default=None,
        max_length=64,
        exclude_if=lambda preset: preset is None,
        description="A preset (GET /v1/presets) to start from; `config` overrides its fields "
        "(objects merge key by key, other values and lists replace). 422 `unknown_preset` "
        "if this server has none of that name.",
    )
    preset_version: str | None = Field(
        default=None,
        max_length=64,
        exclude_if=lambda version: version is None,
        description="Pins the preset's version: 422 `preset_version_mismatch` if the server's differs.",
    )
    callback_url: CallbackUrl = None
    # Left out of the request's hash when "keep", as label and metadata are: a body without it
    # stays the request it was before jobs had it, so its replays still match.
    duplicates: Handling = Field(
        default="keep",
        exclude_if=lambda handling: handling == "keep",
        description="Prompts repeated in this job (exact or normalised: see the README's Duplicate "
        "prompts) are always reported. `keep`: an item for every prompt. `skip`: an item only for "
        "the first occurrence; items keep their prompt's position in the list.",
    )
    budget: Budget | None = Field(
        default=None,
        exclude_if=lambda budget: budget is None,  # left out of the request's hash when absent
        description="Stop starting LLM calls once the job's recorded calls reach this (see the "
        "README's Costs and budgets); raise it with PATCH. 422 `budget_too_small` below what one "
        "call may cost, `unpriced_endpoint` for max_cost_usd with an endpoint without prices.",
    )

    @model_validator(mode="after")
    def _one_source_of_prompts(self) -> JobIn:
        if (self.prompts is None) == (self.items is None):
            raise ValueError("give exactly one of 'prompts' or 'items'")
        return self

    def prompt_items(self) -> list[PromptIn]:
        return self.items or [PromptIn(prompt=p) for p in self.prompts or []]


class PresetOut(BaseModel):
    name: str
    version: str = Field(description="Hash of the preset's config: the same config, the same version.")
    description: str
    notes: str = Field(description="What is known (e.g. from the paper) and what is this project's choice.")
    config: dict[str, Any] = Field(
        description="The fields the preset sets, as in a job's `config`; the rest are the server's defaults."
    )


class PolicySetOut(BaseModel):
    id: UUID
    name: str
    version: str
    description: str
    builtin: bool
    created_at: datetime


class PolicySetDetailOut(PolicySetOut):
    policies: list[dict[str, Any]]


PolicyEntry = Annotated[str, Field(min_length=1, max_length=1000)]


class BorderlineExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=2000)
    guidance: str = Field(min_length=1, max_length=2000)


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    title: str = Field(min_length=1, max_length=200)
    scope: str = Field(min_length=1, max_length=5000)
    allowed: list[PolicyEntry] = Field(default_factory=list, max_length=50)
    not_allowed: list[PolicyEntry] = Field(default_factory=list, max_length=50)
    borderline_examples: list[BorderlineExample] = Field(default_factory=list, max_length=20)


class PolicySetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = Field(default="", max_length=5000)
    policies: list[PolicyIn] = Field(
        min_length=1,
        max_length=50,
        description=f"Distinct ids; rendered for the prompts, at most {MAX_POLICY_TEXT_CHARS:,} characters.",
    )

    @field_validator("policies")
    @classmethod
    def _fit_in_a_prompt(cls, policies: list[PolicyIn]) -> list[PolicyIn]:
        ids = [policy.id for policy in policies]
        if duplicates := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"duplicate policy id {', '.join(map(repr, duplicates))}")
        chars = len(render_policies([policy.model_dump() for policy in policies]))
        if chars > MAX_POLICY_TEXT_CHARS:
            raise ValueError(
                f"the policies render to {chars:,} characters of prompt text; at most "
                f"{MAX_POLICY_TEXT_CHARS:,} are allowed"
            )
        return policies


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
    cached_prompt_tokens: int = Field(description="Of prompt_tokens, those the servers reported as cached.")
    completion_tokens: int
    cost_usd: float | None = Field(
        description="At the prices pinned in the job when it was submitted; null when an endpoint "
        "the job uses has no price (unknown, not free)."
    )


class BudgetOut(BaseModel):
    max_cost_usd: float | None
    max_tokens: int | None
    spent_cost_usd: float | None = Field(description="Recorded calls so far; null if unpriced.")
    spent_tokens: int
    exhausted: bool = Field(description="No new call starts; items wait as `budget_exhausted`.")


JobStatus = Literal["queued", "running", "budget_exhausted", "completed", "cancelling", "cancelled"]


class MetricStats(BaseModel):
    mean: float = Field(description="Mean score, 1 to 5.")
    distribution: dict[str, int] = Field(description='CoTs per score, "1" to "5".')


class QualitySummary(BaseModel):
    """The auto-grader and the quality gate over the job's CoTs so far."""

    graded: int = Field(description="CoTs with scores.")
    grade_failed: int = Field(description="CoTs the grader gave no usable scores for (rejected).")
    accepted: int = Field(description="CoTs that passed every threshold.")
    rejected: int
    metrics: dict[str, MetricStats] = Field(description="Per metric, over the graded CoTs.")


class PairSummary(BaseModel):
    """Ear-whisperer preference pairs: one attempt per completed item."""

    attempted: int
    kept: int
    not_kept: dict[str, int] = Field(description="Attempts not kept, by reason.")
    mean_gap: float | None = Field(description="Mean policy-faithfulness gap of the kept pairs.")


REFUSALS_BY_STAGE = (
    "Refused turns per stage, then per model: those the fallback then answered and those that "
    "failed their item (or, for grading and pairs, left it ungraded or without a pair)."
)


class JobOut(BaseModel):
    id: UUID
    status: JobStatus
    created_at: datetime
    cancelled_at: datetime | None
    label: str | None
    metadata: dict[str, Any]
    policy_set: PolicySetBrief
    config: dict[str, Any]
    counts: JobCounts
    usage: Usage
    budget: BudgetOut | None = Field(description="null: the job has no budget.")
    refusals_by_stage: dict[str, dict[str, int]] = Field(description=REFUSALS_BY_STAGE)
    quality: QualitySummary | None = Field(
        default=None, description="Present when the job asked for grading."
    )
    pairs: PairSummary | None = Field(default=None, description="Present when the job asked for pairs.")
    duplicates: DuplicatesOut | None = Field(
        default=None,
        description="Duplicate prompts found at submission; null for comparisons and for jobs "
        "submitted before duplicates were reported.",
    )


class JobProgressOut(BaseModel):
    """A job's progress: the data of the `snapshot` and `done` events of its event stream."""

    status: JobStatus
    counts: JobCounts
    usage: Usage
    budget: BudgetOut | None = Field(default=None, description="null: the job has no budget.")
    refusals_by_stage: dict[str, dict[str, int]] = Field(description=REFUSALS_BY_STAGE)
    quality: QualitySummary | None = Field(
        default=None, description="Present when the job asked for grading."
    )
    pairs: PairSummary | None = Field(default=None, description="Present when the job asked for pairs.")


class ItemFinishedOut(BaseModel):
    """The data of an `item` event: an item of the job ended, or stopped to wait for budget
    (`budget_exhausted`: it resumes when the budget is raised)."""

    item_id: UUID
    position: int
    status: Literal["completed", "failed", "cancelled", "budget_exhausted"]
    error_code: str | None


class QualityReport(QualitySummary):
    thresholds: dict[str, float] = Field(description="The job's gate: lowest accepted score per metric.")
    below_threshold: dict[str, int] = Field(
        description="Why CoTs were rejected: per gated metric, CoTs scored under its threshold "
        "(a CoT may miss several); ungraded CoTs are counted in grade_failed."
    )


class ReportOut(BaseModel):
    job_id: UUID
    status: JobStatus
    counts: JobCounts
    quality: QualityReport | None = Field(default=None, description="Present when the job asked for grading.")
    pairs: PairSummary | None = Field(default=None, description="Present when the job asked for pairs.")
    usage: Usage
    usage_by_stage: dict[str, Usage] = Field(description="LLM calls, tokens and cost per stage.")
    budget: BudgetOut | None
    refusals_by_stage: dict[str, dict[str, int]] = Field(description=REFUSALS_BY_STAGE)


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
    error_message: str | None = Field(
        description="Why the item failed or waits, in the service's words (never an upstream's answer)."
    )
    created_at: datetime
    finished_at: datetime | None


class TurnOut(BaseModel):
    """A turn that may hold hazardous text (whisper, rejected, guard, and grading of the
    rejected side) has its raw_output, parsed and error blanked for keys without the
    `hazardous:read` scope, and `redacted` true."""

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
    cached_prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None = Field(description="At the job's pinned prices; null: unpriced endpoint.")
    latency_ms: float
    request_hash: str
    created_at: datetime
    redacted: bool = False


class ThoughtOut(BaseModel):
    id: int
    text: str
    stage: str
    round: int
    agent: int


class RefinedThoughtOut(BaseModel):
    text: str
    sources: list[int] = Field(description="Ids of the deliberation thoughts it keeps or merges.")


class FallbackOut(BaseModel):
    stage: str
    round: int
    agent: int
    model: str = Field(description="The fallback's model, as its endpoint named it.")


class DroppedThoughtOut(BaseModel):
    id: int
    text: str
    reason: Literal["redundant", "deceptive", "policy_inconsistent"]
    explanation: str


class ScoreOut(BaseModel):
    score: int = Field(ge=1, le=5)
    rationale: str | None = Field(description="Null when redacted (grading of a rejected CoT).")


Scores = dict[str, ScoreOut]


class GateOut(BaseModel):
    accepted: bool | None = Field(description="The quality gate's decision; null when no grading was asked.")
    reasons: list[str] = Field(description="Thresholds missed, or why the CoT is ungraded.")


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
    scores: Scores | None = Field(description="The auto-grader's scores; null when not graded.")
    grade_error: str | None = Field(description="Why the grader gave no scores.")
    quality: GateOut
    fallbacks: list[FallbackOut] = Field(
        description="Stages whose agent refused and the job's fallback answered (the item's own, "
        "grading, whisper and a JSON guard); both turns are stored."
    )
    created_at: datetime


class ItemDetailOut(ItemOut):
    cot: CotOut | None
    turns: list[TurnOut]
    usage: Usage = Field(description="The item's turns summed (a comparison item: the judge's).")


class ItemPage(BaseModel):
    data: list[ItemOut]
    next_cursor: str | None


class CotPage(BaseModel):
    data: list[CotOut]
    next_cursor: str | None


class GuardOut(BaseModel):
    unsafe: bool | None = Field(description="Null when the guard's output could not be read.")
    categories: list[str] = Field(
        description="Policies (or Llama Guard S-codes) the guard says are violated; without the "
        "hazardous scope, only those naming a policy of the set or an S-code."
    )
    rationale: str | None = Field(description="Null when redacted.")
    error: str | None = Field(description="Why the guard's output was unreadable; null when redacted.")


class SampleOut(BaseModel):
    thoughts: list[str]
    response: str


class ChosenOut(BaseModel):
    """The item's own refined CoT."""

    thoughts: list[str]
    response: str
    scores: Scores | None


class RejectedOut(BaseModel):
    """The CoT written under the whispered belief that the guard flagged. Text is null when
    redacted, or when no try was flagged."""

    belief: str | None
    thoughts: list[str] | None
    response: str | None
    scores: Scores | None
    grade_error: str | None = Field(description="Why the grader gave no scores; null when redacted.")
    guard: GuardOut | None


class WhisperTryOut(BaseModel):
    number: int
    belief: str | None = Field(description="Null when redacted.")
    refused: bool = Field(description="The generator refused to follow the belief.")
    rejected: SampleOut | None = Field(description="Null when redacted or refused.")
    refusal: str | None = Field(description="The generator's refusal; null when redacted.")
    guard: GuardOut | None = Field(description="Null when there was nothing to judge.")


class PreferencePairOut(BaseModel):
    item_id: UUID
    position: int
    prompt: str
    kept: bool
    reason: str | None = Field(description="Why the pair was not kept; null when kept.")
    gap: float | None = Field(description="Chosen minus rejected policy faithfulness.")
    chosen: ChosenOut
    rejected: RejectedOut
    tries: list[WhisperTryOut]
    redacted: bool = Field(description="Hazardous text was withheld: the key lacks `hazardous:read`.")


class PreferencePairPage(BaseModel):
    data: list[PreferencePairOut]
    next_cursor: str | None


class StatusCounts(BaseModel):
    total: int
    by_status: dict[str, int] = Field(description="Items per status (statuses with none left out).")


class JobListed(BaseModel):
    """A job as GET /v1/jobs lists it; GET /v1/jobs/{id} has the rest."""

    id: UUID
    kind: JobKind = Field(  # type: ignore[valid-type]
        description="The job's mode: `aidsafe`, `zero_shot` or `comparison`."
    )
    status: JobStatus
    created_at: datetime
    cancelled_at: datetime | None
    label: str | None
    metadata: dict[str, Any]
    counts: StatusCounts
    cost_usd: float | None = Field(description="So far; null when an endpoint the job uses has no price.")


class JobPage(BaseModel):
    data: list[JobListed]
    next_cursor: str | None


class ComparisonListed(BaseModel):
    """A comparison as GET /v1/comparisons lists it; GET /v1/comparisons/{id} has the rest."""

    id: UUID
    status: JobStatus
    created_at: datetime
    cancelled_at: datetime | None
    label: str | None
    metadata: dict[str, Any]
    baseline_job_id: UUID
    candidate_job_id: UUID
    counts: StatusCounts
    cost_usd: float | None = Field(description="The judge's calls so far; null if its endpoint has no price.")


class ComparisonPage(BaseModel):
    data: list[ComparisonListed]
    next_cursor: str | None


class ComparisonIn(Labelled):
    model_config = ConfigDict(extra="forbid")
    baseline_job_id: UUID
    candidate_job_id: UUID
    judge: RoleIn | None = Field(default=None, description="Temperature defaults to 0.")
    callback_url: CallbackUrl = None

    @model_validator(mode="after")
    def _two_jobs(self) -> ComparisonIn:
        if self.baseline_job_id == self.candidate_job_id:
            raise ValueError("a job cannot be compared with itself: name two different jobs")
        return self


class MetricComparison(BaseModel):
    baseline: float | None
    candidate: float | None
    delta: float | None = Field(description="Candidate minus baseline.")


class Pairwise(BaseModel):
    """The judge's verdicts, from the candidate's side. A sample wins only when the judge
    prefers it in both orders; a split is a tie."""

    wins: int
    ties: int
    losses: int
    unreadable: int = Field(description="No readable verdict in both orders.")


class ComparisonOut(BaseModel):
    id: UUID
    status: JobStatus
    created_at: datetime
    label: str | None
    metadata: dict[str, Any]
    baseline_job_id: UUID
    candidate_job_id: UUID
    judge: dict[str, Any]
    prompts: int = Field(description="Prompts both jobs completed: the items compared.")
    counts: JobCounts
    metrics: dict[str, MetricComparison] = Field(
        description="Per metric, the grader's mean on each side over the compared prompts."
    )
    pairwise: Pairwise
    usage: Usage = Field(description="The judge's calls (the compared jobs' own are theirs).")


class JobDeletionOut(BaseModel):
    """The trace of a deleted job: who deleted it, when, and the rows deleted per table."""

    id: int = Field(description="Pass as `before_id` to read older deletions.")
    job_id: UUID
    mode: str = Field(description="The job's mode (`comparison` for a comparison).")
    deleted_by_key_id: UUID
    deleted_at: datetime
    row_counts: dict[str, int] = Field(description="Rows deleted per table, the job's row included.")


class CallbackSecretOut(BaseModel):
    callback_secret: str | None = Field(
        description="The key of the HMAC-SHA256 signature on the job's callback deliveries (see "
        "the README's Callbacks), shown only in the answer to the submission (and to its "
        "replays). Null when the job names no callback."
    )


class CountRange(BaseModel):
    min: int
    max: int


class CostRange(BaseModel):
    min: float
    max: float


class EstimateOut(BaseModel):
    """What a job would use (POST /v1/jobs/estimate); nothing is created. `min`: every
    deliberation agrees at its first turn (and the first whisper try is flagged); `max`: every
    round of every agent (and every whisper try). Re-asks are not counted. Prompts are
    estimated high (three bytes a token) and every reply at its full max_tokens, so real use
    is usually lower, often below `min`."""

    items: int
    calls: CountRange
    prompt_tokens: CountRange
    completion_tokens: CountRange
    cost_usd: CostRange | None = Field(description="At the current prices; null if an endpoint is unpriced.")
    unpriced_endpoints: list[str]
    prices: dict[str, Prices] = Field(description="The prices a job submitted now would pin.")


class SubmittedJobOut(JobOut, CallbackSecretOut):
    pass


class SubmittedComparisonOut(ComparisonOut, CallbackSecretOut):
    pass
