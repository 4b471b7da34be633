"""What GET /v1/jobs and GET /v1/comparisons filter on, read from the query string."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Query
from pydantic import AfterValidator, AwareDatetime

from app.api.schemas import LABEL_PATTERN, MAX_LABEL_CHARS
from app.errors import InvalidFilter
from app.storable import read_json, storable_input
from app.store.job_listing import JobFilter
from app.store.models import JobStatus

MAX_METADATA_FILTER_CHARS = 1_000


def _in_utc(moment: datetime) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 with an offset: no instant the database holds
        raise ValueError("the time is out of range") from None


Moment = Annotated[AwareDatetime, AfterValidator(_in_utc)]


def _metadata(text: str | None) -> dict[str, Any] | None:
    """The `metadata` filter's JSON object; InvalidFilter (422) for anything else."""
    if text is None:
        return None
    try:
        wanted = storable_input(read_json(text))
    except ValueError as exc:
        raise InvalidFilter(f"metadata: not a JSON object PostgreSQL can match ({exc})") from None
    if not isinstance(wanted, dict):
        raise InvalidFilter('metadata: give a JSON object, such as {"source": "wildchat"}')
    return wanted


async def _job_filter(
    status: Annotated[
        list[JobStatus] | None, Query(description="Only jobs in these statuses (repeatable).")
    ] = None,
    created_after: Annotated[
        Moment | None, Query(description="Only jobs created after this time (ISO 8601, with a UTC offset).")
    ] = None,
    created_before: Annotated[
        Moment | None, Query(description="Only jobs created before this time (ISO 8601, with a UTC offset).")
    ] = None,
    label: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_LABEL_CHARS,
            pattern=LABEL_PATTERN,
            description="Only jobs with exactly this label.",
        ),
    ] = None,
    metadata: Annotated[
        str | None,
        Query(
            max_length=MAX_METADATA_FILTER_CHARS,
            description='A JSON object: only jobs whose metadata contains it (`{"source": "wildchat"}` '
            "keeps jobs whose metadata has that key with that value; nested objects match the same "
            "way). 422 `invalid_filter` if it is not a JSON object.",
        ),
    ] = None,
) -> JobFilter:
    return JobFilter(
        statuses=status or (),
        created_after=created_after,
        created_before=created_before,
        label=label,
        metadata=_metadata(metadata),
    )


# The filters both listings share; GET /v1/jobs adds `kind`.
JobFilterDep = Annotated[JobFilter, Depends(_job_filter)]
