"""What LLM calls cost, what a job may spend, and what a job would cost before it runs.

Prices are USD per million tokens per endpoint (settings `llm_prices`), pinned in a job's plan
at submission, so a later price change prices new jobs only and never rewrites a job's
history. A turn's cost is computed from its reported tokens and those pinned prices when it
is recorded; an endpoint without prices gives calls of unknown cost (null), never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.config import Prices
from app.deliberation.budget import RequestBudget, estimate_tokens, largest_requests
from app.deliberation.config import Mode, PipelineConfig
from app.deliberation.policies import PolicySet
from app.deliberation.prompting import PromptSet
from app.errors import BudgetTooSmall, UnpricedEndpoint
from app.plan import GenerationPlan, JobPlan

PER_MILLION = 1_000_000


class Budget(BaseModel):
    """A job's spending limit: once its recorded calls reach either figure, no new LLM call
    starts and its items wait as `budget_exhausted` until the budget is raised. Calls already
    in flight finish, so a job can exceed its budget by at most those calls."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_cost_usd: float | None = Field(
        default=None,
        gt=0,
        description="In USD, at the job's pinned prices (every endpoint it uses needs prices).",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=2**63 - 1, description="Prompt + completion tokens, all calls."
    )  # le: the column is a BIGINT

    @model_validator(mode="after")
    def _a_limit(self) -> Budget:
        if self.max_cost_usd is None and self.max_tokens is None:
            raise ValueError("give max_cost_usd, max_tokens or both (or null for no budget)")
        return self

    @classmethod
    def of(cls, max_cost_usd: float | None, max_tokens: int | None) -> Budget | None:
        """A job's budget from its row's columns; None: it has none."""
        if max_cost_usd is None and max_tokens is None:
            return None
        return cls.model_construct(max_cost_usd=max_cost_usd, max_tokens=max_tokens)

    def reached(self, tokens: int, usd: float) -> bool:
        """Whether calls that used `tokens` and cost `usd` have spent it."""
        return (self.max_tokens is not None and tokens >= self.max_tokens) or (
            self.max_cost_usd is not None and usd >= self.max_cost_usd
        )


class BudgetExhausted(Exception):
    """The job's budget is spent: the item's next call was not started."""


def call_cost(prices: Prices | None, prompt: int, cached: int, completion: int) -> float | None:
    """USD for one call's reported tokens; `cached` prompt tokens are part of `prompt` (as
    OpenAI reports them). None: the endpoint is unpriced."""
    if prices is None:
        return None
    cached = min(cached, prompt)
    cached_price = prices.input if prices.cached_input is None else prices.cached_input
    return (
        (prompt - cached) * prices.input + cached * cached_price + completion * prices.output
    ) / PER_MILLION


def job_cost(plan: JobPlan, spent_usd: float) -> float | None:
    """A job's cost from the sum of its turns' costs: None unless every endpoint it uses has
    pinned prices (then every turn has a cost)."""
    return spent_usd if priced(plan) else None


def priced(plan: JobPlan) -> bool:
    """Whether every call of the job has a price: batch jobs that send unanswered requests
    online need the online prices too."""
    needed = plan.endpoints()
    if isinstance(plan, GenerationPlan) and plan.sends_online() and not needed <= plan.online_prices.keys():
        return False
    return needed <= plan.prices.keys()


@dataclass(frozen=True)
class Range:
    min: int | float
    max: int | float


@dataclass(frozen=True)
class Estimate:
    items: int
    calls: Range
    prompt_tokens: Range
    completion_tokens: Range
    cost_usd: Range | None  # None: an endpoint the job uses is unpriced
    unpriced_endpoints: list[str]


@dataclass(frozen=True)
class _Calls:
    """An item's calls, each as estimated for a one-character prompt."""

    budgets: list[RequestBudget]
    max_tokens: int

    def prompt_tokens(self, prompt_extra: int) -> int:
        return sum(b.tokens - self.max_tokens + prompt_extra for b in self.budgets)

    def cost(self, prices: dict[str, Prices], prompt_extra: int) -> float | None:
        total = 0.0
        for b in self.budgets:
            cost = call_cost(
                prices.get(b.endpoint), b.tokens - self.max_tokens + prompt_extra, 0, self.max_tokens
            )
            if cost is None:
                return None
            total += cost
        return total


_PROBE = "x"  # the prompt the per-call figures are estimated for; each item adds its own


# The roles of the optional stages (grading, pairs); every other role writes the item's CoT.
_GRADER, _PAIRS = "grader", ("whisperer", "generator", "guard")


def _item_calls(plan: GenerationPlan, policies: PolicySet, wording: PromptSet) -> tuple[_Calls, _Calls]:
    """The fewest calls of an item (agreement at the first deliberation turn, the first
    whisper try flagged) and the most (every turn of the turn budget, every whisper try, and
    with the baseline as many standard sampling tries); re-asks excluded. Each call is
    budget.py's largest request of its role, found by role name, so stages a plan leaves out
    (no intents, no refiner, no deliberation) are simply not there; deliberation turn t is the
    request of the agent speaking t-th, which reads the t - 1 turns before it."""
    # The fallback is asked only after a refusal, which an estimate does not assume (nor re-asks).
    config = replace(plan.pipeline(), fallback=None)
    turns = config.turn_budget() if config.mode is Mode.AIDSAFE else 0  # zero-shot: one call
    budgets = largest_requests(config, policies, wording, _PROBE)
    writing = [b for b in budgets if b.role != _GRADER and b.role not in _PAIRS]
    others = [b for b in writing if not b.role.startswith("deliberator-")]
    deliberation = [_turn(config, policies, wording, t) for t in range(1, turns + 1)]
    graders = [b for b in budgets if b.role == _GRADER]
    # The grader scores the item's CoT and, with pairs, every rejected side the guard judges.
    pair_try = [b for b in budgets if b.role in _PAIRS] + (graders[:1] if config.pairs else [])
    # Standard sampling tries without the whisperer (its request, without the belief, sized
    # as the whispered one: budget.py's estimates are deliberately high).
    if config.pairs and config.pairs.baseline:
        pair_try += [b for b in pair_try if b.role != "whisperer"]
    fewest = others + deliberation[:1] + graders[:1] + pair_try
    tries = config.pairs.max_tries if config.pairs else 0
    most = others + deliberation + graders[:1] + pair_try * tries
    return _Calls(fewest, config.max_tokens), _Calls(most, config.max_tokens)


def _turn(config: PipelineConfig, policies: PolicySet, wording: PromptSet, turn: int) -> RequestBudget:
    """Deliberation turn `turn` (from 1): budget.py sizes each agent's last turn of a turn
    budget, and with a budget of `turn` turns the agent speaking last speaks turn `turn`."""
    agent = (turn - 1) % len(config.deliberators) + 1
    budgets = largest_requests(replace(config, max_turns=turn), policies, wording, _PROBE)
    return next(b for b in budgets if b.role == f"deliberator-{agent}")


def estimate(plan: GenerationPlan, policies: PolicySet, wording: PromptSet, prompts: list[str]) -> Estimate:
    """Calls, tokens and cost of running `prompts` under `plan`, as a range. The token
    figures are budget.py's deliberately high estimates (three bytes a token) and every reply
    at its full max_tokens, so the real figures are usually lower, even below `min`."""
    fewest, most = _item_calls(plan, policies, wording)
    extras = [estimate_tokens(p) - estimate_tokens(_PROBE) for p in prompts]
    n = len(prompts)

    def tokens(calls: _Calls) -> tuple[int, int]:
        prompt = sum(calls.prompt_tokens(extra) for extra in extras)
        return prompt, n * len(calls.budgets) * calls.max_tokens

    (p_min, c_min), (p_max, c_max) = tokens(fewest), tokens(most)
    unpriced = sorted(plan.endpoints() - plan.prices.keys())
    cost = None
    if not unpriced:
        cost = Range(  # to the nano-dollar: float sums would show 0.07502400000000001
            round(sum(fewest.cost(plan.prices, extra) or 0.0 for extra in extras), 9),
            round(sum(most.cost(plan.prices, extra) or 0.0 for extra in extras), 9),
        )
    return Estimate(
        items=n,
        calls=Range(n * len(fewest.budgets), n * len(most.budgets)),
        prompt_tokens=Range(p_min, p_max),
        completion_tokens=Range(c_min, c_max),
        cost_usd=cost,
        unpriced_endpoints=unpriced,
    )


def check_budget(
    budget: Budget | None, plan: JobPlan, policies: PolicySet, wording: PromptSet, prompts: list[str]
) -> None:
    """Refuse a budget no call fits in (the job would stop before it starts), or a money
    budget for a job with an unpriced endpoint (its spending could not be counted). A
    comparison's budget is checked for prices only."""
    if budget is None:
        return
    unpriced = sorted(plan.endpoints() - plan.prices.keys())
    if budget.max_cost_usd is not None and unpriced:
        raise UnpricedEndpoint(
            "a max_cost_usd budget needs prices for every endpoint the job uses; unpriced: "
            f"{', '.join(unpriced)} "
            "(give max_tokens instead, or ask the operator to price them)",
            details={"unpriced_endpoints": unpriced},
        )
    if not isinstance(plan, GenerationPlan):
        return
    fewest, _ = _item_calls(plan, policies, wording)
    cheapest = _Calls(fewest.budgets[:1], fewest.max_tokens)
    extra = estimate_tokens(min(prompts, key=estimate_tokens)) - estimate_tokens(_PROBE)
    one_call: dict[str, Any] = {"tokens": cheapest.prompt_tokens(extra) + cheapest.max_tokens}
    one_call["cost_usd"] = cheapest.cost(plan.prices, extra)
    too_small = (budget.max_tokens is not None and budget.max_tokens < one_call["tokens"]) or (
        budget.max_cost_usd is not None and budget.max_cost_usd < (one_call["cost_usd"] or 0.0)
    )
    if too_small:
        raise BudgetTooSmall(
            f"the budget is below what the job's first call may cost (about {one_call['tokens']:,} tokens"
            + (f", ${one_call['cost_usd']:.6f}" if one_call["cost_usd"] is not None else "")
            + ", its estimated prompt and a full max_tokens reply): no call could start",
            details={"one_call": one_call},
        )
