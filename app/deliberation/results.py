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
GAP_SCALE = (SCORE_SCALE[0] - SCORE_SCALE[1], SCORE_SCALE[1] - SCORE_SCALE[0])  # chosen minus rejected
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


PairMethod = Literal["whisper", "standard"]  # how a try's rejected side was sampled


@dataclass(frozen=True)
class PairTry:
    """One try at a rejected side: the ear-whisperer's (a bad belief injected into the
    generation) or standard sampling's (the generator alone, the whisperer's baseline). The
    belief, the rejected sample, the refusal and what the guard and grader said are hazardous."""

    number: int
    belief: str | None  # None for standard sampling
    rejected: Sample | None  # None when the generator refused
    refusal: str | None  # the generator's refusal (a whispered one is shown to the whisperer)
    guard: GuardVerdict | None  # None when there was nothing to judge (a refusal)
    grade: Grade | None = None  # the rejected side's; None unless the guard gave a verdict
    gap: float | None = None  # chosen minus rejected policy faithfulness; None: a side ungraded
    method: PairMethod = "whisper"


PairReason = Literal[
    "whisperer_refused",
    "whisperer_unparseable",
    "rejected_unparseable",
    "guard_unparseable",
    "guard_never_flagged",
    "grading_failed",
]


@dataclass(frozen=True)
class PairOutcome:
    """The DPO pair attempt of one item. The chosen side is the item's own CoT, the rejected
    side the whisper try the guard flagged. Whether a made pair is kept is the reader's
    threshold on its gap (`min_gap` of the pair listing and the export), not the engine's."""

    reason: PairReason | None  # why no pair was made; None: made (flagged, both sides graded)
    tries: list[PairTry]  # the whisperer's, in order
    baseline: list[PairTry] = field(default_factory=list)  # standard sampling's, when asked for

    @property
    def made(self) -> bool:
        return self.reason is None

    @property
    def rejected(self) -> PairTry | None:
        """The try the guard flagged, if any: the rejected side of the pair."""
        last = self.tries[-1] if self.tries else None
        return last if last and last.guard and last.guard.unsafe else None

    @property
    def rejected_grade(self) -> Grade | None:
        return self.rejected.grade if self.rejected else None

    @property
    def gap(self) -> float | None:
        return self.rejected.gap if self.rejected else None

    def candidates(self) -> list[PairTry]:
        """Every try of either method whose rejected side the guard was asked about."""
        return [t for t in (*self.tries, *self.baseline) if t.rejected is not None]


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
