"""/v1/comparisons: judge two jobs' samples of the same prompts against each other (the
paper's LLM_ZS vs AIDSAFE comparison) by one judge or several, with the grader's means side
by side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from app import callbacks
from app.api import views
from app.api.bodies import JsonBody
from app.api.deps import CurrentKey, SessionDep
from app.api.errors import documented
from app.api.jobs import ERRORS, Cursor, Limit
from app.api.json_answers import json_answer
from app.api.listing import JobFilterDep
from app.api.schemas import ComparisonIn, ComparisonOut, ComparisonPage, SubmittedComparisonOut
from app.api.submissions import Submission, SubmissionDep, submit_responses
from app.errors import ComparisonMismatch
from app.idempotency import RequestHash
from app.plan import check_comparison_fits, comparison_mismatches, cot_tokens, resolve_comparison
from app.reports import comparison_stats
from app.store import comparisons, job_listing, jobs, policy_sets, prompt_sets
from app.store.models import Job
from app.store.positions import Listing
from app.threads import in_thread

router = APIRouter(prefix="/v1/comparisons", tags=["comparisons"])
COMPARISON_BODY = JsonBody[ComparisonIn](ComparisonIn, max_values=1_000)  # two ids and a judge


async def _comparison_read(session: AsyncSession, job: Job) -> Callable[[], ComparisonOut]:
    """The job as a comparison, read now, made by the callable returned with no more reads:
    intervals and kappas over thousands of prompts, CPU for a worker thread. NotFound if the
    job is not a comparison."""
    plan = comparisons.plan_of(job)
    summary = await jobs.summary(session, job)
    judges = len(plan.judges)
    counts = await comparisons.verdict_counts(session, job.id, judges)
    patterns = await comparisons.verdict_patterns(session, job.id, judges)
    scores = await comparisons.paired_score_counts(session, job.id)

    def shown() -> ComparisonOut:
        report = {
            "judges": [comparison_stats.counted_results(counted) for counted in counts],
            "agreement": comparison_stats.agreement(len(counts), patterns),
            "metrics": comparison_stats.metrics(scores),
        }
        return views.comparison_out(job, plan, summary, report)

    return shown


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses=submit_responses(SubmittedComparisonOut, 400, 401, 404, 409, 413, 422, 503),
    openapi_extra=COMPARISON_BODY.openapi,
)
async def create_comparison(
    key: CurrentKey, body: Annotated[ComparisonIn, Depends(COMPARISON_BODY)], submission: SubmissionDep
) -> SubmittedComparisonOut:
    """Compare two of this key's jobs on the prompts both completed (exact text; 422
    `no_common_prompts` if none). Each judge reads each pair of samples in both orders; a
    sample wins only if preferred both times. Runs as a job of mode `comparison`. 422
    `comparison_mismatch` if the jobs differ in their policy set or grader (details name
    what differs) unless `allow_mismatch`; 422 `request_too_large` if a judge's requests may
    not fit its endpoint's context or the server's `AIDSAFE_LLM_MAX_REQUEST_TOKENS`; 422
    `invalid_prompt_set` if the candidate job's prompt set, which words the judge's requests, no
    longer passes registration's checks."""
    body.refuse_batch("comparisons")
    request_hash = await RequestHash.of(body)
    job = await submission.replayed(key.id, "comparisons", request_hash)
    if job is None:
        job = await _new_comparison(key.id, body, submission, request_hash)
    shown = await submission.shown(await _comparison_read(submission.session, job))
    return SubmittedComparisonOut(**dict(shown), callback_secret=job.callback_secret)


async def _new_comparison(
    key_id: UUID, body: ComparisonIn, submission: Submission, request_hash: RequestHash
) -> Job:
    session, settings = submission.session, submission.settings
    callback = callbacks.requested(body.callback_url, settings)
    baseline = await jobs.get_owned(session, body.baseline_job_id, key_id)
    candidate = await jobs.get_owned(session, body.candidate_job_id, key_id)
    for compared in (baseline, candidate):  # a deletion now waits for the comparison, and refuses
        await jobs.hold(session, compared.id)
    base_policies = await policy_sets.by_id(session, baseline.policy_set_id)
    cand_policies = await policy_sets.by_id(session, candidate.policy_set_id)
    differences = comparison_mismatches(
        baseline.plan,
        candidate.plan,
        ((base_policies.name, base_policies.version), (cand_policies.name, cand_policies.version)),
    )
    if differences and not body.allow_mismatch:
        raise ComparisonMismatch(
            f"the jobs differ in their {' and '.join(what.replace('_', ' ') for what in differences)}: "
            "their samples were not made or graded alike; pass allow_mismatch: true to compare them anyway",
            details={"mismatches": differences},
        )
    plan = resolve_comparison(body.judge_roles(), settings, baseline.id, candidate.id, list(differences))
    # The judge is worded by the candidate's set, pinned before the stages or the checks of
    # today may have been: a template missing from it was a KeyError (500) here.
    wording = prompt_sets.usable(
        await prompt_sets.of_job(session, candidate.prompt_set_id), "the candidate job's "
    )
    await in_thread(
        check_comparison_fits,
        plan,
        policy_sets.for_engine(cand_policies),
        prompt_sets.for_engine(wording),
        await comparisons.longest_prompt(session, candidate.id),
        (cot_tokens(baseline.plan), cot_tokens(candidate.plan)),
        settings,
    )
    job, new_item_ids = await comparisons.create(
        session,
        submission.job_request(key_id, jobs.Labels(body.label, body.metadata), request_hash, callback),
        baseline=baseline,
        candidate=candidate,
        plan=plan,
    )
    await submission.accept(job, new_item_ids)
    return job


@router.get("", responses=documented(400, 401, 422, 503), response_model=ComparisonPage)
async def list_comparisons(
    key: CurrentKey, session: SessionDep, keep: JobFilterDep, cursor: Cursor = None, limit: Limit = 100
) -> Response:
    """This key's comparisons, newest first, with their items counted per status. Filters
    combine (all must hold). A cursor resumes where its page ended, also once the comparisons
    listed are deleted."""
    rows, next_cursor = await job_listing.page(session, key.id, Listing.COMPARISONS, keep, cursor, limit)
    # A page of 500 with 8 KiB of metadata each: encoded on the event loop as GET /v1/jobs's was.
    return await json_answer(
        session,
        lambda: ComparisonPage(
            data=[views.comparison_listed(row) for row in rows],
            next_cursor=next_cursor,
        ),
    )


@router.get("/{comparison_id}", responses=ERRORS, response_model=ComparisonOut)
async def get_comparison(comparison_id: UUID, session: SessionDep, key: CurrentKey) -> Response:
    """Progress; the grader's per-metric means of both jobs over the compared prompts and the
    candidate's paired lead, with 95 % t intervals; each judge's wins, ties and losses from
    the candidate's side, as shares with Wilson 95 % intervals; and, with several judges,
    their agreement (Cohen's or Fleiss' kappa)."""
    return await json_answer(
        session, await _comparison_read(session, await jobs.get_owned(session, comparison_id, key.id))
    )
