"""Owner checks of the jobs side that the route-wide probe (tests/test_tenancy.py) does not
pin: a request naming ids of two tenants (another key's sample under your own evaluation),
the job summaries kept between polls, which the probe catches only while its poll comes
within their age of the owner's, and the owner a submitted job's items take their turns
in line as. Found by one-site ablations
(bench/MUTATION-tenant-seams-jobs.md)."""

from __future__ import annotations

import httpx
from arq.connections import ArqRedis

from app.config import Settings
from app.queue import item_of_job
from app.store.db import Sessions
from tests.conftest import api_client, delete_redis_keys, new_key
from tests.test_api import Headers, error_of, items_of, submit


async def evaluation_of(api: httpx.AsyncClient, headers: Headers, response: str) -> str:
    """A graded sample evaluation of one sample of the key's; its id."""
    made = await api.post(
        "/v1/sample-evaluations",
        json={"samples": [{"prompt": "How do I store rice?", "response": response}], "grade": {}},
        headers=headers,
    )
    assert made.status_code == 202, made.text
    job_id: str = made.json()["id"]
    return job_id


async def test_another_keys_sample_under_your_own_evaluation_is_not_found(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    owner, other = await new_key(sessions, "owner"), await new_key(sessions, "other")
    theirs = await evaluation_of(api, owner, "the owner's answer")
    mine = await evaluation_of(api, other, "mine")
    samples = (await api.get(f"/v1/sample-evaluations/{theirs}/samples", headers=owner)).json()["data"]
    their_item = samples[0]["item_id"]

    answer = await api.get(f"/v1/sample-evaluations/{mine}/samples/{their_item}", headers=other)

    error_of(answer, 404, "not_found")
    assert "the owner's answer" not in answer.text


async def test_a_job_summary_kept_for_its_owner_is_not_shown_to_another_key(
    settings: Settings, sessions: Sessions
) -> None:
    """The owner's summary is kept for later polls (app/api/summaries.py): by job and key, so
    another key's poll of the job within that time is a 404, not the owner's reading."""
    owner, other = await new_key(sessions, "owner"), await new_key(sessions, "other")
    async with api_client(settings.model_copy(update={"job_summary_max_age_s": 600})) as api:
        job_id = (await submit(api, owner, ["How do I store rice?"]))["id"]
        assert (await api.get(f"/v1/jobs/{job_id}", headers=owner)).status_code == 200

        error_of(await api.get(f"/v1/jobs/{job_id}", headers=other), 404, "not_found")


async def test_a_submitted_jobs_items_take_their_owners_turns_in_line(
    api: httpx.AsyncClient, sessions: Sessions, settings: Settings, arq_redis: ArqRedis
) -> None:
    """A key's second job waits behind its first, and another key's job comes in beside the
    first (app/queue.py): the API enqueues a job's items as its owner's share."""
    await delete_redis_keys(settings)  # an empty line
    heavy, light = await new_key(sessions, "heavy"), await new_key(sessions, "light")
    first = (await submit(api, heavy, ["p1", "p2", "p3"]))["id"]
    second = (await submit(api, heavy, ["p4"]))["id"]
    others = (await submit(api, light, ["q1"]))["id"]
    job_of = {
        item["id"]: job_id
        for job_id, headers in ((first, heavy), (second, heavy), (others, light))
        for item in await items_of(api, headers, job_id)
    }

    line = [
        job_of[str(item_of_job(queued.decode())[0])]
        for queued in await arq_redis.zrange(settings.queue_name, 0, -1)
    ]

    assert line[-1] == second, line
    assert others in line[:2], line
