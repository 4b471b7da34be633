"""A comparison's report over HTTP: Markdown and CSV with intervals, and PNG plots, for the
comparison's owner only."""

from __future__ import annotations

import csv
import io

import httpx
from PIL import Image

from app.config import Settings
from app.store.db import Sessions
from tests.conftest import new_key, run_worker_burst
from tests.scripted_llm import ScriptedLLM
from tests.test_api import error_of
from tests.test_quality_api import (
    GRADED,
    PAIRED,
    a_grade,
    compare,
    completed,
    finished_job,
    judged,
    kept_pair,
)
from tests.test_viewer import logged_in

Headers = dict[str, str]
PROMPTS = ["a", "b", "c"]


async def finished_comparison(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> str:
    """Baseline scored 3 and candidate 5 on CoT policy faithfulness; the candidate has pairs
    with gaps 2 and 3; the judge prefers the candidate twice and ties once."""
    weaker = [completed(a_grade(cot_policy_faithfulness=3))] * 3
    baseline = await finished_job(api, auth, sessions, weaker, {**GRADED, "mode": "zero_shot"}, PROMPTS)
    stronger = [completed(a_grade(cot_policy_faithfulness=5), kept_pair(gap)) for gap in (2.0, 3.0, 3.0)]
    candidate = await finished_job(api, auth, sessions, stronger, PAIRED, PROMPTS)
    scripted_llm.script("pairwise_judgement", *judged("B", "A"), *judged("B", "A"), *judged("A", "A"))
    response = await compare(
        api, auth, baseline, candidate, label="rice and bleach", judge={"model": "judge-model"}
    )
    assert response.status_code == 202, response.text
    await run_worker_burst(settings, max_jobs=1)
    return str(response.json()["id"])


async def test_the_report_gives_means_shares_and_gaps_with_intervals(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    comparison = await finished_comparison(api, auth, sessions, settings, scripted_llm)

    markdown = await api.get(f"/v1/comparisons/{comparison}/report", headers=auth)
    assert markdown.status_code == 200
    assert markdown.headers["content-type"].startswith("text/markdown")
    text = markdown.text
    assert text.startswith("# rice and bleach\n") and "3 prompts compared" in text
    assert "| cot_policy_faithfulness | 3.00 [3.00, 3.00] | 5.00 [5.00, 5.00] | +2.00 |" in text
    assert "| baseline (zero-shot) | candidate (AIDSAFE) |" in text
    assert "| judge-model | 3 | 67% [21%, 94%] | 33% [6%, 79%] | 0% [0%, 56%] |" in text
    assert "| whisper | 3 | 2.67 [1.23, 4.00] |" in text
    assert "![Grader score distributions](scores.png)" in text and "(gaps.png)" in text
    assert (
        "> baseline written by scripted-model; candidate written by scripted-model; judged by judge-model."
        in text
    )

    table = await api.get(f"/v1/comparisons/{comparison}/report", params={"format": "csv"}, headers=auth)
    assert table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    faithfulness = {r["side"]: float(r["value"]) for r in rows if r["name"] == "cot_policy_faithfulness"}
    assert faithfulness == {"baseline (zero-shot)": 3.0, "candidate (AIDSAFE)": 5.0}


async def test_plots_are_pngs_served_to_the_api_and_shown_in_the_viewer(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    comparison = await finished_comparison(api, auth, sessions, settings, scripted_llm)
    for plot in ("scores", "gaps"):
        response = await api.get(f"/v1/comparisons/{comparison}/plots/{plot}.png", headers=auth)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).format == "PNG"
    unknown = await api.get(f"/v1/comparisons/{comparison}/plots/violin.png", headers=auth)
    error_of(unknown, 422, "validation_error")

    await logged_in(api, auth)
    page = (await api.get(f"/view/jobs/{comparison}")).text
    assert 'id="comparison-report"' in page and "candidate (AIDSAFE)" in page
    assert "Judge judge-model, 3 judged:" in " ".join(page.split())
    for plot in ("scores", "gaps"):
        assert f'src="/view/jobs/{comparison}/plots/{plot}.png"' in page
        shown = await api.get(f"/view/jobs/{comparison}/plots/{plot}.png")
        assert shown.status_code == 200 and Image.open(io.BytesIO(shown.content)).format == "PNG"


async def test_another_keys_comparison_and_a_plain_job_have_no_report(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    baseline = await finished_job(api, auth, sessions, [completed()], prompts=["x"])
    candidate = await finished_job(api, auth, sessions, [completed()], prompts=["x"])
    comparison = (await compare(api, auth, baseline, candidate)).json()["id"]
    assert (await api.get(f"/v1/comparisons/{comparison}/report", headers=auth)).status_code == 200
    other = await new_key(sessions, "mallory")
    for path in ("report", "plots/scores.png"):
        error_of(await api.get(f"/v1/comparisons/{comparison}/{path}", headers=other), 404, "not_found")
    error_of(await api.get(f"/v1/comparisons/{baseline}/report", headers=auth), 404, "not_found")
