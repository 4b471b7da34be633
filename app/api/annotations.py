"""The labeling-tool round trip: Label Studio's config and Argilla's dataset settings for a
job, and human reviews imported back from either tool's files (Label Studio's webhook
deliveries are in app/api/webhooks.py).

Tasks and records go out through GET /v1/jobs/{id}/export (formats `label_studio` and
`argilla`). Reviews are stored append-only beside the model's output, never over it."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from app.api.bodies import JsonBody
from app.api.deps import OwnedJob, SessionDep
from app.api.errors import documented
from app.api.schemas import ErrorOut
from app.config import Settings
from app.labeling import argilla, imports, label_studio
from app.labeling.reviews import Parsed
from app.store.models import Job

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


# Reading an import walks every annotation and keeps a copy of each, so its bodies are capped
# lower than others (a Label Studio export of some 300 tasks fits): each object it makes may be
# walked by a garbage collection that holds the GIL, and so the event loop.
MAX_IMPORT_VALUES = 50_000
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
    job: OwnedJob,
    tasks: Annotated[list[label_studio.TaskIn], Depends(LABEL_STUDIO_EXPORT)],
    session: SessionDep,
) -> ImportOut:
    """Import the annotations of a Label Studio JSON export (the file as the body). All or
    nothing; importing the same file again adds nothing; an edited annotation adds a row."""
    return await _imported(session, await asyncio.to_thread(label_studio.read_export, tasks), job)


@router.get("/v1/jobs/{job_id}/argilla/settings", responses=READ_ERRORS)
async def argilla_settings(job: OwnedJob) -> dict[str, Any]:
    """Argilla dataset settings (fields, questions, metadata) for this job's records: load
    them with `rg.Settings.from_json`."""
    return argilla.settings()


@router.post(
    "/v1/jobs/{job_id}/annotations/argilla", responses=IMPORT_ERRORS, openapi_extra=ARGILLA_RECORDS.openapi
)
async def import_argilla(
    job: OwnedJob,
    records: Annotated[list[argilla.RecordIn] | argilla.RecordPageIn, Depends(ARGILLA_RECORDS)],
    session: SessionDep,
) -> ImportOut:
    """Import reviewers' responses from Argilla records with their responses (a list, or a
    page `{"items": [...]}` as Argilla's API returns). Only submitted responses count."""
    listed = records if isinstance(records, list) else records.items
    return await _imported(session, await asyncio.to_thread(argilla.read_records, listed), job)
