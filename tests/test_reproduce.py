"""`aidsafe reproduce`: the paper's procedure through the real API, a real worker and the
scripted LLM: an AIDSAFE job and a zero-shot job on the same prompts, graded, compared, and
the report written to a folder."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import httpx
from PIL import Image

from app.config import Settings
from app.store.db import Sessions
from tests.conftest import eventually, run_worker_burst
from tests.scripted_llm import ScriptedLLM, guard_verdict
from tests.test_cli import AIDSAFE, cli_env, job_ids, write
from tests.test_quality_api import judged

Headers = dict[str, str]


async def test_reproduce_runs_both_jobs_compares_them_and_writes_the_report(
    live_api: str,
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    tmp_path: Path,
) -> None:
    prompts = write(
        tmp_path,
        "prompts.jsonl",
        json.dumps({"prompt": "How do I store rice safely?"}),
        json.dumps({"prompt": "Is it safe to mix bleach and vinegar?"}),
    )
    scripted_llm.script("guard_verdict", guard_verdict(True, "physical-harm"), guard_verdict(True))
    out = tmp_path / "report"
    options = ["--out", str(out), "--judge-model", "judge-model", "--max-rounds", "1", "--pairs"]
    process = await asyncio.create_subprocess_exec(
        AIDSAFE,
        "reproduce",
        str(prompts),
        *options,
        env=cli_env(live_api, auth),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    await eventually(lambda: _at_least(sessions, 2), 30, "the AIDSAFE and zero-shot jobs")
    await run_worker_burst(settings)
    await eventually(lambda: _at_least(sessions, 3), 60, "the comparison")
    scripted_llm.script("pairwise_judgement", *judged("B", "A"), *judged("tie", "tie"))
    await run_worker_burst(settings, max_jobs=1)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()

    assert process.returncode == 0, text
    [candidate, baseline, comparison] = await job_ids(sessions)
    shown = (await api.get(f"/v1/comparisons/{comparison}", headers=auth)).json()
    assert (shown["baseline_job_id"], shown["candidate_job_id"]) == (baseline, candidate)
    [judge] = shown["judges"]
    assert judge["judge"]["model"] == "judge-model" and judge["wins"] == 1
    for job, mode in ((candidate, "aidsafe"), (baseline, "zero_shot")):
        config = (await api.get(f"/v1/jobs/{job}", headers=auth)).json()["config"]
        assert (config["mode"], config["grading"]["grader"]["model"]) == (mode, "judge-model")

    report = (out / "report.md").read_text()
    assert report.startswith("# AIDSAFE vs zero-shot\n") and "2 prompts compared" in report
    assert "| judge-model | 2 | 50% [9%, 91%] | 50% [9%, 91%] | 0% [0%, 66%] |" in report
    assert "| whisper | 2 |" in report and "![Preference-pair gaps](gaps.png)" in report
    assert "2 prompts compared" in text and f"Written to {out}/" in text  # printed as well
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert {r["side"] for r in rows if r["section"] == "score"} == {
        "baseline (zero-shot)",
        "candidate (AIDSAFE)",
    }
    for plot in ("scores.png", "gaps.png"):
        assert Image.open(io.BytesIO((out / plot).read_bytes())).format == "PNG"


async def _at_least(sessions: Sessions, jobs: int) -> bool:
    return len(await job_ids(sessions)) >= jobs
