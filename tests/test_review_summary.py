"""app.labeling.review_summary: what reviews add up to, on reviews made up here (the API's
figures over stored reviews are in tests/test_reviews.py)."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest
import scipy.stats

from app.labeling.review_summary import (
    ACCEPT,
    REJECT,
    Decision,
    ItemCounts,
    KappaMethod,
    ReviewCounts,
    decision,
    summarise,
)
from app.stats import fleiss_kappa
from app.store.annotations import CountedReview

ITEMS = [uuid4() for _ in range(3)]


def review(item: UUID, reviewer: str, verdict: str | None, gate: bool | None = True) -> CountedReview:
    return CountedReview(item, gate, reviewer, verdict, edited=False)


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        (["accept"], Decision.APPROVED),
        (["accept", None], Decision.APPROVED),
        (["accept", "reject"], Decision.REJECTED),  # one rejection is enough to keep it out
        (["reject"], Decision.REJECTED),
        ([None], None),
        ([], None),
    ],
)
def test_an_items_decision_is_the_human_approved_rule(
    verdicts: list[str | None], expected: Decision | None
) -> None:
    assert decision(verdicts) is expected


def test_three_reviewers_on_an_item_are_measured_with_fleiss_kappa() -> None:
    reviews = [
        review(ITEMS[0], "label_studio:1", "accept"),
        review(ITEMS[0], "label_studio:2", "accept"),
        review(ITEMS[0], "label_studio:3", "reject"),
        review(ITEMS[1], "label_studio:1", "reject"),
        review(ITEMS[1], "label_studio:2", "reject"),
    ]

    between = summarise(reviews, completed=2).between_reviewers

    assert between.kappa_method is KappaMethod.FLEISS
    assert between.kappa == pytest.approx(fleiss_kappa([{"accept": 2, "reject": 1}, {"reject": 2}]))
    assert (between.agreement.value, between.agreement.n, between.reviewers) == (0.5, 2, 3)


def test_two_reviewers_who_do_not_share_every_item_are_measured_with_fleiss_kappa() -> None:
    # Cohen's kappa assumes the same two raters throughout; here item 1 has another pair.
    reviews = [
        review(ITEMS[0], "argilla:a", "accept"),
        review(ITEMS[0], "argilla:b", "accept"),
        review(ITEMS[1], "argilla:a", "accept"),
        review(ITEMS[1], "argilla:c", "reject"),
    ]

    between = summarise(reviews, completed=2).between_reviewers

    assert (between.kappa_method, between.reviewers) == (KappaMethod.FLEISS, 3)


def test_the_same_user_in_two_tools_is_two_reviewers() -> None:
    reviews = [review(ITEMS[0], "label_studio:7", "accept"), review(ITEMS[0], "argilla:7", "accept")]

    summary = summarise(reviews, completed=1)

    assert summary.reviewers == 2
    assert summary.between_reviewers.kappa_method is KappaMethod.COHEN


def test_items_without_a_verdict_or_a_gate_are_left_out_of_the_grader_agreement() -> None:
    reviews = [
        review(ITEMS[0], "label_studio:1", "reject", gate=False),
        review(ITEMS[1], "label_studio:1", None, gate=True),  # a comment alone
        review(ITEMS[2], "label_studio:1", "accept", gate=None),  # not graded
    ]

    grader = summarise(reviews, completed=3).grader

    assert (grader.agreement.value, grader.agreement.n, grader.both_reject) == (1.0, 1, 1)


def test_one_reviewer_with_two_verdicts_on_an_item_is_measured_with_fleiss_kappa() -> None:
    # A tool may keep two annotations of one user on an item: two raters but not the same two
    # on every item, as Cohen's kappa needs. Fleiss by hand: item agreements 1 and 0, mean 1/2;
    # accept 3 of 4 ratings: chance 9/16 + 1/16 = 5/8; kappa (1/2 - 5/8) / (3/8) = -1/3.
    reviews = [
        review(ITEMS[0], "label_studio:1", "accept"),
        review(ITEMS[0], "label_studio:2", "accept"),
        review(ITEMS[1], "label_studio:1", "accept"),
        review(ITEMS[1], "label_studio:1", "reject"),
    ]

    between = summarise(reviews, completed=2).between_reviewers

    assert (between.kappa_method, between.reviewers) == (KappaMethod.FLEISS, 2)
    assert between.kappa == pytest.approx(-1 / 3)


def test_a_jobs_reviews_add_up_to_its_counts_its_decisions_and_both_agreements() -> None:
    # Two reviewers; per item: (first's verdict, second's), the grader's gate, and the decision.
    first, second = "label_studio:1", "label_studio:2"
    item = [uuid4() for _ in range(12)]
    reviews = [
        CountedReview(item[0], True, first, ACCEPT, edited=True),  # both accept: approved
        CountedReview(item[0], True, second, ACCEPT, edited=True),
        CountedReview(item[1], True, first, REJECT, edited=False),  # split: rejected
        CountedReview(item[1], True, second, ACCEPT, edited=False),
        CountedReview(item[2], False, first, REJECT, edited=False),  # both reject
        CountedReview(item[2], False, second, REJECT, edited=False),
        CountedReview(item[3], False, first, ACCEPT, edited=False),  # both accept, one edits
        CountedReview(item[3], False, second, ACCEPT, edited=True),
        CountedReview(item[4], True, first, None, edited=False),  # a comment: no decision
        CountedReview(item[5], True, first, ACCEPT, edited=False),
        CountedReview(item[5], True, second, ACCEPT, edited=False),
        CountedReview(item[6], False, first, REJECT, edited=False),  # one verdict each
        CountedReview(item[7], False, second, REJECT, edited=False),
        CountedReview(item[8], True, first, REJECT, edited=False),
        CountedReview(item[8], True, second, None, edited=False),
        CountedReview(item[9], True, first, ACCEPT, edited=False),
        CountedReview(item[10], True, second, ACCEPT, edited=False),
        CountedReview(item[11], None, first, None, edited=False),  # a comment, not graded
    ]

    summary = summarise(reviews, completed=14)

    assert summary.reviews == ReviewCounts(total=18, accepted=9, rejected=6, no_verdict=3, edited=3)
    assert summary.items == ItemCounts(completed=14, reviewed=12, approved=5, rejected=5, edited=2)
    assert summary.reviewers == 2
    # Decided and gated (4 and 11 have no decision): approved 0, 3, 5, 9, 10 (gates T, F, T,
    # T, T); rejected 1, 2, 6, 7, 8 (T, F, F, F, T). Match on 0, 5, 9, 10, 2, 6, 7: 7 of 10.
    # Human approves 5 of 10, the gate accepts 6 of 10: chance (5 * 6 + 5 * 4) / 100 = 1/2;
    # Cohen's kappa (7/10 - 1/2) / (1/2) = 2/5.
    grader = summary.grader
    assert (grader.both_accept, grader.both_reject) == (4, 3)
    assert (grader.human_accepts_grader_rejects, grader.human_rejects_grader_accepts) == (1, 2)
    assert grader.kappa == pytest.approx(2 / 5)
    wilson = scipy.stats.binomtest(7, 10).proportion_ci(0.95, method="wilson")
    assert (grader.agreement.value, grader.agreement.n) == (7 / 10, 10)
    assert grader.agreement.low == pytest.approx(wilson.low)
    assert grader.agreement.high == pytest.approx(wilson.high)
    # Items with two verdicts, 0, 1, 2, 3, 5: all agree on 4 of 5. The first accepts 3 of 5, the
    # second 4 of 5: chance (3 * 4 + 2 * 1) / 25 = 14/25; kappa (4/5 - 14/25) / (11/25) = 6/11.
    between = summary.between_reviewers
    assert (between.kappa_method, between.reviewers) == (KappaMethod.COHEN, 2)
    assert between.kappa == pytest.approx(6 / 11)
    assert (between.agreement.value, between.agreement.n) == (4 / 5, 5)
