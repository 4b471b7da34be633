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


@dataclass(frozen=True)
class RoleConfig:
    endpoint: str
    model: str
    temperature: float


@dataclass(frozen=True)
class GradingConfig:
    grader: RoleConfig
    # metric -> lowest score a CoT may have and be accepted; metrics left out are not gated
    thresholds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GuardConfig:
    role: RoleConfig
    style: GuardStyle = GuardStyle.JSON


@dataclass(frozen=True)
class PairsConfig:
    """The ear-whisperer recipe. Needs grading: a pair is kept on its policy-faithfulness gap."""

    whisperer: RoleConfig
    generator: RoleConfig  # writes the rejected CoT with the whispered belief injected
    guard: GuardConfig
    max_tries: int = 3
    min_gap: float = 1.0


@dataclass(frozen=True)
class PipelineConfig:
    intent: RoleConfig
    seed: RoleConfig
    deliberators: tuple[RoleConfig, ...]  # one per agent, in speaking order
    refiner: RoleConfig
    max_rounds: int
    max_tokens: int
    max_reasks: int
    mode: Mode = Mode.AIDSAFE
    grading: GradingConfig | None = None
    pairs: PairsConfig | None = None
