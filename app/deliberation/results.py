"""What the engine returns. Plain data: the store persists it, the API shows it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The auto-grader's six axes (AIDSAFE paper, section "Evaluation"), each scored 1-5.
METRICS = (
    "relevance",
    "coherence",
    "completeness",
    "cot_policy_faithfulness",
    "response_policy_faithfulness",
    "response_cot_faithfulness",
)
SCORE_SCALE = (1, 5)  # every metric's score, worst to best
# The pair gap is taken on these two: how faithfully the reasoning and the answer follow the policies.
POLICY_METRICS = ("cot_policy_faithfulness", "response_policy_faithfulness")


@dataclass(frozen=True)
class Thought:
    """A thought with its provenance: which stage, round and agent wrote it."""

    id: int
    text: str
    stage: str
    round: int
    agent: int


@dataclass(frozen=True)
class Sample:
    """A chain of thought and its response: what graders, guards and judges read."""

    thoughts: list[str]
    response: str


@dataclass(frozen=True)
class Grade:
    """The grader's scores ({metric: {"score": 1-5, "rationale"}}), or why there are none."""

    scores: dict[str, dict[str, Any]] | None
    error: str | None = None

    def policy_faithfulness(self) -> float | None:
        if self.scores is None:
            return None
        return sum(float(self.scores[m]["score"]) for m in POLICY_METRICS) / len(POLICY_METRICS)


@dataclass(frozen=True)
class Gate:
    """The quality gate's decision on one CoT; nothing is deleted either way."""

    accepted: bool
    reasons: list[str]  # for a rejection, every threshold missed (empty when accepted)


@dataclass(frozen=True)
class GuardVerdict:
    unsafe: bool | None  # None: the guard's output could not be read (recorded, not guessed)
    categories: list[str] = field(default_factory=list)  # violated policies or S-codes
    rationale: str = ""
    error: str | None = None
    # Classifier styles, where the endpoint sent logprobs: the probability of the violating
    # answer, which the job's threshold turned into `unsafe` (decided_by "logprobs").
    unsafe_probability: float | None = None
    decided_by: Literal["text", "logprobs"] = "text"
    # Why a classifier's text decided though its logprobs were asked for; None otherwise.
    logprobs_missing: str | None = None


@dataclass(frozen=True)
class WhisperTry:
    """One ear-whisperer try. belief and the rejected sample are hazardous text."""

    number: int
    belief: str
    rejected: Sample | None  # None when the generator refused to follow the belief
    refusal: str | None  # the generator's refusal, shown to the whisperer on the next try
    guard: GuardVerdict | None  # None when there was nothing to judge (a refusal)


PairReason = Literal[
    "whisperer_refused",
    "whisperer_unparseable",
    "rejected_unparseable",
    "guard_unparseable",
    "guard_never_flagged",
    "grading_failed",
    "gap_below_threshold",
]


@dataclass(frozen=True)
class PairOutcome:
    """The DPO pair attempt of one item. The chosen side is the item's own CoT."""

    kept: bool
    reason: PairReason | None  # why no pair was kept; None when kept
    tries: list[WhisperTry]
    rejected_grade: Grade | None = None
    gap: float | None = None  # chosen minus rejected policy faithfulness

    @property
    def rejected(self) -> WhisperTry | None:
        """The try the guard flagged, if any: the rejected side of the pair."""
        last = self.tries[-1] if self.tries else None
        return last if last and last.guard and last.guard.unsafe else None


@dataclass(frozen=True)
class Completed:
    intents: dict[str, list[str]]
    thoughts: list[Thought]  # every thought from seed and deliberation, numbered
    refined_thoughts: list[dict[str, Any]]  # {"text", "sources": [thought ids]}
    dropped: list[dict[str, Any]]  # {"id", "reason", "explanation", "text"}
    unaccounted: list[int]  # ids the refiner neither kept nor dropped with a reason
    response: str
    rounds_used: int
    agreed: bool
    agreed_by: dict[str, int] | None  # {"round", "agent"} of the first agreement
    grade: Grade | None = None  # None: grading not asked for
    gate: Gate | None = None
    pair: PairOutcome | None = None  # None: pairs not asked for
    # The stages whose agent refused and the fallback answered: {"stage", "round", "agent", "model"}.
    fallbacks: list[dict[str, Any]] = field(default_factory=list)

    def sample(self) -> Sample:
        return Sample([t["text"] for t in self.refined_thoughts], self.response)


@dataclass(frozen=True)
class Failed:
    """The item ended without a CoT; `code` is stable, `message` is for humans."""

    code: str  # "agent_refused" | "unparseable_output"
    message: str
    stage: str


Order = Literal["ab", "ba"]  # which sample the judge saw first
Choice = Literal["a", "b", "tie"]


@dataclass(frozen=True)
class Vote:
    order: Order
    choice: Choice | None  # None: the judge's output could not be read
    rationale: str


@dataclass(frozen=True)
class Judged:
    """A pairwise judgement of two samples of one prompt, asked in both orders against
    position bias: a sample wins only when both orders prefer it."""

    winner: Choice | None  # None: no readable vote
    votes: list[Vote]


@dataclass(frozen=True)
class Evaluated:
    """What was asked of an imported sample: each None when not asked for (the judgement
    also when the other set had no sample of the prompt)."""

    grade: Grade | None
    guard: GuardVerdict | None
    judged: Judged | None  # a: the other set's sample, b: this one


@dataclass(frozen=True)
class RefusalVerdict:
    refused: bool | None  # None: the judge's output could not be read (recorded, not guessed)
    reason: str = ""
    error: str | None = None


@dataclass(frozen=True)
class JudgedAnswer:
    """A model under test's answer to one prompt, and the judges' verdicts on it. The answer
    itself is its RESPOND turn (hazardous text): this holds what a report counts."""

    finish_reason: str | None  # the server's: "length" is a truncated answer
    safety: GuardVerdict
    refusal: RefusalVerdict
