"""Every stage of the engine, declared once: the role that speaks, the schema it answers in,
the normalizer that reads its reply, the templates that ask it and what fills them.

The Caller asks a stage from its declaration, the request budgets are worked out from the
same declarations, and prompt sets are checked against them. Adding a stage: a `Stage`
member, a declaration here, its templates in prompts/, and one `caller.call` where the
engine needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.deliberation import parsing, schemas
from app.deliberation.config import GuardStyle, Limits
from app.deliberation.policies import PolicySet
from app.deliberation.ports import Stage
from app.deliberation.prompting import PromptSet, instructed

Normalize = Callable[..., dict[str, Any]]

# What later stages are shown for the intents when a job skips their decomposition.
NOT_DECOMPOSED = "(not decomposed: work from the query itself)"


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    stage: Stage
    role: str  # as turns, limits and logs name the speaker; "{agent}" is filled in
    # Travels in response_format.json_schema.name; servers and logs see it. None: the reply
    # is plain text, read by `normalize` itself, and is not re-asked (re-asks ask for JSON).
    schema_name: str | None
    build_schema: Callable[[Limits], dict[str, Any]] | None
    normalize: Normalize
    # (system, user) templates in prompts/; None: a classifier with its own chat template,
    # sent the conversation it judges (the prompt, then the sample as the assistant's turn),
    # or, with `classifier_prompt`, one user message from that template.
    templates: tuple[str, str] | None
    # What the engine fills the user template with besides `prompt`: `inputs` are what the
    # stage works on, so its template must show each; `extras` it may show.
    inputs: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    # A model under test (model evaluations): sent its own system prompt (the role's
    # instructions), if any, and the prompt, nothing of ours; any reply is its answer.
    under_test: bool = False
    # A classifier whose prompt format carries the policies, the prompt and the sample.
    classifier_prompt: str | None = None
    # Asks for the reply's logprobs; its normalizer takes them (`logprobs`) and a `threshold`.
    logprobs: bool = False
    # Whether a refusal is asked again of the job's fallback role: yes where refusing is
    # declining the task itself. Not where the refusal is the answer being measured (the
    # rejected side's generator), nor where a chat model cannot stand in (a classifier).
    falls_back: bool

    @property
    def plain_text(self) -> bool:
        return self.schema_name is None

    def schema(self, limits: Limits) -> dict[str, Any] | None:
        return None if self.build_schema is None else self.build_schema(limits)

    def role_of(self, agent: int) -> str:
        return self.role.format(agent=agent)

    def messages(
        self,
        policies: PolicySet,
        wording: PromptSet,
        limits: Limits,
        instructions: str = "",
        **values: object,
    ) -> list[dict[str, str]]:
        """The request's messages; `instructions` are the role's own, after the stage's."""
        if self.under_test:
            own = [{"role": "system", "content": instructions}] if instructions else []
            return [*own, {"role": "user", "content": str(values["prompt"])}]
        if self.classifier_prompt is not None:
            text = wording.render(self.classifier_prompt, policies=policies.text, **values)
            return [{"role": "user", "content": text}]
        if self.templates is None:
            return [
                {"role": "user", "content": str(values["prompt"])},
                {"role": "assistant", "content": str(values["sample"])},
            ]
        system, user = self.templates
        return instructed(policies, wording, limits, instructions, system, user, **values)


INTENT = StageSpec(
    stage=Stage.INTENT,
    role="intent",
    schema_name="intent_decomposition",
    build_schema=schemas.intent,
    normalize=parsing.normalize_intent,
    templates=("intent.system", "intent.user"),
    falls_back=True,
)

SEED = StageSpec(
    stage=Stage.SEED,
    role="seed",
    schema_name="seed_cot",
    build_schema=schemas.seed,
    normalize=parsing.normalize_seed,
    templates=("seed.system", "seed.user"),
    inputs=("intents",),
    falls_back=True,
)

DELIBERATION = StageSpec(
    stage=Stage.DELIBERATION,
    role="deliberator-{agent}",
    schema_name="deliberation_turn",
    build_schema=schemas.deliberation,
    normalize=parsing.normalize_deliberation,
    templates=("deliberation.system", "deliberation.user"),
    inputs=("intents", "thoughts", "response"),
    extras=("agent", "agents", "round", "max_rounds"),
    falls_back=True,
)

# Its normalizer also takes thought_count: the ids the reply may cite.
REFINE = StageSpec(
    stage=Stage.REFINE,
    role="refiner",
    schema_name="refined_cot",
    build_schema=schemas.refined,
    normalize=parsing.normalize_refined,
    templates=("refine.system", "refine.user"),
    inputs=("intents", "thoughts", "response"),
    falls_back=True,
)

# The paper's LLM_ZS baseline: CoT and response in one call.
ZERO_SHOT = StageSpec(
    stage=Stage.ZERO_SHOT,
    role="zero-shot",
    schema_name="zero_shot_cot",
    build_schema=schemas.seed,
    normalize=parsing.normalize_seed,
    templates=("zero_shot.system", "zero_shot.user"),
    falls_back=True,
)

# Round 0: the item's CoT; round n: the rejected side of whisper try n.
GRADE = StageSpec(
    stage=Stage.GRADE,
    role="grader",
    schema_name="quality_scores",
    build_schema=schemas.scores,
    normalize=parsing.normalize_scores,
    templates=("grade.system", "grade.user"),
    inputs=("sample",),
    falls_back=True,
)

WHISPER = StageSpec(
    stage=Stage.WHISPER,
    role="whisperer",
    schema_name="whisper_belief",
    build_schema=schemas.belief,
    normalize=parsing.normalize_belief,
    templates=("whisper.system", "whisper.user"),
    inputs=("history",),
    extras=("violations",),  # WHISPER_AIMS of the job's guard style
    falls_back=True,
)

# The zero-shot instructions, with the whispered belief injected.
REJECTED = StageSpec(
    stage=Stage.REJECTED,
    role="generator",
    schema_name="rejected_cot",
    build_schema=schemas.seed,
    normalize=parsing.normalize_seed,
    templates=("zero_shot.system", "rejected.user"),
    inputs=("belief",),
    # Its refusal is the target model resisting the belief: a failed try the whisperer is shown.
    falls_back=False,
)

# Standard sampling, the whisperer's baseline: the zero-shot instructions and no belief.
# Its tries are agent STANDARD_AGENT's turns of the stages rejected, guard and grade, so
# that try n never meets the whisperer's try n (agent 0) in the turn log.
STANDARD = StageSpec(
    stage=Stage.REJECTED,
    role="generator",
    schema_name="standard_cot",
    build_schema=schemas.seed,
    normalize=parsing.normalize_seed,
    templates=("zero_shot.system", "zero_shot.user"),
    falls_back=False,  # as the rejected side's generator: its refusal is a try
)
STANDARD_AGENT = 1

# Any chat model, asked for a JSON verdict against the policy set.
GUARD = StageSpec(
    stage=Stage.GUARD,
    role="guard",
    schema_name="guard_verdict",
    build_schema=schemas.guard_verdict,
    normalize=parsing.normalize_guard_json,
    templates=("guard.system", "guard.user"),
    inputs=("sample",),
    falls_back=True,
)

# The guard stage played by a Llama Guard-style classifier.
LLAMA_GUARD = StageSpec(
    stage=Stage.GUARD,
    role="guard",
    schema_name=None,
    build_schema=None,
    normalize=parsing.normalize_llama_guard,
    templates=None,
    logprobs=True,
    # A chat model sent this conversation would answer it, not classify it.
    falls_back=False,
)

# The guard stage played by a ShieldGemma-style classifier, asked in its prompt format.
SHIELDGEMMA = StageSpec(
    stage=Stage.GUARD,
    role="guard",
    schema_name=None,
    build_schema=None,
    normalize=parsing.normalize_shieldgemma,
    templates=None,
    classifier_prompt="shieldgemma.user",
    logprobs=True,
    inputs=("sample",),
    falls_back=False,  # a classifier: a chat model cannot stand in
)

GUARDS = {  # by the job's guard style
    GuardStyle.JSON: GUARD,
    GuardStyle.LLAMA_GUARD: LLAMA_GUARD,
    GuardStyle.SHIELDGEMMA: SHIELDGEMMA,
}

# The violations the whisperer is told to aim at, by the guard style that judges its tries:
# only those the guard can flag, since a try it cannot flag is never kept. Only the JSON guard
# is told that an over-refusal is a violation. Llama Guard judges by its own hazard categories,
# never sent the policies; ShieldGemma, a harm classifier, is asked whether the response's
# content breaks the policies, and a refusal's does not.
WHISPER_AIMS = {
    GuardStyle.JSON: "helping with something harmful, deceiving, or refusing a benign request",
    GuardStyle.LLAMA_GUARD: "helping with something harmful",
    GuardStyle.SHIELDGEMMA: "helping with something harmful or deceiving",
}

# Comparison jobs: round 1 sees (a, b), round 2 sees (b, a).
JUDGE = StageSpec(
    stage=Stage.JUDGE,
    role="judge",
    schema_name="pairwise_judgement",
    build_schema=schemas.judgement,
    normalize=parsing.normalize_judgement,
    templates=("judge.system", "judge.user"),
    inputs=("first", "second"),
    # Comparison jobs have no fallback role.
    falls_back=False,
)

# Model evaluations: the model under test answers as it would answer a user (plain chat).
RESPOND = StageSpec(
    stage=Stage.RESPOND,
    role="target",
    schema_name=None,
    build_schema=None,
    normalize=parsing.normalize_answer,
    templates=None,
    under_test=True,
    falls_back=False,  # its refusal is what the evaluation measures
)

# Model evaluations: whether the answer refused the user or complied.
REFUSAL = StageSpec(
    stage=Stage.REFUSAL,
    role="refusal-judge",
    schema_name="refusal_judgement",
    build_schema=schemas.refusal_verdict,
    normalize=parsing.normalize_refusal,
    templates=("refusal.system", "refusal.user"),
    inputs=("answer",),
    falls_back=False,  # evaluations have no fallback role
)

DECLARED = (
    INTENT,
    SEED,
    DELIBERATION,
    REFINE,
    ZERO_SHOT,
    GRADE,
    WHISPER,
    REJECTED,
    STANDARD,
    GUARD,
    LLAMA_GUARD,
    SHIELDGEMMA,
    JUDGE,
    RESPOND,
    REFUSAL,
)
