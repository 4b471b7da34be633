"""/v1/jobs/{id}/callbacks: the delivery log of a job's callback, for its owner."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import OwnedJob, SessionDep
from app.api.errors import documented
from app.store import callbacks as store
from app.store.models import CallbackAttempt, CallbackDelivery, CallbackStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class CallbackAttemptOut(BaseModel):
    number: int = Field(
        description="1 for the first attempt. A number missing from the log was "
        "claimed by a worker that died before it could log it (it was sent again)."
    )
    attempted_at: datetime
    duration_ms: float
    status_code: int | None = Field(description="The receiver's HTTP status; null: no answer, or not sent.")
    error: str | None = Field(description="Why it did not count as delivered; null: delivered (2xx).")
    response_snippet: str | None = Field(description="The first characters of the receiver's answer.")


class CallbackDeliveryOut(BaseModel):
    id: UUID = Field(description="Sent in the X-Aidsafe-Delivery header of every attempt: dedupe by it.")
    url: str
    status: CallbackStatus = Field(
        description="pending (due at `next_attempt_at`), delivered, gave_up (the retry period ran "
        "out), or refused (its host is no longer on the server's allow-list)."
    )
    attempts: int = Field(description="Attempts claimed so far.")
    next_attempt_at: datetime | None = Field(description="When it is sent next; null unless pending.")
    created_at: datetime = Field(description="When the job ended.")
    finished_at: datetime | None
    body: dict[str, Any] = Field(description="The JSON body each attempt sends.")
    log: list[CallbackAttemptOut]


class CallbacksOut(BaseModel):
    url: str | None = Field(description="The job's callback URL; null: it names none.")
    deliveries: list[CallbackDeliveryOut] = Field(
        description="One when the job has ended (its end is the one event announced), none before."
    )


@router.get("/{job_id}/callbacks", responses=documented(401, 404, 422, 503))
async def get_callbacks(job: OwnedJob, session: SessionDep) -> CallbacksOut:
    """The job's callback deliveries: status, every attempt with the receiver's status code
    or the error, and when the next attempt is due."""
    rows = await store.deliveries_of(session, job.id)
    return CallbacksOut(
        url=job.callback_url, deliveries=[_delivery_out(delivery, log) for delivery, log in rows]
    )


def _delivery_out(delivery: CallbackDelivery, log: list[CallbackAttempt]) -> CallbackDeliveryOut:
    pending = delivery.status == CallbackStatus.PENDING
    return CallbackDeliveryOut(
        id=delivery.id,
        url=delivery.url,
        status=CallbackStatus(delivery.status),
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at if pending else None,
        created_at=delivery.created_at,
        finished_at=delivery.finished_at,
        body=delivery.payload,
        log=[
            CallbackAttemptOut(
                number=a.number,
                attempted_at=a.attempted_at,
                duration_ms=a.duration_ms,
                status_code=a.status_code,
                error=a.error,
                response_snippet=a.response_snippet,
            )
            for a in log
        ],
    )
