"""`aidsafe reviews`: reviewers' verdicts from Label Studio and Argilla."""

from __future__ import annotations

import typer

from aidsafe.models import Review
from app.cli.connection import ApiKeyOpt, ApiUrl, api_client
from app.cli.output import console, escape, interval

reviews_cli = typer.Typer(help="Reviewers' verdicts from Label Studio and Argilla (over the HTTP API).")


def _kappa(kappa: float | None, method: str | None = None) -> str:
    shown = "n/a" if kappa is None else f"{kappa:.2f}"
    return f"{shown} ({method})" if method else shown


@reviews_cli.command("summary")
def review_summary(job_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """What the job's reviews add up to: counts, and agreement as shares with 95 % intervals.

    Agreement with the grader's gate and between reviewers; the intervals are Wilson's."""
    with api_client(api_url, key) as client:
        summary = client.get_review_summary(job_id)
    reviews, items, grader, between = (
        summary.reviews,
        summary.items,
        summary.grader,
        summary.between_reviewers,
    )
    console.print(
        f"Reviews: {reviews.total} by {summary.reviewers} reviewers: {reviews.accepted} accept, "
        f"{reviews.rejected} reject, {reviews.no_verdict} no verdict; {reviews.edited} edited the response.",
        highlight=False,
    )
    console.print(
        f"Items: {items.reviewed} of {items.completed} reviewed: {items.approved} approved, "
        f"{items.rejected} rejected, {items.edited} with an edit.",
        highlight=False,
    )
    console.print(
        f"With the grader's gate: {interval(grader.agreement, 1, percent=True)} agree, "
        f"kappa {_kappa(grader.kappa)} "
        f"(both accept {grader.both_accept}, both reject {grader.both_reject}, "
        f"human accepts/gate rejects {grader.human_accepts_grader_rejects}, "
        f"human rejects/gate accepts {grader.human_rejects_grader_accepts}).",
        highlight=False,
    )
    console.print(
        f"Between reviewers: {interval(between.agreement, 1, percent=True)} unanimous, "
        f"kappa {_kappa(between.kappa, between.kappa_method)}.",
        highlight=False,
    )


@reviews_cli.command("item")
def item_reviews(item_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", key: ApiKeyOpt = "") -> None:
    """An item's reviews as they count now, oldest first, and its decision."""
    with api_client(api_url, key) as client:
        first = client.get_item_reviews(item_id, limit=500)
        console.print(f"Item {first.item_id}: {first.decision or 'no verdict yet'}.", highlight=False)
        for review in first.reviews:
            _print_review(review)
        if first.next_cursor:
            for review in client.iter_item_reviews(item_id, cursor=first.next_cursor, limit=500):
                _print_review(review)


def _print_review(review: Review) -> None:
    rating = f", rated {review.policy_faithfulness}" if review.policy_faithfulness else ""
    flagged = f", flags thoughts {review.flagged_thoughts}" if review.flagged_thoughts else ""
    console.print(
        f"{review.reviewed_at:%Y-%m-%dT%H:%M:%S}  {review.source}:{review.reviewer}  "
        f"{review.verdict or 'no verdict'}{rating}{flagged}",
        highlight=False,
    )
    if review.edited_response is not None:
        console.print(f"  edited response: {escape(review.edited_response)}", highlight=False)
    if review.comment:
        console.print(f"  comment: {escape(review.comment)}", highlight=False)
