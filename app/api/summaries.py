"""Jobs as the API shows them (JobOut), and as GET /v1/jobs/{id} serves them: read and
counted at most once a second per job (less often for a job whose count takes long), behind
the polls.

Counting a job's items and turns costs time in proportion to the job: a few milliseconds
of Postgres for 10,000 items. Clients poll this endpoint, and at hundreds of polls a second
counting on every one would take more CPU than the machine has. So each API process reads
a job at most once per `max_age_s` (setting `job_summary_max_age_s`; 0 reads every time)
and answers the polls in between from that reading, without touching the database. A job
whose count took d seconds is read at most once per d / `read_share` (setting
`job_summary_read_share`, 2 %) if that is longer, up to ten times `max_age_s` (a count's
time includes its waits), and its bound below grows alike: counting
a job grows with it (48 ms for 10,000 items in bench/RESULTS.md, more while Postgres is busy),
and a dashboard polling twenty such jobs must not keep a Postgres core busy. A poll
that finds the reading older, by up to another such period, is answered from it too and
starts the next one behind it (`Recent`): a job polled often never keeps a poll waiting for
its count, and no answer is older than twice that period and a count.
Responses to writes (submit, cancel) are always counted afresh, and a cancel drops the
job's reading, so a caller sees its own change at once.

A reading is kept as the answer's JSON, encoded once in a worker thread: a job of 10,000
prompts in pairs shows a duplicates report of some 20,000 values, and FastAPI's checking and
encoding of it on every poll took 3 ms of the event loop (bench/RESULTS.md).
"""

from __future__ import annotations

from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from app.api import views
from app.api.json_answers import as_answered
from app.api.recent import Recent
from app.api.schemas import JobOut
from app.duplicates import DuplicatesOut
from app.store import jobs, policy_sets, prompt_sets
from app.store.db import Sessions
from app.store.models import Job
from app.threads import in_thread


async def job_out(session: AsyncSession, job: Job, *, with_duplicates: bool = True) -> JobOut:
    """The job as the API shows it, counted now; its duplicates report, which the job's reads
    leave out unless asked (jobs.get_owned), only `with_duplicates` (else None)."""
    policy_set = await policy_sets.by_id(session, job.policy_set_id)
    prompt_set = await prompt_sets.pinned(session, job.prompt_set_id)
    return JobOut(
        id=job.id,
        created_at=job.created_at,
        cancelled_at=job.cancelled_at,
        label=job.label,
        metadata=job.job_metadata,
        policy_set=views.policy_set_brief(policy_set),
        prompt_set=views.prompt_set_brief(prompt_set) if prompt_set is not None else None,
        config=job.plan.model_dump(mode="json"),  # the plan's JSON, as stored
        duplicates=_duplicates_out(job) if with_duplicates else None,
        **await jobs.summary(session, job),
    )


def _duplicates_out(job: Job) -> DuplicatesOut | None:
    return None if job.duplicates is None else DuplicatesOut.model_validate(job.duplicates)


class JobSummaries:
    def __init__(self, sessions: Sessions, max_age_s: float, read_share: float) -> None:
        self._sessions = sessions
        # By job and key: another key's poll (a 404) never touches the owner's reading.
        self._read: Recent[tuple[UUID, UUID], bytes] = Recent(
            max_age_s, stale_s=max_age_s, read_share=read_share
        )

    async def get_owned_json(self, job_id: UUID, owner_key_id: UUID) -> bytes:
        """jobs.get_owned shown as job_out, as read at most `max_age_s` ago (see above), in JSON
        (`as_answered`)."""

        async def read() -> bytes:
            async with self._sessions() as session:
                job = await jobs.get_owned(session, job_id, owner_key_id, with_duplicates=True)
                shown = await job_out(session, job)
            return await in_thread(as_answered, shown)

        return await self._read.get((job_id, owner_key_id), read)

    def forget(self, job_id: UUID, owner_key_id: UUID) -> None:
        """The job changed through this process: read it afresh next time."""
        self._read.forget((job_id, owner_key_id))

    async def aclose(self) -> None:
        await self._read.aclose()
