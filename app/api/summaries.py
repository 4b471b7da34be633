"""Job summaries as GET /v1/jobs/{id} serves them: counted at most once a second per job.

Counting a job's items and turns costs time in proportion to the job: a few milliseconds
of Postgres for 10,000 items. Clients poll this endpoint, and at hundreds of polls a second
counting on every one would take more CPU than the machine has. So each API process counts
a job at most once per `max_age_s` (setting `job_summary_max_age_s`; 0 counts every time)
and answers the polls in between from that count. Responses to writes (submit, cancel)
are always counted afresh, and a cancel drops the job's count, so a caller sees its own
change at once.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from app.store import jobs
from app.store.models import Job

_MAX_ENTRIES = 10_000  # beyond this, expired counts are dropped


class JobSummaries:
    def __init__(self, max_age_s: float) -> None:
        self._max_age_s = max_age_s
        self._counted: dict[UUID, tuple[float, dict[str, Any]]] = {}  # job id: (when, summary)
        self._counting: set[UUID] = set()

    async def get(self, session: AsyncSession, job: Job) -> dict[str, Any]:
        """The job's summary as counted at most `max_age_s` ago; while one request recounts
        it, the others get the previous count instead of counting too."""
        entry = self._counted.get(job.id)
        if entry is not None and (time.monotonic() - entry[0] < self._max_age_s or job.id in self._counting):
            return entry[1]
        started = time.monotonic()
        self._counting.add(job.id)
        try:
            summary = await jobs.summary(session, job)
        finally:
            self._counting.discard(job.id)
        if len(self._counted) >= _MAX_ENTRIES:
            self._drop_expired()
        self._counted[job.id] = (started, summary)
        return summary

    def forget(self, job_id: UUID) -> None:
        """The job changed through this process: count it afresh next time."""
        self._counted.pop(job_id, None)

    def _drop_expired(self) -> None:
        oldest = time.monotonic() - self._max_age_s
        self._counted = {job_id: entry for job_id, entry in self._counted.items() if entry[0] >= oldest}
