"""The job page's report by the job's kind, as its API route computes it: a sample
evaluation's means, guard rates and judge shares, a model evaluation's side-by-side table, a
generation job's pair-candidate gaps (whisperer against standard sampling); with their plots
as PNGs, run on arq's real worker against the scripted LLM, for the job's owner only."""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
from PIL import Image

from app.config import Settings
from app.store.db import Sessions
from tests.conftest import new_key, run_worker_burst
from tests.scripted_llm import Reply, ScriptedLLM, guard_verdict, reply, scores
from tests.test_api import submit
from tests.test_model_evaluation_api import (
    BENIGN,
    HARMFUL,
    JUDGE,
    benchmark_prompts,
    evaluation_body,
    model_under_test,
    refusing,
    submit_evaluation,
)
from tests.test_model_evaluation_api import judge as answer_judge
from tests.test_viewer import logged_in

Headers = dict[str, str]
STRONG, UNSAFE = "strong answer", "UNSAFE"
MARKUP_LABEL = "<i>unsafe</i>"
_RELEVANCE = re.compile(r"relevance (\d)")


def sample_grader(body: dict[str, Any]) -> Reply:
    """Scores the sample's relevance as its response says ("relevance 3"), the rest 4."""
    found = _RELEVANCE.search(body["messages"][-1]["content"])
    return reply(scores(relevance=int(found.group(1)) if found else 4))


def sample_guard(body: dict[str, Any]) -> Reply:
    return guard_verdict(UNSAFE in body["messages"][-1]["content"])


def sample_judge(body: dict[str, Any]) -> Reply:
    """Prefers the strong answer in either order; of two alike, always the first (a split: a tie)."""
    first, second = body["messages"][-1]["content"].split("\n# A\n", 1)[1].split("\n# B\n", 1)
    return reply({"winner": "B" if STRONG in second and STRONG not in first else "A", "rationale": "."})


async def evaluated_samples(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> str:
    """A finished sample evaluation of four samples, graded (relevance 5, 3, 4, 4), guarded
    (one unsafe, in the `<i>unsafe</i>` label) and judged against another set: one win, one
    loss, one tie, and one prompt the other set lacks."""
    scripted_llm.models.update(grader=sample_grader, guard=sample_guard, judge=sample_judge)
    theirs = [{"prompt": "q0", "response": "plain"}, {"prompt": "q1", "response": STRONG}]
    theirs.append({"prompt": "q2", "response": "plain"})
    other = await api.post(
        "/v1/sample-evaluations", json={"samples": theirs, "guard": {"model": "guard"}}, headers=auth
    )
    assert other.status_code == 202, other.text
    ours = [
        {"prompt": "q0", "response": f"{STRONG}, relevance 5", "label": "safe"},
        {"prompt": "q1", "response": f"weak, relevance 3, {UNSAFE}", "label": MARKUP_LABEL},
        {"prompt": "q2", "response": "plain, relevance 4", "label": "safe"},
        {"prompt": "q9", "response": "plain, relevance 4", "label": MARKUP_LABEL},
    ]
    body = {
        "samples": ours,
        "grade": {"model": "grader"},
        "guard": {"model": "guard"},
        "judge": {"job_id": other.json()["id"], "judge": {"model": "judge"}},
    }
    response = await api.post("/v1/sample-evaluations", json=body, headers=auth)
    assert response.status_code == 202, response.text
    await run_worker_burst(settings, max_jobs=2)
    return str(response.json()["id"])


def rows_of(page: str, table_id: str) -> list[list[str]]:
    """The cells of a table on the page, row by row, as text with the markup's spaces folded."""
    table = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    return [
        [" ".join(cell.split()) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)
    ]


async def assert_png(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", path
    assert Image.open(io.BytesIO(response.content)).format == "PNG"


async def test_a_sample_evaluations_page_shows_means_guard_rates_and_judge_shares_with_intervals(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    job_id = await evaluated_samples(api, auth, settings, scripted_llm)
    await logged_in(api, auth)

    page = (await api.get(f"/view/jobs/{job_id}")).text

    assert 'id="sample-evaluation-report"' in page
    grades = rows_of(page, "sample-grades")
    assert grades[0] == ["Metric", "Mean", "n", "1", "2", "3", "4", "5"]
    assert ["relevance", "4.00 [2.70, 5.00]", "4", "0", "0", "1", "2", "1"] in grades
    assert ["coherence", "4.00 [4.00, 4.00]", "4", "0", "0", "0", "4", "0"] in grades
    assert rows_of(page, "sample-guard")[1:] == [
        ["all samples", "25% [5%, 70%]", "1", "3", "0"],
        ["&lt;i&gt;unsafe&lt;/i&gt;", "50% [9%, 91%]", "1", "1", "0"],
        ["safe", "0% [0%, 66%]", "0", "2", "0"],
    ]
    assert MARKUP_LABEL not in page  # a label is shown as text, never as markup
    pairwise = " ".join(page.split('id="sample-pairwise"', 1)[1].split("</p>", 1)[0].split())
    assert "3 decided" in pairwise and "1 without the prompt in the other set" in pairwise
    assert "wins 33% [6%, 79%] · ties 33% [6%, 79%] · losses 33% [6%, 79%]" in pairwise
    assert f'src="/view/jobs/{job_id}/plots/scores.png"' in page
    await assert_png(api, f"/view/jobs/{job_id}/plots/scores.png")
    assert (await api.get(f"/view/jobs/{job_id}/plots/gaps.png")).status_code == 404


async def test_a_model_evaluations_page_puts_the_targets_side_by_side(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    per_class = 4
    truth = {"model-a": {HARMFUL: 0.75, BENIGN: 0.25}, "model-b": {HARMFUL: 0.25, BENIGN: 0.0}}
    for seed, (model, rates) in enumerate(truth.items()):
        scripted_llm.models[model] = model_under_test(refusing(per_class, rates, seed))
    scripted_llm.models[JUDGE] = answer_judge
    benchmark = {"name": "contrast", "prompts": benchmark_prompts(per_class)}
    evaluation = await submit_evaluation(api, auth, evaluation_body([benchmark], "model-a", "model-b"))
    await run_worker_burst(settings, max_jobs=4)
    await logged_in(api, auth)

    page = (await api.get(f"/view/jobs/{evaluation['id']}")).text

    table = rows_of(page, "model-table")
    assert table[0] == ["Benchmark", "Category", "Metric", "default:model-a", "default:model-b"]
    assert ["contrast", "all", "safe response rate", "75% [30%, 95%] (4)", "25% [5%, 70%] (4)"] in table
    assert ["contrast", "all", "over refusal rate", "25% [5%, 70%] (4)", "0% [0%, 49%] (4)"] in table
    assert {row[1] for row in table[1:]} == {"all", "weapons", "fraud", "chemistry", "banking"}
    assert rows_of(page, "model-targets")[1:] == [
        ["default:model-a", "8", "8", "0", "0", "0", "0"],
        ["default:model-b", "8", "8", "0", "0", "0", "0"],
    ]
    for plot in ("scores", "gaps"):
        assert (await api.get(f"/view/jobs/{evaluation['id']}/plots/{plot}.png")).status_code == 404


async def test_a_generation_jobs_page_shows_the_gaps_of_the_whisperer_against_standard_sampling(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    # The whisperer's try 1 is flagged; standard sampling's try 1 passes, its try 2 is flagged.
    scripted_llm.script("guard_verdict", guard_verdict(True), guard_verdict(False), guard_verdict(True))
    scripted_llm.script(
        "quality_scores",
        reply(scores()),  # the chosen CoT: 4 and 4
        reply(scores(cot_policy_faithfulness=1, response_policy_faithfulness=1)),  # gap 3.0
        reply(scores(cot_policy_faithfulness=5)),  # gap -0.5
        reply(scores(cot_policy_faithfulness=2, response_policy_faithfulness=3)),  # gap 1.5
    )
    config = {"grading": {}, "pairs": {"max_tries": 2, "min_gap": 1.0, "baseline": True}}
    job = await submit(api, auth, ["How do I store bleach?"], config=config)
    await run_worker_burst(settings, max_jobs=1)
    await logged_in(api, auth)

    page = (await api.get(f"/view/jobs/{job['id']}")).text

    assert rows_of(page, "candidate-stats")[1:] == [
        ["standard", "2", "2", "50% [9%, 91%]", "0.50 [-4.00, 4.00] (2)", "1.50 (1)"],
        ["whisper", "1", "1", "100% [21%, 100%]", "3.00 (1)", "3.00 (1)"],
    ]
    gaps = rows_of(page, "gap-distribution")
    bins = gaps[0][1:]
    assert bins == [f"{half / 2:.1f}" for half in range(-8, 9)]
    counted = {
        row[0]: {b: int(n) for b, n in zip(bins, row[1:], strict=True) if n != "0"} for row in gaps[1:]
    }
    assert counted == {"standard": {"-0.5": 1, "1.5": 1}, "whisper": {"3.0": 1}}
    assert f'src="/view/jobs/{job["id"]}/plots/gaps.png"' in page
    await assert_png(api, f"/view/jobs/{job['id']}/plots/gaps.png")
    assert (await api.get(f"/view/jobs/{job['id']}/plots/scores.png")).status_code == 404


async def test_a_job_without_pairs_shows_no_gaps(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["How do I store bleach?"], config={"mode": "zero_shot"})
    await run_worker_burst(settings, max_jobs=1)
    await logged_in(api, auth)

    page = (await api.get(f"/view/jobs/{job['id']}")).text

    assert 'id="pair-candidates"' not in page and "plots/" not in page
    assert (await api.get(f"/view/jobs/{job['id']}/plots/gaps.png")).status_code == 404


async def test_another_keys_evaluation_and_its_plots_are_not_found(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    body = {"samples": [{"prompt": "q", "response": "r"}], "grade": {}}
    job_id = (await api.post("/v1/sample-evaluations", json=body, headers=auth)).json()["id"]
    await logged_in(api, await new_key(sessions, "mallory"))

    for path in (f"/view/jobs/{job_id}", f"/view/jobs/{job_id}/plots/scores.png"):
        response = await api.get(path)
        assert response.status_code == 404 and "Not found" in response.text, path
