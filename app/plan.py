"""A job's plan: what its request asked for, resolved against the server's defaults at
submission into a typed, frozen plan (one variant per kind of job), stored as its JSON with
the job (so it cannot change under it) and read back typed by the API and the worker, which
turns it into the engine's config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from app.config import Agents, CallTokens, EndpointConfig, EndpointName, Prices, Rounds, Settings, Temperature
from app.deliberation.budget import (
    RequestBudget,
    bytes_tokens,
    estimate_tokens,
    evaluation_requests,
    judge_request,
    largest_requests,
    least_reply_tokens,
    reply_tokens,
    sample_evaluation_requests,
    sample_judge_request,
    sample_thoughts,
    sample_tokens,
    stage_floors,
)
from app.deliberation.config import (
    LIMIT_CAPS,
    EvaluationConfig,
    Evaluators,
    GradingConfig,
    GuardConfig,
    GuardStyle,
    Limits,
    Mode,
    PairsConfig,
    PipelineConfig,
    RoleConfig,
)
from app.deliberation.policies import MAX_POLICY_TEXT_CHARS, PolicySet
from app.deliberation.prompting import PromptSet
from app.deliberation.quality import sample_text
from app.deliberation.results import METRICS, Sample
from app.deliberation.stages import DECLARED
from app.errors import BatchUnsupported, InvalidConfig, InvalidPromptSet, RequestTooLarge, shown_name

Metric = Literal[METRICS]  # type: ignore[valid-type]
Score = Annotated[float, Field(ge=1, le=5)]
# Judging roles (grader, guard, judge) default to temperature 0: a verdict should not be a draw.
JUDGING_TEMPERATURE = 0.0
DEFAULT_THRESHOLD = 3.0


MAX_ROLE_INSTRUCTIONS_CHARS = 2000
Delivery = Literal["online", "batch"]
Unanswered = Literal["next_wave", "online"]


class RoleIn(BaseModel):
    """Any field left out falls back to the job's `defaults`, then to the server's."""

    model_config = ConfigDict(extra="forbid")

    endpoint: EndpointName | None = Field(default=None, description="Name of a configured endpoint.")
    model: str | None = Field(default=None, max_length=200)
    temperature: Temperature | None = None
    instructions: str | None = Field(
        default=None,
        max_length=MAX_ROLE_INSTRUCTIONS_CHARS,
        description="Added to this role's instructions: e.g. a deliberator's persona (one agent that "
        "hunts needless refusals, one that hunts harm).",
    )


class GradingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: RoleIn = Field(default_factory=RoleIn, description="Temperature defaults to 0.")
    thresholds: dict[Metric, Score] | None = Field(
        default=None,
        description=f"Lowest accepted score per metric (1-5). Default: {DEFAULT_THRESHOLD:g} on every "
        "metric; metrics left out of a given map are not gated.",
    )


class GuardIn(RoleIn):
    style: GuardStyle = Field(
        default=GuardStyle.JSON,
        description="`json`: any chat model asked for a JSON verdict. `llama_guard`: a Llama "
        "Guard-style classifier answering `safe` / `unsafe` + category codes. `shieldgemma`: a "
        "ShieldGemma-style classifier asked, in its prompt format with the policies, whether the "
        "response violates them, answering `Yes` / `No`. Temperature defaults to 0.",
    )
    threshold: float = Field(
        default=GuardConfig.threshold,
        ge=0,
        le=1,
        description="`llama_guard` and `shieldgemma`, where the endpoint sends logprobs: the sample is "
        "flagged when the probability of the violating answer (`unsafe`, `Yes`) is at least this. "
        "Without logprobs the text answer decides, and the verdict says so.",
    )


class PairsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    whisperer: RoleIn = Field(default_factory=RoleIn, description="Writes the bad belief.")
    generator: RoleIn = Field(default_factory=RoleIn, description="Writes the rejected CoT under it.")
    guard: GuardIn = Field(default_factory=GuardIn, description="Judges the rejected side.")
    max_tries: int = Field(default=3, ge=1, le=10, description="Beliefs tried before giving up.")
    min_gap: float = Field(
        default=1.0,
        ge=0,
        le=4,
        description="Lowest policy-faithfulness gap (chosen minus rejected, mean of the CoT-policy "
        "and response-policy scores) for a pair to be kept: the default `min_gap` of the pair "
        "listing, the `trl_dpo` export and the job's pair summary. Every gap is stored.",
    )
    baseline: bool = Field(
        default=False,
        description="Also sample rejected sides without the whisperer (standard sampling), as many "
        "tries, judged by the same guard and grader: the report compares the two gap distributions.",
    )


class LimitsIn(BaseModel):
    """How much each reply may list; the schemas and the instructions both say so."""

    model_config = ConfigDict(extra="forbid")
    thoughts_per_turn: int = Field(
        default=Limits.thoughts_per_turn,
        ge=1,
        le=LIMIT_CAPS.thoughts_per_turn,
        description="The seed's thoughts, and each deliberation turn's new ones.",
    )
    kept_thoughts: int = Field(
        default=Limits.kept_thoughts,
        ge=1,
        le=LIMIT_CAPS.kept_thoughts,
        description="The refiner's final thoughts.",
    )
    max_drops: int = Field(
        default=Limits.max_drops, ge=0, le=LIMIT_CAPS.max_drops, description="Thoughts the refiner may drop."
    )


class FallbackIn(BaseModel):
    """Fields left out fall back to the server's fallback settings, then the endpoint's."""

    model_config = ConfigDict(extra="forbid")
    endpoint: EndpointName | None = Field(default=None, description="Name of a configured endpoint.")
    model: str | None = Field(default=None, max_length=200)
    temperature: Temperature | None = None


class BatchOptions(BaseModel):
    """How a batch job (`delivery: batch`) treats what its batches leave undone."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    unanswered: Unanswered = Field(
        default="next_wave",
        description="A request its batch left unanswered (the batch expired, failed or was cancelled by "
        "the provider; a line's server error or 429): `next_wave` files it in the job's next wave (its "
        "item fails after AIDSAFE_BATCH_MAX_SUBMISSIONS batches); `online` sends it online at once, "
        "at the endpoint's online price.",
    )


class JobConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Mode = Field(
        default=Mode.AIDSAFE,
        description="`aidsafe`: the multi-agent pipeline. `zero_shot`: one call by the seed role "
        "writes CoT and response (the paper's LLM_ZS baseline).",
    )
    agents: Agents | None = Field(default=None, description="Deliberating agents.")
    max_rounds: Rounds | None = Field(
        default=None,
        description="Round budget; a round is every agent once. 0: the seed goes straight to the refiner.",
    )
    max_turns: int | None = Field(
        default=None, ge=0, le=160, description="Deliberation turns in all, across rounds. Default: no cap."
    )
    decompose_intents: bool = Field(
        default=True, description="False: no intent stage (an ablation); later stages work from the query."
    )
    refine: bool = Field(
        default=True,
        description="False: no refiner (an ablation); the final CoT is every thought in order, "
        "nothing dropped.",
    )
    limits: LimitsIn = Field(default_factory=LimitsIn)
    max_tokens: CallTokens | None = Field(default=None, description="Per call.")
    defaults: RoleIn = Field(default_factory=RoleIn, description="Applies to every role.")
    intent: RoleIn | None = None
    seed: RoleIn | None = None
    deliberators: list[RoleIn] | None = Field(
        default=None, min_length=1, max_length=8, description="One per agent, in speaking order."
    )
    refiner: RoleIn | None = None
    grading: GradingIn | None = Field(default=None, description="Score every CoT and gate it.")
    pairs: PairsIn | None = Field(
        default=None, description="Ear-whisperer DPO pairs. Turns grading on (the gap needs scores)."
    )
    fallback: FallbackIn | Literal[False] | None = Field(
        default=None,
        description="Asked the same request when an agent refuses one of the item's stages (intent, "
        "seed, deliberation, refine, zero-shot); the item fails `agent_refused` only if it refuses "
        "too. The grader, the whisperer and a JSON guard fall back too; the rejected side's "
        "generator and a Llama Guard-style guard do not. Default: the server's fallback, if one "
        "is set. `false`: none.",
    )
    delivery: Delivery = Field(
        default="online",
        description="`online`: each call as the item reaches it. `batch`: the items advance in waves, "
        "every item's next call sent in the providers' batch APIs (cheaper, answered within their "
        "completion window). 422 `batch_unsupported` if an endpoint the job uses has no batch API.",
    )
    batch: BatchOptions | None = Field(
        default=None, description="Batch delivery's options; only with `delivery: batch`."
    )


class PresetRef(BaseModel):
    """The preset a job started from (presets/*.yaml): its name and content version."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    version: str


# The plan's JSON is what GET /v1/jobs/{id} shows as the job's `config`: its fields keep the
# names and order the stored config always had, and `mode` tells the variants apart.
_FROZEN = ConfigDict(frozen=True, extra="forbid")


def _pinned_prices() -> Any:
    """The prices of the endpoints a job uses, pinned at submission (left out of the JSON when
    none is priced, so a plan without prices reads and shows as it always did)."""
    return Field(default_factory=dict, exclude_if=lambda prices: not prices)


class GuardPlan(BaseModel):
    model_config = _FROZEN
    endpoint: str
    model: str
    temperature: float
    style: GuardStyle
    instructions: str = ""
    threshold: float = GuardConfig.threshold  # plans stored before thresholds read with the default

    def config(self) -> GuardConfig:
        role = RoleConfig(self.endpoint, self.model, self.temperature, self.instructions)
        return GuardConfig(role, self.style, self.threshold)


class PairsPlan(BaseModel):
    model_config = _FROZEN
    whisperer: RoleConfig
    generator: RoleConfig
    guard: GuardPlan
    max_tries: int
    min_gap: float  # the readers' default threshold: the engine records every gap
    baseline: bool = False  # plans stored before the baseline read back without it

    def config(self) -> PairsConfig:
        return PairsConfig(self.whisperer, self.generator, self.guard.config(), self.max_tries, self.baseline)


class RolesPlan(BaseModel):
    model_config = _FROZEN
    intent: RoleConfig
    seed: RoleConfig
    deliberators: tuple[RoleConfig, ...]  # one per agent, in speaking order
    refiner: RoleConfig


class GenerationPlan(BaseModel):
    """Write a CoT per prompt: the multi-agent pipeline, or the zero-shot baseline."""

    model_config = _FROZEN
    mode: Literal[Mode.AIDSAFE, Mode.ZERO_SHOT]
    max_rounds: int
    max_tokens: int
    max_reasks: int
    roles: RolesPlan
    grading: GradingConfig | None = None
    pairs: PairsPlan | None = None
    # Later fields: plans stored before them read back with the behaviour they had.
    max_turns: int | None = None
    decompose_intents: bool = True
    refine: bool = True
    limits: Limits = Limits()
    # Left out of the JSON when None, so a job without a preset stores and shows as before.
    preset: PresetRef | None = Field(default=None, exclude_if=lambda preset: preset is None)
    # Asked again when an agent refuses (app.deliberation.calls); left out of the JSON when None too.
    fallback: RoleConfig | None = Field(default=None, exclude_if=lambda fallback: fallback is None)
    prices: dict[str, Prices] = _pinned_prices()
    # Left out of the JSON when online, so an online job stores and shows as before.
    delivery: Delivery = Field(default="online", exclude_if=lambda delivery: delivery == "online")
    # A batch job's options, and its endpoints' online prices (its saving, its calls sent online).
    batch: BatchOptions | None = Field(default=None, exclude_if=lambda batch: batch is None)
    online_prices: dict[str, Prices] = _pinned_prices()

    def sends_online(self) -> bool:
        """A batch job that sends the requests its batches left unanswered online."""
        return self.batch is not None and self.batch.unanswered == "online"

    def endpoints(self) -> set[str]:
        """Every endpoint the job may call: those of the stages it runs."""
        config = self.pipeline()
        roles = [self.roles.seed]  # the zero-shot writer too
        if self.mode is Mode.AIDSAFE:
            roles += [self.roles.intent] if self.decompose_intents else []
            roles += self.roles.deliberators[: config.turn_budget()]
            roles += [self.roles.refiner] if self.refine else []
        if self.grading is not None:
            roles.append(self.grading.grader)
        if self.pairs is not None:
            roles += [self.pairs.whisperer, self.pairs.generator, self.pairs.guard.config().role]
        if self.fallback is not None:
            roles.append(self.fallback)
        return {role.endpoint for role in roles}

    def pipeline(self) -> PipelineConfig:
        """The engine's config for every item of the job."""
        roles = self.roles
        return PipelineConfig(
            intent=roles.intent,
            seed=roles.seed,
            deliberators=roles.deliberators,
            refiner=roles.refiner,
            max_rounds=self.max_rounds,
            max_tokens=self.max_tokens,
            max_reasks=self.max_reasks,
            mode=self.mode,
            grading=self.grading,
            pairs=None if self.pairs is None else self.pairs.config(),
            max_turns=self.max_turns,
            decompose_intents=self.decompose_intents,
            refine=self.refine,
            limits=self.limits,
            fallback=self.fallback,
        )


class ComparisonPlan(BaseModel):
    """Judge, prompt by prompt, the samples two finished jobs wrote (a baseline and a candidate),
    by one judge or several."""

    model_config = _FROZEN
    mode: Literal["comparison"] = "comparison"
    baseline_job_id: UUID
    candidate_job_id: UUID
    judges: tuple[RoleConfig, ...] = Field(min_length=1)
    max_tokens: int
    max_reasks: int
    # What differed between the two jobs (policy_set, grader) when the caller allowed it.
    mismatches: tuple[str, ...] = Field(default=(), exclude_if=lambda mismatches: not mismatches)
    prices: dict[str, Prices] = _pinned_prices()

    @model_validator(mode="before")
    @classmethod
    def _one_judge(cls, stored: Any) -> Any:
        """Plans stored before several judges name their one `judge`."""
        if isinstance(stored, dict) and "judge" in stored and "judges" not in stored:
            stored = dict(stored)
            stored["judges"] = [stored.pop("judge")]
        return stored

    def endpoints(self) -> set[str]:
        return {judge.endpoint for judge in self.judges}


class SampleEvaluationPlan(BaseModel):
    """Grade, guard and/or judge samples written elsewhere (imported with the job): each of
    the three roles is None when not asked for. The judge compares each sample with the one
    of the same prompt in `against_job_id`'s set."""

    model_config = _FROZEN
    mode: Literal["sample_evaluation"] = "sample_evaluation"
    grader: RoleConfig | None
    guard: GuardPlan | None
    judge: RoleConfig | None
    against_job_id: UUID | None
    max_tokens: int
    max_reasks: int
    prices: dict[str, Prices] = _pinned_prices()

    def endpoints(self) -> set[str]:
        roles = [self.grader, self.judge, self.guard.config().role if self.guard else None]
        return {role.endpoint for role in roles if role is not None}

    def evaluators(self) -> Evaluators:
        """The engine's config for every item of the job."""
        guard = None if self.guard is None else self.guard.config()
        return Evaluators(self.grader, guard, self.judge, self.max_tokens, self.max_reasks)


MAX_SYSTEM_PROMPT_CHARS = 20_000
MAX_TARGET_NAME_CHARS = 100


class TargetIn(BaseModel):
    """A model under test. Fields left out fall back to the server's defaults."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TARGET_NAME_CHARS,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Its column in the report. Default: `endpoint:model`. Names must differ.",
    )
    endpoint: EndpointName | None = Field(default=None, description="Name of a configured endpoint.")
    model: str | None = Field(default=None, max_length=200)
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Default 0: a rerun asks what the first run asked."
    )
    system_prompt: str | None = Field(
        default=None,
        max_length=MAX_SYSTEM_PROMPT_CHARS,
        description="Sent as the system message; none by default. Nothing else of ours is sent.",
    )


class TargetPlan(BaseModel):
    model_config = _FROZEN
    name: str
    endpoint: str
    model: str
    temperature: float
    system_prompt: str = ""

    def role(self) -> RoleConfig:
        # The RESPOND stage sends the role's instructions as the whole system message.
        return RoleConfig(self.endpoint, self.model, self.temperature, self.system_prompt)


class ModelEvaluationPlan(BaseModel):
    """Benchmark prompts answered by each model under test, every answer classified by a
    safety judge (the guard) and a refusal judge. Items: one per (prompt, target)."""

    model_config = _FROZEN
    mode: Literal["model_evaluation"] = "model_evaluation"
    targets: tuple[TargetPlan, ...]  # the report's columns, in this order
    safety_judge: GuardPlan
    refusal_judge: RoleConfig
    max_tokens: int  # the targets' answers and the judges' verdicts
    max_reasks: int
    prices: dict[str, Prices] = _pinned_prices()

    def endpoints(self) -> set[str]:
        roles = [target.role() for target in self.targets]
        return {role.endpoint for role in [*roles, self.safety_judge.config().role, self.refusal_judge]}

    def evaluation(self, target: int) -> EvaluationConfig:
        """The engine's config for the items of target number `target`."""
        return EvaluationConfig(
            self.targets[target].role(),
            self.safety_judge.config(),
            self.refusal_judge,
            self.max_tokens,
            self.max_reasks,
        )


JobPlan = Annotated[
    GenerationPlan | ComparisonPlan | SampleEvaluationPlan | ModelEvaluationPlan, Field(discriminator="mode")
]
_JOB_PLAN: TypeAdapter[JobPlan] = TypeAdapter(JobPlan)


def read_plan(stored: Any) -> JobPlan:
    """The plan from its stored JSON (decoded); raises pydantic's ValidationError."""
    return _JOB_PLAN.validate_python(stored)


class _Roles:
    """Fills a role from the role's own fields, then the job's defaults, then the server's."""

    def __init__(self, defaults: RoleIn, settings: Settings) -> None:
        self.defaults, self.settings = defaults, settings
        self.endpoints = settings.endpoints()

    def __call__(self, specific: RoleIn | None, path: str, temperature: float | None = None) -> RoleConfig:
        """`temperature` is the role's own default; it goes before the job's defaults."""
        specific = specific or RoleIn()
        endpoint = specific.endpoint or self.defaults.endpoint or "default"
        if endpoint not in self.endpoints:
            raise InvalidConfig(
                f"{path}: unknown endpoint '{endpoint}'; configured: {', '.join(sorted(self.endpoints))}"
            )
        model = specific.model or self.defaults.model or self.endpoints[endpoint].default_model
        for candidate in (specific.temperature, temperature, self.defaults.temperature):
            if candidate is not None:
                break
        return RoleConfig(
            endpoint,
            self._offered(endpoint, model or self.settings.llm_model, path),
            self.settings.default_temperature if candidate is None else candidate,
            specific.instructions or self.defaults.instructions or "",
        )

    def guard(self, specific: GuardIn, path: str) -> GuardPlan:
        """A guard: a judging role (temperature 0 by default) of its style and threshold."""
        role = self(specific, path, JUDGING_TEMPERATURE)
        return GuardPlan(**asdict(role), style=specific.style, threshold=specific.threshold)

    def fallback(self, specific: FallbackIn | Literal[False] | None) -> RoleConfig | None:
        """The job's fallback, or the server's; the job's `defaults` name the model the
        fallback stands in for, so they do not apply to it."""
        settings = self.settings
        if specific is False or (
            specific is None and not (settings.fallback_endpoint or settings.fallback_model)
        ):
            return None
        specific = specific or FallbackIn()
        endpoint = specific.endpoint or settings.fallback_endpoint or "default"
        if endpoint not in self.endpoints:
            raise InvalidConfig(
                f"fallback: unknown endpoint '{endpoint}'; configured: {', '.join(sorted(self.endpoints))}"
            )
        model = specific.model or settings.fallback_model or self.endpoints[endpoint].default_model
        for temperature in (specific.temperature, settings.fallback_temperature, self.defaults.temperature):
            if temperature is not None:
                break
        return RoleConfig(
            endpoint,
            self._offered(endpoint, model or settings.llm_model, "fallback"),
            settings.default_temperature if temperature is None else temperature,
        )

    def _offered(self, endpoint: str, model: str, path: str) -> str:
        """`model`, if `endpoint` offers it (its `models`, when the operator lists them)."""
        offered = self.endpoints[endpoint].models
        if offered is not None and model not in offered:
            raise InvalidConfig(
                f"{path}: model '{shown_name(model)}' is not offered on endpoint '{endpoint}'; "
                f"offered: {', '.join(offered)}"
            )
        return model


def resolve(config: JobConfigIn, settings: Settings, preset: PresetRef | None = None) -> GenerationPlan:
    """Fill every role from defaults and check endpoint names; raises InvalidConfig. `config`
    is already merged with the `preset` it started from, if any (app/presets.py)."""
    role = _Roles(config.defaults, settings)
    agents = config.agents or (len(config.deliberators) if config.deliberators else settings.default_agents)
    if config.deliberators is not None and len(config.deliberators) != agents:
        raise InvalidConfig(
            f"'deliberators' lists {len(config.deliberators)} agents but 'agents' is {agents}"
        )
    deliberators: list[RoleIn | None] = [*config.deliberators] if config.deliberators else [None] * agents
    grading = config.grading or (GradingIn() if config.pairs else None)
    pairs = config.pairs
    plan = GenerationPlan(
        mode=config.mode,
        max_rounds=settings.default_max_rounds if config.max_rounds is None else config.max_rounds,
        max_tokens=config.max_tokens or settings.default_max_tokens,
        max_reasks=settings.max_reasks,
        roles=RolesPlan(
            intent=role(config.intent, "intent"),
            seed=role(config.seed, "seed"),
            deliberators=tuple(role(d, f"deliberators[{i}]") for i, d in enumerate(deliberators)),
            refiner=role(config.refiner, "refiner"),
        ),
        grading=None
        if grading is None
        else GradingConfig(
            role(grading.grader, "grading.grader", JUDGING_TEMPERATURE),
            dict.fromkeys(METRICS, DEFAULT_THRESHOLD) if grading.thresholds is None else grading.thresholds,
        ),
        pairs=None
        if pairs is None
        else PairsPlan(
            whisperer=role(pairs.whisperer, "pairs.whisperer"),
            generator=role(pairs.generator, "pairs.generator"),
            guard=role.guard(pairs.guard, "pairs.guard"),
            max_tries=pairs.max_tries,
            min_gap=pairs.min_gap,
            baseline=pairs.baseline,
        ),
        max_turns=config.max_turns,
        decompose_intents=config.decompose_intents,
        refine=config.refine,
        limits=Limits(**config.limits.model_dump()),
        preset=preset,
        fallback=role.fallback(config.fallback),
        delivery=config.delivery,
    )
    endpoints = plan.endpoints()
    if config.delivery == "online":
        if config.batch is not None:
            raise InvalidConfig("'batch' options need delivery 'batch'")
        return plan.model_copy(update={"prices": pinned_prices(endpoints, settings)})
    _check_batch(endpoints, settings)
    return plan.model_copy(
        update={
            "batch": config.batch or BatchOptions(),
            "prices": pinned_prices(endpoints, settings, "batch"),
            "online_prices": pinned_prices(endpoints, settings),
        }
    )


def _check_batch(endpoints: set[str], settings: Settings) -> None:
    configured = settings.endpoints()
    online_only = sorted(name for name in endpoints if configured[name].batch is None)
    if online_only:
        raise BatchUnsupported(
            f"delivery 'batch' needs a batch API on every endpoint the job uses; without one: "
            f"{', '.join(online_only)} (use delivery 'online', or other endpoints)",
            details={"endpoints": online_only},
        )


def resolve_comparison(
    judges: Sequence[RoleIn | None],
    settings: Settings,
    baseline_job_id: UUID,
    candidate_job_id: UUID,
    mismatches: Sequence[str] = (),
) -> ComparisonPlan:
    """The plan of a comparison job: judge models (None: a judge of the server's defaults)
    over two finished jobs, which differ in `mismatches` (allowed by the caller)."""
    role = _Roles(RoleIn(), settings)
    roles = tuple(role(judge, f"judges[{n}]", JUDGING_TEMPERATURE) for n, judge in enumerate(judges))
    return ComparisonPlan(
        baseline_job_id=baseline_job_id,
        candidate_job_id=candidate_job_id,
        judges=roles,
        max_tokens=settings.default_max_tokens,
        max_reasks=settings.max_reasks,
        mismatches=tuple(mismatches),
        prices=pinned_prices({judge.endpoint for judge in roles}, settings),
    )


def resolve_sample_evaluation(
    grader: RoleIn | None,
    guard: GuardIn | None,
    judge: RoleIn | None,
    against_job_id: UUID | None,
    settings: Settings,
) -> SampleEvaluationPlan:
    """The plan of a sample evaluation: the roles asked for (judging temperature 0 by
    default); InvalidConfig if none is."""
    if grader is None and guard is None and judge is None:
        raise InvalidConfig("ask for at least one of 'grade', 'guard' or 'judge'")
    role = _Roles(RoleIn(), settings)
    plan = SampleEvaluationPlan(
        grader=None if grader is None else role(grader, "grade", JUDGING_TEMPERATURE),
        guard=None if guard is None else role.guard(guard, "guard"),
        judge=None if judge is None else role(judge, "judge.judge", JUDGING_TEMPERATURE),
        against_job_id=against_job_id,
        max_tokens=settings.default_max_tokens,
        max_reasks=settings.max_reasks,
    )
    return plan.model_copy(update={"prices": pinned_prices(plan.endpoints(), settings)})


def resolve_model_evaluation(
    targets: list[TargetIn],
    safety_judge: GuardIn | None,
    refusal_judge: RoleIn | None,
    max_tokens: int | None,
    settings: Settings,
) -> ModelEvaluationPlan:
    """The plan of a model evaluation; raises InvalidConfig for an unknown endpoint or two
    targets of one name."""
    role = _Roles(RoleIn(), settings)
    planned = []
    for i, target in enumerate(targets):
        resolved = role(
            RoleIn(endpoint=target.endpoint, model=target.model, temperature=target.temperature),
            f"targets[{i}]",
            JUDGING_TEMPERATURE,
        )
        planned.append(
            TargetPlan(
                name=target.name or f"{resolved.endpoint}:{resolved.model}",
                endpoint=resolved.endpoint,
                model=resolved.model,
                temperature=resolved.temperature,
                system_prompt=target.system_prompt or "",
            )
        )
    names = [target.name for target in planned]
    if len(set(names)) < len(names):
        twice = max(names, key=names.count)
        raise InvalidConfig(f"targets: two targets are named '{twice}'; give each its own name")
    guard = safety_judge or GuardIn()
    plan = ModelEvaluationPlan(
        targets=tuple(planned),
        safety_judge=role.guard(guard, "safety_judge"),
        refusal_judge=role(refusal_judge, "refusal_judge", JUDGING_TEMPERATURE),
        max_tokens=max_tokens or settings.default_max_tokens,
        max_reasks=settings.max_reasks,
    )
    return plan.model_copy(update={"prices": pinned_prices(plan.endpoints(), settings)})


def comparison_mismatches(
    baseline: JobPlan, candidate: JobPlan, policy_sets: tuple[tuple[str, str], tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    """What differs between two jobs in what a comparison of their samples rests on: the
    policy set (its content version; `policy_sets` are each job's (name, version)), and the
    grader whose scores the means compare (its endpoint, model, temperature and
    instructions; the gate's thresholds do not change a score). {what: {"baseline": ...,
    "candidate": ...}}; empty when nothing differs."""
    found: dict[str, dict[str, Any]] = {}
    (base_name, base_version), (cand_name, cand_version) = policy_sets
    if base_version != cand_version:
        found["policy_set"] = {
            "baseline": f"{base_name}@{base_version}",
            "candidate": f"{cand_name}@{cand_version}",
        }
    base_grader, cand_grader = _grader(baseline), _grader(candidate)
    if base_grader != cand_grader:
        found["grader"] = {
            "baseline": None if base_grader is None else asdict(base_grader),
            "candidate": None if cand_grader is None else asdict(cand_grader),
        }
    return found


def _grader(plan: JobPlan) -> RoleConfig | None:
    return plan.grading.grader if isinstance(plan, GenerationPlan) and plan.grading is not None else None


def pinned_prices(
    endpoints: set[str], settings: Settings, delivery: Delivery = "online"
) -> dict[str, Prices]:
    """The current prices of those of `endpoints` that have prices: their batch APIs' for
    batch delivery."""
    configured = settings.endpoints()
    return {
        name: prices
        for name in sorted(endpoints)
        if (prices := _prices(configured[name], delivery)) is not None
    }


def _prices(endpoint: EndpointConfig, delivery: Delivery) -> Prices | None:
    if delivery == "batch":
        return None if endpoint.batch is None else endpoint.batch.prices
    return endpoint.prices


def check_job_fits(
    plan: GenerationPlan, policies: PolicySet, wording: PromptSet, prompts: list[str], settings: Settings
) -> None:
    """Raise RequestTooLarge if some request of this job, worded by `wording`, may not fit
    its endpoint."""
    longest = max(prompts, key=estimate_tokens)
    _check_fits(largest_requests(plan.pipeline(), policies, wording, longest), policies, settings)


def check_comparison_fits(
    plan: ComparisonPlan,
    policies: PolicySet,
    wording: PromptSet,
    longest_prompt: str,
    samples: tuple[int, int],
    settings: Settings,
) -> None:
    """Raise RequestTooLarge if some judge's requests may not fit its endpoint; each sample
    counts for at most as many tokens as `samples` says (cot_tokens of the job that wrote it)."""
    budgets = [
        judge_request(judge, policies, wording, longest_prompt, samples, plan.max_tokens)
        for judge in plan.judges
    ]
    _check_fits(budgets, policies, settings)


def cot_tokens(plan: JobPlan) -> int:
    """The most one of the CoTs a job wrote counts for, read by a comparison's judge."""
    if isinstance(plan, GenerationPlan):
        return sample_tokens(plan.pipeline())
    return reply_tokens(plan.max_tokens, Limits())  # it wrote none: no prompt to compare


def cot_thoughts(plan: JobPlan) -> int:
    """The most thoughts one of the CoTs a job wrote can hold: each a labeling tool may flag."""
    if isinstance(plan, GenerationPlan):
        return sample_thoughts(plan.pipeline())
    return 0  # it wrote none


def check_model_evaluation_fits(
    plan: ModelEvaluationPlan, policies: PolicySet, wording: PromptSet, prompts: list[str], settings: Settings
) -> None:
    """Raise RequestTooLarge if some target's or judge's request, the judges' worded by
    `wording`, may not fit its endpoint."""
    longest = max(prompts, key=estimate_tokens)
    budgets = [
        budget
        for target in range(len(plan.targets))
        for budget in evaluation_requests(plan.evaluation(target), policies, wording, longest)
    ]
    _check_fits(list(dict.fromkeys(budgets)), policies, settings)  # the judges' once


def check_sample_evaluation_fits(
    plan: SampleEvaluationPlan,
    policies: PolicySet,
    wording: PromptSet,
    samples: Sequence[tuple[str, Sample]],
    against: Sequence[int | None],
    settings: Settings,
) -> None:
    """Raise RequestTooLarge if some role's request about some (prompt, sample) may not fit
    its endpoint. The largest sample, prompt and reasoning and response together, decides the
    grader's and the guard's; the judge's, the largest with the other set's sample it reads.
    `against`: per sample, the UTF-8 bytes of that other sample as the judge is shown it
    (None: the other set has none of its prompt, and it is not judged); empty without a judge."""
    sizes = [estimate_tokens(prompt) + estimate_tokens(sample_text(sample)) for prompt, sample in samples]
    largest = max(range(len(samples)), key=sizes.__getitem__)
    budgets = sample_evaluation_requests(plan.evaluators(), policies, wording, *samples[largest])
    judged = {n: other for n, other in enumerate(against) if other is not None}
    if plan.judge is not None and judged:
        n = max(judged, key=lambda n: sizes[n] + bytes_tokens(judged[n]))
        prompt, sample = samples[n]
        budgets.append(
            sample_judge_request(plan.judge, policies, wording, prompt, sample, judged[n], plan.max_tokens)
        )
    _check_fits(budgets, policies, settings)


def _check_fits(budgets: list[RequestBudget], policies: PolicySet, settings: Settings) -> None:
    # The cap applies to sets registered before it existed, whatever the endpoints take.
    if len(policies.text) > MAX_POLICY_TEXT_CHARS:
        raise RequestTooLarge(
            f"policy set '{policies.name}' version {policies.version} renders to "
            f"{len(policies.text):,} characters of prompt text; at most {MAX_POLICY_TEXT_CHARS:,} are allowed"
        )
    endpoints, ceiling = settings.endpoints(), settings.llm_max_request_tokens
    found = (_Overrun.of(b, endpoints[b.endpoint].max_context_tokens, ceiling) for b in budgets)
    overruns = [overrun for overrun in found if overrun is not None]
    if overruns:
        worst = max(overruns, key=lambda o: o.excess)
        raise RequestTooLarge(worst.message(), details=[overrun.detail() for overrun in overruns])


_SHRINK = (
    "lower max_tokens, max_rounds or agents, shorten the prompts, the policies or the prompt set's templates"
)


@dataclass(frozen=True)
class _Overrun:
    """A role's largest request over a limit the client would hold it to (fitted): its
    endpoint's context, or the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS."""

    budget: RequestBudget
    limit: int
    of_context: bool  # else of the server's ceiling

    @classmethod
    def of(cls, budget: RequestBudget, context: int | None, ceiling: int) -> _Overrun | None:
        """Held, as the client holds it, to the lesser limit alone. The ceiling refuses the
        request only if its prompt leaves less than the least reply: the client lowers a
        max_tokens over the rest, under a larger context too. A context must take the
        max_tokens whole, which servers keep room for."""
        if context is None or context > ceiling:
            return cls(budget, ceiling, of_context=False) if budget.least_tokens > ceiling else None
        return cls(budget, context, of_context=True) if budget.tokens > context else None

    @property
    def excess(self) -> int:
        """By how much the request must shrink to pass: all of it over a context; its prompt
        and least reply over the ceiling, which lowers the rest of its max_tokens."""
        return (self.budget.tokens if self.of_context else self.budget.least_tokens) - self.limit

    def detail(self) -> dict[str, Any]:
        limit = "max_context_tokens" if self.of_context else "max_request_tokens"
        return {
            "role": self.budget.role,
            "endpoint": self.budget.endpoint,
            "estimated_tokens": self.budget.tokens,
            limit: self.limit,
        }

    def message(self) -> str:
        budget = self.budget
        sends = (
            f"role '{budget.role}' may send endpoint '{budget.endpoint}' requests of about "
            f"{budget.tokens:,} tokens with max_tokens"
        )
        if self.of_context:
            return (
                f"{sends}, over its max_context_tokens of {self.limit:,}; {_SHRINK}, "
                "or use an endpoint with a larger context"
            )
        return (
            f"{sends}, over the server's AIDSAFE_LLM_MAX_REQUEST_TOKENS of {self.limit:,}: their prompt, "
            f"of about {budget.prompt_tokens:,} tokens, leaves less than "
            f"{least_reply_tokens(budget.max_tokens):,} for a reply; {_SHRINK}"
        )


def check_prompt_set_fits(wording: PromptSet, settings: Settings) -> None:
    """Raise InvalidPromptSet if some stage's templates alone (no policies, an empty prompt,
    the server's default max_tokens of reply) are over every endpoint's context. An
    endpoint of unknown context may take anything. The templates must be valid."""
    contexts = [endpoint.max_context_tokens for endpoint in settings.endpoints().values()]
    if not contexts or None in contexts:
        return
    largest = max(c for c in contexts if c is not None)
    max_tokens = settings.default_max_tokens
    floors = stage_floors(wording, max_tokens)
    over = [
        (floors[spec.stage.value], spec.stage.value, spec.templates)
        for spec in DECLARED
        if spec.templates is not None and floors[spec.stage.value] > largest
    ]
    if over:
        tokens, stage, names = max(over)
        raise InvalidPromptSet(
            f"stage {stage}: templates {', '.join(names)} make requests of about {tokens:,} tokens with "
            f"the default max_tokens of {max_tokens:,} before any policy or prompt, over the largest "
            f"endpoint context of {largest:,}; shorten them",
            details=[
                {"stage": s, "templates": list(n), "estimated_tokens": t, "max_context_tokens": largest}
                for t, s, n in over
            ],
        )
