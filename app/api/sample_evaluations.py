"""/v1/sample-evaluations: grade, guard and/or judge samples written elsewhere (a released
dataset, another team's pipeline), given in the request or uploaded as a JSONL, CSV or
Parquet file; per-sample results and a report with 95 % intervals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from app import callbacks
from app.api import views
from app.api.bodies import JsonBody, body_openapi, read_capped
from app.api.deps import CurrentKey, OwnedJob, ReadsHazardous, SessionDep, SettingsDep
from app.api.jobs import ERRORS, PAGE_ERRORS, Cursor, RowLimit, resolve_prompt_set
from app.api.json_answers import json_answer
from app.api.schemas import (
    SampleEvaluationIn,
    SampleEvaluationOptions,
    SampleEvaluationOut,
    SampleResultOut,
    SampleResultPage,
    SubmittedSampleEvaluationOut,
)
from app.api.state import api_state
from app.api.submissions import Submission, SubmissionDep, submit_responses
from app.config import Settings
from app.deliberation.results import Sample as EngineSample
from app.errors import InvalidRequest
from app.idempotency import RequestHash
from app.plan import RoleIn, SampleEvaluationPlan, check_sample_evaluation_fits, resolve_sample_evaluation
from app.sample_files import MAX_JSON_VALUES, FileType, Sample, read_samples, samples_of
from app.storable import read_json, storable_input
from app.store import jobs, policy_sets, prompt_sets, sample_evaluations
from app.store.jobs import NewCallback
from app.store.models import Job
from app.threads import in_thread

router = APIRouter(prefix="/v1/sample-evaluations", tags=["sample evaluations"])
SAMPLES_BODY = JsonBody[SampleEvaluationIn](SampleEvaluationIn, max_values=MAX_JSON_VALUES)
_OPTIONS: TypeAdapter[SampleEvaluationOptions] = TypeAdapter(SampleEvaluationOptions)
# What an upload's Content-Type says its file type is, when `file_type` does not.
_MEDIA_TYPES: dict[str, FileType] = {
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/x-jsonlines": "jsonl",
    "text/csv": "csv",
    "application/vnd.apache.parquet": "parquet",
}
SUBMIT_ERRORS = submit_responses(SubmittedSampleEvaluationOut, 400, 401, 404, 409, 413, 422, 503)


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, responses=SUBMIT_ERRORS, openapi_extra=SAMPLES_BODY.openapi
)
async def evaluate_samples(
    key: CurrentKey, body: Annotated[SampleEvaluationIn, Depends(SAMPLES_BODY)], submission: SubmissionDep
) -> SubmittedSampleEvaluationOut:
    """Evaluate the samples in the body, each read as a row of a JSONL file (see the upload
    route). Runs as a job of mode `sample_evaluation`, one item per sample."""
    request_hash = await RequestHash.of(body)
    job = await submission.replayed(key.id, "samples", request_hash)
    if job is None:
        asked = _asked(body, submission.settings)
        samples = await in_thread(samples_of, body.samples, body.format, body.columns)
        job = await _new_evaluation(key.id, body, asked, samples, submission, request_hash)
    return await _submitted(submission, job)


@dataclass(frozen=True)
class _Upload:
    """An upload read and checked, before the submission takes its key's turn (KeyWriteSession):
    a slow upload holds up none of the key's other requests, only one of its body turns (held
    until the answer: the samples wait in memory for the key's row)."""

    options: SampleEvaluationOptions
    samples: list[Sample]
    request_hash: RequestHash


async def _uploaded(
    request: Request,
    settings: SettingsDep,
    key: CurrentKey,
    options: Annotated[
        str,
        Query(
            max_length=8_000,
            description="The evaluation's options as JSON (SampleEvaluationOptions: format, columns, "
            'grade, guard, judge, ...), e.g. {"format": "safety", "grade": {}, "guard": {}}.',
        ),
    ] = "{}",
    file_type: Annotated[
        Literal["jsonl", "csv", "parquet"] | None,
        Query(description="The file's type; by default its Content-Type's."),
    ] = None,
) -> AsyncIterator[_Upload]:
    kind = file_type or _MEDIA_TYPES.get(_media_type(request))
    if kind is None:
        # curl's --data-binary sends a form's Content-Type: say which ones would have done.
        problem = (
            f"give one of {', '.join(get_args(FileType))}, or send the file with a Content-Type "
            f"that names its type: {', '.join(_MEDIA_TYPES)}"
        )
        raise InvalidRequest.of([{"loc": ("query", "file_type"), "msg": problem}])
    # Before the body: options that cannot make an evaluation are refused unread, unless the
    # upload may be a replay, whose job is answered whatever the server's settings are now.
    # (The header as sent: the submission's dependency checks it, and a second declaration
    # would report an empty one twice.)
    chosen = _read_options(options)
    if "idempotency-key" not in request.headers:
        _asked(chosen, settings)
    async with api_state(request).body_turns.turn(key.id):
        raw = await read_capped(request, settings.max_request_bytes, settings.body_stall_s)
        # Decoded, a file holds no more than a body may carry: a Parquet file of 91 KB decoding
        # to 500 MB took 70 s of the API's CPU and 3.4 GB of its memory, for one request. Read
        # in the key's turns for a thread (in_thread): read in anyio's threads, beside them, a
        # key's burst of uploads read as many files at once as it had bodies in memory.
        samples = await in_thread(
            read_samples, raw, kind, chosen.format, chosen.columns, max_bytes=settings.max_request_bytes
        )
        yield _Upload(chosen, samples, await RequestHash.of(chosen, kind.encode() + raw))


@router.post(
    "/upload",
    status_code=status.HTTP_202_ACCEPTED,
    responses=SUBMIT_ERRORS,
    openapi_extra=body_openapi({t: {"schema": {"type": "string", "format": "binary"}} for t in _MEDIA_TYPES}),
)
async def upload_samples(
    key: CurrentKey, upload: Annotated[_Upload, Depends(_uploaded)], submission: SubmissionDep
) -> SubmittedSampleEvaluationOut:
    """Evaluate the samples of the file in the body (UTF-8 JSONL or CSV with a header, or
    Parquet) with the column mapping of `options`. 413 `payload_too_large` over the server's
    request cap (read no further), for a JSONL line of over 5,000 JSON values, and for Parquet
    whose metadata lists over 10,000 row groups or columns, or whose mapped columns hold over
    1,200,000 values or decode to over the request cap (64 MiB in a batch of 32 rows). Each other
    refusal names the row (1-based, the header not counted) and the column in `details`: 422
    `missing_column`, `invalid_encoding`, `empty_row`, `too_many_samples`, `invalid_sample_file`.
    Nothing is stored unless every row is good."""
    job = await submission.replayed(key.id, "samples", upload.request_hash)
    if job is None:
        asked = _asked(upload.options, submission.settings)
        job = await _new_evaluation(
            key.id, upload.options, asked, upload.samples, submission, upload.request_hash
        )
    return await _submitted(submission, job)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _read_options(options: str) -> SampleEvaluationOptions:
    """The options, with the checks a JSON body gets (`storable_input`): they are stored."""
    try:
        data = storable_input(read_json(options))
    except json.JSONDecodeError as exc:
        raise _invalid_options(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:  # read_json's and storable_input's
        raise _invalid_options(str(exc)) from None
    try:
        return _OPTIONS.validate_python(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", "options", *e["loc"])} for e in exc.errors(include_url=False)]
        raise InvalidRequest.of(errors) from None


def _invalid_options(problem: str) -> InvalidRequest:
    return InvalidRequest.of([{"loc": ("query", "options"), "msg": problem}])


@dataclass(frozen=True)
class _Asked:
    """What the options ask for, as far as it is checked without the samples or the database."""

    plan: SampleEvaluationPlan
    callback: NewCallback | None


def _asked(options: SampleEvaluationOptions, settings: Settings) -> _Asked:
    """The options' plan and callback: BatchUnsupported, CallbackRefused or InvalidConfig (no
    role asked for, an unknown endpoint) for options no samples could make an evaluation of."""
    options.refuse_batch("sample evaluations")
    callback = callbacks.requested(options.callback_url, settings)
    judge, against = None, None
    if options.judge is not None:
        judge, against = options.judge.judge or RoleIn(), options.judge.job_id
    return _Asked(resolve_sample_evaluation(options.grade, options.guard, judge, against, settings), callback)


async def _new_evaluation(
    key_id: UUID,
    options: SampleEvaluationOptions,
    asked: _Asked,
    samples: list[Sample],
    submission: Submission,
    request_hash: RequestHash,
) -> Job:
    session, settings = submission.session, submission.settings
    plan, callback = asked.plan, asked.callback
    against: list[sample_evaluations.OtherSample | None] = []
    if plan.against_job_id is not None:  # this key's, and not a comparison
        await sample_evaluations.other_set(session, plan.against_job_id, key_id)
        prompts = [s.prompt for s in samples]
        # Linked as read here, checked: the other job may finish more samples meanwhile.
        against = await sample_evaluations.other_samples(session, plan.against_job_id, prompts)
    policy_set = await policy_sets.resolve_for_job(
        session, key_id, options.policy_set.name, options.policy_set.version
    )
    prompt_set = await resolve_prompt_set(session, key_id, options.prompt_set)
    shown = [(s.prompt, EngineSample(s.thoughts, s.response)) for s in samples]
    await in_thread(
        check_sample_evaluation_fits,
        plan,
        policy_sets.for_engine(policy_set),
        prompt_sets.for_engine(prompt_set),
        shown,
        [None if other is None else other.shown_bytes for other in against],
        settings,
    )
    job, new_item_ids = await sample_evaluations.submit(
        session,
        submission.job_request(key_id, jobs.Labels(options.label, options.metadata), request_hash, callback),
        policy_set_id=policy_set.id,
        prompt_set_id=prompt_set.id,
        plan=plan,
        samples=samples,
        against=against,
    )
    await submission.accept(job, new_item_ids)
    return job


async def _submitted(submission: Submission, job: Job) -> SubmittedSampleEvaluationOut:
    evaluation = await submission.shown(await evaluation_read(submission.session, job))
    return SubmittedSampleEvaluationOut(**dict(evaluation), callback_secret=job.callback_secret)


async def evaluation_read(session: AsyncSession, job: Job) -> Callable[[], SampleEvaluationOut]:
    """The job as a sample evaluation, with the report of what it asks (as the API and the web
    viewer show it); NotFound if it is not one. Read now, made by the callable with no more
    reads (the session may be closed meanwhile): CPU for a worker thread (see below)."""
    plan = sample_evaluations.plan_of(job)
    report: dict[str, Any] = {}
    if plan.grader is not None:
        report["grades"] = await sample_evaluations.grades(session, job.id)
    if plan.judge is not None:
        report["pairwise"] = await sample_evaluations.pairwise_counts(session, job.id)
    verdicts = await sample_evaluations.guard_verdicts(session, job.id) if plan.guard is not None else None
    policy_set = await policy_sets.by_id(session, job.policy_set_id)
    prompt_set = await prompt_sets.pinned(session, job.prompt_set_id)
    summary = await jobs.summary(session, job)

    def shown() -> SampleEvaluationOut:
        guard = {} if verdicts is None else {"guard": sample_evaluations.guard_counts(verdicts)}
        return views.sample_evaluation_out(job, plan, policy_set, prompt_set, summary, report | guard)

    # A Wilson interval per sample label: the labels are the client's, and thousands of them
    # held the event loop for seconds (when an interval was 250 µs of scipy's; some 2 µs now).
    return shown


@router.get("/{job_id}", responses=ERRORS, response_model=SampleEvaluationOut)
async def get_sample_evaluation(job: OwnedJob, session: SessionDep) -> Response:
    """Progress and the report: per metric the mean score with its 95 % interval and the
    score counts, the guard's unsafe rate (overall and per label) and the judge's win, tie
    and loss rates, each with its Wilson interval."""
    return await json_answer(session, await evaluation_read(session, job))


@router.get("/{job_id}/samples", responses=PAGE_ERRORS, response_model=SampleResultPage)
async def list_sample_results(
    job: OwnedJob,
    session: SessionDep,
    reads_hazardous: ReadsHazardous,
    cursor: Cursor = None,
    limit: RowLimit = 100,
) -> Response:
    """The samples in order, each with its scores, guard verdict and judgement so far. The
    guard's rationale is withheld from keys without `hazardous:read`, as for every guard."""
    sample_evaluations.plan_of(job)
    known = views.policy_ids(await policy_sets.by_id(session, job.policy_set_id))
    rows, next_cursor = await jobs.page_samples(session, job.id, cursor, limit)
    # Shaped in a worker thread: a page of 500 samples held the event loop for 40-66 ms.
    return await json_answer(
        session,
        lambda: SampleResultPage(
            data=[views.sample_result_out(*row, reads_hazardous, known) for row in rows],
            next_cursor=next_cursor,
        ),
    )


@router.get("/{job_id}/samples/{item_id}", responses=ERRORS)
async def get_sample_result(
    job: OwnedJob, item_id: UUID, session: SessionDep, reads_hazardous: ReadsHazardous
) -> SampleResultOut:
    """One sample with its scores, guard verdict and judgement (the item's turns are at
    GET /v1/items/{item_id})."""
    sample_evaluations.plan_of(job)
    known = views.policy_ids(await policy_sets.by_id(session, job.policy_set_id))
    row = await sample_evaluations.result_of(session, job, item_id)
    return views.sample_result_out(*row, reads_hazardous, known)
