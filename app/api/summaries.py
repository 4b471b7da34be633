"""Jobs as GET /v1/jobs/{id} serves them: read and counted at most once a second per job.

Counting a job's items and turns costs time in proportion to the job: a few milliseconds
of Postgres for 10,000 items. Clients poll this endpoint, and at hundreds of polls a second
counting on every one would take more CPU than the machine has. So each API process reads
a job (its row and its counts) at most once per `max_age_s` (setting
`job_summary_max_age_s`; 0 reads every time) and answers the polls in between from that.
Responses to writes (submit, cancel) are always counted afresh, and a cancel drops the
job's reading, so a caller sees its own change at once.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from app.api.recent import Recent
from app.store import jobs
from app.store.models import Job


class JobSummaries:
    def __init__(self, max_age_s: float) -> None:
        self._read: Recent[UUID, tuple[Job, dict[str, Any]]] = Recent(max_age_s)

    async def get_owned(
        self, session: AsyncSession, job_id: UUID, owner_key_id: UUID
    ) -> tuple[Job, dict[str, Any]]:
        """jobs.get_owned and jobs.summary, as read at most `max_age_s` ago."""

        async def read() -> tuple[Job, dict[str, Any]]:
            job = await jobs.get_owned(session, job_id, owner_key_id)
            return job, await jobs.summary(session, job)

        job, summary = await self._read.get(job_id, read)
        return jobs.owned(job, job_id, owner_key_id), summary

    def forget(self, job_id: UUID) -> None:
        """The job changed through this process: read it afresh next time."""
        self._read.forget(job_id)
