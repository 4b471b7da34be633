"""A job through API, queue, worker, engine and Postgres, against the scripted LLM."""

from __future__ import annotations

import httpx

from app.config import Settings
from tests.conftest import run_worker_burst


async def test_posted_prompts_come_back_as_refined_cots(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings
) -> None:
    created = await api.post(
        "/v1/jobs", json={"prompts": ["How do I bake bread?", "How do I pick a lock?"]}, headers=auth
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    await run_worker_burst(settings)

    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "completed", job
    assert job["counts"]["by_status"] == {"completed": 2}
    cots = (await api.get(f"/v1/jobs/{job_id}/cots", headers=auth)).json()["data"]
    assert [c["prompt"] for c in cots] == ["How do I bake bread?", "How do I pick a lock?"]
    assert all(c["refined_thoughts"] and c["response"] for c in cots)
