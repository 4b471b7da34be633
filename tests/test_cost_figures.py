"""Cost accounting's figures without the service: a call's cost from its reported tokens, when a
budget is spent, whether a job's cost can be known, the estimate's ranges and the budget
check at submission (tests/test_costs.py runs them through the API and the worker)."""

from __future__ import annotations

import re
import uuid

import pytest

from app.config import BatchConfig, EndpointConfig, Prices, Settings
from app.costs import Budget, call_cost, check_budget, estimate, job_cost, priced
from app.deliberation.budget import estimate_tokens
from app.errors import BudgetTooSmall, UnpricedEndpoint
from app.plan import BatchOptions, GenerationPlan, JobConfigIn, resolve, resolve_comparison
from tests.test_engine import POLICIES, PROMPTS
from tests.test_plan import LONG, SHORT

PRICES = Prices(input=1.0, cached_input=0.5, output=2.0)  # USD per million tokens
BATCH_PRICES = Prices(input=0.5, output=1.0)
SETTINGS = Settings(
    llm_model="server-model",
    llm_batch=BatchConfig(prices=BATCH_PRICES),
    llm_endpoints={
        "second": EndpointConfig(base_url="http://127.0.0.1:1/v1", batch=BatchConfig(prices=BATCH_PRICES)),
        "third": EndpointConfig(base_url="http://127.0.0.1:2/v1"),
    },
    llm_prices={"default": PRICES},
)
QUICK = {"agents": 2, "max_rounds": 2, "max_tokens": 64}  # intent, seed, 1-4 turns, refiner


def plan(**config: object) -> GenerationPlan:
    return resolve(JobConfigIn.model_validate({**QUICK, **config}), SETTINGS)


def test_a_call_costs_its_uncached_cached_and_completion_tokens_at_their_prices() -> None:
    assert call_cost(PRICES, 1000, 400, 200) == pytest.approx((600 * 1.0 + 400 * 0.5 + 200 * 2.0) / 1e6)
    assert call_cost(Prices(input=3.0, output=0.5), 1000, 0, 200) == pytest.approx((3000 + 100) / 1e6)
    # Without a cached price, cached tokens cost the input price.
    assert call_cost(Prices(input=1.0, output=2.0), 1000, 400, 200) == pytest.approx(1400 / 1e6)
    # A server reporting more cached tokens than prompt tokens is not paid to cache them.
    assert call_cost(PRICES, 1000, 1500, 0) == pytest.approx(1000 * 0.5 / 1e6)
    assert call_cost(None, 1000, 400, 200) is None  # unpriced: unknown, not free


def test_a_budget_is_spent_once_either_limit_is_reached() -> None:
    tokens_only, money_only = Budget(max_tokens=1000), Budget(max_cost_usd=0.01)
    both = Budget(max_tokens=1000, max_cost_usd=0.01)

    assert (tokens_only.reached(999, 1e6), tokens_only.reached(1000, 0.0)) == (False, True)
    assert (money_only.reached(10**9, 0.0099), money_only.reached(0, 0.01)) == (False, True)
    assert (both.reached(999, 0.0099), both.reached(1000, 0.0), both.reached(0, 0.01)) == (False, True, True)


def test_a_budget_read_from_its_columns_is_none_when_both_are_null() -> None:
    assert Budget.of(None, None) is None
    assert Budget.of(None, 500) == Budget(max_tokens=500)
    assert Budget.of(0.5, None) == Budget(max_cost_usd=0.5)


def test_a_jobs_cost_is_known_only_when_every_endpoint_it_calls_is_priced() -> None:
    assert (priced(plan()), job_cost(plan(), 0.25)) == (True, 0.25)
    unpriced = plan(refiner={"endpoint": "second"})
    assert (priced(unpriced), job_cost(unpriced, 0.25)) == (False, None)


def test_a_batch_job_sending_unanswered_requests_online_needs_online_prices_too() -> None:
    # "second" has batch prices but no online ones.
    on_second = {"delivery": "batch", "defaults": {"endpoint": "second"}}
    next_wave = plan(**on_second)
    online = plan(**on_second, batch=BatchOptions(unanswered="online").model_dump())

    assert next_wave.prices == online.prices == {"second": BATCH_PRICES}
    assert (priced(next_wave), priced(online)) == (True, False)
    assert priced(plan(delivery="batch", batch={"unanswered": "online"}))  # "default": both priced


def test_the_estimate_counts_every_prompts_calls_and_tokens_at_full_max_tokens() -> None:
    figures = estimate(plan(), POLICIES, PROMPTS, [SHORT, LONG, SHORT])

    # Fewest: intent, seed, the first agent agrees, refiner. Most: 2 rounds of 2 agents.
    assert (figures.items, figures.calls.min, figures.calls.max) == (3, 12, 21)
    assert (figures.completion_tokens.min, figures.completion_tokens.max) == (12 * 64, 21 * 64)
    # Each prompt's own tokens are in every call of its item.
    longer = estimate_tokens(LONG) - estimate_tokens(SHORT)
    shorts = estimate(plan(), POLICIES, PROMPTS, [SHORT, SHORT, SHORT])
    assert figures.prompt_tokens.min - shorts.prompt_tokens.min == 4 * longer
    assert figures.prompt_tokens.max - shorts.prompt_tokens.max == 7 * longer
    assert figures.cost_usd is not None and figures.unpriced_endpoints == []
    for cost, prompt, completion in (
        (figures.cost_usd.min, figures.prompt_tokens.min, figures.completion_tokens.min),
        (figures.cost_usd.max, figures.prompt_tokens.max, figures.completion_tokens.max),
    ):
        assert cost == round((prompt * 1.0 + completion * 2.0) / 1e6, 9)


@pytest.mark.parametrize(
    ("config", "fewest", "most"),
    [
        ({"mode": "zero_shot"}, 1, 1),
        # The fallback is asked only after a refusal, which an estimate does not assume.
        ({"fallback": {"endpoint": "default"}}, 4, 7),
        # Grading adds a call; pairs a try (or max_tries of them) of three calls and a grade; the
        # baseline as many tries of a sample, a verdict and a grade.
        ({"grading": {}}, 5, 8),
        ({"pairs": {"max_tries": 3}}, 4 + 1 + 4, 7 + 1 + 3 * 4),
        ({"pairs": {"max_tries": 3, "baseline": True}}, 4 + 1 + 4 + 3, 7 + 1 + 3 * (4 + 3)),
        ({"mode": "zero_shot", "pairs": {"max_tries": 2}}, 1 + 1 + 4, 1 + 1 + 2 * 4),
        # A stage left out is no call; a turn budget caps the deliberation turns.
        ({"decompose_intents": False, "refine": False}, 2, 5),
        ({"max_rounds": 0}, 3, 3),
        ({"max_turns": 3}, 4, 6),
    ],
)
def test_an_items_calls_range_from_agreement_at_once_to_every_turn_and_try(
    config: dict[str, object], fewest: int, most: int
) -> None:
    figures = estimate(plan(**config), POLICIES, PROMPTS, [SHORT, LONG])

    assert (figures.calls.min, figures.calls.max) == (2 * fewest, 2 * most)


def test_the_fewest_calls_deliberate_one_turn_the_first_whatever_the_turn_budget() -> None:
    seed_and_turns = {"decompose_intents": False, "refine": False}  # no stage sized by the turn budget
    fewest = [
        estimate(plan(max_rounds=rounds, **seed_and_turns), POLICIES, PROMPTS, [SHORT]).prompt_tokens.min
        for rounds in (1, 2, 4)
    ]

    assert fewest[0] == fewest[1] == fewest[2]


def test_each_deliberation_turn_is_the_request_of_the_agent_speaking_it() -> None:
    instructions = "Hunt for needless refusals. " * 20
    three = {"agents": 3, "max_rounds": 1}
    plain = estimate(plan(**three), POLICIES, PROMPTS, [SHORT]).prompt_tokens
    third_instructed = estimate(
        plan(**three, deliberators=[{}, {}, {"instructions": instructions}]), POLICIES, PROMPTS, [SHORT]
    ).prompt_tokens

    # The third agent does not speak in the fewest calls, and speaks once in the most.
    assert third_instructed.min == plain.min
    extra = third_instructed.max - plain.max
    assert (
        estimate_tokens(instructions) <= extra <= estimate_tokens(instructions) + 16
    )  # and a message's frame


def test_cost_figures_are_rounded_to_the_nano_dollar() -> None:
    odd = Prices(input=0.123457, output=0.654321)
    job = resolve(
        JobConfigIn.model_validate(QUICK), SETTINGS.model_copy(update={"llm_prices": {"default": odd}})
    )
    figures = estimate(job, POLICIES, PROMPTS, [SHORT, LONG])

    assert figures.cost_usd is not None
    for cost, prompt, completion in (
        (figures.cost_usd.min, figures.prompt_tokens.min, figures.completion_tokens.min),
        (figures.cost_usd.max, figures.prompt_tokens.max, figures.completion_tokens.max),
    ):
        exact = (prompt * odd.input + completion * odd.output) / 1e6
        assert cost == round(exact, 9) and cost != round(exact, 10)


def test_an_estimate_with_an_unpriced_endpoint_names_it_and_gives_no_cost() -> None:
    figures = estimate(plan(seed={"endpoint": "second"}), POLICIES, PROMPTS, [SHORT])

    assert (figures.cost_usd, figures.unpriced_endpoints) == (None, ["second"])
    assert (figures.calls.min, figures.calls.max) == (4, 7)


def test_a_budget_must_fit_one_call_for_the_shortest_prompt() -> None:
    zero_shot = plan(mode="zero_shot")  # one call an item: the estimate of one item is that call
    one = estimate(zero_shot, POLICIES, PROMPTS, [SHORT])
    tokens = int(one.prompt_tokens.min + one.completion_tokens.min)
    assert one.cost_usd is not None
    usd = one.cost_usd.min
    prompts = [LONG, SHORT]  # the shortest prompt decides

    check_budget(Budget(max_tokens=tokens), zero_shot, POLICIES, PROMPTS, prompts)
    check_budget(Budget(max_cost_usd=usd), zero_shot, POLICIES, PROMPTS, prompts)
    with pytest.raises(BudgetTooSmall) as refused:
        check_budget(Budget(max_tokens=tokens - 1), zero_shot, POLICIES, PROMPTS, prompts)
    assert refused.value.details == {"one_call": {"tokens": tokens, "cost_usd": pytest.approx(usd)}}
    assert f"(about {tokens:,} tokens, ${usd:.6f}, its estimated prompt" in refused.value.message
    with pytest.raises(BudgetTooSmall):
        check_budget(Budget(max_cost_usd=usd * 0.999), zero_shot, POLICIES, PROMPTS, prompts)
    check_budget(None, zero_shot, POLICIES, PROMPTS, prompts)


def test_a_budget_need_not_fit_more_than_the_first_call_of_an_item() -> None:
    job = plan()
    item = estimate(job, POLICIES, PROMPTS, [SHORT])
    # The mean of the item's fewest calls (the first, the intent's, is the smallest).
    mean_call = int(item.prompt_tokens.min + item.completion_tokens.min) // int(item.calls.min)
    assert item.cost_usd is not None

    check_budget(Budget(max_tokens=mean_call), job, POLICIES, PROMPTS, [SHORT])
    check_budget(Budget(max_cost_usd=item.cost_usd.min / item.calls.min), job, POLICIES, PROMPTS, [SHORT])


def test_a_money_budget_needs_every_endpoint_priced_and_a_token_budget_does_not() -> None:
    job = plan(refiner={"endpoint": "second"})

    with pytest.raises(UnpricedEndpoint) as refused:
        check_budget(Budget(max_cost_usd=5), job, POLICIES, PROMPTS, [SHORT])
    assert refused.value.details == {"unpriced_endpoints": ["second"]}
    two = plan(refiner={"endpoint": "second"}, seed={"endpoint": "third"})
    with pytest.raises(UnpricedEndpoint) as both:
        check_budget(Budget(max_cost_usd=5), two, POLICIES, PROMPTS, [SHORT])
    assert both.value.message == (
        "a max_cost_usd budget needs prices for every endpoint the job uses; unpriced: second, third "
        "(give max_tokens instead, or ask the operator to price them)"
    )
    check_budget(Budget(max_tokens=10**6), job, POLICIES, PROMPTS, [SHORT])
    with pytest.raises(BudgetTooSmall) as small:
        check_budget(Budget(max_tokens=10), job, POLICIES, PROMPTS, [SHORT])
    assert small.value.details["one_call"]["cost_usd"] is not None  # the first call is priced
    # A first call of unknown cost: the refusal gives its tokens only.
    with pytest.raises(BudgetTooSmall) as unknown:
        check_budget(Budget(max_tokens=10), plan(intent={"endpoint": "second"}), POLICIES, PROMPTS, [SHORT])
    assert unknown.value.details["one_call"]["cost_usd"] is None
    assert re.search(r"\(about [\d,]+ tokens, its estimated prompt", unknown.value.message)


def test_a_comparisons_budget_is_checked_for_prices_only() -> None:
    priced_judges = resolve_comparison([None], SETTINGS, uuid.uuid4(), uuid.uuid4())
    check_budget(Budget(max_cost_usd=1e-9, max_tokens=1), priced_judges, POLICIES, PROMPTS, [SHORT])
    unpriced = resolve_comparison(
        [None, None], SETTINGS.model_copy(update={"llm_prices": {}}), uuid.uuid4(), uuid.uuid4()
    )
    with pytest.raises(UnpricedEndpoint):
        check_budget(Budget(max_cost_usd=5), unpriced, POLICIES, PROMPTS, [SHORT])
