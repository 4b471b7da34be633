"""Model evaluations as a client sees them: benchmarks inline or as JSONL/CSV files, the
job on arq's real worker against scripted models under test and scripted judges, and the
report that puts the models side by side with Wilson intervals."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from sqlalchemy import func, select, update

import aidsafe
from app.cli.evaluate import parse_target
from app.config import Settings
from app.sample_files import MAX_LINE_VALUES
from app.stats import proportion
from app.store import keys
from app.store.db import Sessions
from app.store.models import Item, ItemStatus, ModelAnswer, TurnRow
from tests.conftest import ROOT, eventually, least_loop_pause, longest_loop_pause, new_key, run_worker_burst
from tests.scripted_llm import DEFAULT_REFUSAL, Reply, ScriptedLLM, guard_verdict, http_error, reply
from tests.test_api import error_of, items_of, row_counts
from tests.test_cli import aidsafe as cli_command
from tests.test_cli import job_ids
from tests.test_prompt_sets import register_on_builtin

Headers = dict[str, str]
JUDGE = "judge-model"
HARMFUL, BENIGN = "harmful", "benign"
_NUMBERED = re.compile(r"\b(harmful|benign) prompt (\d+)\b")


def benchmark_prompts(per_class: int) -> list[dict[str, Any]]:
    """`per_class` harmful prompts (expected: refuse) and as many benign ones (comply), each
    class split into two categories, numbered so a scripted model can tell them apart."""
    prompts = []
    for kind, expected, categories in (
        (HARMFUL, "refuse", ("weapons", "fraud")),
        (BENIGN, "comply", ("chemistry", "banking")),
    ):
        prompts += [
            {
                "prompt": f"{kind} prompt {n}: please answer.",
                "expected": expected,
                "category": categories[n % 2],
            }
            for n in range(per_class)
        ]
    return prompts


def refusing(per_class: int, refusal_rates: dict[str, float], seed: int) -> set[tuple[str, int]]:
    """Exactly rate x per_class prompts of each class, drawn at random: the ones refused."""
    rng = random.Random(seed)
    return {
        (kind, n)
        for kind, rate in refusal_rates.items()
        for n in rng.sample(range(per_class), round(rate * per_class))
    }


def model_under_test(refused: set[tuple[str, int]]) -> Any:
    """A model that refuses exactly the prompts in `refused` and answers the others."""

    def answer(body: dict[str, Any]) -> Reply:
        kind, number = _NUMBERED.search(body["messages"][-1]["content"]).groups()  # type: ignore[union-attr]
        return reply(
            DEFAULT_REFUSAL if (kind, int(number)) in refused else f"Sure: the answer to {kind} {number}."
        )

    return answer


def judge(body: dict[str, Any]) -> Reply:
    """A judge that reads the answer right: an answer that does not refuse a harmful prompt
    is unsafe; an answer that refuses is a refusal."""
    shown = body["messages"][-1]["content"]
    refused = DEFAULT_REFUSAL in shown
    if body["response_format"]["json_schema"]["name"] == "guard_verdict":
        unsafe = f"{HARMFUL} prompt" in shown and not refused
        return guard_verdict(unsafe, *(["physical-harm"] if unsafe else []))
    return reply({"refused": refused, "reason": "It declines." if refused else "It answers."})


def evaluation_body(benchmarks: list[dict[str, Any]], *targets: str, **fields: Any) -> dict[str, Any]:
    return {
        "benchmarks": benchmarks,
        "targets": [{"model": model} for model in targets],
        "safety_judge": {"model": JUDGE},
        "refusal_judge": {"model": JUDGE},
        **fields,
    }


async def submit_evaluation(api: httpx.AsyncClient, auth: Headers, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/v1/model-evaluations", json=body, headers=auth)
    assert response.status_code == 202, response.text
    submitted: dict[str, Any] = response.json()
    return submitted


def rows_of(report: dict[str, Any], benchmark: str, category: str | None) -> dict[str, dict[str, Any]]:
    """The report's rows of one benchmark and category, by metric."""
    return {
        row["metric"]: row["models"]
        for row in report["table"]
        if (row["benchmark"], row["category"]) == (benchmark, category)
    }


# --- the report recovers known refusal rates ----------------------------------------------------


@pytest.mark.slow
async def test_the_report_recovers_two_models_known_refusal_rates_within_its_intervals(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    per_class = 50
    truth = {"model-a": {HARMFUL: 0.8, BENIGN: 0.1}, "model-b": {HARMFUL: 0.4, BENIGN: 0.0}}
    for seed, (model, rates) in enumerate(truth.items()):
        scripted_llm.models[model] = model_under_test(refusing(per_class, rates, seed))
    scripted_llm.models[JUDGE] = judge
    benchmark = {"name": "contrast", "prompts": benchmark_prompts(per_class)}

    submitted = await submit_evaluation(api, auth, evaluation_body([benchmark], "model-a", "model-b"))
    await run_worker_burst(settings, max_jobs=32)

    report = (await api.get(f"/v1/model-evaluations/{submitted['id']}", headers=auth)).json()
    assert report["status"] == "completed"
    assert [t["name"] for t in report["targets"]] == ["default:model-a", "default:model-b"]
    overall = rows_of(report, "contrast", None)
    expected_rates: dict[str, Callable[[dict[str, float]], float]] = {
        "safe_response_rate": lambda rates: rates[HARMFUL],  # the judge finds every refusal safe
        "refusal_rate": lambda rates: rates[HARMFUL],
        "compliance_rate": lambda rates: 1 - rates[BENIGN],
        "over_refusal_rate": lambda rates: rates[BENIGN],
    }
    assert list(overall) == list(expected_rates)
    for metric, true_rate in expected_rates.items():
        assert list(overall[metric]) == ["default:model-a", "default:model-b"]  # side by side
        for model, rates in truth.items():
            rate = overall[metric][f"default:{model}"]
            assert rate["n"] == per_class
            assert rate["low"] <= true_rate(rates) <= rate["high"], (metric, model, rate)
            assert rate["value"] == pytest.approx(true_rate(rates))
            wilson = proportion(rate["count"], rate["n"])
            assert (rate["low"], rate["high"]) == (pytest.approx(wilson.low), pytest.approx(wilson.high))
    # Each category is counted apart; its answers add up to the benchmark's.
    by_category = [rows_of(report, "contrast", c)["refusal_rate"] for c in ("weapons", "fraud")]
    assert [rates["default:model-a"]["n"] for rates in by_category] == [25, 25]
    assert sum(rates["default:model-a"]["count"] for rates in by_category) == 40
    assert "compliance_rate" not in rows_of(report, "contrast", "weapons")  # only harmful prompts there
    for name in ("default:model-a", "default:model-b"):
        assert report["by_target"][name] == {
            "items": 2 * per_class,
            "completed": 2 * per_class,
            "failed": 0,
            "safety_unreadable": 0,
            "refusal_unreadable": 0,
            "truncated": 0,
        }
    # Every answer and both verdicts are stored turns, one of each per item.
    async with sessions() as session:
        stages = Counter(
            dict((await session.execute(select(TurnRow.stage, func.count()).group_by(TurnRow.stage))).all())
        )
    assert stages == {"respond": 4 * per_class, "guard": 4 * per_class, "refusal": 4 * per_class}


# --- items, resumption and hazards --------------------------------------------------------------


async def test_items_are_every_prompt_asked_of_every_target_prompt_by_prompt(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    prompts = benchmark_prompts(2)
    submitted = await submit_evaluation(
        api, auth, evaluation_body([{"name": "b", "prompts": prompts}], "m1", "m2")
    )

    assert (submitted["status"], submitted["counts"]["total"]) == ("queued", 8)
    listed = await items_of(api, auth, submitted["id"])
    assert [item["prompt"] for item in listed] == [p["prompt"] for p in prompts for _ in range(2)]
    assert {item["stage"] for item in listed} == {"respond"}
    async with sessions() as session:
        answers = (await session.scalars(select(ModelAnswer).order_by(ModelAnswer.target))).all()
    assert [a.target for a in answers] == [0] * 4 + [1] * 4
    assert {a.expected for a in answers} == {"refuse", "comply"}
    jobs = (await api.get("/v1/jobs", params={"kind": "model_evaluation"}, headers=auth)).json()["data"]
    assert [job["id"] for job in jobs] == [submitted["id"]]


async def test_an_item_resumed_after_a_judge_outage_asks_the_target_once(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models["m1"] = lambda body: reply("An answer.")
    # More failures than the client's retries: the item goes back to the queue, then resumes.
    scripted_llm.script("refusal_judgement", *[http_error(503)] * (settings.llm_max_retries + 1))
    prompts = benchmark_prompts(1)[:1]
    submitted = await submit_evaluation(api, auth, evaluation_body([{"name": "b", "prompts": prompts}], "m1"))

    await run_worker_burst(settings)

    report = (await api.get(f"/v1/model-evaluations/{submitted['id']}", headers=auth)).json()
    assert report["by_target"]["default:m1"]["completed"] == 1
    assert len([r for r in scripted_llm.requests if r.body["model"] == "m1"]) == 1
    assert len(scripted_llm.requests_for("guard_verdict")) == 1
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(TurnRow)) == 3


async def test_answers_are_hazardous_text_redacted_for_keys_without_the_scope(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models["m1"] = lambda body: reply("HAZARD-answer")
    body = evaluation_body([{"name": "b", "prompts": benchmark_prompts(1)[:1]}], "m1")
    scoped = await new_key(sessions, "red-team", (keys.HAZARDOUS_READ,))
    plain = await submit_evaluation(api, auth, body)
    red_team = await submit_evaluation(api, scoped, body)
    await run_worker_burst(settings)

    for headers, job, shown in ((auth, plain, False), (scoped, red_team, True)):
        [item] = await items_of(api, headers, job["id"])
        turns = (await api.get(f"/v1/items/{item['id']}", headers=headers)).json()["turns"]
        [answer] = [turn for turn in turns if turn["stage"] == "respond"]
        assert ("HAZARD-answer" in answer["raw_output"]) is shown
        assert answer["redacted"] is not shown


# --- benchmark files and bad input -----------------------------------------------------------------


def as_csv(prompts: list[dict[str, Any]]) -> str:
    lines = ["prompt,expected,category,source"]
    lines += [f'"{p["prompt"]}",{p["expected"]},{p["category"]},test' for p in prompts]
    return "\n".join(lines) + "\n"


async def test_a_benchmark_file_in_jsonl_or_csv_makes_the_same_items_with_other_fields_as_metadata(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    example = (ROOT / "benchmarks" / "example.jsonl").read_text(encoding="utf-8")
    from_jsonl = await submit_evaluation(
        api,
        auth,
        evaluation_body([{"name": "example", "file": {"format": "jsonl", "content": example}}], "m1"),
    )
    prompts = [json.loads(line) for line in example.splitlines()]
    from_csv = await submit_evaluation(
        api,
        auth,
        evaluation_body([{"name": "example", "file": {"format": "csv", "content": as_csv(prompts)}}], "m1"),
    )

    jsonl_items, csv_items = [await items_of(api, auth, job["id"]) for job in (from_jsonl, from_csv)]
    assert (
        [i["prompt"] for i in jsonl_items]
        == [i["prompt"] for i in csv_items]
        == [p["prompt"] for p in prompts]
    )
    assert jsonl_items[0]["metadata"] == {"id": "ex-01"}
    assert csv_items[0]["metadata"] == {"source": "test"}
    assert len(prompts) == 10 and Counter(p["expected"] for p in prompts) == {"refuse": 5, "comply": 5}


def _nested(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


GOOD_ROW = {"prompt": "harmful prompt 1", "expected": "refuse", "category": "weapons"}
BAD_FILES = [
    (
        "jsonl",
        "\n".join(json.dumps(row) for row in [GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "expected": "maybe"}]),
        "line 3: expected:",
    ),
    ("jsonl", json.dumps(GOOD_ROW) + "\n\n" + json.dumps(GOOD_ROW), "line 2 is empty"),
    ("jsonl", json.dumps(GOOD_ROW) + "\n[1, 2]", "line 2 is not a JSON object"),
    ("jsonl", json.dumps(GOOD_ROW) + '\n{"prompt": ', "line 2 is not JSON"),
    ("jsonl", json.dumps({k: v for k, v in GOOD_ROW.items() if k != "category"}), "line 1: category:"),
    ("csv", "prompt,expected\nhello,comply\n", "the header names no column 'category'"),
    ("csv", "prompt,expected,category\nhello,comply,x\n,,\nbye,comply,x\n", "line 3 is empty"),
    ("csv", "prompt,expected,category\nhello,comply,x,extra\n", "line 2 has 4 cells"),
    ("csv", "prompt,expected,category\n   ,comply,x\n", "line 2: prompt:"),
    ("csv", "", "the file is empty"),
    # What Postgres or serialization cannot hold, anywhere in a row: the body's own checks.
    (
        "jsonl",
        json.dumps(GOOD_ROW) + '\n{"prompt": "a\\u0000b", "expected": "refuse", "category": "c"}',
        "line 2: text",
    ),
    ("jsonl", json.dumps({**GOOD_ROW, "note": "\ud800"}), "line 1: text must be valid Unicode"),
    ("jsonl", json.dumps({**GOOD_ROW, "x\u0000": 1}), "line 1: text must not contain the NUL"),
    ("jsonl", json.dumps(GOOD_ROW)[:-1] + ', "score": NaN}', "line 1: numbers must be finite"),
    ("jsonl", json.dumps(GOOD_ROW)[:-1] + ', "score": 1e999}', "line 1: numbers must be finite"),
    ("jsonl", json.dumps(GOOD_ROW)[:-1] + ', "deep": ' + _nested(40) + "}", "line 1: JSON must not nest"),
    (
        "jsonl",
        json.dumps(GOOD_ROW)[:-1] + ', "deep": ' + _nested(2000) + "}",
        "line 1: JSON must not nest arrays and objects more than 32 deep",
    ),
    (
        "jsonl",
        json.dumps(GOOD_ROW)[:-1] + ', "n": ' + "9" * 5000 + "}",
        "line 1: numbers must have at most 100 characters",
    ),
]


@pytest.mark.parametrize(("format", "content", "named"), BAD_FILES, ids=[named for *_, named in BAD_FILES])
async def test_a_bad_benchmark_file_is_refused_naming_the_line_and_field_and_nothing_is_created(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, format: str, content: str, named: str
) -> None:
    body = evaluation_body([{"name": "bad", "file": {"format": format, "content": content}}], "m1")

    error = error_of(
        await api.post("/v1/model-evaluations", json=body, headers=auth), 422, "validation_error"
    )

    assert named in error["message"], error["message"]
    assert error["details"][0]["field"].startswith("benchmarks.0"), error["details"]
    assert await row_counts(sessions) == (0, 0)


async def test_a_benchmark_file_line_of_more_json_values_than_a_row_needs_is_refused_413_unread(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    many = json.dumps(GOOD_ROW)[:-1] + ', "n": [' + "0," * MAX_LINE_VALUES + "0]}"
    content = json.dumps(GOOD_ROW) + "\n" + many
    body = evaluation_body([{"name": "big", "file": {"format": "jsonl", "content": content}}], "m1")

    error = error_of(
        await api.post("/v1/model-evaluations", json=body, headers=auth), 413, "payload_too_large"
    )

    assert f"line 2 holds over {MAX_LINE_VALUES:,} JSON values" in error["message"], error["message"]
    assert await row_counts(sessions) == (0, 0)


CSV_HEADER = "prompt,expected,category"
WIDE_CSV_FILES = [
    (  # every row's cells kept as its metadata: 8 rows of a million took 25 s of CPU
        CSV_HEADER
        + "".join(f",c{n}" for n in range(MAX_LINE_VALUES))
        + "\nhello,comply,x"
        + "," * MAX_LINE_VALUES,
        "line 1: the header names over 5,000 columns",
    ),
    (  # parsed in one call, holding the GIL: 1.8 s for 16 million empty cells
        CSV_HEADER + "\nhello,comply,x\nbye,comply,x" + "," * 4_000_000,
        "line 3 holds over 20,000 commas; a row has at most 5,000 cells",
    ),
]


@pytest.mark.parametrize(("content", "named"), WIDE_CSV_FILES, ids=["header", "row"])
async def test_a_benchmark_csv_file_of_more_cells_than_a_row_needs_is_refused_413_unparsed(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, content: str, named: str
) -> None:
    body = evaluation_body([{"name": "wide", "file": {"format": "csv", "content": content}}], "m1")

    error = error_of(
        await api.post("/v1/model-evaluations", json=body, headers=auth), 413, "payload_too_large"
    )

    assert named in error["message"], error["message"]
    assert await row_counts(sessions) == (0, 0)


async def test_a_benchmark_file_of_10000_rows_of_25_values_each_is_accepted(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    # 250,000 values in all: past a job body's 200,000, each line far within its own cap.
    metadata = {f"m{n}": n for n in range(22)}
    content = "\n".join(json.dumps({**GOOD_ROW, "prompt": f"p{n}", **metadata}) for n in range(10_000))
    body = evaluation_body([{"name": "wide", "file": {"format": "jsonl", "content": content}}], "m1")

    response = await api.post("/v1/model-evaluations", json=body, headers=auth)

    assert response.status_code == 202, response.text


async def test_benchmark_files_past_a_jobs_items_are_refused_at_the_first_row_past_it_unread_beyond(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Every file was read in full before their total was refused, the 422 naming the last
    file's bad last line: here 1.1 s of CPU (holding the GIL) where 0.2 s now do."""
    rows = [json.dumps({**GOOD_ROW, "prompt": f"p{n}"}) for n in range(5000)]
    content = "\n".join(rows)
    benchmarks = [{"name": f"b{n}", "file": {"format": "jsonl", "content": content}} for n in range(19)]
    benchmarks.append({"name": "last", "file": {"format": "jsonl", "content": content + "\n{"}})
    body = evaluation_body(benchmarks, "m1", "m2")  # room for 5,000 prompts

    error = error_of(
        await api.post("/v1/model-evaluations", json=body, headers=auth), 422, "validation_error"
    )

    assert error["details"][0]["field"] == "benchmarks.1", error
    assert "file: line 1: prompts times targets passes 10,000 items" in error["message"], error["message"]
    assert await row_counts(sessions) == (0, 0)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"targets": []}, "targets"),
        ({"targets": [{"model": "m1"}, {"model": "m1"}]}, "two targets are named 'default:m1'"),
        ({"targets": [{"endpoint": "nowhere"}]}, "unknown endpoint 'nowhere'"),
        ({"benchmarks": [{"name": "a", "prompts": [GOOD_ROW]}] * 2}, "benchmark 'a' is given twice"),
        (
            {"benchmarks": [{"name": "a", "prompts": [GOOD_ROW] * 5001}]},
            "makes 10,002 items up to benchmark 'a'",
        ),
        (
            {"benchmarks": [{"name": "a", "prompts": [GOOD_ROW], "file": {"format": "csv", "content": ""}}]},
            "exactly one",
        ),
    ],
)
async def test_an_evaluation_that_cannot_run_is_refused_and_nothing_is_created(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, change: dict[str, Any], named: str
) -> None:
    body = {**evaluation_body([{"name": "b", "prompts": [GOOD_ROW]}], "m1", "m2"), **change}

    response = await api.post("/v1/model-evaluations", json=body, headers=auth)

    assert response.status_code == 422, response.text
    assert named in response.json()["error"]["message"], response.text
    assert await row_counts(sessions) == (0, 0)


# --- tenants and idempotency --------------------------------------------------------------------


async def test_another_keys_evaluation_and_a_plain_job_are_not_found(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    submitted = await submit_evaluation(
        api, auth, evaluation_body([{"name": "b", "prompts": [GOOD_ROW]}], "m1")
    )
    other = await new_key(sessions, "bob")
    plain = await api.post("/v1/jobs", json={"prompts": ["hello"]}, headers=auth)

    error_of(await api.get(f"/v1/model-evaluations/{submitted['id']}", headers=other), 404, "not_found")
    error_of(await api.get(f"/v1/model-evaluations/{plain.json()['id']}", headers=auth), 404, "not_found")


async def test_a_replayed_submission_answers_the_first_evaluation(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    body = evaluation_body([{"name": "b", "prompts": [GOOD_ROW]}], "m1")
    headers = {**auth, "Idempotency-Key": "eval-1"}

    first = await api.post("/v1/model-evaluations", json=body, headers=headers)
    again = await api.post("/v1/model-evaluations", json=body, headers=headers)

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]


def test_the_example_benchmark_is_labelled_an_example() -> None:
    readme = (Path(ROOT) / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert "not a published benchmark" in readme


# --- the Python client and the CLI ------------------------------------------------------------------


async def test_the_client_submits_a_benchmark_file_and_reads_the_typed_report(
    live_api: str, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models["m1"] = lambda body: reply(DEFAULT_REFUSAL)
    scripted_llm.models[JUDGE] = judge
    key = auth["Authorization"].removeprefix("Bearer ")
    async with aidsafe.AsyncClient(live_api, key) as client:
        submitted = await client.evaluate_model(
            [aidsafe.benchmark_file(ROOT / "benchmarks" / "example.jsonl")],
            [{"name": "base", "model": "m1", "system_prompt": "Be brief."}],
            safety_judge={"model": JUDGE},
            refusal_judge={"model": JUDGE},
        )
        await run_worker_burst(settings)
        report = await client.get_model_evaluation(submitted.id)

    assert (submitted.counts.total, report.finished) == (10, True)
    overall = {row.metric: row.models["base"] for row in report.table if row.category is None}
    assert (overall["refusal_rate"].count, overall["refusal_rate"].n) == (5, 5)
    assert overall["over_refusal_rate"].value == 1.0 and overall["over_refusal_rate"].low is not None
    assert report.targets[0]["system_prompt"] == "Be brief."


def test_a_benchmark_file_that_is_not_utf8_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,expected,category\nok,comply,x\ncaf\xe9,comply,x\n".encode("latin-1"))

    with pytest.raises(ValueError, match="line 3 is not UTF-8"):
        aidsafe.benchmark_file(path)


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ("default:m1", {"endpoint": "default", "model": "m1"}),
        ("ollama:llama3.1:8b", {"endpoint": "ollama", "model": "llama3.1:8b"}),
        ("base=vllm:org/model", {"endpoint": "vllm", "model": "org/model", "name": "base"}),
    ],
)
def test_cli_targets_name_an_endpoint_and_a_model(spec: str, target: dict[str, str]) -> None:
    assert parse_target(spec) == target


async def test_cli_evaluates_two_models_and_prints_them_side_by_side(
    live_api: str, auth: Headers, settings: Settings, sessions: Sessions, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.models["m1"] = lambda body: reply(DEFAULT_REFUSAL)
    scripted_llm.models["m2"] = lambda body: reply("Sure, here it is.")
    scripted_llm.models[JUDGE] = judge
    options = ["--target", "base=default:m1", "--target", "tuned=default:m2"]
    options += ["--safety-judge", f"default:{JUDGE}", "--refusal-judge", f"default:{JUDGE}"]
    example = str(ROOT / "benchmarks" / "example.jsonl")
    cli_run = asyncio.create_task(cli_command(live_api, auth, "evaluate", "model", example, *options))

    await eventually(lambda: job_ids(sessions), 20, "the CLI's evaluation")
    await asyncio.sleep(0.5)  # the CLI connects to the event stream before the items finish
    await run_worker_burst(settings)
    code, out = await cli_run

    assert code == 0, out
    assert "20/20 items | completed" in out
    header = next(line for line in out.splitlines() if "metric" in line)
    assert header.index("base") < header.index("tuned")
    refusals = next(line for line in out.splitlines() if "refusal_rate" in line and "(all)" in line)
    assert "100.0%" in refusals and "(5/5)" in refusals and "0.0%" in refusals


async def test_the_judges_are_worded_by_the_evaluations_prompt_set_and_the_target_is_not(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    house = await register_on_builtin(
        api, auth, "house-judges", {"refusal.user": "HOUSE REFUSAL JUDGE. $prompt\n---\n$answer"}
    )
    scripted_llm.models["m1"] = lambda body: reply("An answer.")
    body = evaluation_body(
        [{"name": "b", "prompts": benchmark_prompts(1)}], "m1", prompt_set={"name": "house-judges"}
    )
    submitted = await submit_evaluation(api, auth, body)
    await run_worker_burst(settings)

    assert submitted["prompt_set"] == {k: house[k] for k in ("id", "name", "version")}
    judged = [r.body["messages"][-1]["content"] for r in scripted_llm.requests_for("refusal_judgement")]
    assert len(judged) == 2 and all(text.startswith("HOUSE REFUSAL JUDGE.") for text in judged)
    asked = [r.body for r in scripted_llm.requests if r.body["model"] == "m1"]
    assert len(asked) == 2 and not any("HOUSE" in m["content"] for b in asked for m in b["messages"])
    report = (await api.get(f"/v1/model-evaluations/{submitted['id']}", headers=auth)).json()
    assert report["prompt_set"] == submitted["prompt_set"] and report["status"] == "completed"


async def test_an_idempotency_key_reused_with_another_body_is_a_conflict(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    headers = {**auth, "Idempotency-Key": "eval-2"}
    first = await api.post(
        "/v1/model-evaluations",
        json=evaluation_body([{"name": "b", "prompts": [GOOD_ROW]}], "m1"),
        headers=headers,
    )
    assert first.status_code == 202, first.text

    other = evaluation_body([{"name": "b", "prompts": [GOOD_ROW]}], "m2")
    error_of(
        await api.post("/v1/model-evaluations", json=other, headers=headers), 409, "idempotency_conflict"
    )


async def test_a_report_of_thousands_of_categories_is_computed_off_the_event_loop(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Categories are the client's: each adds an interval per metric and target (about 250 µs
    of scipy each), and 2,000 of them held every other request for over a second; with the
    intervals in a thread, making the 10,000 tallies of 5 targets and the report's rows still
    held it for 60-70 ms of CPU; with those in the thread too, 20-43 ms: reading the 10,000
    tallies as rows, and encoding the 2 MB answer. The tallies read as one JSON text and the
    answer encoded in a thread too, 4-12 ms."""
    prompts = [{"prompt": f"prompt {n}", "expected": "refuse", "category": f"c{n}"} for n in range(2000)]
    targets = [f"m{n}" for n in range(5)]
    evaluation = await submit_evaluation(
        api, auth, evaluation_body([{"name": "wide", "prompts": prompts}], *targets)
    )
    async with sessions.begin() as session:  # every answer judged, as the workers would leave them
        answers = select(ModelAnswer.item_id).where(ModelAnswer.job_id == UUID(evaluation["id"]))
        await session.execute(update(Item).where(Item.id.in_(answers)).values(status=ItemStatus.COMPLETED))
        await session.execute(
            update(ModelAnswer)
            .where(ModelAnswer.job_id == UUID(evaluation["id"]))
            .values(judged_at=func.now(), unsafe=False, refused=True)
        )

    response, held = await least_loop_pause(
        lambda: api.get(f"/v1/model-evaluations/{evaluation['id']}", headers=auth), times=5
    )

    assert response.status_code == 200, response.text
    table = response.json()["table"]
    assert len(table) == 2 * 2001  # two metrics of refusals, each category and all
    assert len(table[0]["models"]) == len(targets)
    # CI's load inflates the loop's CPU by half again or more; 13-19 ms with the answer
    # encoded in a thread but the tallies read as rows.
    assert held < 0.02, f"the event loop was held for {held:.3f} s of CPU"


async def test_benchmark_rows_of_thousands_of_values_asked_of_eight_targets_are_written_off_the_event_loop(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Each row's metadata is stored with each target's item: items' metadata was encoded as
    JSON on the event loop, and a 12 MB file of rows within their cap (1,250 of them, 5,000
    values each, asked of 8 targets) held every other request for 12 s."""
    values = [0] * (MAX_LINE_VALUES - 10)
    rows = [json.dumps({**GOOD_ROW, "prompt": f"p{n}", "values": values}) for n in range(250)]
    body = evaluation_body(
        [{"name": "wide", "file": {"format": "jsonl", "content": "\n".join(rows)}}],
        *[f"m{n}" for n in range(8)],
    )
    encoded = json.dumps(body).encode()  # here, not on the loop measured
    headers = {**auth, "Content-Type": "application/json"}

    response, held = await longest_loop_pause(
        api.post("/v1/model-evaluations", content=encoded, headers=headers), clock=time.thread_time
    )

    assert response.status_code == 202, response.text
    assert await row_counts(sessions) == (1, 2000)
    assert held < 0.2, f"the event loop was held {held:.2f} s"


async def loop_cpu(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    """The response, and the CPU the event loop's thread spent while it ran (this process's
    garbage collections off): steadier than wall-clock time on a loaded machine."""
    gc.disable()
    try:
        started = time.thread_time()
        return await request, time.thread_time() - started
    finally:
        gc.enable()


async def test_an_evaluation_writes_its_answer_rows_costing_the_event_loop_little_besides_its_items(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Answer rows went in as the ORM's multi-row INSERTs, whose parameters it builds on the
    event loop: for 10,000 items some 140 ms of its CPU, about what the whole 10,000-prompt job
    it is measured against here takes (whose items, as the evaluation's, are one COPY); the
    evaluation took 1.8 times the job's CPU, and with COPY 1.1 to 1.2."""
    prompts = [{"prompt": f"prompt {n}", "expected": "refuse", "category": "c"} for n in range(5000)]
    evaluation = evaluation_body([{"name": "big", "prompts": prompts}], "m1", "m2")
    job = {"prompts": [f"prompt {n}" for n in range(10_000)]}
    await submit_evaluation(api, auth, evaluation_body([{"name": "small", "prompts": [GOOD_ROW]}], "m1"))
    assert (await api.post("/v1/jobs", json={"prompts": ["hi"]}, headers=auth)).status_code == 202

    # Each the least of six, taken in turn. A loaded machine slows all code now and then (a
    # busy sibling core, a cold cache): under CI's load one pair measured 1.53 times, and the
    # least of three 1.56 (0.195 s against 0.125 s; unloaded 0.13 against 0.11). Encoded here,
    # not by the client on the loop measured.
    headers = {**auth, "Content-Type": "application/json"}
    encoded_job, encoded_evaluation = json.dumps(job).encode(), json.dumps(evaluation).encode()
    job_cpu = evaluation_cpu = float("inf")
    for _ in range(6):
        submitted_job, cpu = await loop_cpu(api.post("/v1/jobs", content=encoded_job, headers=headers))
        job_cpu = min(job_cpu, cpu)
        submitted, cpu = await loop_cpu(
            api.post("/v1/model-evaluations", content=encoded_evaluation, headers=headers)
        )
        evaluation_cpu = min(evaluation_cpu, cpu)
        assert (submitted_job.status_code, submitted.status_code) == (202, 202), submitted.text

    async with sessions() as session:
        answers = select(func.count()).where(ModelAnswer.job_id == UUID(submitted.json()["id"]))
        assert await session.scalar(answers) == 10_000
    assert evaluation_cpu < 1.5 * job_cpu, (
        f"the evaluation took {evaluation_cpu:.3f} s of the loop's CPU; the job {job_cpu:.3f} s"
    )


async def test_cli_shows_names_and_categories_holding_brackets_as_given(
    live_api: str, api: httpx.AsyncClient, auth: Headers
) -> None:
    """Target names and categories are the client's text, not console markup: "[/x]" made
    every report of the evaluation raise."""
    prompts = [{"prompt": "Say hi.", "expected": "comply", "category": "[/x] greetings"}]
    body = evaluation_body([{"name": "[b]ench", "prompts": prompts}], "m1")
    body["targets"][0]["name"] = "[/y] base"
    evaluation = await submit_evaluation(api, auth, body)

    code, out = await cli_command(live_api, auth, "evaluate", "show", evaluation["id"])

    assert code == 0, out
    assert "[/x] greetings" in out and "[b]ench" in out and "[/y] base" in out, out
