"""/v1/model-evaluations: ask models under test a benchmark's prompts and judge every answer
for safety and for refusal, as the paper evaluates its fine-tuned models; the report puts
the models side by side with Wilson 95 % intervals."""

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
from app.api.jobs import ERRORS, resolve_prompt_set
from app.api.json_answers import json_answer
from app.api.schemas import (
    MAX_JOB_VALUES,
    ModelEvaluationIn,
    ModelEvaluationOut,
    SubmittedModelEvaluationOut,
)
from app.api.submissions import Submission, SubmissionDep, submit_responses
from app.idempotency import RequestHash
from app.plan import check_model_evaluation_fits, resolve_model_evaluation
from app.reports import model_evaluation
from app.store import jobs, model_evaluations, policy_sets, prompt_sets
from app.store.models import Job
from app.threads import in_thread

router = APIRouter(prefix="/v1/model-evaluations", tags=["model evaluations"])
# A benchmark file's text is one value here; its JSONL is counted against the same cap as
# it is read.
MODEL_EVALUATION_BODY = JsonBody[ModelEvaluationIn](ModelEvaluationIn, max_values=MAX_JOB_VALUES)


async def evaluation_read(session: AsyncSession, job: Job) -> Callable[[], ModelEvaluationOut]:
    """The job as a model evaluation, with its report (as the API and the web viewer show it);
    NotFound if it is not one. Read now, made by the callable with no more reads (the session
    may be closed meanwhile): CPU for a worker thread (see below)."""
    plan = model_evaluations.plan_of(job)
    rows = await model_evaluations.tally_rows(session, job)
    policy_set = await policy_sets.by_id(session, job.policy_set_id)
    prompt_set = await prompt_sets.pinned(session, job.prompt_set_id)
    summary = await jobs.summary(session, job)

    def shown() -> ModelEvaluationOut:
        tallies = model_evaluations.tallies_of(rows)
        return views.model_evaluation_out(
            job,
            plan,
            policy_set,
            prompt_set,
            summary,
            model_evaluation.by_target(plan, tallies),
            model_evaluation.table(plan, tallies),
        )

    # A Wilson interval per benchmark, category, metric and target: the categories are the
    # client's, and thousands of them held the event loop for seconds (an interval was 250 µs
    # of scipy's then; some 2 µs now); in a thread, their tallies and rows still held it 60 ms.
    return shown


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses=submit_responses(SubmittedModelEvaluationOut, 400, 401, 409, 413, 422, 503),
    openapi_extra=MODEL_EVALUATION_BODY.openapi,
)
async def create_model_evaluation(
    key: CurrentKey,
    body: Annotated[ModelEvaluationIn, Depends(MODEL_EVALUATION_BODY)],
    submission: SubmissionDep,
) -> SubmittedModelEvaluationOut:
    """Ask every target every benchmark prompt (an item per prompt and target), then have the
    safety judge and the refusal judge classify each answer. A benchmark comes inline or as a
    JSONL or CSV file's text; a bad row is a 422 naming its line and field, and nothing is
    created. 422 `request_too_large` if a target's or judge's requests may not fit its
    endpoint's context or the server's `AIDSAFE_LLM_MAX_REQUEST_TOKENS`."""
    body.refuse_batch("model evaluations")
    request_hash = await RequestHash.of(body)
    job = await submission.replayed(key.id, "model_evaluation", request_hash)
    if job is None:
        job = await _new_model_evaluation(key.id, body, submission, request_hash)
    shown = await submission.shown(await evaluation_read(submission.session, job))
    return SubmittedModelEvaluationOut(**dict(shown), callback_secret=job.callback_secret)


async def _new_model_evaluation(
    key_id: UUID, body: ModelEvaluationIn, submission: Submission, request_hash: RequestHash
) -> Job:
    session, settings = submission.session, submission.settings
    callback = callbacks.requested(body.callback_url, settings)
    plan = resolve_model_evaluation(
        body.targets, body.safety_judge, body.refusal_judge, body.max_tokens, settings
    )
    policy_set = await policy_sets.resolve_for_job(
        session, key_id, body.policy_set.name, body.policy_set.version
    )
    prompt_set = await resolve_prompt_set(session, key_id, body.prompt_set)
    cases = [
        model_evaluations.NewCase(benchmark.name, row.category, row.expected, row.prompt, row.metadata)
        for benchmark in body.benchmarks
        for row in benchmark.rows()
    ]
    await in_thread(
        check_model_evaluation_fits,
        plan,
        policy_sets.for_engine(policy_set),
        prompt_sets.for_engine(prompt_set),
        [case.prompt for case in cases],
        settings,
    )
    job, new_item_ids = await model_evaluations.create(
        session,
        submission.job_request(key_id, jobs.Labels(body.label, body.metadata), request_hash, callback),
        policy_set_id=policy_set.id,
        prompt_set_id=prompt_set.id,
        plan=plan,
        cases=cases,
    )
    await submission.accept(job, new_item_ids)
    return job


@router.get("/{evaluation_id}", response_model=ModelEvaluationOut, responses=ERRORS)
async def get_model_evaluation(evaluation_id: UUID, session: SessionDep, key: CurrentKey) -> Response:
    """Progress, and the report over the answers judged so far: per benchmark, category and
    metric, each target's rate with its Wilson 95 % interval. The answers themselves are the
    items' `respond` turns (GET /v1/items/{id}; hazardous text: keys without
    `hazardous:read` see them redacted)."""
    shown = await evaluation_read(session, await jobs.get_owned(session, evaluation_id, key.id))
    return await json_answer(session, shown)
