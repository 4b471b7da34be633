"""The labeling-tool round trip: Label Studio's config and Argilla's dataset settings for a
job, human reviews imported back from either tool's files (Label Studio's webhook
deliveries are in app/api/webhooks.py), and the reviews read back: an item's, and what a
job's add up to.

Tasks and records go out through GET /v1/jobs/{id}/export (formats `label_studio` and
`argilla`). Reviews are stored append-only beside the model's output, never over it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from app.api.bodies import JsonBody
from app.api.deps import CurrentKey, OwnedJob, SessionDep
from app.api.errors import documented
from app.api.jobs import PAGE_ERRORS, Cursor, RowLimit
from app.api.schemas import ErrorOut, IntervalOut
from app.config import Settings
from app.labeling import argilla, imports, label_studio
from app.labeling.review_summary import Decision, KappaMethod, decision, summarise
from app.labeling.reviews import Parsed
from app.plan import cot_thoughts
from app.store import annotations as stored
from app.store import jobs
from app.store.models import Job
from app.threads import in_thread

router = APIRouter(tags=["labeling"])
_NOT_IMPORTED = {
    "model": ErrorOut,
    "description": (
        "Nothing was imported: the body is not in the tool's format (validation_error), an "
        "annotation cannot be read (invalid_annotation), or names an item without a CoT in "
        "this job (unknown_items)."
    ),
}
READ_ERRORS = documented(401, 404, 422, 503)
IMPORT_ERRORS = {**documented(400, 401, 404, 413, 503), 422: _NOT_IMPORTED}


def _import_cap(settings: Settings) -> int:
    return settings.max_import_bytes


MAX_IMPORT_VALUES = imports.MAX_IMPORT_VALUES
LABEL_STUDIO_EXPORT = JsonBody[list[label_studio.TaskIn]](
    list[label_studio.TaskIn], MAX_IMPORT_VALUES, _import_cap
)
LABEL_STUDIO_EVENT = JsonBody[label_studio.WebhookIn](label_studio.WebhookIn, MAX_IMPORT_VALUES, _import_cap)
ARGILLA_RECORDS = JsonBody[list[argilla.RecordIn] | argilla.RecordPageIn](
    argilla.RecordsIn, MAX_IMPORT_VALUES, _import_cap
)


class SkippedOut(BaseModel):
    annotation: str | None = Field(description="The tool's id of the annotation or response.")
    reason: str


class ImportOut(BaseModel):
    imported: int = Field(description="Reviews stored now.")
    duplicates: int = Field(description="Reviews already stored (the same version), left as they were.")
    retracted: int = Field(description="Reviews withdrawn because the annotation was deleted in the tool.")
    skipped: list[SkippedOut] = Field(description="Left out on purpose: cancelled, draft, discarded, empty.")


def import_out(report: imports.ImportReport) -> ImportOut:
    return ImportOut(
        imported=report.imported,
        duplicates=report.duplicates,
        retracted=report.retracted,
        skipped=[SkippedOut(annotation=s.annotation, reason=s.reason) for s in report.skipped],
    )


async def _imported(session: SessionDep, parsed: Parsed, job: Job) -> ImportOut:
    await jobs.hold(session, job.id)  # a deletion of the job waits for the reviews, or went first
    report = await imports.record_reviews(session, parsed, owner_key_id=job.owner_key_id, job_id=job.id)
    await session.commit()
    return import_out(report)


@router.get(
    "/v1/jobs/{job_id}/label-studio/config",
    response_class=Response,
    responses={
        200: {
            "description": "The labeling config (XML) for a Label Studio project of this job's tasks.",
            "content": {"application/xml": {"schema": {"type": "string"}}},
        },
        **READ_ERRORS,
    },
)
async def label_studio_config(job: OwnedJob) -> Response:
    """Shows the prompt, intents, numbered refined thoughts and response; asks for a verdict,
    a policy-faithfulness rating, flagged thoughts, an edited response and a comment."""
    return Response(label_studio.CONFIG, media_type="application/xml")


@router.post(
    "/v1/jobs/{job_id}/annotations/label-studio",
    responses=IMPORT_ERRORS,
    openapi_extra=LABEL_STUDIO_EXPORT.openapi,
)
async def import_label_studio(
    key: CurrentKey,  # then the body, then the job: see OwnedJob
    tasks: Annotated[list[label_studio.TaskIn], Depends(LABEL_STUDIO_EXPORT)],
    job: OwnedJob,
    session: SessionDep,
) -> ImportOut:
    """Import the annotations of a Label Studio JSON export (the file as the body). All or
    nothing; importing the same file again adds nothing; an edited annotation adds a row."""
    return await _imported(session, await in_thread(label_studio.read_export, tasks), job)


@router.get("/v1/jobs/{job_id}/argilla/settings", responses=READ_ERRORS)
async def argilla_settings(job: OwnedJob) -> dict[str, Any]:
    """Argilla dataset settings (fields, questions, metadata) for this job's records: load
    them with `rg.Settings.from_json`. Each thought the job's CoTs can hold has an option to
    flag it (at least 12; with `refine: false`, the seed's and every turn's)."""
    return argilla.settings(cot_thoughts(job.plan))


@router.post(
    "/v1/jobs/{job_id}/annotations/argilla", responses=IMPORT_ERRORS, openapi_extra=ARGILLA_RECORDS.openapi
)
async def import_argilla(
    key: CurrentKey,  # then the body, then the job: see OwnedJob
    records: Annotated[list[argilla.RecordIn] | argilla.RecordPageIn, Depends(ARGILLA_RECORDS)],
    job: OwnedJob,
    session: SessionDep,
) -> ImportOut:
    """Import reviewers' responses from Argilla records with their responses (a list, or a
    page `{"items": [...]}` as Argilla's API returns). Only submitted responses count."""
    listed = records if isinstance(records, list) else records.items
    return await _imported(session, await in_thread(argilla.read_records, listed), job)


# --- reviews read back ----------------------------------------------------------------------


class ReviewOut(BaseModel):
    """A review that counts now: the latest version of a reviewer's annotation, not withdrawn."""

    id: UUID = Field(description="The stored version's id.")
    source: str = Field(description="label_studio or argilla.")
    annotation_id: str = Field(description="The tool's id of the annotation (Argilla: of the response).")
    reviewer: str = Field(
        description="Label Studio's user id (or email, in older exports); Argilla's user id."
    )
    verdict: str | None = Field(description="accept, reject, or null: no decision given.")
    edited: bool = Field(description="The reviewer changed the response.")
    edited_response: str | None = Field(description="The response as the reviewer left it, when changed.")
    policy_faithfulness: int | None = Field(description="The reviewer's rating, 1-5.")
    flagged_thoughts: list[int] = Field(description="Numbers of the CoT's thoughts flagged, 1-based.")
    comment: str | None
    reviewed_at: datetime = Field(description="The tool's time of this version.")
    received_at: datetime = Field(description="When the service stored it.")
    webhook_id: UUID | None = Field(
        description="The webhook that delivered it (perhaps deleted since); null: a file import."
    )


class ItemReviewsOut(BaseModel):
    item_id: UUID
    job_id: UUID
    decision: Decision | None = Field(
        description="Of all the item's reviews, not this page's alone. approved: some reviewer "
        "accepts and none rejects (what `human_approved` exports keep); rejected: some reviewer "
        "rejects; null: no verdict yet."
    )
    gate_accepted: bool | None = Field(description="The grader's quality gate; null when not graded.")
    reviews: list[ReviewOut] = Field(description="A page of them, oldest first.")
    next_cursor: str | None = Field(description="Pass it as `cursor` for the next page; null: the last.")


def _review_out(row: stored.ItemReview) -> ReviewOut:
    return ReviewOut(
        id=row.id,
        source=row.source,
        annotation_id=row.external_id,
        reviewer=row.annotator,
        verdict=row.verdict,
        edited=row.edited_response is not None,
        edited_response=row.edited_response,
        policy_faithfulness=row.policy_faithfulness,
        flagged_thoughts=row.flagged_thoughts,
        comment=row.comment,
        reviewed_at=row.annotated_at,
        received_at=row.created_at,
        webhook_id=row.webhook_id,
    )


@router.get("/v1/items/{item_id}/reviews", responses=PAGE_ERRORS)
async def item_reviews(
    item_id: UUID, session: SessionDep, key: CurrentKey, cursor: Cursor = None, limit: RowLimit = 100
) -> ItemReviewsOut:
    """The item's reviews that count now, one per reviewer's annotation (its latest version;
    withdrawn ones left out), a page at a time, with the item's decision and the grader's
    gate. A cursor resumes where its page ended."""
    item, _ = await jobs.get_item_owned(session, item_id, key.id)
    cot = await jobs.item_cot(session, item_id)
    verdicts = await stored.item_verdicts(session, item_id, key.id)
    rows, next_cursor = await stored.page_item_reviews(session, item_id, key.id, cursor, limit)
    return ItemReviewsOut(
        item_id=item.id,
        job_id=item.job_id,
        decision=decision(verdicts),
        gate_accepted=cot.accepted if cot else None,
        reviews=[_review_out(row) for row in rows],
        next_cursor=next_cursor,
    )


class ReviewCountsOut(BaseModel):
    total: int = Field(description="Reviews that count now.")
    accepted: int
    rejected: int
    no_verdict: int = Field(description="A rating, flag, comment or edit without accept or reject.")
    edited: int = Field(description="With an edited response, whatever the verdict.")


class ReviewedItemsOut(BaseModel):
    completed: int = Field(description="The job's CoTs: what can be reviewed.")
    reviewed: int = Field(description="With at least one review.")
    approved: int = Field(description="Some reviewer accepts, none rejects.")
    rejected: int = Field(description="Some reviewer rejects.")
    edited: int = Field(description="With at least one edited response.")


class GraderAgreementOut(BaseModel):
    """Items with both a reviewers' decision and a quality-gate decision."""

    agreement: IntervalOut = Field(description="The share of those items where the two decisions match.")
    kappa: float | None = Field(description="Cohen's kappa, the reviewers' decision against the gate's.")
    both_accept: int
    both_reject: int
    human_accepts_grader_rejects: int
    human_rejects_grader_accepts: int


class ReviewerAgreementOut(BaseModel):
    """Items with two or more verdicts."""

    agreement: IntervalOut = Field(description="The share of those items where every verdict is the same.")
    kappa: float | None = Field(
        description="Agreement beyond chance; null when undefined (one verdict only)."
    )
    kappa_method: KappaMethod | None = Field(
        description="cohen: the same two reviewers on every item; fleiss: any reviewers, any number."
    )
    reviewers: int = Field(description="Distinct reviewers on those items.")


class ReviewSummaryOut(BaseModel):
    job_id: UUID
    reviews: ReviewCountsOut
    items: ReviewedItemsOut
    reviewers: int = Field(
        description="Distinct reviewers (a tool's user: one person in two tools counts twice)."
    )
    grader: GraderAgreementOut
    between_reviewers: ReviewerAgreementOut


@router.get("/v1/jobs/{job_id}/reviews/summary", responses=READ_ERRORS)
async def review_summary(job: OwnedJob, session: SessionDep) -> ReviewSummaryOut:
    """What the job's reviews that count now add up to: counts of reviews and items,
    agreement with the grader's quality gate, and agreement between reviewers, each share
    with its Wilson 95 % interval."""
    rows = await stored.job_reviews(session, job.id, job.owner_key_id)
    completed = await stored.count_cots(session, job.id)
    await session.close()  # its connection given back before waiting for a thread (json_answer says why)
    summary = await in_thread(summarise, rows, completed)  # a large job's reviews: off the loop
    grader, between = summary.grader, summary.between_reviewers
    return ReviewSummaryOut(
        job_id=job.id,
        reviews=ReviewCountsOut(**vars(summary.reviews)),
        items=ReviewedItemsOut(**vars(summary.items)),
        reviewers=summary.reviewers,
        grader=GraderAgreementOut(
            **{**vars(grader), "agreement": IntervalOut.of(grader.agreement)},
        ),
        between_reviewers=ReviewerAgreementOut(
            **{**vars(between), "agreement": IntervalOut.of(between.agreement)},
        ),
    )
