"""app.labeling.review_summary: what reviews add up to, on reviews made up here (the API's
figures over stored reviews are in tests/test_reviews.py)."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from app.labeling.review_summary import Decision, KappaMethod, decision, summarise
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
