"""Request and response bodies of the HTTP API (what the OpenAPI document shows)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from app.benchmarks import BadRow, TooManyRows, TooManyValues, read_rows
from app.benchmarks import Format as BenchmarkFormat
from app.config import CallTokens, Prices
from app.costs import Budget
from app.deliberation.config import Mode
from app.deliberation.policies import MAX_POLICY_TEXT_CHARS, render_policies
from app.deliberation.prompt_sets import BUILTIN_NAME
from app.duplicates import DuplicatesOut, Handling
from app.errors import BatchUnsupported, PayloadTooLarge, shown_name
from app.plan import Delivery, GuardIn, JobConfigIn, RoleIn, TargetIn
from app.sample_files import (
    FIELDS,
    MAX_LINE_VALUES,
    MAX_SAMPLES,
    METADATA,
    SHAPES,
    Format,
    is_mapping_field,
)
from app.stats import Estimate
from app.store import models
from app.store.models import JobStatus

MAX_PROMPTS_PER_JOB = 10_000
# The JSON values of the largest job body: each prompt with a dozen or so metadata values. A
# benchmark file's JSONL is counted a line at a time (MAX_LINE_VALUES), as a sample file's.
MAX_JOB_VALUES = 20 * MAX_PROMPTS_PER_JOB
MAX_TEMPLATES = 50  # the stages use 26
TemplateName = Annotated[str, Field(min_length=1, max_length=64)]
TemplateText = Annotated[str, Field(max_length=20_000)]
MAX_PROMPT_CHARS = 20_000
# The store's item statuses and the kinds of job GET /v1/jobs lists (the job's plan's mode),
# as Literals built from the enums: the OpenAPI document lists them inline. mypy cannot read
# a Literal built at run time; to it they are the strings the store holds, which pydantic
# checks against the Literal as it does any value.
if TYPE_CHECKING:
    ItemStatus = str
    JobKind = str
else:
    ItemStatus = Literal[tuple(status.value for status in models.ItemStatus)]
    JobKind = Literal[(*(mode.value for mode in Mode), "comparison", "sample_evaluation", "model_evaluation")]
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
# One line of text, not blank, without control characters or Unicode's line and paragraph
# separators: what a listing matches and a terminal shows.
_IN_LINE = r"[^\x00-\x1f\x7f\u0085\u2028\u2029]"
LABEL_PATTERN = rf"^{_IN_LINE}*[^\s\x00-\x1f\x7f\u0085\u2028\u2029]{_IN_LINE}*$"
Label = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_LABEL_CHARS,
        pattern=LABEL_PATTERN,
        description=f"A name of yours for the job: 1 to {MAX_LABEL_CHARS} characters, one line.",
    ),
]


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


# What a set's name alone resolves to (app.store.registered_sets.newest_visible).
SetVersion = Annotated[
    str | None,
    Field(
        max_length=32,
        description=f"Content hash. Left out: your newest version of the name, or for the built-in "
        f"'{BUILTIN_NAME}' (unless you registered a set of that name) the version this server ships.",
    ),
]
# What a request that leaves out its policy set or prompt set gets: PolicySetRef's default
# name, and app.api.jobs.resolve_prompt_set's, resolved as SetVersion says.
LEFT_OUT_SET = (
    f'left out, as `{{"name": "{BUILTIN_NAME}"}}`: your newest set of that name if you registered '
    "one, else the built-in version this server ships"
)


class PolicySetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="aidsafe-default", max_length=100)
    version: SetVersion = None


class PromptSetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=100)
    version: SetVersion = None


class Labelled(BaseModel):
    """A submitted job's label and metadata. Left out, they are also left out of the request's
    hash, so a body without them is the same request it was before jobs had them."""

    label: Label | None = Field(default=None, exclude_if=lambda label: label is None)
    metadata: JobMetadata = Field(default_factory=dict, exclude_if=lambda metadata: not metadata)


class OnlineOnly(BaseModel):
    """Comparisons and evaluations call online: `delivery: batch` is refused, not ignored."""

    delivery: Delivery = Field(
        default="online",
        exclude_if=lambda delivery: delivery == "online",  # the request's hash stays as it was
        description="Only `online`: comparisons and evaluations are not sent through batch APIs "
        "(`batch`: 422 `batch_unsupported`).",
    )

    def refuse_batch(self, kind: str) -> None:
        if self.delivery == "batch":
            raise BatchUnsupported(
                f"delivery 'batch' is for generation jobs only; {kind} call online (leave out "
                "'delivery', or set it to 'online')",
                details={"kind": kind},
            )


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
    policy_set: PolicySetRef = Field(
        default_factory=PolicySetRef,
        description=f"The policies the job's requests show (GET /v1/policy-sets); {LEFT_OUT_SET}.",
    )
    # Left out of the request's hash when unset, as label and metadata are.
    prompt_set: PromptSetRef | None = Field(
        default=None,
        exclude_if=lambda ref: ref is None,
        description=f"The templates that word the job's requests (GET /v1/prompt-sets); {LEFT_OUT_SET}. "
        "422 `unknown_prompt_set` if no such set is visible to this key.",
    )
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


class RegisteredSetOut(BaseModel):
    """A policy set or a prompt set: a version registered by content."""

    id: UUID
    name: str
    version: str
    description: str
    builtin: bool
    created_at: datetime


class PolicySetOut(RegisteredSetOut):
    pass


class PolicySetDetailOut(PolicySetOut):
    policies: list[dict[str, Any]]


class PromptSetOut(RegisteredSetOut):
    pass


class PromptSetDetailOut(PromptSetOut):
    templates: dict[str, str] = Field(description="Every template by name (see the README's Prompt sets).")


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


SetName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
SetDescription = Annotated[str, Field(max_length=5000)]


class PolicySetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: SetName
    description: SetDescription = ""
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


class PromptSetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: SetName
    description: SetDescription = ""
    templates: dict[TemplateName, TemplateText] = Field(
        max_length=MAX_TEMPLATES,
        description="Every template the stages use, by name (the built-in set's names: GET "
        "/v1/prompt-sets/{id}), as text with $placeholders; with `base`, only those that differ "
        "from it. 422 `invalid_prompt_set` for a template missing or unknown, a placeholder "
        "unknown or missing, bad $ syntax, or templates too long for every endpoint's context.",
    )
    base: PromptSetRef | None = Field(
        default=None,
        description="A set visible to this key (e.g. the built-in `aidsafe-default`) whose templates "
        "fill in those not given. The result is stored whole: later changes to the base never "
        "change this version.",
    )


class SetBrief(BaseModel):
    id: UUID
    name: str
    version: str


class PolicySetBrief(SetBrief):
    pass


class PromptSetBrief(SetBrief):
    pass


class RegisteredPromptSetOut(PromptSetDetailOut):
    base: PromptSetBrief | None = Field(description="The set the missing templates were taken from.")
    inherited: list[str] = Field(description="The templates taken from `base`, by name.")


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
        description="At the prices pinned in the job when it was submitted. A job's is null when "
        "an endpoint the job uses has no price (unknown, not free); an item's only when one of "
        "its own calls went to such an endpoint."
    )


class BudgetOut(BaseModel):
    max_cost_usd: float | None
    max_tokens: int | None
    spent_cost_usd: float | None = Field(description="Recorded calls so far; null if unpriced.")
    spent_tokens: int
    exhausted: bool = Field(description="No new call starts; items wait as `budget_exhausted`.")


class IntervalOut(BaseModel):
    """A measured share or mean with its 95 % interval (Wilson for shares, Student t for
    means); all null but `n` when nothing was measured, the bounds null when one value was."""

    value: float | None
    low: float | None
    high: float | None
    n: int = Field(description="What it was measured on.")

    @classmethod
    def of(cls, estimate: Estimate) -> IntervalOut:
        return cls(value=estimate.value, low=estimate.low, high=estimate.high, n=estimate.n)


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
    """Ear-whisperer preference pairs: one attempt per completed item, kept at the job's min_gap."""

    attempted: int
    kept: int
    not_kept: dict[str, int] = Field(
        description="Attempts not kept, by reason (`gap_below_threshold`: a pair under `min_gap`)."
    )
    mean_gap: float | None = Field(description="Mean policy-faithfulness gap of the kept pairs.")
    min_gap: float = Field(description="The job's `pairs.min_gap`, the pairs are kept at.")


class GapDistribution(BaseModel):
    mean: IntervalOut = Field(description="Mean gap with its Student t interval, over the graded candidates.")
    bins: dict[str, int] = Field(
        description='Graded candidates per gap, "-4.0" to "4.0" by 0.5 (every gap integer scores give).'
    )


class CandidateStats(BaseModel):
    """One sampling method's rejected sides (candidates) the guard was asked about."""

    candidates: int
    judged: int = Field(description="Candidates the guard gave a readable verdict on.")
    flagged: IntervalOut = Field(description="Share of the judged ones the guard flagged (Wilson interval).")
    gap: GapDistribution = Field(description="Chosen minus rejected policy faithfulness, every graded one.")
    flagged_gap: GapDistribution = Field(description="The same over the flagged ones: pairs' rejected sides.")


class PairReport(PairSummary):
    candidates: dict[str, CandidateStats] = Field(
        description="Per sampling method: `whisper`, and `standard` when the job asked for the baseline. "
        "Jobs finished before candidates were recorded have none."
    )


class BatchOut(BaseModel):
    """One provider batch of a wave."""

    endpoint: str
    status: Literal["preparing", "uploaded", "submitted", "collected", "refused", "cancelled", "lost"] = (
        Field(
            description="Ours: its requests chosen, its input file uploaded, the batch created (and polled), "
            "its answers collected; or refused by the provider, cancelled with the job, or lost (the "
            "provider no longer knew it: its requests went back as an expired batch's unanswered ones do)."
        )
    )
    provider_status: str | None = Field(
        description="The provider's: validating, in_progress, finalizing, completed, failed, expired, "
        "cancelling, cancelled; null before it was created."
    )
    requests: int
    request_counts: dict[str, int] | None = Field(description="The provider's: total, completed, failed.")


class BatchSavingOut(BaseModel):
    """What batch delivery saved on the job's calls so far."""

    cost_usd: float = Field(
        description="What the calls cost (at the batch price; those sent online at theirs)."
    )
    online_cost_usd: float = Field(description="What the same tokens would have cost online.")
    saving_usd: float = Field(description="online_cost_usd - cost_usd.")


class BatchProgressOut(BaseModel):
    """A batch job's waves: the current one's batches, the job's requests by status, its saving."""

    wave: int = Field(description="The current wave (1, 2, ...); 0 before the first is sent.")
    batches: list[BatchOut]
    requests: dict[str, int] = Field(
        description="The job's batch requests by status: pending (waiting for the next wave), submitted, "
        "answered, rejected (the provider refused it), failed (unanswered in every batch), online "
        "(unanswered by its batch and sent online, as the job's `batch.unanswered` says)."
    )
    saving: BatchSavingOut | None = Field(
        description="null unless every endpoint the job uses has both an online and a batch price."
    )


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
    prompt_set: PromptSetBrief | None = Field(
        description="The templates that word the job's requests; null for jobs submitted before jobs "
        "pinned one (they run the built-in set)."
    )
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
    batch: BatchProgressOut | None = Field(
        default=None, description="A batch job's waves (`delivery: batch`); null for online jobs."
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
    batch: BatchProgressOut | None = Field(
        default=None, description="A batch job's waves (`delivery: batch`); absent for online jobs."
    )


class ItemFinishedOut(BaseModel):
    """The data of an `item` event: an item of the job ended, or stopped to wait for budget
    (`budget_exhausted`: it resumes when the budget is raised) or for its batch's answers
    (`awaiting_batch`: once per wave, for a batch job)."""

    item_id: UUID
    position: int
    status: Literal["completed", "failed", "cancelled", "budget_exhausted", "awaiting_batch"]
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
    pairs: PairReport | None = Field(default=None, description="Present when the job asked for pairs.")
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
    prompt_set: PromptSetBrief | None = Field(
        description="The templates that worded its requests; null for CoTs written before they were recorded."
    )
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
    # Verdicts stored before classifiers read logprobs have none: the defaults are theirs.
    unsafe_probability: float | None = Field(
        default=None,
        description="`llama_guard` and `shieldgemma` guards whose endpoint sent logprobs: the "
        "probability of the violating answer, against the job's threshold. Null otherwise.",
    )
    decided_by: Literal["text", "logprobs"] = Field(
        default="text", description="Whether the probability or the guard's text answer decided `unsafe`."
    )
    logprobs_missing: str | None = Field(
        default=None,
        description="Why a classifier's text decided though logprobs were asked for (the endpoint "
        "sent none, or none of the answer's likeliest first tokens began either answer).",
    )


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


class PairTryOut(BaseModel):
    number: int
    method: Literal["whisper", "standard"] = Field(
        description="`whisper`: written under the whisperer's belief. `standard`: sampled without it "
        "(the baseline)."
    )
    belief: str | None = Field(description="Null when redacted, and for standard sampling.")
    refused: bool = Field(description="The generator refused (to follow the belief).")
    rejected: SampleOut | None = Field(description="Null when redacted or refused.")
    refusal: str | None = Field(description="The generator's refusal; null when redacted.")
    guard: GuardOut | None = Field(description="Null when there was nothing to judge.")
    gap: float | None = Field(
        description="Chosen minus this rejected side's policy faithfulness; null when a side was not graded."
    )


class PreferencePairOut(BaseModel):
    item_id: UUID
    position: int
    prompt: str
    kept: bool = Field(description="A pair was made and its gap is at least `min_gap` (asked, or the job's).")
    reason: str | None = Field(
        description="Why the pair was not kept (`gap_below_threshold`: made, under `min_gap`); null if kept."
    )
    gap: float | None = Field(description="Chosen minus rejected policy faithfulness.")
    chosen: ChosenOut
    rejected: RejectedOut
    tries: list[PairTryOut] = Field(description="The whisperer's, then standard sampling's (the baseline).")
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
    kind: JobKind = Field(
        description="The job's kind: `aidsafe`, `zero_shot`, `comparison`, `sample_evaluation` or "
        "`model_evaluation`."
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


MAX_JUDGES = 5


class ComparisonIn(Labelled, OnlineOnly):
    model_config = ConfigDict(extra="forbid")
    baseline_job_id: UUID
    candidate_job_id: UUID
    judges: list[RoleIn | None] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_JUDGES,
        description="The judges, each a role (temperature defaults to 0; null or {}: the server's "
        "default model). Each judges every prompt; the report gives each judge's results and "
        "their agreement. Default: one judge of the server's default model.",
    )
    judge: RoleIn | None = Field(default=None, description="One judge: the same as `judges: [judge]`.")
    allow_mismatch: bool = Field(
        default=False,
        description="Compare jobs that differ in their policy set or their grader anyway (422 "
        "`comparison_mismatch` otherwise); the comparison records what differs.",
    )
    callback_url: CallbackUrl = None

    @model_validator(mode="after")
    def _two_jobs(self) -> ComparisonIn:
        if self.baseline_job_id == self.candidate_job_id:
            raise ValueError("a job cannot be compared with itself: name two different jobs")
        if self.judge is not None and self.judges is not None:
            raise ValueError("give 'judges' or 'judge', not both")
        return self

    def judge_roles(self) -> list[RoleIn | None]:
        return self.judges or [self.judge]


# --- model evaluations ----------------------------------------------------------------------

MAX_BENCHMARKS = 20
MAX_TARGETS = 8
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=LABEL_PATTERN)]
Expected = Literal["refuse", "comply"]


class BenchmarkPromptIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: PromptText
    expected: Expected = Field(
        description="What a safe model does: `refuse` a harmful prompt, `comply` with a benign one."
    )
    category: Name = Field(description="The report counts each category apart, and all together.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Kept with the prompt's items.")


class BenchmarkFileIn(BaseModel):
    """A benchmark file's text: JSONL (an object per line) or CSV (a header line, then a row
    per prompt), with the fields prompt, expected and category; other fields are metadata."""

    model_config = ConfigDict(extra="forbid")
    format: BenchmarkFormat
    content: str


class BenchmarkIn(BaseModel):
    """Give either `prompts` or `file`. A row that is not valid fails the whole request (422,
    naming its line and field): nothing is imported."""

    model_config = ConfigDict(extra="forbid")
    name: Name
    prompts: list[BenchmarkPromptIn] | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPTS_PER_JOB
    )
    file: BenchmarkFileIn | None = None
    _rows: list[BenchmarkPromptIn] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _one_source_of_prompts(self) -> BenchmarkIn:
        if (self.prompts is None) == (self.file is None):
            raise ValueError("give exactly one of 'prompts' or 'file'")
        self._rows = self.prompts or []
        return self

    def read_file(self, max_rows: int) -> None:
        """Read the benchmark's file, if it has one, refusing its first row past `max_rows`:
        ValueError naming the line (and field) of a row that cannot be one."""
        if self.file is not None:
            self._rows = _file_rows(self.file, max_rows)

    def rows(self) -> list[BenchmarkPromptIn]:
        """The benchmark's prompts, as given or as read from its file (by the evaluation)."""
        return self._rows


def _file_rows(file: BenchmarkFileIn, max_rows: int) -> list[BenchmarkPromptIn]:
    try:
        rows = read_rows(file.format, file.content, max_rows, MAX_LINE_VALUES)
    except TooManyValues as exc:  # a size cap, as an uploaded file's (not a ValueError: 413)
        raise PayloadTooLarge(f"file: {exc}") from None
    except TooManyRows as exc:
        raise ValueError(
            f"file: line {exc.line}: prompts times targets passes {MAX_PROMPTS_PER_JOB:,} items, a job's most"
        ) from None
    except BadRow as exc:
        raise ValueError(f"file: {exc}") from None
    read = []
    for number, fields in rows:
        try:
            read.append(BenchmarkPromptIn.model_validate(fields))
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in error["loc"]) or "row"
            raise ValueError(f"file: line {number}: {field}: {error['msg']}") from None
    return read


class ModelEvaluationIn(Labelled, OnlineOnly):
    model_config = ConfigDict(extra="forbid")
    benchmarks: list[BenchmarkIn] = Field(min_length=1, max_length=MAX_BENCHMARKS)
    targets: list[TargetIn] = Field(
        min_length=1,
        max_length=MAX_TARGETS,
        description="The models under test, the report's columns: e.g. a base model and its fine-tune.",
    )
    safety_judge: GuardIn | None = Field(
        default=None, description="Classifies each answer safe or unsafe. Temperature defaults to 0."
    )
    refusal_judge: RoleIn | None = Field(
        default=None, description="Classifies each answer refused or complied. Temperature defaults to 0."
    )
    policy_set: PolicySetRef = Field(
        default_factory=PolicySetRef, description=f"The policies the judges are shown; {LEFT_OUT_SET}."
    )
    prompt_set: PromptSetRef | None = Field(
        default=None,
        exclude_if=lambda ref: ref is None,  # a body without it hashes as it did before
        description=f"The templates that word the judges' requests (`GET /v1/prompt-sets`); "
        f"{LEFT_OUT_SET}. The targets get nothing of ours but their own system prompt.",
    )
    max_tokens: CallTokens | None = Field(
        default=None, description="Per call: the targets' answers and the judges' verdicts."
    )
    callback_url: CallbackUrl = None

    @model_validator(mode="after")
    def _fits_a_job(self) -> ModelEvaluationIn:
        names = [benchmark.name for benchmark in self.benchmarks]
        if len(set(names)) < len(names):
            raise ValueError(f"benchmark '{max(names, key=names.count)}' is given twice")
        # Files are read here, in order, each no further than the job has room for: read as
        # each benchmark was validated, twenty files of 10,000 rows were all read (over a
        # second of CPU, holding the GIL) before their total was refused.
        targets = len(self.targets)
        room = MAX_PROMPTS_PER_JOB // targets  # prompts times targets is at most the cap
        prompts = 0
        for number, benchmark in enumerate(self.benchmarks):
            try:
                benchmark.read_file(room - prompts)
            except ValueError as exc:
                raise _at(("benchmarks", number), benchmark, exc) from None
            prompts += len(benchmark.rows())
            if prompts > room:
                raise ValueError(
                    f"prompts times targets makes {prompts * targets:,} items up to benchmark "
                    f"'{benchmark.name}'; a job has at most {MAX_PROMPTS_PER_JOB:,}"
                )
        return self


def _at(loc: tuple[str | int, ...], input: Any, problem: ValueError) -> ValidationError:
    """`problem` as pydantic reports it at `loc` (a model validator's own errors have none):
    raised in a validator, it is placed under the model's location."""
    details = InitErrorDetails(type="value_error", loc=loc, input=input, ctx={"error": problem})
    return ValidationError.from_exception_data(ModelEvaluationIn.__name__, [details])


class RateOut(BaseModel):
    """A share with its Wilson 95 % interval; value, low and high are null when n is 0."""

    value: float | None
    low: float | None
    high: float | None
    count: int = Field(description="Answers counted in the share.")
    n: int = Field(description="Answers with a readable verdict (the denominator).")


class ModelReportRow(BaseModel):
    """One row of the side-by-side table: a metric on a benchmark (one category, or all)."""

    benchmark: str
    category: str | None = Field(description="null: every category of the benchmark.")
    expected: Expected = Field(description="The prompts the metric counts.")
    metric: Literal["safe_response_rate", "refusal_rate", "compliance_rate", "over_refusal_rate"] = Field(
        description="On `refuse` prompts: `safe_response_rate` (the safety judge found the answer "
        "safe), `refusal_rate` (the refusal judge found it refused). On `comply` prompts: "
        "`compliance_rate` and `over_refusal_rate` (1 - compliance)."
    )
    models: dict[str, RateOut] = Field(description="By target name, in the targets' order.")


class TargetCountsOut(BaseModel):
    items: int
    completed: int
    failed: int
    safety_unreadable: int = Field(
        description="Completed answers the safety judge gave no readable verdict on."
    )
    refusal_unreadable: int = Field(
        description="Completed answers the refusal judge gave no readable verdict on."
    )
    truncated: int = Field(description="Answers the server cut at max_tokens (judged as they are).")


class ModelEvaluationOut(BaseModel):
    id: UUID
    status: JobStatus
    created_at: datetime
    label: str | None
    metadata: dict[str, Any]
    targets: list[dict[str, Any]] = Field(description="The models under test, as resolved.")
    safety_judge: dict[str, Any]
    refusal_judge: dict[str, Any]
    policy_set: PolicySetBrief
    prompt_set: PromptSetBrief | None = Field(
        description="The templates that worded its requests; null for one from before evaluations pinned "
        "a set (the built-in wording of its time)."
    )
    counts: JobCounts
    by_target: dict[str, TargetCountsOut] = Field(description="Per target name.")
    table: list[ModelReportRow] = Field(
        description="Rows: benchmark, category and metric; columns: the targets (the paper's Table 2 shape)."
    )
    usage: Usage


class MetricComparison(BaseModel):
    baseline: IntervalOut = Field(description="The mean over the baseline's graded samples.")
    candidate: IntervalOut = Field(description="The mean over the candidate's graded samples.")
    delta: IntervalOut = Field(
        description="The mean of candidate minus baseline over the prompts both sides have a score "
        "for (a paired difference), with its interval."
    )


class JudgeResults(BaseModel):
    """One judge's verdicts, from the candidate's side. A sample wins only when the judge
    prefers it in both orders; a split is a tie. Shares are of the readable verdicts."""

    judge: dict[str, Any] = Field(description="The judge's role: endpoint, model, temperature, instructions.")
    wins: int
    ties: int
    losses: int
    unreadable: int = Field(description="No readable verdict in both orders.")
    win_rate: IntervalOut
    tie_rate: IntervalOut
    loss_rate: IntervalOut


class JudgeAgreement(BaseModel):
    """How far the judges agree, over the prompts every one of them gave a readable verdict."""

    judges: int
    items: int = Field(description="Prompts every judge gave a readable verdict on.")
    unanimous: IntervalOut = Field(
        description="The share of them on which every judge gave the same verdict."
    )
    kappa: float | None = Field(
        description="Agreement beyond chance: 1 full, 0 as by chance, below 0 worse. Null when chance "
        "agreement is certain (every judge gave one same verdict throughout) or nothing was judged."
    )
    kappa_kind: Literal["cohen", "fleiss"] = Field(description="Cohen's for two judges, Fleiss' for more.")


class ComparisonOut(BaseModel):
    id: UUID
    status: JobStatus
    created_at: datetime
    label: str | None
    metadata: dict[str, Any]
    baseline_job_id: UUID
    candidate_job_id: UUID
    mismatches: list[str] = Field(
        description="What differs between the two jobs, compared anyway (`allow_mismatch`): "
        "`policy_set`, `grader`. Empty for comparable jobs."
    )
    prompts: int = Field(description="Prompts both jobs completed: the items compared.")
    counts: JobCounts
    metrics: dict[str, MetricComparison] = Field(
        description="Per metric, the grader's mean on each side over the compared prompts, and the "
        "candidate's lead. Empty when neither job was graded."
    )
    judges: list[JudgeResults] = Field(description="Each judge's results, in the order they were given.")
    agreement: JudgeAgreement | None = Field(description="Null with one judge.")
    usage: Usage = Field(description="The judges' calls (the compared jobs' own are theirs).")


class JobDeletionOut(BaseModel):
    """The trace of a deleted job: who deleted it, when, and the rows deleted per table."""

    id: int = Field(
        validation_alias="number",
        description="This key's deletions are numbered 1, 2, 3, …; pass as `before_id` to read older ones.",
    )
    job_id: UUID
    mode: str = Field(description="The job's mode (`comparison` for a comparison).")
    deleted_by_key_id: UUID
    deleted_at: datetime
    row_counts: dict[str, int] = Field(description="Rows deleted per table, the job's row included.")


class CallbackSecretOut(BaseModel):
    callback_secret: str | None = Field(
        description="The key of the HMAC-SHA256 signature on the job's callback deliveries (see "
        "the README's Callbacks), shown only in the answer to the submission (and to its "
        "replays). Null when the job names no callback, or (in a replay) once its delivery is over: "
        "the secret is then erased."
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


class AgainstIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: UUID = Field(
        description="Another sample evaluation, or a generation job, of this key: its sample of each "
        "prompt (exact text) is the other side. 422 `no_common_prompts` if it has none of the prompts."
    )
    judge: RoleIn | None = Field(default=None, description="Temperature defaults to 0.")


MAX_COLUMN_NAME_CHARS = 200


def _mapping(columns: dict[str, str]) -> dict[str, str]:
    if unknown := [name for name in columns if not is_mapping_field(name)]:
        raise ValueError(
            f"unknown field {', '.join(repr(shown_name(name)) for name in unknown)}: "
            f"map {', '.join(FIELDS)} or metadata.<name>"
        )
    # A metadata name is a key of every sample's metadata: one of megabytes was copied into
    # each of 10,000 items, hundreds of GB of rows from one body.
    if long := [name for name in columns if len(name) > len(METADATA) + MAX_COLUMN_NAME_CHARS]:
        raise ValueError(
            f"{shown_name(long[0])!r}: a metadata name has at most {MAX_COLUMN_NAME_CHARS} characters"
        )
    return columns


ColumnName = Annotated[str, Field(min_length=1, max_length=MAX_COLUMN_NAME_CHARS)]


class SampleEvaluationOptions(Labelled, OnlineOnly):
    """What to run on the samples (at least one of grade, guard, judge), and how to read them."""

    model_config = ConfigDict(extra="forbid")
    format: Format = Field(
        default="generic",
        description="The column shape: "
        + "; ".join(f"`{name}`: {shape.description}" for name, shape in SHAPES.items())
        + ".",
    )
    columns: Annotated[dict[str, ColumnName], AfterValidator(_mapping)] = Field(
        default_factory=dict,
        max_length=50,
        description="Field to column, over the format's: `prompt`, `thoughts`, `response`, `label`, or "
        "`metadata.<name>` (copied into the item's metadata). A column named here must be present.",
    )
    grade: RoleIn | None = Field(
        default=None, description="Score every sample on the six metrics ({} for the defaults)."
    )
    guard: GuardIn | None = Field(default=None, description="The guard's verdict on every sample.")
    judge: AgainstIn | None = Field(
        default=None, description="Pairwise judgement against another set's sample of the same prompt."
    )
    policy_set: PolicySetRef = Field(
        default_factory=PolicySetRef,
        description=f"The policies the grader, guard and judge are shown; {LEFT_OUT_SET}.",
    )
    prompt_set: PromptSetRef | None = Field(
        default=None,
        exclude_if=lambda ref: ref is None,  # a body without it hashes as it did before
        description="The templates that word the grader's, guard's and judge's requests "
        f"(`GET /v1/prompt-sets`); {LEFT_OUT_SET}.",
    )
    callback_url: CallbackUrl = None


class SampleEvaluationIn(SampleEvaluationOptions):
    samples: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_SAMPLES,
        description="The samples, each an object read as a row of a JSONL file (`format`, `columns`).",
    )


class MetricReport(BaseModel):
    mean: IntervalOut = Field(description="Mean score with its Student t interval.")
    distribution: dict[str, int] = Field(description='Samples per score, "1" to "5".')


class GradeReport(BaseModel):
    graded: int
    grade_failed: int = Field(description="Samples the grader gave no usable scores for.")
    metrics: dict[str, MetricReport]


class GuardRate(BaseModel):
    unsafe: int
    safe: int
    unreadable: int = Field(description="The guard's output could not be read.")
    unsafe_rate: IntervalOut = Field(description="unsafe / (unsafe + safe), with its Wilson interval.")


class GuardReport(GuardRate):
    by_label: dict[str, GuardRate] = Field(
        description="The same per sample label (e.g. `safe` / `unsafe` of a safety set); unlabelled "
        "samples under `(none)`."
    )


class PairwiseReport(BaseModel):
    """The judge's verdicts, from this set's side: a sample wins only when the judge prefers
    it in both orders; a split is a tie. Rates are over the decided (wins + ties + losses),
    with Wilson intervals."""

    against_job_id: UUID
    wins: int
    ties: int
    losses: int
    unreadable: int = Field(description="No readable verdict in both orders.")
    unmatched: int = Field(description="Samples whose prompt the other set lacks: not judged.")
    win_rate: IntervalOut
    tie_rate: IntervalOut
    loss_rate: IntervalOut


class SampleEvaluationOut(BaseModel):
    id: UUID
    status: JobStatus
    created_at: datetime
    label: str | None
    metadata: dict[str, Any]
    policy_set: PolicySetBrief
    prompt_set: PromptSetBrief | None = Field(
        description="The templates that worded its requests; null for one from before evaluations pinned "
        "a set (the built-in wording of its time)."
    )
    config: dict[str, Any]
    samples: int
    counts: JobCounts
    usage: Usage
    grades: GradeReport | None = Field(description="Present when grading was asked for.")
    guard: GuardReport | None = Field(description="Present when the guard was asked for.")
    pairwise: PairwiseReport | None = Field(description="Present when the judge was asked for.")


class SubmittedSampleEvaluationOut(SampleEvaluationOut, CallbackSecretOut):
    pass


class VoteOut(BaseModel):
    order: Literal["ab", "ba"] = Field(description="ab: the other set's sample was shown first.")
    choice: Literal["a", "b", "tie"] | None = Field(description="a: the other set's, b: this sample.")
    rationale: str


class JudgementOut(BaseModel):
    against_item_id: UUID = Field(description="The other set's item of the same prompt.")
    outcome: Literal["win", "tie", "loss"] | None = Field(description="This sample's; null: unreadable.")
    votes: list[VoteOut]


class SampleResultOut(BaseModel):
    item_id: UUID
    position: int
    prompt: str
    thoughts: list[str]
    response: str
    label: str | None
    metadata: dict[str, Any]
    status: ItemStatus
    error_code: str | None
    error_message: str | None
    scores: Scores | None = Field(description="The grader's; null when not graded.")
    grade_error: str | None
    guard: GuardOut | None = Field(description="Null when not asked for (or not yet run).")
    judgement: JudgementOut | None = Field(description="Null when not judged.")


class SampleResultPage(BaseModel):
    data: list[SampleResultOut]
    next_cursor: str | None


class SubmittedModelEvaluationOut(ModelEvaluationOut, CallbackSecretOut):
    pass
