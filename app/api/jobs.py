"""/v1/jobs: submit prompt batches, follow them, cancel them, page through results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from app import callbacks, duplicates, events
from app.api import views
from app.api.bodies import JsonBody
from app.api.deps import (
    CurrentKey,
    KeyWriteSession,
    OwnedJob,
    PresetsDep,
    ReadsHazardous,
    SessionDep,
    SettingsDep,
    StateDep,
    SummariesDep,
)
from app.api.errors import documented
from app.api.json_answers import json_answer
from app.api.listing import JobFilterDep
from app.api.schemas import (
    MAX_JOB_VALUES,
    CotPage,
    EstimateOut,
    ItemPage,
    ItemStatus,
    JobDeletionOut,
    JobIn,
    JobKind,
    JobLabelsIn,
    JobOut,
    JobPage,
    PreferencePairPage,
    PromptIn,
    PromptSetRef,
    ReportOut,
    SubmittedJobOut,
)
from app.api.submissions import Submission, SubmissionDep, enqueue_committed, submit_responses
from app.api.summaries import job_out
from app.config import Settings
from app.costs import check_budget, estimate
from app.deliberation.policies import PolicySet
from app.deliberation.prompt_sets import BUILTIN_NAME
from app.deliberation.prompting import PromptSet
from app.deliberation.results import GAP_SCALE
from app.duplicates import DuplicatesOut
from app.idempotency import RequestHash
from app.plan import GenerationPlan, check_job_fits, resolve
from app.presets import Presets
from app.store import deletions, job_listing, jobs, page_sizes, policy_sets, prompt_sets
from app.store.models import Job, PolicySetRow, PromptSetRow
from app.store.positions import Listing
from app.threads import in_thread

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
RowLimit = Annotated[
    int,
    Query(
        ge=1,
        le=500,
        description="Page size; a page stops short of it where its rows come to "
        f"{page_sizes.PAGE_ROW_BYTES:,} bytes of JSON (a larger row comes alone). Follow "
        "`next_cursor` until it is null.",
    ),
]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page.")]
ERRORS = documented(401, 404, 422, 503)  # routes with an id in the path
PAGE_ERRORS = documented(400, 401, 404, 422, 503)
JOB_BODY = JsonBody[JobIn](JobIn, max_values=MAX_JOB_VALUES)
LABELS_BODY = JsonBody[JobLabelsIn](JobLabelsIn, max_values=5_000)  # a label and 8 KiB of metadata


def min_gap_query(description: str) -> Any:
    """A `min_gap` query parameter: a policy-faithfulness gap, within the scale gaps have."""
    low, high = GAP_SCALE
    # Without allow_inf_nan, NaN would be refused as "at most 4".
    return Query(ge=low, le=high, allow_inf_nan=False, description=description)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses=submit_responses(SubmittedJobOut, 400, 401, 409, 413, 422, 503),
    openapi_extra=JOB_BODY.openapi,
)
async def submit_job(
    key: CurrentKey, body: Annotated[JobIn, Depends(JOB_BODY)], submission: SubmissionDep, presets: PresetsDep
) -> SubmittedJobOut:
    """Accept a batch of 1 to 10,000 prompts; one arq job per item is enqueued after commit.
    Duplicate prompts are reported in `duplicates`, and with `"duplicates": "skip"` get no item.
    422 `request_too_large` if a role's requests may not fit its endpoint's context or the
    server's `AIDSAFE_LLM_MAX_REQUEST_TOKENS`; 409
    `limit_reached` if the key has `AIDSAFE_MAX_OPEN_JOBS_PER_KEY` open jobs (of any kind)."""
    request_hash = await RequestHash.of(body)
    job = await submission.replayed(key.id, "jobs", request_hash)
    if job is None:
        job = await _new_job(key.id, body, submission, presets, request_hash)
    shown = await job_out(submission.session, job)
    return SubmittedJobOut(**dict(shown), callback_secret=job.callback_secret)


async def _new_job(
    key_id: UUID, body: JobIn, submission: Submission, presets: Presets, request_hash: RequestHash
) -> Job:
    session, settings = submission.session, submission.settings
    callback = callbacks.requested(body.callback_url, settings)
    planned = await _planned(key_id, body, session, settings, presets)
    plan, found, kept = planned.plan, planned.found, planned.kept
    job, new_item_ids = await jobs.submit(
        session,
        submission.job_request(key_id, jobs.Labels(body.label, body.metadata), request_hash, callback),
        policy_set_id=planned.policy_set.id,
        prompt_set_id=planned.prompt_set.id,
        plan=plan,
        items=[jobs.NewItem(position, p.prompt, p.metadata) for position, p in kept],
        duplicates=found.model_dump(mode="json"),
        budget=body.budget,
    )
    await submission.accept(job, new_item_ids)
    return job


@router.post("/estimate", responses=documented(400, 401, 413, 422, 503), openapi_extra=JOB_BODY.openapi)
async def estimate_job(
    key: CurrentKey,
    body: Annotated[JobIn, Depends(JOB_BODY)],
    session: SessionDep,
    settings: SettingsDep,
    presets: PresetsDep,
) -> EstimateOut:
    """What the job in the body would use: LLM calls, tokens and cost, as a range, at the
    current prices. Checks the body as POST /v1/jobs does (its 422s included) and creates
    nothing: no job, no items, no Idempotency-Key."""
    planned = await _planned(key.id, body, session, settings, presets)
    plan, texts = planned.plan, [p.prompt for _, p in planned.kept]
    # A cost per prompt: 10,000 held the event loop for 10 ms.
    figures = await in_thread(estimate, plan, *planned.for_engine(), texts)
    return EstimateOut.model_validate({**asdict(figures), "prices": plan.prices})


@dataclass(frozen=True)
class _Planned:
    plan: GenerationPlan
    policy_set: PolicySetRow
    prompt_set: PromptSetRow
    found: DuplicatesOut
    kept: list[tuple[int, PromptIn]]  # (position, prompt) of the items it makes

    def for_engine(self) -> tuple[PolicySet, PromptSet]:
        return policy_sets.for_engine(self.policy_set), prompt_sets.for_engine(self.prompt_set)


async def resolve_prompt_set(session: AsyncSession, key_id: UUID, ref: PromptSetRef | None) -> PromptSetRow:
    """The prompt set a job or an evaluation pins: the one named, else the built-in set."""
    ref = ref or PromptSetRef(name=BUILTIN_NAME)
    return await prompt_sets.resolve_for_job(session, key_id, ref.name, ref.version)


async def _planned(
    key_id: UUID, body: JobIn, session: AsyncSession, settings: Settings, presets: Presets
) -> _Planned:
    """A job request resolved and checked as submitting it does (its 422s), creating nothing:
    the plan (its preset merged), the policy and prompt sets, the duplicates and the prompts kept."""
    config, preset = presets.config_for(body.preset, body.preset_version, body.config)
    plan = resolve(config, settings, preset)
    policy_set = await policy_sets.resolve_for_job(
        session, key_id, body.policy_set.name, body.policy_set.version
    )
    prompt_set = await resolve_prompt_set(session, key_id, body.prompt_set)
    # Off the event loop: 10,000 prompts' models and their duplicates take 20-30 ms.
    prompts, found = await in_thread(_prompts_and_duplicates, body)
    skipped = set(found.skipped)
    kept = [(position, p) for position, p in enumerate(prompts) if position not in skipped]
    planned = _Planned(plan, policy_set, prompt_set, found, kept)
    texts, (policies, wording) = [p.prompt for _, p in kept], planned.for_engine()
    # Off the event loop: the sizes of 10,000 prompts (2-4 ms of CPU), and the budget's check as
    # in relabel_job (it held the loop for 40 ms for 8 agents and 20 rounds).
    await in_thread(check_job_fits, plan, policies, wording, texts, settings)
    await in_thread(check_budget, body.budget, plan, policies, wording, texts)
    return planned


def _prompts_and_duplicates(body: JobIn) -> tuple[list[PromptIn], DuplicatesOut]:
    prompts = body.prompt_items()
    return prompts, duplicates.find([p.prompt for p in prompts], body.duplicates)


@router.get("", responses=documented(400, 401, 422, 503), response_model=JobPage)
async def list_jobs(
    key: CurrentKey,
    session: SessionDep,
    keep: JobFilterDep,
    kind: Annotated[list[JobKind] | None, Query(description="Only jobs of these kinds (repeatable).")] = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Response:
    """This key's jobs, comparisons included, newest first, with their items counted per
    status. Filters combine (all must hold). A cursor resumes where its page ended, also once
    the jobs listed are deleted."""
    rows, next_cursor = await job_listing.page(
        session, key.id, Listing.JOBS, replace(keep, kinds=kind or ()), cursor, limit
    )
    # A job's metadata is up to 8 KiB of JSON: FastAPI's encoding of a page of 500 jobs with
    # 4,000 values in each held the event loop for 30 ms.
    return await json_answer(
        session, lambda: JobPage(data=[views.job_listed(row) for row in rows], next_cursor=next_cursor)
    )


@router.get("/{job_id}", responses=ERRORS, response_model=JobOut)
async def get_job(job_id: UUID, key: CurrentKey, summaries: SummariesDep) -> Response:
    """Status, counts per stage and status, and token totals, as counted at most about two
    seconds ago (twice the server's `job_summary_max_age_s`), or for a job whose count takes
    long, up to ten times that (`job_summary_read_share`; app/api/summaries.py)."""
    return Response(await summaries.get_owned_json(job_id, key.id), media_type="application/json")


@router.patch(
    "/{job_id}", responses=documented(400, 401, 404, 413, 422, 503), openapi_extra=LABELS_BODY.openapi
)
async def relabel_job(
    key: CurrentKey,  # then the body, then the job: see OwnedJob
    body: Annotated[JobLabelsIn, Depends(LABELS_BODY)],
    job: OwnedJob,
    session: SessionDep,
    summaries: SummariesDep,
    state: StateDep,
) -> JobOut:
    """Set the job's label, metadata and/or budget; a field left out stays as it is. A budget
    that is no longer spent resumes the items waiting as `budget_exhausted`."""
    changed = body.model_fields_set
    await jobs.relabel(session, job, body.model_dump(include=changed - {"budget"}))
    resumed: list[tuple[UUID, int]] = []
    if "budget" in changed:
        policies = policy_sets.for_engine(await policy_sets.by_id(session, job.policy_set_id))
        wording = prompt_sets.for_engine(await prompt_sets.of_job(session, job.prompt_set_id))
        shortest = await jobs.shortest_prompt(session, job.id)
        # Off the event loop: it renders the largest request of every deliberation turn, some
        # 13,000 for 8 agents and 20 rounds, which held it for 40 ms.
        await in_thread(check_budget, body.budget, job.plan, policies, wording, [shortest])
        resumed = await jobs.set_budget(session, state.spending, job, body.budget)
    await session.commit()
    await enqueue_committed(state.arq, state.settings, job, resumed)
    await jobs.refresh_with_duplicates(session, job)
    summaries.forget(job.id, job.owner_key_id)
    return await job_out(session, job)


@router.post("/{job_id}/cancel", responses=ERRORS)
async def cancel_job(job: OwnedJob, session: SessionDep, summaries: SummariesDep) -> JobOut:
    """Queued items are cancelled at once; running items stop within a lease period.
    Finished items and their data are kept; a job that has already finished stays as it
    is (`completed`, no `cancelled_at`). Cancelling twice is harmless."""
    await jobs.cancel(session, job)
    await session.commit()
    await jobs.refresh_with_duplicates(session, job)
    summaries.forget(job.id, job.owner_key_id)
    return await job_out(session, job)


@router.get("/{job_id}/items", responses=PAGE_ERRORS, response_model=ItemPage)
async def list_items(
    job: OwnedJob,
    session: SessionDep,
    status: ItemStatus | None = None,
    cursor: Cursor = None,
    limit: RowLimit = 100,
) -> Response:
    rows, next_cursor = await jobs.page_items(session, job.id, status, cursor, limit)
    # Shaped and encoded in a worker thread: on the event loop, a page of 500 items of 300
    # metadata values each held it for 19-32 ms of CPU, reading the rows 5-9 of them.
    return await json_answer(
        session, lambda: ItemPage(data=[views.item_out(item) for item in rows], next_cursor=next_cursor)
    )


@router.get("/{job_id}/cots", responses=PAGE_ERRORS, response_model=CotPage)
async def list_cots(
    job: OwnedJob,
    session: SessionDep,
    accepted: Annotated[
        bool | None, Query(description="Only CoTs the quality gate accepted (true) or rejected (false).")
    ] = None,
    cursor: Cursor = None,
    limit: RowLimit = 100,
) -> Response:
    """Refined CoTs of completed items, in prompt order, with their scores and gate decision."""
    rows, next_cursor = await jobs.page_cots(session, job.id, accepted, cursor, limit)
    # Shaped in a worker thread: a page of 500 CoTs held the event loop for 44 ms.
    return await json_answer(
        session,
        lambda: CotPage(data=[views.cot_out(cot, item) for cot, item in rows], next_cursor=next_cursor),
    )


@router.get("/{job_id}/preference-pairs", responses=PAGE_ERRORS, response_model=PreferencePairPage)
async def list_preference_pairs(
    job: OwnedJob,
    session: SessionDep,
    reads_hazardous: ReadsHazardous,
    kept: Annotated[
        bool | None, Query(description="Only pairs kept at `min_gap` (true) or not kept (false).")
    ] = None,
    min_gap: Annotated[
        float | None,
        min_gap_query(
            "Only pairs with at least this policy-faithfulness gap, kept at it. Default: "
            "no gap filter, and pairs are kept at the job's `pairs.min_gap`."
        ),
    ] = None,
    cursor: Cursor = None,
    limit: RowLimit = 100,
) -> Response:
    """Ear-whisperer pair attempts in prompt order, with every try (standard sampling's too,
    when the job asked for the baseline). Beliefs, rejected CoTs and
    what the generator, guard and grader said about them are hazardous: keys without the
    `hazardous:read` scope get them as null (see the README's "Hazardous text")."""
    known = views.policy_ids(await policy_sets.by_id(session, job.policy_set_id))
    rows, next_cursor = await jobs.page_pairs(
        session, job, kept=kept, min_gap=min_gap, cursor=cursor, limit=limit
    )
    # Shaped in a worker thread: a page of 500 pairs held the event loop for 56-66 ms.
    return await json_answer(
        session,
        lambda: PreferencePairPage(
            data=[views.pair_out(*row, reads_hazardous, known) for row in rows], next_cursor=next_cursor
        ),
    )


@router.get("/{job_id}/report", responses=ERRORS, response_model=ReportOut)
async def get_report(job: OwnedJob, session: SessionDep) -> Response:
    """Quality in full: grader statistics, the gate's thresholds and misses, pair outcomes,
    and LLM usage by stage."""
    report = await jobs.report_read(session, job)
    return await json_answer(session, lambda: views.report_out(job, report()))


@router.delete("/{job_id}", responses=documented(401, 404, 409, 422, 503))
async def delete_job(
    job_id: UUID, key: CurrentKey, session: KeyWriteSession, summaries: SummariesDep, state: StateDep
) -> JobDeletionOut:
    """Delete a finished job (a comparison too) and everything derived from it: items,
    turns, CoTs, preference pairs, judgements, annotations, its progress events and its
    Idempotency-Key (which is free again), in one transaction. Answers the deletion's
    trace, which GET /v1/deletions keeps listing. 409 `job_running` while items are queued
    or running (cancel the job first), or a cancelled batch job's provider batches are not yet
    cancelled; 409 `job_in_comparison` while comparisons judge its
    samples (their ids in `details.comparison_ids`: delete them first). Deleting again is a 404."""
    deletion = await deletions.delete_job(session, job_id, key.id)
    await session.commit()
    summaries.forget(job_id, key.id)
    await events.forget_job(state.arq, state.settings, job_id)
    return JobDeletionOut.model_validate(deletion, from_attributes=True)
