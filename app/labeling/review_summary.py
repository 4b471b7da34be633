"""What a job's human reviews add up to: counts, the item's decision under the rule exports
use, agreement with the grader's gate, and agreement between reviewers. Pure functions over
the reviews that count now (app.store.annotations.job_reviews)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

from app.stats import Estimate, cohen_kappa, fleiss_kappa, proportion
from app.store.annotations import CountedReview

ACCEPT, REJECT = "accept", "reject"


class Decision(StrEnum):
    """An item's human decision, as the exports' `human_approved` filter reads its reviews."""

    APPROVED = "approved"  # some reviewer accepts and none rejects
    REJECTED = "rejected"  # some reviewer rejects


def decision(verdicts: Iterable[str | None]) -> Decision | None:
    """The item's decision from its current reviewers' verdicts; None while none gave one."""
    given = set(verdicts)
    if REJECT in given:
        return Decision.REJECTED
    return Decision.APPROVED if ACCEPT in given else None


@dataclass(frozen=True)
class ReviewCounts:
    total: int
    accepted: int
    rejected: int
    no_verdict: int  # a rating, flag, comment or edit without accept/reject
    edited: int  # with a response the reviewer changed (whatever the verdict)


@dataclass(frozen=True)
class ItemCounts:
    completed: int  # the job's CoTs: what could be reviewed
    reviewed: int  # with at least one review that counts
    approved: int
    rejected: int
    edited: int  # with at least one edited response: what `human_edits` exports change


@dataclass(frozen=True)
class GraderAgreement:
    """Items with a human decision and a grader's gate decision: how often they match."""

    agreement: Estimate  # the share of those items where they match, Wilson 95 %
    kappa: float | None  # Cohen's, the reviewers' decision against the gate
    both_accept: int
    both_reject: int
    human_accepts_grader_rejects: int
    human_rejects_grader_accepts: int


class KappaMethod(StrEnum):
    COHEN = "cohen"  # the same two reviewers on every item
    FLEISS = "fleiss"  # any reviewers, any number per item


@dataclass(frozen=True)
class ReviewerAgreement:
    """Items with two or more verdicts: how often all their reviewers agree."""

    agreement: Estimate  # the share of those items where every verdict is the same, Wilson 95 %
    kappa: float | None
    kappa_method: KappaMethod | None  # None with no item to measure
    reviewers: int  # distinct reviewers on those items


@dataclass(frozen=True)
class ReviewSummary:
    reviews: ReviewCounts
    items: ItemCounts
    reviewers: int
    grader: GraderAgreement
    between_reviewers: ReviewerAgreement


def summarise(reviews: Sequence[CountedReview], completed: int) -> ReviewSummary:
    """The summary of a job's reviews that count now; `completed`: the job's CoTs."""
    by_item: dict[UUID, list[CountedReview]] = defaultdict(list)
    for review in reviews:
        by_item[review.item_id].append(review)
    decisions = {item: decision(r.verdict for r in rows) for item, rows in by_item.items()}
    verdicts = Counter(review.verdict for review in reviews)
    return ReviewSummary(
        reviews=ReviewCounts(
            total=len(reviews),
            accepted=verdicts[ACCEPT],
            rejected=verdicts[REJECT],
            no_verdict=verdicts[None],
            edited=sum(review.edited for review in reviews),
        ),
        items=ItemCounts(
            completed=completed,
            reviewed=len(by_item),
            approved=sum(d is Decision.APPROVED for d in decisions.values()),
            rejected=sum(d is Decision.REJECTED for d in decisions.values()),
            edited=sum(any(r.edited for r in rows) for rows in by_item.values()),
        ),
        reviewers=len({review.reviewer for review in reviews}),
        grader=_with_grader([(d, by_item[item][0].gate_accepted) for item, d in decisions.items()]),
        between_reviewers=_between_reviewers(by_item.values()),
    )


def _with_grader(decided: list[tuple[Decision | None, bool | None]]) -> GraderAgreement:
    """Per item, (the reviewers' decision, the gate's); items lacking either are left out."""
    pairs = [
        (human is Decision.APPROVED, gate)
        for human, gate in decided
        if human is not None and gate is not None
    ]
    table = Counter(pairs)
    matches = table[True, True] + table[False, False]
    return GraderAgreement(
        agreement=proportion(matches, len(pairs)),
        kappa=cohen_kappa(pairs),
        both_accept=table[True, True],
        both_reject=table[False, False],
        human_accepts_grader_rejects=table[True, False],
        human_rejects_grader_accepts=table[False, True],
    )


def _between_reviewers(items: Iterable[list[CountedReview]]) -> ReviewerAgreement:
    verdicts = [[(r.reviewer, r.verdict) for r in rows if r.verdict is not None] for rows in items]
    rated = [ratings for ratings in verdicts if len(ratings) >= 2]
    unanimous = sum(len({verdict for _, verdict in ratings}) == 1 for ratings in rated)
    reviewers = {reviewer for ratings in rated for reviewer, _ in ratings}
    kappa, method = _kappa(rated, reviewers)
    return ReviewerAgreement(proportion(unanimous, len(rated)), kappa, method, len(reviewers))


def _kappa(
    rated: list[list[tuple[str, str]]], reviewers: set[str]
) -> tuple[float | None, KappaMethod | None]:
    """Cohen's kappa when the same two reviewers gave every verdict (two fixed raters, what it
    assumes), Fleiss' otherwise."""
    if not rated:
        return None, None
    if len(reviewers) == 2 and all(len(r) == 2 and {who for who, _ in r} == reviewers for r in rated):
        first, second = sorted(reviewers)
        return cohen_kappa([(dict(r)[first], dict(r)[second]) for r in rated]), KappaMethod.COHEN
    return fleiss_kappa([Counter(verdict for _, verdict in ratings) for ratings in rated]), KappaMethod.FLEISS
