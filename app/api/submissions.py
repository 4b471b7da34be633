"""What the submit routes (jobs, comparisons, sample and model evaluations) share: the
request's idempotency, and accepting the new job (commit, then enqueue its items; a replay
answers 200)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar
from uuid import UUID

from arq.connections import ArqRedis
from fastapi import Depends, Header, Response, status
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.deps import ArqDep, KeyWriteSession, SettingsDep
from app.api.errors import documented
from app.config import Settings
from app.idempotency import RequestHash
from app.queue import enqueue_items
from app.store import jobs
from app.store.models import Job
from app.threads import in_thread

log = logging.getLogger("aidsafe.api")
T = TypeVar("T")
# An empty header is refused (422), not taken as no key: it is likely an unset variable in the
# client, and answering 202 would hide that its retries are not idempotent.
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=200)]


def submit_responses(submitted: type[BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    """A submit route's documented answers besides its 202: a replay's 200, and `errors`."""
    replay = {"model": submitted, "description": "Replay of an earlier POST with the same Idempotency-Key."}
    return {200: replay, **documented(*errors)}


@dataclass(frozen=True)
class Submission:
    """A submit request's session (opened in its key's turn: KeyWriteSession) and idempotency
    key, and how to accept what it made."""

    session: AsyncSession
    settings: Settings
    idempotency_key: str | None
    _arq: ArqRedis
    _response: Response

    async def replayed(
        self, owner_key_id: UUID, scope: jobs.IdempotencyScope, request_hash: RequestHash
    ) -> Job | None:
        """The job this request's Idempotency-Key made in `scope`, answered 200 as it is;
        IdempotencyConflict if another request made it. Looked up before the route checks the
        request: a replay finds its job even if the server's settings (endpoints, contexts,
        callback hosts) or the key's sets have changed since, which would refuse it as new."""
        if self.idempotency_key is None:
            return None
        job = await jobs.replayed(self.session, owner_key_id, scope, self.idempotency_key, request_hash)
        if job is not None:
            self._response.status_code = status.HTTP_200_OK
        return job

    async def accept(self, job: Job, new_item_ids: list[UUID]) -> None:
        """Commit the job, then enqueue its new items; none new means a replay: 200, not 202."""
        await self.session.commit()
        if not new_item_ids:
            self._response.status_code = status.HTTP_200_OK
        await enqueue_committed(self._arq, self.settings, job, [(item_id, 1) for item_id in new_item_ids])

    async def shown(self, build: Callable[[], T]) -> T:
        """What `build` makes of what the route has read (the job as its answer shows it),
        made in a worker thread once the session is closed, as json_answer does: its
        connection given back, what it read stays loaded, detached. The route reads no more."""
        await self.session.close()
        return await in_thread(build)

    def job_request(
        self,
        owner_key_id: UUID,
        labels: jobs.Labels,
        request_hash: RequestHash,
        callback: jobs.NewCallback | None,
    ) -> jobs.JobRequest:
        """This request's terms for the job it makes, under the server's cap on open jobs."""
        return jobs.JobRequest(
            owner_key_id,
            labels,
            self.idempotency_key,
            request_hash,
            callback,
            self.settings.max_open_jobs_per_key,
        )


async def _submission(
    session: KeyWriteSession,
    settings: SettingsDep,
    arq: ArqDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Submission:
    return Submission(session, settings, idempotency_key, arq, response)


SubmissionDep = Annotated[Submission, Depends(_submission)]


async def enqueue_committed(
    arq: ArqRedis, settings: Settings, job: Job, items: list[tuple[UUID, int]]
) -> None:
    """Enqueue a committed job's (item id, enqueue counter) pairs, in line as its key's share.
    A failure is logged, not raised: the job exists now, and the sweeper enqueues queued items
    whose arq job is missing."""
    try:
        await enqueue_items(arq, settings.queue_name, items, share=job.owner_key_id)
    except Exception:
        log.exception("enqueue failed for job %s; the sweeper will enqueue its items", job.id)
