"""Idempotency-Key replays across releases: a replay matches on what the client sent, so a
release that changes the default of a field the body left out does not make it a conflict;
and a job stored before that rule (its hash of the body with every default filled in) still
replays."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import pytest
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from sqlalchemy import update

from app.api.schemas import (
    ComparisonIn,
    JobIn,
    ModelEvaluationIn,
    PolicySetRef,
    SampleEvaluationIn,
    SampleEvaluationOptions,
)
from app.config import EndpointConfig, Settings
from app.idempotency import _TEXT_SLICE, RequestHash, _canonical_json
from app.plan import JobConfigIn
from app.store.db import Sessions
from app.store.models import Job
from tests.conftest import api_client
from tests.scripted_llm import ScriptedLLM
from tests.test_api import error_of, row_counts
from tests.test_model_evaluation_api import GOOD_ROW, evaluation_body
from tests.test_quality_api import completed, finished_job

Headers = dict[str, str]
CONFLICT = "this Idempotency-Key was already used with a different request body"
CSV = b"prompt,response\nHow do tides work?,The moon pulls the sea.\n"
SAMPLE = {"prompt": "How do tides work?", "response": "The moon pulls the sea."}


@dataclass(frozen=True)
class Submit:
    """A submit request: what is sent, and what its route parses (`parsed`, then the file
    type and bytes of an upload)."""

    path: str
    parsed: BaseModel
    json: dict[str, Any] | None = None
    params: dict[str, str] | None = None
    content: bytes | None = None
    upload: bytes = b""

    async def send(self, api: httpx.AsyncClient, headers: Headers) -> httpx.Response:
        return await api.post(
            self.path, json=self.json, params=self.params, content=self.content, headers=headers
        )

    def legacy_hash(self) -> str:
        """What a job stored before replays matched on what was sent: the hash of the parsed
        body with every default filled in (written out as that code had it)."""
        return hashlib.sha256(self.parsed.model_dump_json().encode() + self.upload).hexdigest()

    def sent_hash(self) -> str:
        """The hash of the fields the request gave."""
        sent = self.parsed.model_dump_json(exclude_unset=True)
        return hashlib.sha256(sent.encode() + self.upload).hexdigest()


def json_submit(path: str, schema: type[BaseModel], body: dict[str, Any]) -> Submit:
    return Submit(path, schema.model_validate(body), json=body)


def upload_submit(content: bytes, **options: Any) -> Submit:
    params = {"file_type": "csv", "options": json.dumps(options)}
    parsed = SampleEvaluationOptions.model_validate(options)
    return Submit(
        "/v1/sample-evaluations/upload", parsed, params=params, content=content, upload=b"csv" + content
    )


JOB_BODY = {"prompts": ["a", "b"], "config": {"agents": 2}}
JOB = json_submit("/v1/jobs", JobIn, JOB_BODY)
SUBMITS = {
    "job": JOB,
    "model evaluation": json_submit(
        "/v1/model-evaluations",
        ModelEvaluationIn,
        evaluation_body([{"name": "b", "prompts": [GOOD_ROW]}], "m1"),
    ),
    "sample evaluation": json_submit(
        "/v1/sample-evaluations", SampleEvaluationIn, {"guard": {}, "samples": [SAMPLE]}
    ),
    "sample upload": upload_submit(CSV, guard={}),
}


@pytest.fixture(params=[*SUBMITS, "comparison"])
async def submitted(
    request: pytest.FixtureRequest, api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> Submit:
    """Each submit route's request (a comparison's needs two finished jobs first)."""
    if request.param != "comparison":
        return SUBMITS[request.param]
    baseline, candidate = [
        await finished_job(api, auth, sessions, [completed()], prompts=["a"]) for _ in range(2)
    ]
    return json_submit(
        "/v1/comparisons", ComparisonIn, {"baseline_job_id": baseline, "candidate_job_id": candidate}
    )


async def store_hash(
    sessions: Sessions, job_id: str, request_hash: str, *, by_this_release: bool = False
) -> None:
    """Make the job hold this hash: stored by an earlier release, which (as migration 0038 marks
    every job stored before it) may have stored the legacy hash, or by this one."""
    values: dict[str, Any] = {"request_hash": request_hash}
    if not by_this_release:
        values["request_hash_may_be_legacy"] = True
    async with sessions.begin() as session:
        await session.execute(update(Job).where(Job.id == UUID(job_id)).values(values))


def assert_replays(first: httpx.Response, again: httpx.Response) -> None:
    """`again` answered with what `first` made, as a replay."""
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]


async def stored(sessions: Sessions, redis: Redis, settings: Settings) -> tuple[int, int, int]:
    """Jobs, items and queued arq jobs."""
    return (*await row_counts(sessions), await redis.zcard(settings.queue_name))


# --- a release that changes a default -------------------------------------------------------


class EarlierConfig(JobConfigIn):
    max_rounds: int | None = 3


class EarlierPolicySetRef(PolicySetRef):
    name: str = "aidsafe-v0"


class EarlierDefaultInGivenObject(JobIn):
    """JobIn as an earlier release had it, defaulting a field of `config` (which the body
    gives) otherwise."""

    config: EarlierConfig = Field(default_factory=EarlierConfig)


class EarlierDefaultInObjectLeftOut(JobIn):
    """JobIn as an earlier release had it, defaulting `policy_set` (which the body leaves
    out) otherwise."""

    policy_set: EarlierPolicySetRef = Field(default_factory=EarlierPolicySetRef)


@pytest.mark.parametrize("earlier", [EarlierDefaultInGivenObject, EarlierDefaultInObjectLeftOut])
async def test_a_replay_spanning_a_changed_default_of_a_field_left_out_still_replays(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    redis: Redis,
    settings: Settings,
    earlier: type[JobIn],
) -> None:
    headers = {**auth, "Idempotency-Key": "across-releases"}
    first = await JOB.send(api, headers)
    assert first.status_code == 202, first.text
    # What the earlier release stored: this code's hash of the body as its schema parsed it.
    await store_hash(sessions, first.json()["id"], RequestHash(earlier.model_validate(JOB_BODY)).value)
    before = await stored(sessions, redis, settings)

    again = await JOB.send(api, headers)

    assert_replays(first, again)
    assert await stored(sessions, redis, settings) == before


# --- jobs stored with the legacy hash ---------------------------------------------------------


async def test_a_job_stored_with_the_legacy_hash_still_replays(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    redis: Redis,
    settings: Settings,
    submitted: Submit,
) -> None:
    headers = {**auth, "Idempotency-Key": "before-the-release"}
    first = await submitted.send(api, headers)
    assert first.status_code == 202, first.text
    assert submitted.legacy_hash() != submitted.sent_hash()  # the body leaves defaults out
    await store_hash(sessions, first.json()["id"], submitted.legacy_hash())
    before = await stored(sessions, redis, settings)

    again = await submitted.send(api, headers)

    assert_replays(first, again)
    assert await stored(sessions, redis, settings) == before


ANOTHER = {
    "job": (JOB, json_submit("/v1/jobs", JobIn, {"prompts": ["a", "c"], "config": {"agents": 2}})),
    "sample upload": (upload_submit(CSV, guard={}), upload_submit(CSV + b"Why?,Because.\n", guard={})),
}


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy hash", "hash of what was sent"])
@pytest.mark.parametrize(("first", "another"), ANOTHER.values(), ids=ANOTHER.keys())
async def test_another_request_under_the_same_key_is_a_conflict(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    redis: Redis,
    settings: Settings,
    first: Submit,
    another: Submit,
    legacy: bool,
) -> None:
    headers = {**auth, "Idempotency-Key": "one-request"}
    made = await first.send(api, headers)
    assert made.status_code == 202, made.text
    if legacy:
        await store_hash(sessions, made.json()["id"], first.legacy_hash())
    before = await stored(sessions, redis, settings)

    error = error_of(await another.send(api, headers), 409, "idempotency_conflict")
    assert error["message"] == CONFLICT
    assert await stored(sessions, redis, settings) == before


async def test_a_job_stored_by_this_release_is_matched_on_its_hash_alone(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    redis: Redis,
    settings: Settings,
    submitted: Submit,
) -> None:
    """The legacy hash, a second dump of the whole body (30 MiB held the event loop for
    70-150 ms), is never computed for it, so a key cannot have that done at will by replaying
    its own key with another large body. Shown by planting the body's legacy hash, which
    this release never stores: computed, it would match."""
    headers = {**auth, "Idempotency-Key": "this-release"}
    first = await submitted.send(api, headers)
    assert first.status_code == 202, first.text
    await store_hash(sessions, first.json()["id"], submitted.legacy_hash(), by_this_release=True)
    before = await stored(sessions, redis, settings)

    error = error_of(await submitted.send(api, headers), 409, "idempotency_conflict")

    assert error["message"] == CONFLICT
    assert await stored(sessions, redis, settings) == before


# --- what a request is --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelled_out",
    [{"config": {"agents": 2, "max_rounds": None}}, {"policy_set": {"name": "aidsafe-default"}}],
    ids=["in a given object", "an object left out"],
)
async def test_a_default_spelled_out_is_part_of_the_request(
    api: httpx.AsyncClient, auth: Headers, spelled_out: dict[str, Any]
) -> None:
    # A later release may default the field otherwise: a stored hash cannot tell which
    # default a body that left it out meant, so left out and spelled out must differ.
    headers = {**auth, "Idempotency-Key": "spelled-out"}
    assert (await JOB.send(api, headers)).status_code == 202

    response = await api.post("/v1/jobs", json={**JOB_BODY, **spelled_out}, headers=headers)

    error_of(response, 409, "idempotency_conflict")


@pytest.mark.parametrize(
    "spelled_out",
    [
        {"label": None},
        {"metadata": {}},
        {"duplicates": "keep"},
        {"budget": None},
        {"prompt_set": None},
        {"preset": None, "preset_version": None},
    ],
    ids=lambda spelled_out: ",".join(spelled_out),
)
async def test_fields_whose_default_is_left_out_of_the_hash_may_be_spelled_out(
    api: httpx.AsyncClient, auth: Headers, spelled_out: dict[str, Any]
) -> None:
    headers = {**auth, "Idempotency-Key": "exclude-if"}
    first = await JOB.send(api, headers)
    assert first.status_code == 202, first.text

    again = await api.post("/v1/jobs", json={**JOB_BODY, **spelled_out}, headers=headers)

    assert_replays(first, again)


async def test_key_order_and_spacing_are_not_part_of_the_request(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    headers = {**auth, "Idempotency-Key": "as-parsed", "Content-Type": "application/json"}
    first = await JOB.send(api, headers)
    assert first.status_code == 202, first.text

    reordered = json.dumps(dict(reversed(list(JOB_BODY.items()))), indent=2).encode()
    again = await api.post("/v1/jobs", content=reordered, headers=headers)

    assert_replays(first, again)


async def test_key_order_inside_free_form_objects_is_not_part_of_the_request(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """Metadata and sample rows are free-form objects, dumped in the order they came."""
    headers = {**auth, "Idempotency-Key": "free-form"}
    body = {**JOB_BODY, "metadata": {"team": "red", "run": {"seed": 1, "arm": "a"}}}
    first = await api.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202, first.text

    reordered = {**JOB_BODY, "metadata": {"run": {"arm": "a", "seed": 1}, "team": "red"}}
    again = await api.post("/v1/jobs", json=reordered, headers=headers)

    assert_replays(first, again)
    other = {**JOB_BODY, "metadata": {"run": {"arm": "b", "seed": 1}, "team": "red"}}
    error_of(await api.post("/v1/jobs", json=other, headers=headers), 409, "idempotency_conflict")


async def test_a_body_with_an_integer_beyond_64_bits_is_accepted_and_replays(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """Free-form metadata may hold any JSON integer; the request's hash must not refuse it."""
    headers = {**auth, "Idempotency-Key": "big-number", "Content-Type": "application/json"}
    body = b'{"prompts": ["a"], "metadata": {"seed": 123456789012345678901234567890}}'
    first = await api.post("/v1/jobs", content=body, headers=headers)
    assert first.status_code == 202, first.text

    assert_replays(first, await api.post("/v1/jobs", content=body, headers=headers))


async def test_a_job_hashed_by_the_one_shot_json_encoder_still_replays(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Earlier releases wrote the hashed text with one `json.dumps` call; it is now written a
    value at a time (off the event loop), and must be the same text."""
    headers = {**auth, "Idempotency-Key": "one-shot"}
    metadata = {"é": [1.5e300, -0.0, 2**70, None, True, '\u2028"\\\U0001f600'], "a": {"z": {}, "b": []}}
    body = {**JOB_BODY, "metadata": metadata}
    first = await api.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202, first.text
    sent = JobIn.model_validate(body).model_dump(mode="json", exclude_unset=True)
    one_shot = json.dumps(sent, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    await store_hash(sessions, first.json()["id"], hashlib.sha256(one_shot.encode()).hexdigest())

    assert_replays(first, await api.post("/v1/jobs", json=body, headers=headers))


def test_a_string_longer_than_a_slice_is_hashed_as_the_one_shot_encoder_writes_it_in_pieces() -> None:
    """A string is quoted a slice at a time (one call for 30 MiB held the GIL for 0.1-0.3 s),
    and must read as one: escapes fall on every side of the slices' ends."""
    long = '"\\\u2028é\n' * _TEXT_SLICE
    value = {"b": [long, 1.5e300, -0.0, 2**70, None, True], "a": {"z": {}, "y": []}, "c": long[:_TEXT_SLICE]}

    pieces = list(_canonical_json(value))

    assert "".join(pieces) == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert max(map(len, pieces)) <= 2 * _TEXT_SLICE  # each character written at most twice


# --- a replay after the server's settings changed ----------------------------------------------


async def test_a_replay_finds_its_job_though_the_server_would_now_refuse_the_request_as_new(
    api: httpx.AsyncClient,
    auth: Headers,
    sessions: Sessions,
    redis: Redis,
    settings: Settings,
    submitted: Submit,
) -> None:
    headers = {**auth, "Idempotency-Key": "before-the-change"}
    first = await submitted.send(api, headers)
    assert first.status_code == 202, first.text
    before = await stored(sessions, redis, settings)

    # A context no request fits: the request, sent as new, is refused.
    async with api_client(settings.model_copy(update={"llm_max_context_tokens": 1})) as changed:
        error_of(await submitted.send(changed, auth), 422, "request_too_large")
        again = await submitted.send(changed, headers)

    assert_replays(first, again)
    assert await stored(sessions, redis, settings) == before


async def test_another_request_under_a_used_key_is_a_conflict_though_the_server_would_refuse_it(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, redis: Redis, settings: Settings
) -> None:
    headers = {**auth, "Idempotency-Key": "before-the-change"}
    assert (await JOB.send(api, headers)).status_code == 202
    before = await stored(sessions, redis, settings)

    async with api_client(settings.model_copy(update={"llm_max_context_tokens": 1})) as changed:
        other = await changed.post("/v1/jobs", json={**JOB_BODY, "prompts": ["c"]}, headers=headers)

    error_of(other, 409, "idempotency_conflict")
    assert await stored(sessions, redis, settings) == before


async def test_an_upload_replay_is_read_though_its_endpoint_is_gone(
    auth: Headers, sessions: Sessions, redis: Redis, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    """An upload's options are checked before its file is read, but a replay's only after: its
    job is answered though the endpoint its options name is no longer configured."""
    elsewhere = {"elsewhere": EndpointConfig(base_url=scripted_llm.base_url)}
    upload = upload_submit(CSV, guard={"endpoint": "elsewhere"})
    headers = {**auth, "Idempotency-Key": "before-the-change"}
    async with api_client(settings.model_copy(update={"llm_endpoints": elsewhere})) as api:
        first = await upload.send(api, headers)
    assert first.status_code == 202, first.text
    before = await stored(sessions, redis, settings)

    async with api_client(settings) as changed:
        error_of(await upload.send(changed, auth), 422, "invalid_config")
        again = await upload.send(changed, headers)

    assert_replays(first, again)
    assert await stored(sessions, redis, settings) == before


@pytest.mark.parametrize("route", SUBMITS)
async def test_an_empty_idempotency_key_is_one_problem_on_every_submit_route(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, redis: Redis, settings: Settings, route: str
) -> None:
    """The upload's options check and its submission both read the header: it was listed
    twice, "(and 1 more)"."""
    before = await stored(sessions, redis, settings)

    error = error_of(await SUBMITS[route].send(api, {**auth, "Idempotency-Key": ""}), 422, "validation_error")

    assert error["details"] == [
        {"field": "header.idempotency-key", "problem": "String should have at least 1 character"}
    ], error
    assert "more" not in error["message"], error["message"]
    assert await stored(sessions, redis, settings) == before
