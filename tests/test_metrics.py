"""Prometheus metrics: the API's queue view and the workers' LLM and item counters."""

from __future__ import annotations

import asyncio
import re

import httpx
from prometheus_client import REGISTRY

from app.config import Settings
from tests.conftest import api_client, checkouts, run_worker_burst
from tests.scripted_llm import ScriptedLLM, http_error
from tests.test_api import error_of


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_api_metrics_show_queued_items_and_queue_depth(
    api: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    await api.post("/v1/jobs", json={"prompts": ["a", "b", "c"]}, headers=auth)

    response = await api.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'aidsafe_items{status="queued"} 3.0' in response.text
    assert "aidsafe_queue_depth 3.0" in response.text


async def test_api_metrics_list_only_the_apis_own_families(api: httpx.AsyncClient) -> None:
    """The LLM and per-item families are the workers' (their port serves them): listed by the
    API too, they never had a value there, families a Prometheus user would wait on for nothing."""
    page = (await api.get("/metrics")).text

    families = set(re.findall(r"^# TYPE (aidsafe_\w+)", page, re.MULTILINE))
    assert families == {
        "aidsafe_items",
        "aidsafe_queue_depth",
        "aidsafe_webhook_deliveries_spooled_total",
        "aidsafe_webhook_deliveries_spooled_created",  # the counter's start, as the client shows it
        "aidsafe_webhook_deliveries_waiting",
        "aidsafe_webhook_deliveries_dead",
    }
    for family in families:
        assert re.search(rf"^{family}[{{ ]", page, re.MULTILINE), f"{family} has no value"
    assert re.search(r"^process_resident_memory_bytes ", page, re.MULTILINE)  # the process's own too


async def test_a_flood_of_scrapes_takes_one_connection(settings: Settings) -> None:
    """Without a metrics token anyone may scrape, and each scrape counted items on a connection
    of the pool: a flood of them held the pool from the tenants. One page serves them all."""
    async with api_client(settings) as api:
        with checkouts() as taken:
            answers = await asyncio.gather(*(api.get("/metrics") for _ in range(50)))

    assert [answer.status_code for answer in answers] == [200] * 50
    assert all("aidsafe_queue_depth" in answer.text for answer in answers)
    assert len(taken) == 1


async def test_a_metrics_token_set_on_the_server_is_asked_of_every_scrape(settings: Settings) -> None:
    async with api_client(settings.model_copy(update={"metrics_token": "s3cret-token"})) as api:
        unasked = await api.get("/metrics")
        wrong = await api.get("/metrics", headers={"Authorization": "Bearer s3cret-toke"})
        api_key_scheme = await api.get("/metrics", headers={"Authorization": "Basic s3cret-token"})
        scraped = await api.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})

    for refused in (unasked, wrong, api_key_scheme):
        error_of(refused, 401, "unauthorized")
    assert scraped.status_code == 200 and "aidsafe_queue_depth" in scraped.text


async def test_worker_counts_llm_calls_tokens_errors_and_finished_items(
    api: httpx.AsyncClient, auth: dict[str, str], settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    ok = {"endpoint": "default", "role": "seed", "outcome": "ok"}
    limited = {**ok, "outcome": "rate_limited"}
    before = (
        sample("aidsafe_llm_request_seconds_count", **ok),
        sample("aidsafe_llm_request_seconds_count", **limited),
        sample("aidsafe_llm_tokens_total", endpoint="default", role="seed", kind="completion"),
        sample("aidsafe_items_finished_total", status="completed"),
    )
    scripted_llm.script("seed_cot", http_error(429, retry_after=0))
    await api.post("/v1/jobs", json={"prompts": ["How do I fix a flat tyre?"]}, headers=auth)

    await run_worker_burst(settings)

    after = (
        sample("aidsafe_llm_request_seconds_count", **ok),
        sample("aidsafe_llm_request_seconds_count", **limited),
        sample("aidsafe_llm_tokens_total", endpoint="default", role="seed", kind="completion"),
        sample("aidsafe_items_finished_total", status="completed"),
    )
    calls, rate_limited, tokens, finished = (a - b for a, b in zip(after, before, strict=True))
    assert (calls, rate_limited, finished) == (1, 1, 1)
    assert tokens > 0
