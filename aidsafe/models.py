"""What the API answers, as the client reads it.

These mirror the response schemas in app/api/schemas.py (a test compares them with the
OpenAPI document). They are the client's own: the server's schemas import the store and
the job plan, which a notebook should not need. Fields the server adds later are kept
(`extra="allow"`), and statuses are plain strings, so an older client reads a newer API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

# Item statuses after which nothing changes (the store's FINISHED).
FINISHED_ITEM_STATUSES = ("completed", "failed", "cancelled")
# Job statuses after which nothing changes.
FINISHED_JOB_STATUSES = ("completed", "cancelled")
# A job's, and an item's, status while the job's budget is spent.
WAITING_FOR_BUDGET = "budget_exhausted"


class Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Page(Model, Generic[T]):
    """One page of a listing; pass `next_cursor` back as `cursor` for the next (None: the last)."""

    data: list[T]
    next_cursor: str | None


class PolicySetBrief(Model):
    id: UUID
    name: str
    version: str


class PromptSetBrief(Model):
    id: UUID
    name: str
    version: str


class JobCounts(Model):
    total: int
    by_status: dict[str, int]
    by_stage: dict[str, dict[str, int]]

    @property
    def finished(self) -> int:
        """Items that will not change any more."""
        return sum(self.by_status.get(status, 0) for status in FINISHED_ITEM_STATUSES)


class StatusCounts(Model):
    total: int
    by_status: dict[str, int]

    @property
    def finished(self) -> int:
        return sum(self.by_status.get(status, 0) for status in FINISHED_ITEM_STATUSES)


class Usage(Model):
    llm_calls: int
    prompt_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens
    completion_tokens: int
    cost_usd: float | None = None  # None: an endpoint is unpriced (unknown, not free)


class Budget(Model):
    """A job's budget and what its recorded calls spent of it."""

    max_cost_usd: float | None
    max_tokens: int | None
    spent_cost_usd: float | None
    spent_tokens: int
    exhausted: bool


class MetricStats(Model):
    mean: float
    distribution: dict[str, int]


class QualitySummary(Model):
    graded: int
    grade_failed: int
    accepted: int
    rejected: int
    metrics: dict[str, MetricStats]


class PairSummary(Model):
    """Pair attempts, kept at the job's `min_gap` (None from servers older than the field)."""

    attempted: int
    kept: int
    not_kept: dict[str, int]
    mean_gap: float | None
    min_gap: float | None = None


class GapDistribution(Model):
    mean: Interval  # Student t interval
    bins: dict[str, int]  # graded candidates per gap, "-4.0" to "4.0" by 0.5


class CandidateStats(Model):
    """One sampling method's rejected sides the guard was asked about."""

    candidates: int
    judged: int  # with a readable verdict
    flagged: Interval  # share of the judged ones the guard flagged (Wilson interval)
    gap: GapDistribution  # every graded candidate
    flagged_gap: GapDistribution  # the flagged ones: pairs' rejected sides


class PairReport(PairSummary):
    # "whisper", and "standard" when the job asked for the baseline
    candidates: dict[str, CandidateStats] = {}


class DuplicateGroup(Model):
    first: int  # position of the first occurrence
    repeats: list[int]  # positions that repeat it


class DuplicateKind(Model):
    count: int
    groups: list[DuplicateGroup]


class Duplicates(Model):
    """Duplicate prompts found at submission (see the README's Duplicate prompts)."""

    handling: str  # the job's `duplicates` option: "keep" or "skip"
    submitted: int
    exact: DuplicateKind
    normalised: DuplicateKind
    skipped: list[int]  # positions no item was made for


class Batch(Model):
    """One provider batch of a batch job's wave."""

    endpoint: str
    status: str  # ours: preparing, uploaded, submitted, collected, refused, cancelled, lost
    provider_status: str | None
    requests: int
    request_counts: dict[str, int] | None


class BatchSaving(Model):
    """What batch delivery saved on a job's calls so far."""

    cost_usd: float
    online_cost_usd: float  # the same tokens at the online price
    saving_usd: float


class BatchProgress(Model):
    """A batch job's waves: the current one's batches, its requests by status, its saving."""

    wave: int
    batches: list[Batch]
    requests: dict[str, int]
    saving: BatchSaving | None = None  # None: an endpoint lacks an online or a batch price


class JobProgress(Model):
    """A job's progress: what `snapshot` and `done` events carry, and part of every Job."""

    status: str
    counts: JobCounts
    usage: Usage
    budget: Budget | None = None
    refusals_by_stage: dict[str, dict[str, int]] = {}  # stage -> model -> refused turns
    quality: QualitySummary | None = None
    pairs: PairSummary | None = None
    batch: BatchProgress | None = None  # only for jobs with `delivery: batch`

    @property
    def refusals(self) -> int:
        """Refused turns in all, those the fallback answered included."""
        return sum(sum(by_model.values()) for by_model in self.refusals_by_stage.values())

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_JOB_STATUSES

    @property
    def waiting_for_budget(self) -> bool:
        """Its budget is spent: nothing moves until it is raised (Client.update_job)."""
        return self.status == WAITING_FOR_BUDGET


class Job(JobProgress):
    id: UUID
    created_at: datetime
    cancelled_at: datetime | None
    label: str | None
    metadata: dict[str, Any]
    policy_set: PolicySetBrief
    prompt_set: PromptSetBrief | None = None  # None: a job from before jobs pinned one (built-in)
    config: dict[str, Any]
    duplicates: Duplicates | None = None  # None for comparisons and jobs from before the report


class SubmittedJob(Job):
    callback_secret: str | None = Field(description="Shown only in the answer to the submission.")
    replayed: bool = Field(
        default=False,
        description="Client-side: your Idempotency-Key named a job of an earlier call (HTTP 200, not 202).",
    )


class JobListed(Model):
    id: UUID
    kind: str
    status: str
    created_at: datetime
    cancelled_at: datetime | None
    label: str | None
    metadata: dict[str, Any]
    counts: StatusCounts
    cost_usd: float | None = None


class ItemFinished(Model):
    """What an `item` event carries: an item of the job ended."""

    item_id: UUID
    position: int
    status: str
    error_code: str | None


class Item(Model):
    id: UUID
    job_id: UUID
    position: int
    prompt: str
    metadata: dict[str, Any]
    status: str
    stage: str
    attempts: int
    error_code: str | None
    error_message: str | None
    created_at: datetime
    finished_at: datetime | None


class Turn(Model):
    stage: str
    round: int
    agent: int
    attempt: int
    role: str
    endpoint: str
    model: str
    outcome: str
    error: str | None
    agreed: bool | None
    raw_output: str
    parsed: dict[str, Any] | None
    prompt_tokens: int
    cached_prompt_tokens: int = 0
    completion_tokens: int
    cost_usd: float | None = None
    latency_ms: float
    request_hash: str
    created_at: datetime
    redacted: bool = False


class Thought(Model):
    id: int
    text: str
    stage: str
    round: int
    agent: int


class RefinedThought(Model):
    text: str
    sources: list[int]


class DroppedThought(Model):
    id: int
    text: str
    reason: str
    explanation: str


class Fallback(Model):
    """A stage whose agent refused and the job's fallback answered."""

    stage: str
    round: int
    agent: int
    model: str


class Score(Model):
    score: int
    rationale: str | None


class Gate(Model):
    accepted: bool | None
    reasons: list[str]


class Cot(Model):
    item_id: UUID
    position: int
    prompt: str
    intents: dict[str, list[str]]
    refined_thoughts: list[RefinedThought]
    response: str
    dropped_thoughts: list[DroppedThought]
    unaccounted_thought_ids: list[int]
    thoughts: list[Thought]
    rounds_used: int
    agreed: bool
    agreed_by: dict[str, int] | None
    policy_set: PolicySetBrief
    prompt_set: PromptSetBrief | None = None  # None: a CoT from before they were recorded
    scores: dict[str, Score] | None
    grade_error: str | None
    quality: Gate
    fallbacks: list[Fallback] = []
    created_at: datetime


class ItemDetail(Item):
    cot: Cot | None
    turns: list[Turn]
    usage: Usage | None = None


class PreferencePair(Model):
    """An ear-whisperer pair attempt. `chosen`, `rejected` and `tries` are kept as the API
    sends them (see the README's "Preference pairs"); hazardous text is null without the
    `hazardous:read` scope."""

    item_id: UUID
    position: int
    prompt: str
    kept: bool
    reason: str | None
    gap: float | None
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    tries: list[dict[str, Any]]
    redacted: bool


class QualityReport(QualitySummary):
    thresholds: dict[str, float]
    below_threshold: dict[str, int]


class Report(Model):
    job_id: UUID
    status: str
    counts: JobCounts
    quality: QualityReport | None = None
    pairs: PairReport | None = None
    usage: Usage
    usage_by_stage: dict[str, Usage]
    refusals_by_stage: dict[str, dict[str, int]] = {}  # stage -> model -> refused turns
    budget: Budget | None = None


class Interval(Model):
    """A share or a mean with its 95 % interval; all None but `n` when nothing was measured."""

    value: float | None
    low: float | None
    high: float | None
    n: int


class MetricComparison(Model):
    baseline: Interval
    candidate: Interval
    delta: Interval  # the paired mean of candidate minus baseline


class JudgeResults(Model):
    judge: dict[str, Any]
    wins: int
    ties: int
    losses: int
    unreadable: int
    win_rate: Interval
    tie_rate: Interval
    loss_rate: Interval


class JudgeAgreement(Model):
    judges: int
    items: int
    unanimous: Interval
    kappa: float | None
    kappa_kind: str  # "cohen" | "fleiss"


class Comparison(Model):
    id: UUID
    status: str
    created_at: datetime
    label: str | None
    metadata: dict[str, Any]
    baseline_job_id: UUID
    candidate_job_id: UUID
    mismatches: list[str] = []
    prompts: int
    counts: JobCounts
    metrics: dict[str, MetricComparison]
    judges: list[JudgeResults]
    agreement: JudgeAgreement | None = None
    usage: Usage


class SubmittedComparison(Comparison):
    callback_secret: str | None
    replayed: bool = Field(default=False, description="Client-side: see SubmittedJob.replayed.")


class Rate(Model):
    """A share with its Wilson 95 % interval; value, low and high are None when n is 0."""

    value: float | None
    low: float | None
    high: float | None
    count: int
    n: int


class ModelReportRow(Model):
    """One row of a model evaluation's table: a metric on a benchmark, for one category or
    all (category None), with a Rate per model under test."""

    benchmark: str
    category: str | None
    expected: str
    metric: str
    models: dict[str, Rate]


class TargetCounts(Model):
    items: int
    completed: int
    failed: int
    safety_unreadable: int
    refusal_unreadable: int
    truncated: int


class ModelEvaluation(Model):
    id: UUID
    status: str
    created_at: datetime
    label: str | None
    metadata: dict[str, Any]
    targets: list[dict[str, Any]]
    safety_judge: dict[str, Any]
    refusal_judge: dict[str, Any]
    policy_set: PolicySetBrief
    prompt_set: PromptSetBrief | None = None  # None: from before evaluations pinned one (built-in)
    counts: JobCounts
    by_target: dict[str, TargetCounts]
    table: list[ModelReportRow]
    usage: Usage

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_JOB_STATUSES


class SubmittedModelEvaluation(ModelEvaluation):
    callback_secret: str | None
    replayed: bool = Field(default=False, description="Client-side: see SubmittedJob.replayed.")


class ComparisonListed(Model):
    id: UUID
    status: str
    created_at: datetime
    cancelled_at: datetime | None
    label: str | None
    metadata: dict[str, Any]
    baseline_job_id: UUID
    candidate_job_id: UUID
    counts: StatusCounts
    cost_usd: float | None = None


class CountRange(Model):
    min: int
    max: int


class CostRange(Model):
    min: float
    max: float


class Estimate(Model):
    """What a job would use (Client.estimate): a range, usually above real use."""

    items: int
    calls: CountRange
    prompt_tokens: CountRange
    completion_tokens: CountRange
    cost_usd: CostRange | None
    unpriced_endpoints: list[str]
    prices: dict[str, dict[str, float | None]]


class Deletion(Model):
    id: int
    job_id: UUID
    mode: str
    deleted_by_key_id: UUID
    deleted_at: datetime
    row_counts: dict[str, int]


class PolicySet(Model):
    id: UUID
    name: str
    version: str
    description: str
    builtin: bool
    created_at: datetime


class PolicySetDetail(PolicySet):
    policies: list[dict[str, Any]]


class Preset(Model):
    """A named job config of the server's; `config` holds the fields it sets."""

    name: str
    version: str
    description: str
    notes: str
    config: dict[str, Any]


class RegisteredPolicySet(PolicySetDetail):
    created: bool = Field(
        default=True, description="Client-side: False when this exact content was registered already."
    )


class PromptSet(Model):
    id: UUID
    name: str
    version: str
    description: str
    builtin: bool
    created_at: datetime


class PromptSetDetail(PromptSet):
    templates: dict[str, str]


class RegisteredPromptSet(PromptSetDetail):
    base: PromptSetBrief | None = None  # the set the templates not given were taken from
    inherited: list[str] = Field(default_factory=list, description="The templates taken from `base`.")
    created: bool = Field(
        default=True, description="Client-side: False when these exact templates were registered already."
    )


class Webhook(Model):
    id: UUID
    source: str
    name: str
    url: str
    secret_header: str
    created_at: datetime
    revoked_at: datetime | None


class WebhookCreated(Webhook):
    secret: str | None = Field(
        description="Shown once: None when the answer that showed it was lost, or on a replay."
    )
    replayed: bool = Field(
        default=False,
        description="Client-side: your Idempotency-Key named an earlier call's webhook (HTTP 200, not 201).",
    )


class Rejection(Model):
    id: int
    received_at: datetime
    code: str
    message: str
    body: str | None


class MetricReport(Model):
    mean: Interval
    distribution: dict[str, int]


class GradeReport(Model):
    graded: int
    grade_failed: int
    metrics: dict[str, MetricReport]


class GuardRate(Model):
    unsafe: int
    safe: int
    unreadable: int
    unsafe_rate: Interval


class GuardReport(GuardRate):
    by_label: dict[str, GuardRate]


class PairwiseReport(Model):
    against_job_id: UUID
    wins: int
    ties: int
    losses: int
    unreadable: int
    unmatched: int
    win_rate: Interval
    tie_rate: Interval
    loss_rate: Interval


class SampleEvaluation(Model):
    """A sample evaluation's progress and report (GET /v1/sample-evaluations/{id})."""

    id: UUID
    status: str
    created_at: datetime
    label: str | None
    metadata: dict[str, Any]
    policy_set: PolicySetBrief
    prompt_set: PromptSetBrief | None = None  # None: from before evaluations pinned one (built-in)
    config: dict[str, Any]
    samples: int
    counts: JobCounts
    usage: Usage
    grades: GradeReport | None
    guard: GuardReport | None
    pairwise: PairwiseReport | None


class SubmittedSampleEvaluation(SampleEvaluation):
    callback_secret: str | None
    replayed: bool = Field(default=False, description="Client-side: see SubmittedJob.replayed.")


class SampleGuard(Model):
    unsafe: bool | None
    categories: list[str]
    rationale: str | None
    error: str | None


class Vote(Model):
    order: str
    choice: str | None
    rationale: str


class SampleJudgement(Model):
    against_item_id: UUID
    outcome: str | None  # win | tie | loss, this sample's; None: unreadable
    votes: list[Vote]


class SampleResult(Model):
    item_id: UUID
    position: int
    prompt: str
    thoughts: list[str]
    response: str
    label: str | None
    metadata: dict[str, Any]
    status: str
    error_code: str | None
    error_message: str | None
    scores: dict[str, Score] | None
    grade_error: str | None
    guard: SampleGuard | None
    judgement: SampleJudgement | None


class Review(Model):
    """A reviewer's annotation as it counts now (its latest version, not withdrawn)."""

    id: UUID
    source: str
    annotation_id: str
    reviewer: str
    verdict: str | None
    edited: bool
    edited_response: str | None
    policy_faithfulness: int | None
    flagged_thoughts: list[int]
    comment: str | None
    reviewed_at: datetime
    received_at: datetime
    webhook_id: UUID | None


class ItemReviews(Model):
    """A page of an item's reviews; `decision` (of all of them) is approved, rejected or None
    (no verdict yet). Pass `next_cursor` back as `cursor` for the next page (None: the last)."""

    item_id: UUID
    job_id: UUID
    decision: str | None
    gate_accepted: bool | None
    reviews: list[Review]
    next_cursor: str | None


class ReviewCounts(Model):
    total: int
    accepted: int
    rejected: int
    no_verdict: int
    edited: int


class ReviewedItems(Model):
    completed: int
    reviewed: int
    approved: int
    rejected: int
    edited: int


class GraderAgreement(Model):
    agreement: Interval
    kappa: float | None
    both_accept: int
    both_reject: int
    human_accepts_grader_rejects: int
    human_rejects_grader_accepts: int


class ReviewerAgreement(Model):
    agreement: Interval
    kappa: float | None
    kappa_method: str | None
    reviewers: int


class ReviewSummary(Model):
    job_id: UUID
    reviews: ReviewCounts
    items: ReviewedItems
    reviewers: int
    grader: GraderAgreement
    between_reviewers: ReviewerAgreement
