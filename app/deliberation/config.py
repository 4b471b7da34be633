"""What the engine is asked to do for one item: which model plays each role, the budgets,
and the optional grading, quality gates and preference pairs. Frozen per job."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Mode(StrEnum):
    AIDSAFE = "aidsafe"  # intents -> seed -> deliberation -> refinement
    ZERO_SHOT = "zero_shot"  # one call writes CoT + response: the paper's LLM_ZS baseline


class GuardStyle(StrEnum):
    JSON = "json"  # any chat model, asked for a JSON verdict against the policy set
    LLAMA_GUARD = "llama_guard"  # "safe" / "unsafe\nS1,S2" from Llama Guard-style classifiers
    SHIELDGEMMA = (
        "shieldgemma"  # asked in ShieldGemma's format whether the response breaks the policies: Yes / No
    )


@dataclass(frozen=True)
class RoleConfig:
    endpoint: str
    model: str
    temperature: float
    # Appended to the stage's instructions for this role only: a deliberator's persona
    # (e.g. "hunt for needless refusals"), or anything a team wants one role to weigh.
    instructions: str = ""


@dataclass(frozen=True)
class Limits:
    """How much each reply may list: the schemas and the instructions both say so."""

    thoughts_per_turn: int = 6  # the seed's thoughts, and each deliberation turn's new ones
    kept_thoughts: int = 12  # the refiner's final thoughts
    max_drops: int = 24  # the refiner's dropped thoughts


# The most a job may ask for. Argilla's settings list a CoT's thoughts as fixed options:
# `kept_thoughts` of them for every job, more for one whose CoTs are never refined.
LIMIT_CAPS = Limits(thoughts_per_turn=10, kept_thoughts=12, max_drops=24)


@dataclass(frozen=True)
class GradingConfig:
    grader: RoleConfig
    # metric -> lowest score a CoT may have and be accepted; metrics left out are not gated
    thresholds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GuardConfig:
    role: RoleConfig
    style: GuardStyle = GuardStyle.JSON
    # Classifier styles: flagged when the probability of the violating answer ("unsafe",
    # "Yes") is at least this, where the endpoint sends logprobs.
    threshold: float = 0.5


@dataclass(frozen=True)
class Evaluators:
    """The roles a sample evaluation asks (None: not asked) and their reply budget."""

    grader: RoleConfig | None
    guard: GuardConfig | None
    judge: RoleConfig | None
    max_tokens: int
    max_reasks: int


@dataclass(frozen=True)
class PairsConfig:
    """The ear-whisperer recipe. Needs grading: every rejected side the guard judges is
    graded, for its policy-faithfulness gap to the chosen side."""

    whisperer: RoleConfig
    generator: RoleConfig  # writes the rejected CoT with the whispered belief injected
    guard: GuardConfig
    max_tries: int = 3
    # Also sample rejected sides without the whisperer (the paper's standard sampling), as
    # many tries, judged by the same guard and grader: the baseline of the gap's distribution.
    baseline: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    intent: RoleConfig
    seed: RoleConfig
    deliberators: tuple[RoleConfig, ...]  # one per agent, in speaking order
    refiner: RoleConfig
    max_rounds: int  # a round is every agent once; 0: the seed goes straight to the refiner
    max_tokens: int
    max_reasks: int
    mode: Mode = Mode.AIDSAFE
    grading: GradingConfig | None = None
    pairs: PairsConfig | None = None
    # Ablations of the paper's pipeline, each a stage left out or cut short.
    max_turns: int | None = None  # deliberation turns in all, across rounds; None: rounds decide
    decompose_intents: bool = True  # False: no intent stage; later stages are told so
    refine: bool = True  # False: the final CoT is every thought, in order, nothing dropped
    limits: Limits = Limits()
    # Asked the same request when an agent refuses a stage that falls back (its endpoint,
    # model and temperature; the role's instructions stay). None: a refusal fails the item
    # (an optional stage's ends as that stage's failure).
    fallback: RoleConfig | None = None

    def turn_budget(self) -> int:
        """The most deliberation turns an item can take."""
        turns = self.max_rounds * len(self.deliberators)
        return turns if self.max_turns is None else min(turns, self.max_turns)


@dataclass(frozen=True)
class EvaluationConfig:
    """One model evaluation item: the model under test answers the prompt as a user would
    ask it, then a safety judge (the guard) and a refusal judge classify the answer."""

    target: RoleConfig  # the model under test; its `instructions` are its system prompt ("": none)
    safety: GuardConfig
    refusal_judge: RoleConfig
    max_tokens: int
    max_reasks: int
