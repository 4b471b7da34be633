"""Report intervals against figures computed by hand (Wilson 1927; Student t tables)."""

import subprocess
import sys
from collections import Counter

import hypothesis
import pytest
import scipy.stats
from hypothesis import example, given
from hypothesis import strategies as st

from app.config import Settings
from app.stats import (
    NOTHING_MEASURED,
    Estimate,
    _sqrt_of_ratio,
    cohen_kappa,
    counted_mean,
    fleiss_kappa,
    mean,
    proportion,
)
from tests.conftest import worker_env


def test_wilson_interval_matches_the_textbook_figure() -> None:
    # 8 of 10: Wilson 95 % is [0.490, 0.943] (Newcombe 1998, table I style).
    estimate = proportion(8, 10)
    assert estimate.value == 0.8
    assert estimate.low == pytest.approx(0.4902, abs=1e-4)
    assert estimate.high == pytest.approx(0.9433, abs=1e-4)
    assert estimate.n == 10


def test_wilson_interval_stays_inside_zero_and_one_at_the_edges() -> None:
    none = proportion(0, 5)
    every = proportion(5, 5)
    assert none.high is not None and every.low is not None
    assert none.low == 0.0 and 0.0 < none.high < 0.5
    assert every.high == pytest.approx(1.0) and 0.5 < every.low < 1.0


@given(
    st.integers(1, 10**6).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
    st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99, 0.999]),
)
@example((0, 1), 0.95)
@example((7, 7), 0.95)
def test_the_wilson_interval_is_scipys_to_the_last_bits(counts: tuple[int, int], confidence: float) -> None:
    """Computed here from Newcombe's formulas: scipy's binomtest took some 250 µs an interval,
    and a report of 10,000 labels makes one per label."""
    successes, n = counts
    scipys = scipy.stats.binomtest(successes, n).proportion_ci(confidence, method="wilson")
    ours = proportion(successes, n, confidence)
    assert ours.low == pytest.approx(scipys.low, rel=1e-12, abs=1e-15)
    assert ours.high == pytest.approx(scipys.high, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n", range(1, 101))
def test_a_share_of_none_or_of_all_has_its_interval_end_at_exactly_0_or_1(n: int) -> None:
    # The formulas give the end only to a rounding: 0 of 2 gave a low of -5.6e-17, 32 of 32
    # a high of 1.0000000000000002, an interval a reader would see leave [0, 1].
    assert proportion(0, n).low == 0.0
    assert proportion(n, n).high == 1.0


def test_a_wider_confidence_gives_a_wider_interval() -> None:
    narrow, wide = proportion(30, 100, confidence=0.8), proportion(30, 100, confidence=0.99)
    assert wide.low is not None and narrow.low is not None
    assert narrow.high is not None and wide.high is not None
    assert wide.low < narrow.low < 0.3 < narrow.high < wide.high


def test_nothing_measured_and_impossible_counts() -> None:
    assert proportion(0, 0) == NOTHING_MEASURED
    assert mean([]) == NOTHING_MEASURED
    with pytest.raises(ValueError, match="^3 successes out of 2$"):
        proportion(3, 2)
    with pytest.raises(ValueError, match="^-1 successes out of 2$"):
        proportion(-1, 2)


def test_mean_interval_uses_student_t() -> None:
    # mean 3, sd 1.5811, n 5: t(0.975, 4) = 2.7764, half-width 1.9632.
    estimate = mean([1, 2, 3, 4, 5])
    assert estimate.value == 3
    assert estimate.low == pytest.approx(3 - 1.9632, abs=1e-3)
    assert estimate.high == pytest.approx(3 + 1.9632, abs=1e-3)
    assert estimate.n == 5


def test_mean_of_one_value_or_no_spread() -> None:
    assert mean([4.0]) == Estimate(4.0, None, None, 1)
    assert mean([2.0, 2.0, 2.0]) == Estimate(2.0, 2.0, 2.0, 3)


def test_a_mean_interval_is_cut_to_the_scale() -> None:
    # [4, 5, 5]: t interval about [3.23, 6.10]; a 1-5 score's mean cannot pass 5.
    free, cut = mean([4, 5, 5]), mean([4, 5, 5], within=(1, 5))
    assert free.high is not None and free.high > 5
    assert (cut.value, cut.low, cut.high) == (free.value, free.low, 5)
    assert mean([1, 1, 2], within=(1, 5)).low == 1


# How many times each of five values was given: up to 15,000, often few, often one kind.
COUNTS = st.lists(st.one_of(st.integers(0, 3), st.integers(0, 3_000)), min_size=5, max_size=5)
SCORES = (1, 2, 3, 4, 5)
GAPS = (-4.0, -1.5, 0.0, 0.5, 4.0)  # pair gaps come in halves


@hypothesis.settings(max_examples=300, deadline=None)
@given(st.sampled_from([SCORES, GAPS]), COUNTS, st.sampled_from([None, (1, 5), (-4, 4)]))
@example(SCORES, [0, 0, 0, 0, 0], None)
@example(SCORES, [0, 0, 1, 0, 0], (1, 5))
@example(SCORES, [0, 0, 0, 7, 0], (1, 5))
@example(SCORES, [0, 0, 0, 0, 10_000], (1, 5))
@example(SCORES, [1, 0, 0, 0, 9_999], (1, 5))
@example(GAPS, [0, 1, 0, 0, 0], (-4, 4))
def test_a_mean_from_counts_is_the_mean_of_the_values_to_the_last_bit(
    values: tuple[float, ...], counts: list[int], within: tuple[float, float] | None
) -> None:
    expanded = [value for value, count in zip(values, counts, strict=True) for _ in range(count)]

    assert counted_mean(dict(zip(values, counts, strict=True)), within=within) == mean(
        expanded, within=within
    )


def test_a_standard_deviation_halfway_between_two_floats_rounds_to_the_even_one() -> None:
    # sqrt((2**53 + 1)**2 / 4) is 2**52 + 0.5 exactly: halfway between the floats 2**52 and
    # 2**52 + 1, so round-half-even gives 2**52. An exact root must not be marked inexact.
    assert _sqrt_of_ratio((2**53 + 1) ** 2, 4) == 2.0**52
    assert _sqrt_of_ratio((2**53 + 3) ** 2, 4) == 2.0**52 + 2


def test_cohen_kappa_matches_the_textbook_figure() -> None:
    # 50 items: both yes 20, yes/no 5, no/yes 10, both no 15. p_o 0.7, p_e 0.5, kappa 0.4.
    pairs = [("yes", "yes")] * 20 + [("yes", "no")] * 5 + [("no", "yes")] * 10 + [("no", "no")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)


def test_cohen_kappa_of_perfect_chance_and_systematic_disagreement() -> None:
    assert cohen_kappa([("a", "a"), ("b", "b")]) == pytest.approx(1.0)
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)
    assert cohen_kappa([("a", "a"), ("a", "a")]) is None  # one category: chance agrees always
    assert cohen_kappa([]) is None


# Fleiss (1971) as Wikipedia works it: 10 subjects, 14 raters, 5 categories; P-bar 0.378,
# P_e 0.213, kappa 0.210.
FLEISS_TABLE = [
    (0, 0, 0, 0, 14),
    (0, 2, 6, 4, 2),
    (0, 0, 3, 5, 6),
    (0, 3, 9, 2, 0),
    (2, 2, 8, 1, 1),
    (7, 7, 0, 0, 0),
    (3, 2, 6, 3, 0),
    (2, 5, 3, 2, 2),
    (6, 5, 2, 1, 0),
    (0, 2, 2, 3, 7),
]


def test_fleiss_kappa_matches_the_textbook_figure() -> None:
    items = [dict(enumerate(row)) for row in FLEISS_TABLE]
    assert fleiss_kappa(items) == pytest.approx(0.2099, abs=1e-4)


def test_fleiss_kappa_takes_items_with_different_numbers_of_ratings() -> None:
    # Every item unanimous: perfect agreement whatever the number of raters.
    assert fleiss_kappa([{"accept": 2}, {"reject": 3}, {"accept": 4}]) == pytest.approx(1.0)
    # An item with one rating says nothing about agreement and is left out.
    assert fleiss_kappa([{"accept": 2}, {"reject": 2}, {"reject": 1}]) == pytest.approx(1.0)
    # Two raters who always split: as far below chance as they can be.
    assert fleiss_kappa([{"accept": 1, "reject": 1}] * 4) == pytest.approx(-1.0)


def test_fleiss_kappa_of_nothing_or_one_category_is_undefined() -> None:
    assert fleiss_kappa([]) is None
    assert fleiss_kappa([{"accept": 1}]) is None
    assert fleiss_kappa([{"accept": 3}, {"accept": 2}]) is None


def test_fleiss_kappa_of_the_same_items_in_any_order_is_the_same() -> None:
    # A query gives its rows in no set order; summed as they came, these gave 0.31037037037037035
    # one way and 0.3103703703703701 the other.
    items = [{"a": 3, "b": 3}, {"b": 3}, {"a": 2, "b": 1}, {"b": 2}]

    assert fleiss_kappa(items) == fleiss_kappa(items[::-1])


def test_cohen_kappa_over_three_verdicts() -> None:
    # 10 items. Observed: 4 + 2 + 1 = 7 of 10. Firsts: a 5, b 3, tie 2; seconds: a 6, b 3,
    # tie 1. Chance (30 + 9 + 2) / 100 = 0.41; kappa (0.7 - 0.41) / 0.59 = 0.4915.
    counts = {("a", "a"): 4, ("a", "b"): 1, ("b", "b"): 2, ("b", "a"): 1, ("tie", "tie"): 1, ("tie", "a"): 1}
    assert cohen_kappa([pair for pair, n in counts.items() for _ in range(n)]) == pytest.approx(0.29 / 0.59)


def test_fleiss_kappa_matches_a_hand_computed_figure() -> None:
    # Three raters, four items. Per item, agreeing pairs out of 6: 6, 2, 2, 0: mean 5/12.
    # Ratings: a 6, b 4, tie 2 of 12: chance 1/4 + 1/9 + 1/36 = 7/18.
    # Kappa (5/12 - 7/18) / (11/18) = 1/22.
    ratings = [("a", "a", "a"), ("a", "a", "b"), ("b", "b", "tie"), ("tie", "b", "a")]
    assert fleiss_kappa([Counter(item) for item in ratings]) == pytest.approx(1 / 22)


def test_a_worker_or_the_cli_starts_without_scipy_which_loads_at_the_first_interval() -> None:
    # scipy.stats took 0.7 s of a worker's 1.7 s start: a restarted worker's items waited on it.
    script = (
        "import sys, workers.main, app.cli\n"
        "before = 'scipy' in sys.modules\n"
        "from app.stats import mean\n"
        "mean([1.0, 2.0])\n"
        "print(before, 'scipy.stats' in sys.modules)\n"
    )
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["False", "True"]


def test_the_api_freezes_what_scipy_made_as_it_starts(settings: Settings) -> None:
    # Imported after the module-level freeze, scipy's objects were walked by every full
    # collection of the API, 17-28 ms each, with the event loop held.
    script = (
        "import asyncio, gc\n"
        "from app.main import create_app\n"
        "async def started() -> None:\n"
        "    app = create_app()\n"
        "    async with app.router.lifespan_context(app):\n"
        "        print(len(gc.get_objects()))\n"
        "asyncio.run(started())\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=worker_env(settings)
    )
    assert int(shown.stdout) < 10_000, shown.stdout
