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

import time
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from app.store import jobs
from app.store.models import Job

_MAX_ENTRIES = 10_000  # beyond this, expired readings are dropped


class JobSummaries:
    def __init__(self, max_age_s: float) -> None:
        self._max_age_s = max_age_s
        self._read: dict[UUID, tuple[float, Job, dict[str, Any]]] = {}  # job id: (when, row, summary)
        self._reading: set[UUID] = set()

    async def get_owned(
        self, session: AsyncSession, job_id: UUID, owner_key_id: UUID
    ) -> tuple[Job, dict[str, Any]]:
        """jobs.get_owned and jobs.summary, as read at most `max_age_s` ago. While one
        request reads a job again, the others get the previous reading."""
        entry = self._read.get(job_id)
        if entry is not None and (time.monotonic() - entry[0] < self._max_age_s or job_id in self._reading):
            return jobs.owned(entry[1], job_id, owner_key_id), entry[2]
        started = time.monotonic()
        self._reading.add(job_id)
        try:
            job = jobs.owned(await session.get(Job, job_id), job_id, owner_key_id)
            summary = await jobs.summary(session, job)
        finally:
            self._reading.discard(job_id)
        if len(self._read) >= _MAX_ENTRIES:
            self._drop_expired()
        self._read[job_id] = (started, job, summary)
        return job, summary

    def forget(self, job_id: UUID) -> None:
        """The job changed through this process: read it afresh next time."""
        self._read.pop(job_id, None)

    def _drop_expired(self) -> None:
        oldest = time.monotonic() - self._max_age_s
        self._read = {job_id: entry for job_id, entry in self._read.items() if entry[0] >= oldest}
