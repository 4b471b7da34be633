"""The `aidsafe` command line against the real API over HTTP (uvicorn on a free port), arq's
real worker and the scripted LLM: submit with job options, follow, export, policy sets."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args
from uuid import uuid4

import httpx
import pytest
import typer
import typer.rich_utils
import yaml
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import select
from typer.testing import CliRunner

from aidsafe import Client
from aidsafe.models import Comparison, JobCounts, JobProgress, Usage
from app.api.schemas import JobKind
from app.cli import cli
from app.cli.compare import judge_role, print_comparison
from app.cli.follow import ProgressView, follow_job, refusals_text
from app.cli.job_options import job_config
from app.cli.output import console, escape
from app.cli.prompt_files import PromptFileError, read_prompt_file
from app.config import Settings
from app.deliberation.config import GuardStyle
from app.deliberation.prompt_sets import builtin
from app.exports.options import CotStyle
from app.store import policy_sets, prompt_sets
from app.store.db import Sessions
from app.store.models import Job
from tests.conftest import ROOT, eventually, run_worker_burst, served
from tests.scripted_llm import ScriptedLLM, refusal
from tests.test_api import KITCHEN_POLICIES, row_counts, submit
from tests.test_api import register as register_policy_set
from tests.test_readme_cli import COMMANDS

Headers = dict[str, str]
AIDSAFE = str(Path(sys.executable).parent / "aidsafe")
KITCHEN = {
    "name": "kitchen",
    "description": "House rules.",
    "policies": [
        {
            "id": "knives",
            "title": "Knife safety",
            "scope": "Cutting, sharpening.",
            "allowed": ["Technique"],
            "not_allowed": ["Hurting people"],
            "borderline_examples": [{"prompt": "How sharp is too sharp?", "guidance": "Explain safe use."}],
        }
    ],
}


def cli_env(live_api: str, auth: Headers, columns: int = 200) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDSAFE_")}
    env.update(
        AIDSAFE_API_URL=live_api,
        AIDSAFE_API_KEY=auth["Authorization"].removeprefix("Bearer "),
        COLUMNS=str(columns),
    )
    return env


async def aidsafe(live_api: str, auth: Headers, *args: str, columns: int = 200) -> tuple[int, str]:
    """Run the installed `aidsafe` command against the live API, its output `columns` wide;
    (exit code, its output)."""
    process = await asyncio.create_subprocess_exec(
        AIDSAFE,
        *args,
        env=cli_env(live_api, auth, columns),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


async def interruptible(live_api: str, auth: Headers, *args: str) -> asyncio.subprocess.Process:
    """`aidsafe` started as from a terminal, where Ctrl-C (SIGINT) interrupts it; its output
    piped. A shell starts a command run in the background (`cmd &`, as a CI runner may) with
    SIGINT ignored, which every process it starts inherits, and a Python that starts with
    SIGINT ignored never raises KeyboardInterrupt: the test hung on it."""
    return await asyncio.create_subprocess_exec(
        AIDSAFE,
        *args,
        env=cli_env(live_api, auth),
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


async def job_ids(sessions: Sessions) -> list[str]:
    async with sessions() as session:
        return [str(i) for i in await session.scalars(select(Job.id).order_by(Job.created_at))]


def write(tmp_path: Path, name: str, *lines: str) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def test_cli_submits_with_job_options_follows_the_events_and_prints_the_cots(
    live_api: str,
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    tmp_path: Path,
) -> None:
    prompts = write(
        tmp_path,
        "prompts.jsonl",
        json.dumps({"prompt": "How do I sharpen a knife?", "metadata": {"source": "test"}}),
        json.dumps({"prompt": "How do I store knives safely?"}),
    )
    options = ["--agents", "3", "--max-rounds", "2", "--threshold", "relevance=3"]
    options += ["--pairs", "--pair-max-tries", "1", "--pair-min-gap", "0.5"]
    cli_run = asyncio.create_task(aidsafe(live_api, auth, "submit", str(prompts), *options))

    [job_id] = await eventually(lambda: job_ids(sessions), 20, "the CLI's job")
    await asyncio.sleep(0.5)  # the CLI connects to the event stream before the items finish
    await run_worker_burst(settings)
    code, out = await cli_run

    assert code == 0, out
    job = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert (len(job["config"]["roles"]["deliberators"]), job["config"]["max_rounds"]) == (3, 2)
    assert job["config"]["grading"]["thresholds"] == {"relevance": 3}
    assert (job["config"]["pairs"]["max_tries"], job["config"]["pairs"]["min_gap"]) == (1, 0.5)
    assert job["status"] == "completed"
    assert "2/2 items | completed" in out
    assert "polling instead" not in out
    assert "How do I sharpen a knife?" in out and "Refined thoughts" in out
    assert "Intents: Get an answer to: " in out and " [benign]; " in out  # each with its label


async def test_cli_show_prints_square_brackets_in_the_data_as_they_are(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    # Rich markup in a prompt: "[bold]" would vanish, and "[/]" with nothing open would crash.
    prompt = "What do [bold]tags[/bold] and a stray [/] mean in [red]rich[/red]?"
    job = await submit(api, auth, [prompt])
    await run_worker_burst(settings)

    code, out = await aidsafe(live_api, auth, "show", job["id"])

    assert code == 0, out
    assert prompt in out


async def test_cli_show_prints_control_characters_in_the_data_as_escapes(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    """A prompt (from a scraped data set, say) holding terminal control sequences reached the
    terminal as they were: this one retitles it, clears it and turns what follows red (others
    write the clipboard). Shown as escapes, they do nothing."""
    prompt = "Hi \x1b]0;owned\x07\x1b[2J\x1b[31m there\x9b1m"
    job = await submit(api, auth, [prompt])
    await run_worker_burst(settings)

    code, out = await aidsafe(live_api, auth, "show", job["id"])

    assert code == 0, out
    assert "Hi \\x1b]0;owned\\x07\\x1b[2J\\x1b[31m there\\x9b1m" in out
    assert not {"\x1b", "\x07", "\x9b"} & set(out)


def test_a_control_is_shown_reversed_so_it_reads_apart_from_its_escape_written_in_the_text() -> None:
    """The text `\\x1b` (four characters) and ESC itself both printed as `\\x1b`: a reader could
    not tell the prompt that holds a control from the one that only writes its escape. Doubling
    every backslash told them apart but misquoted every other backslash (a regex in a message,
    a Windows path, LaTeX): on a terminal the escapes the CLI makes are reversed instead."""
    terminal = Console(
        file=io.StringIO(), force_terminal=True, color_system="standard", width=200, emoji=False
    )
    text = "written \\x1b[31m, sent \x1b[31m, a path C:\\new\\\\\x07 [b]:skull:\\"

    terminal.print(f"[green]{escape(text)}[/]", highlight=False)

    printed = terminal.file.getvalue()  # type: ignore[attr-defined]
    styles = re.compile("\x1b\\[[0-9;]*m")  # SGR: 32 green, 7 reverse, 0 reset
    shown = "written \\x1b[31m, sent \\x1b[31m, a path C:\\new\\\\\\x07 [b]:skull:\\\n"
    assert styles.sub("", printed) == shown
    assert re.findall("\x1b\\[7;32m(.*?)\x1b\\[0m", printed) == ["\\x1b", "\\x07"]  # the two controls
    with console.capture() as captured:  # the CLI's own console
        console.print(escape("say :skull: and :red_circle:"))
    assert captured.get() == "say :skull: and :red_circle:\n"  # text, not emoji


async def test_cli_shows_bidirectional_controls_in_labels_and_prompts_as_escapes(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    """A right-to-left override or isolate reached the terminal as it was, and one that applies
    them showed the text after it reversed: what was read was not what was there (Trojan
    Source)."""
    controls = "".join(map(chr, (*range(0x202A, 0x202F), *range(0x2066, 0x206A))))
    job = await submit(api, auth, ["Is this \u202edesrever\u202c safe?"], label="run\u2067 1")
    await run_worker_burst(settings)

    _, listed = await aidsafe(live_api, auth, "jobs", "list")
    code, shown = await aidsafe(live_api, auth, "show", job["id"])

    assert code == 0, shown
    assert listed.splitlines()[0].endswith("run\\u2067 1"), listed
    assert "Is this \\u202edesrever\\u202c safe?" in shown
    assert not set(controls) & set(listed + shown)


async def test_cli_follows_a_job_to_the_end(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    # A budget makes each line longer than 80 columns (rich assumes 80 without a terminal).
    job = await submit(api, auth, ["a", "b", "c"], budget={"max_tokens": 1_000_000})
    process = await asyncio.create_subprocess_exec(
        AIDSAFE, "follow", job["id"], env=cli_env(live_api, auth, columns=80), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 30)
    await run_worker_burst(settings)
    rest = await asyncio.wait_for(process.stdout.read(), 30)

    assert await asyncio.wait_for(process.wait(), 30) == 0
    # Queued items wait: none in progress at the stage each runs first.
    assert first.decode().startswith("0/3 items | queued | queued 3 | in progress - | failed 0 |")
    assert "3/3 items | completed" in rest.decode()
    assert rest.decode().splitlines()[-1].startswith("3/3 items | completed")  # no bar's frame after it
    progress = [line for line in (first + rest).decode().splitlines() if "tokens" in line]
    assert all(line.startswith(("0/3", "1/3", "2/3", "3/3")) for line in progress), progress  # one a line


def test_follow_counts_queued_items_apart_from_those_at_work_in_each_stage() -> None:
    """Queued items carry the stage they run next: they were counted as in progress there, so a
    job no worker had touched showed "in progress intent:8"."""
    by_stage = {
        "intent": {"queued": 8, "running": 1},
        "seed": {"queued": 1, "running": 1, "awaiting_batch": 2},
        "done": {"completed": 3},
    }
    summary = JobProgress(
        status="running",
        counts=JobCounts(
            total=16,
            by_status={"queued": 9, "running": 2, "awaiting_batch": 2, "completed": 3},
            by_stage=by_stage,
        ),
        usage=Usage(llm_calls=0, prompt_tokens=0, completion_tokens=0),
    )
    with Progress(console=console, disable=True) as progress, console.capture() as captured:
        ProgressView(progress, progress.add_task("items")).show(summary)

    assert captured.get().startswith(
        "3/16 items | running | queued 9 | in progress intent:1 seed:3 | failed 0 |"
    )


def test_follow_names_each_refusing_model_as_the_caller_wrote_it() -> None:
    """A model's name is the caller's text: `[red]` in it coloured the refusals line and an
    unmatched `[/]` ended `follow` with a MarkupError, after the job had finished."""
    summary = JobProgress(
        status="completed",
        counts=JobCounts(total=1, by_status={"completed": 1}, by_stage={}),
        usage=Usage(llm_calls=1, prompt_tokens=1, completion_tokens=1),
        refusals_by_stage={"seed": {"m[/]": 1, "evil[red]model\u202e": 2}},
    )
    with console.capture() as captured:
        console.print(refusals_text(summary), highlight=False)

    assert captured.get() == "seed: m[/] 1, evil[red]model\\u202e 2\n"


async def test_ctrl_c_stops_following_says_the_job_goes_on_and_the_cli_cancels_it(
    live_api: str, api: httpx.AsyncClient, auth: Headers
) -> None:
    job = await submit(api, auth, ["a", "b"])  # no worker runs: it stays queued
    process = await interruptible(live_api, auth, "follow", job["id"])
    assert process.stdout is not None
    await asyncio.wait_for(process.stdout.readline(), 30)  # following

    process.send_signal(signal.SIGINT)
    said = (await asyncio.wait_for(process.stdout.read(), 30)).decode()
    code = await asyncio.wait_for(process.wait(), 30)
    status = (await api.get(f"/v1/jobs/{job['id']}", headers=auth)).json()["status"]
    cancel_code, cancelled = await aidsafe(live_api, auth, "jobs", "cancel", job["id"])

    assert code == 130 and "Stopped following" in said and "goes on" in " ".join(said.split()), said
    assert status == "queued"
    assert cancel_code == 0 and f"Job {job['id']}: cancelled, 2/2 items finished." in cancelled, cancelled
    # Asked of the process the CLI cancelled through: another may answer from a reading of the
    # job taken before, for up to twice job_summary_max_age_s (app/api/summaries.py).
    async with httpx.AsyncClient(base_url=live_api) as cancelled_through:
        shown = await cancelled_through.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert shown.json()["status"] == "cancelled"


async def test_an_api_gone_while_following_says_the_job_goes_on(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["a"])  # no worker runs: it stays queued
    with served(settings) as doomed_api:
        process = await asyncio.create_subprocess_exec(
            AIDSAFE, "follow", job["id"], env=cli_env(doomed_api, auth), stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), 30)  # following

    # connections refused for 30 s (a restarting API would be back): the API is gone for good
    said = " ".join((await asyncio.wait_for(process.stdout.read(), 90)).decode().split())

    assert await asyncio.wait_for(process.wait(), 30) == 1
    assert "No answer from the API" in said and f"job {job['id']} goes on" in said, said
    # what was tried, for how long: not the last poll's "[Errno 111] Connection refused" alone
    assert "the API did not come back in 30 s: tried " in said and "Connection refused" in said, said
    assert "polling instead" not in said, said  # polling would only have asked the same API


async def test_reproduce_names_both_jobs_before_following_the_first(
    live_api: str, auth: Headers, sessions: Sessions, tmp_path: Path
) -> None:
    prompts = write(tmp_path, "p.jsonl", '{"prompt": "fine"}')
    report = str(tmp_path / "report")
    process = await interruptible(live_api, auth, "reproduce", str(prompts), "--out", report)
    assert process.stdout is not None
    # No worker runs: the first job never ends, and a Ctrl-C now leaves both jobs running.
    named = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    process.send_signal(signal.SIGINT)
    await asyncio.wait_for(process.communicate(), 30)

    submitted = await job_ids(sessions)
    assert len(submitted) == 2 and set(submitted) <= set(named.replace(",", " ").split()), named


async def test_reproduce_pins_both_jobs_to_the_set_versions_named(
    live_api: str, api: httpx.AsyncClient, auth: Headers, sessions: Sessions, tmp_path: Path
) -> None:
    """To run the procedure again as an earlier report did: in the words of the built-in set
    before an upgrade changed it (a version alone is the built-in set's: the client dropped it
    unnamed), and under an earlier version of one's own policies, not the newest."""
    earlier_templates = {**builtin().templates, "refine.system": "# Your task: refinement\nRefine."}
    async with sessions.begin() as session:  # as the earlier release registered its built-in set
        earlier, _ = await prompt_sets.register(session, None, "aidsafe-default", "", earlier_templates, None)
    first_policies = (await register_policy_set(api, auth, KITCHEN_POLICIES)).json()
    revised = [{**KITCHEN_POLICIES[0], "title": "Kitchen safety, revised"}]
    assert (await register_policy_set(api, auth, revised)).status_code == 201  # the newest: not asked for
    prompts = write(tmp_path, "p.jsonl", '{"prompt": "fine"}')
    args = (
        "reproduce",
        str(prompts),
        "--out",
        str(tmp_path / "report"),
        "--prompt-set-version",
        earlier.version,
        "--policy-set",
        "kitchen",
        "--policy-version",
        first_policies["version"],
    )
    process = await interruptible(live_api, auth, *args)
    assert process.stdout is not None
    named = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert "zero-shot job" in named, "both jobs not submitted: see the CLI's stderr"
    process.send_signal(signal.SIGINT)
    await asyncio.wait_for(process.communicate(), 30)

    async with sessions() as session:
        rows = await session.execute(select(Job.prompt_set_id, Job.policy_set_id))
        pinned = [(str(wording), str(policies)) for wording, policies in rows]
    assert pinned == [(str(earlier.id), first_policies["id"])] * 2, named


# `evaluate <command>`: its file, its options and where the API shows what it made.
EVALUATIONS = {
    "samples": (
        ROOT / "tests/fixtures/samples/safety.csv",
        ["--format", "safety", "--guard"],
        "sample-evaluations",
    ),
    "model": (ROOT / "benchmarks/example.jsonl", ["--target", "default:m1"], "model-evaluations"),
}


@pytest.mark.parametrize("command", EVALUATIONS)
async def test_evaluate_pins_the_builtin_versions_named_and_its_guard_is_worded_by_them(
    command: str,
    live_api: str,
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
) -> None:
    """To evaluate again as an earlier report did, after an upgrade changed the built-in
    sets: a version alone is one of the built-in set's, as `submit` takes it."""
    earlier_guard = builtin().templates["guard.system"] + "\nEARLIER GUARD WORDING."
    earlier_policies = policy_sets.load_file(policy_sets.DEFAULT_FILE)["policies"]
    earlier_policies[0] = {**earlier_policies[0], "title": "Earlier policy title"}
    async with sessions.begin() as session:  # as the earlier release registered its built-in sets
        wording, _ = await prompt_sets.register(
            session, None, "aidsafe-default", "", {**builtin().templates, "guard.system": earlier_guard}, None
        )
        policies, _ = await policy_sets.register(session, None, "aidsafe-default", "", earlier_policies, None)
    file, options, path = EVALUATIONS[command]
    pins = ["--prompt-set-version", wording.version, "--policy-version", policies.version]

    code, out = await aidsafe(live_api, auth, "evaluate", command, str(file), *options, *pins, "--no-follow")
    assert code == 0, out
    await run_worker_burst(settings)

    [job_id] = await job_ids(sessions)
    shown = (await api.get(f"/v1/{path}/{job_id}", headers=auth)).json()
    assert shown["status"] == "completed", shown
    assert (shown["prompt_set"]["version"], shown["policy_set"]["version"]) == (
        wording.version,
        policies.version,
    )
    guard_systems = [r.body["messages"][0]["content"] for r in scripted_llm.requests_for("guard_verdict")]
    assert guard_systems and all(
        "EARLIER GUARD WORDING." in system and "Earlier policy title" in system for system in guard_systems
    ), guard_systems


async def test_cli_follow_counts_the_refusals_and_names_them_by_stage_and_model_at_the_end(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", refusal())
    job = await submit(api, auth, ["Refused."])
    await run_worker_burst(settings)

    code, out = await aidsafe(live_api, auth, "follow", job["id"])

    assert code == 0, out
    assert "1/1 items | completed | queued 0 | in progress - | failed 1 |" in out and "| refused 1" in out
    assert "Refusals by stage and model: seed: scripted-model 1" in out


def test_webhook_rejections_refuse_a_limit_of_none_rather_than_say_there_are_none() -> None:
    """With --limit 0 nothing would be fetched, and "No refused deliveries." would be said
    whatever the webhook refused (HN's review)."""
    result = CliRunner().invoke(
        cli, ["webhooks", "rejections", "w", "--limit", "0", "--api-url", "http://127.0.0.1:9", "--key", "k"]
    )

    assert result.exit_code == 2, result.output
    assert "No refused deliveries" not in result.output


@pytest.mark.parametrize(
    ("name", "lines", "reason"),
    [
        ("bad.jsonl", ['{"prompt": "fine"}', '{"prompt": "fine too"}', '{"prompt": "cut'], ":3: not JSON"),
        (
            "bad.jsonl",
            ['{"prompt": "fine"}', '{"text": "no prompt"}'],
            ":2: expected an object with a string",
        ),
        ("bad.jsonl", ['{"prompt": "fine"}', '{"prompt": "x", "metadata": "m"}'], ":2: 'metadata' must be"),
        ("bad.csv", ["text", "no prompt column"], "needs a 'prompt' column"),
        ("bad.csv", ["prompt,source", "fine,a", ",b"], ":3: empty prompt"),
        # Unquoted, a prompt's comma made two fields: "How do I cut" and a "source" of the rest.
        ("bad.csv", ["prompt,source", "How do I cut, then sharpen a knife?,web"], ":2: not the header's 2"),
        ("bad.csv", ["prompt,source", "fine,a", "no source"], ":3: not the header's 2 fields"),
        ("bad.csv", ["prompt", '"a quote never closed', "swallows this line"], "not a readable CSV"),
    ],
)
async def test_a_bad_prompt_file_is_reported_by_line_and_nothing_is_submitted(
    name: str, lines: list[str], reason: str, sessions: Sessions, tmp_path: Path
) -> None:
    path = write(tmp_path, name, *lines)

    result = CliRunner().invoke(cli, ["submit", str(path), "--api-url", "http://127.0.0.1:9", "--key", "k"])

    assert result.exit_code == 2, result.output
    # rich folds the long path wherever the line ends (under xdist, tmp_path is longer still)
    assert "".join(reason.split()) in "".join(result.output.split())
    assert "nothing was submitted" in result.output
    assert await row_counts(sessions) == (0, 0)


async def test_a_file_that_is_not_utf8_is_refused(sessions: Sessions, tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))

    result = CliRunner().invoke(cli, ["submit", str(path), "--api-url", "http://127.0.0.1:9", "--key", "k"])

    assert result.exit_code == 2 and "not UTF-8" in " ".join(result.output.split())
    assert await row_counts(sessions) == (0, 0)


@pytest.mark.parametrize("end", ["\r\n", "\n", "\r"])
def test_bytes_that_are_not_utf8_are_named_by_line_and_file_offset(end: str, tmp_path: Path) -> None:
    """A CSV was read in chunks: the offset named was within the chunk (and past a byte order
    mark, three short), with no line to look at. Lines end as CSV readers end them (a Mac's
    CSV, the kind likely not UTF-8, ends them with a lone carriage return)."""
    path = tmp_path / "excel.csv"
    first = "x" * 20_000
    path.write_bytes(f"prompt{end}{first}{end}".encode("utf-8-sig") + f"caf\xe9{end}".encode("latin-1"))

    with pytest.raises(PromptFileError) as refused:
        read_prompt_file(path)

    offset = len(f"\ufeffprompt{end}{first}{end}caf".encode())
    assert (
        str(refused.value)
        == f"{path}:3: not UTF-8 text (byte 0xe9 at offset {offset}); save the file as UTF-8"
    )


@pytest.mark.parametrize(
    ("lines", "refusal"),
    [
        (["prompt,source", '"two', 'lines",a', '" ",b'], "4: empty prompt"),
        (["prompt", "fine", '"a"b'], "3: not a readable CSV (',' expected after '\"')"),
    ],
)
def test_a_csv_refusal_names_the_line_its_row_ends_on(lines: list[str], refusal: str, tmp_path: Path) -> None:
    """A quoted prompt may hold line breaks: a row's number is not its line's. A row that is
    no CSV was named by no line at all."""
    path = write(tmp_path, "p.csv", *lines)

    with pytest.raises(PromptFileError) as refused:
        read_prompt_file(path)

    assert str(refused.value) == f"{path}:{refusal}"


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_a_jsonl_prompt_may_hold_unicode_line_separators(end: str, tmp_path: Path) -> None:
    """JSON strings may hold U+2028 and the like as they are; str.splitlines cut the line there
    and the file was refused as not JSON. Lines end at a line feed, a carriage return or both."""
    prompts = ["one\u2028two\u2029three\x85four", "five"]
    path = tmp_path / "p.jsonl"
    lines = (json.dumps({"prompt": prompt}, ensure_ascii=False) + end for prompt in prompts)
    path.write_bytes("".join(lines).encode())

    assert read_prompt_file(path) == [{"prompt": prompt, "metadata": {}} for prompt in prompts]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("excel.csv", "prompt,source\r\nhi,a\r\n"),
        ("p.jsonl", '{"prompt": "hi", "metadata": {"source": "a"}}\n'),
    ],
)
def test_a_prompt_file_may_start_with_a_utf8_byte_order_mark(name: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8-sig"))  # as Excel saves "CSV UTF-8"

    assert read_prompt_file(path) == [{"prompt": "hi", "metadata": {"source": "a"}}]


def test_without_a_key_the_cli_says_how_to_give_one(live_api: str) -> None:
    result = CliRunner().invoke(
        cli, ["jobs", "list", "--api-url", live_api], env={"AIDSAFE_API_KEY": None, "COLUMNS": "200"}
    )

    assert result.exit_code == 1 and "401: unauthorized" in result.output, result.output
    assert "give --key or set AIDSAFE_API_KEY" in result.output


def test_without_an_api_at_its_url_the_cli_names_the_url_and_how_to_give_another() -> None:
    with socket.socket() as unused:  # a port nothing listens on once closed
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"

    result = CliRunner().invoke(cli, ["jobs", "list", "--api-url", url, "--key", "k"], env={"COLUMNS": "200"})

    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "connection_failed" in said, said
    assert f"is the API running at {url}?" in said and "--api-url or set AIDSAFE_API_URL" in said, said


async def test_a_job_option_the_api_refuses_is_reported_and_creates_nothing(
    live_api: str, auth: Headers, sessions: Sessions, tmp_path: Path
) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "fine"}')

    code, out = await aidsafe(live_api, auth, "submit", str(path), "--agents", "99")
    # The test endpoints have no batch API: the option reaches the API, which says so.
    batch_code, batch_out = await aidsafe(live_api, auth, "submit", str(path), "--delivery", "batch")

    assert code == 1 and "422: validation_error" in out
    assert batch_code == 1 and "422: batch_unsupported" in batch_out, batch_out
    assert await row_counts(sessions) == (0, 0)


async def test_cli_downloads_an_export_to_a_file(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, tmp_path: Path
) -> None:
    job = await submit(api, auth, ["a", "b"])
    await run_worker_burst(settings)
    output = tmp_path / "out.jsonl"

    code, out = await aidsafe(live_api, auth, "export", job["id"], "--format", "jsonl", "-o", str(output))

    assert code == 0, out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["a", "b"]
    assert not output.with_name("out.jsonl.part").exists()


async def test_cli_exports_to_stdout_with_nothing_but_the_rows_on_it(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, tmp_path: Path
) -> None:
    job = await submit(api, auth, ["a", "b"])
    await run_worker_burst(settings)
    redirected = tmp_path / "rows.jsonl"

    with redirected.open("wb") as stdout:  # aidsafe export ... -o /dev/stdout > rows.jsonl
        process = await asyncio.create_subprocess_exec(
            AIDSAFE,
            *("export", job["id"], "-f", "jsonl", "-o", "/dev/stdout"),
            env=cli_env(live_api, auth),
            stdout=stdout,
            stderr=asyncio.subprocess.PIPE,
        )
        _, said = await process.communicate()

    assert process.returncode == 0 and b"Wrote /dev/stdout" in said, said
    assert [json.loads(line)["prompt"] for line in redirected.read_text().splitlines()] == ["a", "b"]


async def test_cli_export_refused_by_the_api_says_why_and_writes_no_file(
    live_api: str, api: httpx.AsyncClient, auth: Headers, tmp_path: Path
) -> None:
    job = await submit(api, auth, ["a"])
    output = tmp_path / "out.csv"

    code, out = await aidsafe(live_api, auth, "export", job["id"], "--format", "docx", "-o", str(output))

    assert code == 1 and "422" in out
    assert not output.exists() and not output.with_name("out.csv.part").exists()


async def test_a_file_or_folder_the_cli_cannot_write_is_a_bad_option_not_a_traceback(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, tmp_path: Path
) -> None:
    job = await submit(api, auth, ["a"])
    await run_worker_burst(settings)
    prompt_set_id = (await api.get("/v1/prompt-sets", headers=auth)).json()[0]["id"]
    nowhere = tmp_path / "no such folder"

    export_code, export_out = await aidsafe(
        live_api, auth, "export", job["id"], "-f", "jsonl", "-o", str(nowhere / "out.jsonl")
    )
    folder_code, folder_out = await aidsafe(
        live_api, auth, "prompt-sets", "show", prompt_set_id, "--to-folder", "/proc/templates"
    )

    assert export_code == 2 and "Invalid value for --output: cannot write" in export_out, export_out
    assert folder_code == 2 and "Invalid value for --to-folder: cannot write" in folder_out, folder_out
    assert "Traceback" not in export_out + folder_out


async def test_reproduce_refuses_an_out_folder_it_cannot_make_before_submitting_anything(
    sessions: Sessions, tmp_path: Path
) -> None:
    prompts = write(tmp_path, "p.jsonl", '{"prompt": "fine"}')
    taken = write(tmp_path, "report", "a file, not a folder")

    result = CliRunner().invoke(
        cli, ["reproduce", str(prompts), "--out", str(taken), "--api-url", "http://127.0.0.1:9", "--key", "k"]
    )

    assert result.exit_code == 2 and "cannot write" in " ".join(result.output.split()), result.output
    assert await row_counts(sessions) == (0, 0)


async def test_cli_registers_lists_and_shows_policy_sets(
    live_api: str, auth: Headers, tmp_path: Path
) -> None:
    path = tmp_path / "kitchen.yaml"
    path.write_text(yaml.safe_dump(KITCHEN), encoding="utf-8")

    code, out = await aidsafe(live_api, auth, "policy-sets", "create", str(path))
    assert code == 0 and "kitchen@" in out and "registered (id" in out, out
    again_code, again = await aidsafe(live_api, auth, "policy-sets", "create", str(path))
    assert again_code == 0 and "already registered" in again

    code, listing = await aidsafe(live_api, auth, "policy-sets", "list")
    assert code == 0 and "aidsafe-default@" in listing and "built-in" in listing
    own = next(line for line in listing.splitlines() if "kitchen@" in line)
    assert own.endswith(own.split()[-1]) and " own " in own

    code, shown = await aidsafe(live_api, auth, "policy-sets", "show", own.split()[0])
    assert code == 0, shown
    assert yaml.safe_load(shown) == KITCHEN


async def test_on_80_columns_a_shown_set_reads_back_as_yaml_and_listings_keep_a_row_a_line(
    live_api: str, api: httpx.AsyncClient, auth: Headers
) -> None:
    # What `policy-sets show ID > my-lab.yaml` writes: its first line, a comment naming the set,
    # was folded at 80 columns, and the file no longer read as YAML.
    long_named = {**KITCHEN, "name": "house-rules-for-the-whole-kitchen"}
    registered = (await api.post("/v1/policy-sets", json=long_named, headers=auth)).json()
    job = await submit(api, auth, ["a"])

    show_code, shown = await aidsafe(live_api, auth, "policy-sets", "show", registered["id"], columns=80)
    _, sets = await aidsafe(live_api, auth, "policy-sets", "list", columns=80)
    _, jobs = await aidsafe(live_api, auth, "jobs", "list", columns=80)

    assert show_code == 0 and yaml.safe_load(shown)["name"] == long_named["name"], shown
    assert f"{registered['id']}  house-rules-for-the-whole-kitchen@" in sets, sets
    assert any(line.startswith(job["id"]) and line.endswith("0/1  unknown  -") for line in jobs.splitlines())


async def test_cli_lists_a_job_whose_label_holds_brackets_as_given(
    live_api: str, api: httpx.AsyncClient, auth: Headers
) -> None:
    """A label is the client's text, not console markup: one of "[/x]" made every listing of
    the key's jobs raise."""
    job = await submit(api, auth, ["a"], label="[/x] draft")

    code, jobs = await aidsafe(live_api, auth, "jobs", "list")

    assert code == 0, jobs
    assert jobs.splitlines()[0].startswith(job["id"]) and jobs.splitlines()[0].endswith("[/x] draft"), jobs


async def test_cli_refuses_a_policy_file_that_is_not_yaml(
    live_api: str, auth: Headers, tmp_path: Path
) -> None:
    path = write(tmp_path, "bad.yaml", "name: [unclosed")

    code, out = await aidsafe(live_api, auth, "policy-sets", "create", str(path))

    assert code == 2 and "not YAML" in out and "nothing was registered" in out


async def test_cli_copies_the_builtin_prompt_set_to_a_folder_and_registers_an_edited_one(
    live_api: str, auth: Headers, tmp_path: Path
) -> None:
    code, listing = await aidsafe(live_api, auth, "prompt-sets", "list")
    assert code == 0 and "aidsafe-default@" in listing and "built-in" in listing, listing
    folder = tmp_path / "house"

    code, out = await aidsafe(
        live_api, auth, "prompt-sets", "show", listing.split()[0], "--to-folder", str(folder)
    )
    assert code == 0 and f"{len(builtin().templates)} templates of aidsafe-default@" in out, out
    (folder / "seed.user.txt").write_text("Q: $prompt\nI: $intents\n", encoding="utf-8")

    code, out = await aidsafe(live_api, auth, "prompt-sets", "create", str(folder), "--description", "terse")
    assert (
        code == 0
        and "house@" in out
        and "registered (id" in out
        and f"{len(builtin().templates)} templates" in out
    ), out
    code, again = await aidsafe(live_api, auth, "prompt-sets", "create", str(folder))
    assert code == 0 and "already registered" in again, again
    code, shown = await aidsafe(live_api, auth, "prompt-sets", "show", out.split("(id ")[1].split(",")[0])
    assert code == 0 and yaml.safe_load(shown)["templates"]["seed.user"] == "Q: $prompt\nI: $intents\n"

    (folder / "seed.user.txt").write_text("Q: $prompt $tone\n", encoding="utf-8")
    code, refused = await aidsafe(live_api, auth, "prompt-sets", "create", str(folder))
    assert code != 0 and "invalid_prompt_set" in refused and "$tone" in refused, refused

    # Only the changed template, the rest from the built-in set.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "seed.user.txt").write_text("Q: $prompt\nI: $intents\n", encoding="utf-8")
    code, based = await aidsafe(
        live_api, auth, "prompt-sets", "create", str(mine), "--name", "house", "--base", "aidsafe-default"
    )
    inherited = len(builtin().templates) - 1
    assert code == 0 and "already registered" in based, based  # the same whole set as the folder's
    assert f"{len(builtin().templates)} templates, {inherited} from aidsafe-default@" in based, based


async def test_cli_lists_and_shows_presets_and_submits_from_one(
    live_api: str, api: httpx.AsyncClient, auth: Headers, sessions: Sessions, tmp_path: Path
) -> None:
    served = {p["name"]: p for p in (await api.get("/v1/presets", headers=auth)).json()}
    path = write(tmp_path, "p.jsonl", '{"prompt": "fine"}')

    code, listing = await aidsafe(live_api, auth, "presets", "list")
    assert code == 0, listing
    assert [line.split()[0] for line in listing.splitlines()] == [
        f"{n}@{p['version']}" for n, p in served.items()
    ]
    code, shown = await aidsafe(live_api, auth, "presets", "show", "thorough")
    assert code == 0 and shown.startswith(f"# thorough@{served['thorough']['version']}\n"), shown
    assert yaml.safe_load(shown) == {k: served["thorough"][k] for k in ("description", "notes", "config")}

    code, out = await aidsafe(
        live_api,
        auth,
        "submit",
        str(path),
        "--preset",
        "paper",
        "--max-rounds",
        "1",
        "--no-follow",
        "--no-show",
    )
    assert code == 0, out
    [job_id] = await job_ids(sessions)
    config = (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["config"]
    assert config["preset"] == {"name": "paper", "version": served["paper"]["version"]}
    assert (config["max_rounds"], len(config["roles"]["deliberators"])) == (1, 2)

    code, out = await aidsafe(live_api, auth, "submit", str(path), "--preset", "fast")
    assert code == 1 and "422: unknown_preset" in out and "paper, quick, thorough" in out
    assert await row_counts(sessions) == (1, 1)


class ProxyThatCannotStream(httpx.HTTPTransport):
    """A proxy between the CLI and the API that answers event streams with an error page."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(502, text="<html>Bad gateway</html>", headers={"content-type": "text/html"})
        return super().handle_request(request)


async def test_cli_follows_by_polling_when_the_event_stream_is_unavailable(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, ["a", "b"])
    secret = auth["Authorization"].removeprefix("Bearer ")
    with Client(live_api, secret, transport=ProxyThatCannotStream()) as client:
        follower = asyncio.create_task(asyncio.to_thread(follow_job, client, job["id"], 0.1))
        await asyncio.sleep(0.5)
        await run_worker_burst(settings)
        final = await asyncio.wait_for(follower, 30)

    assert final.status == "completed"
    assert final.counts.by_status == {"completed": 2}


def options_config(**given: Any) -> dict[str, Any]:
    """The job config of the submit options `given`, the others left out."""
    unset: dict[str, Any] = dict.fromkeys(
        ("agents", "max_rounds", "max_tokens", "mode", "pair_max_tries", "pair_min_gap")
    )
    return job_config(**{**unset, "grading": False, "thresholds": [], "pairs": False, **given})


def test_job_options_become_the_job_config() -> None:
    baseline = options_config(mode="zero_shot", grading=True)
    gated = options_config(
        agents=2,
        max_tokens=512,
        mode="aidsafe",
        thresholds=["relevance=3", "cot_policy_faithfulness=4.5"],
        pairs=True,
        pair_min_gap=1.5,
    )
    given_only = options_config(max_rounds=1)
    no_deliberation = options_config(max_rounds=0)
    batched = options_config(delivery="batch", batch_unanswered="online")

    assert given_only == {"max_rounds": 1}  # no mode unless asked: a preset's stays
    assert no_deliberation == {"max_rounds": 0}  # not the default's 4
    assert batched == {"delivery": "batch", "batch": {"unanswered": "online"}}
    assert baseline == {"mode": "zero_shot", "grading": {}}
    assert gated == {
        "mode": "aidsafe",
        "agents": 2,
        "max_tokens": 512,
        "grading": {"thresholds": {"relevance": 3.0, "cot_policy_faithfulness": 4.5}},
        "pairs": {"min_gap": 1.5},
    }


@pytest.mark.parametrize("metadata", ["[1]", '[["source", "web"]]', '"web"'])
def test_metadata_that_is_no_json_object_is_refused_before_anything_is_sent(
    metadata: str, tmp_path: Path
) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "fine"}')

    result = CliRunner().invoke(
        cli, ["submit", str(path), "--metadata", metadata, "--api-url", "http://127.0.0.1:9", "--key", "k"]
    )

    # [1] was a TypeError traceback, and [["source", "web"]] became {"source": "web"}
    assert result.exit_code == 2 and "not a JSON object" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    ("command", "option", "values"),
    [
        (["jobs", "list"], "--kind", get_args(JobKind)),
        (["export"], "--cot", [style.value for style in CotStyle]),
        (["evaluate", "model"], "--guard-style", [style.value for style in GuardStyle]),
    ],
)
def test_an_options_help_names_every_value_the_api_takes(
    command: list[str], option: str, values: Sequence[str]
) -> None:
    shown = " ".join(CliRunner().invoke(cli, [*command, "--help"], env={"COLUMNS": "200"}).output.split())

    assert all(value in shown.split(option, 1)[1] for value in values), shown


def test_a_threshold_without_a_score_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "fine"}')

    result = CliRunner().invoke(
        cli,
        ["submit", str(path), "--threshold", "relevance", "--api-url", "http://127.0.0.1:9", "--key", "k"],
    )

    assert result.exit_code == 2 and "expected METRIC=SCORE" in " ".join(result.output.split())


async def test_submit_without_following_prints_the_job_and_returns(
    live_api: str, auth: Headers, tmp_path: Path
) -> None:
    """As the README says: `--no-follow` prints the job's id and returns. It printed every
    item too, as a box saying it had no CoT yet, unless `--no-show` was given as well."""
    prompts = write(tmp_path, "p.jsonl", '{"prompt": "Dice an onion?"}', '{"prompt": "Boil an egg?"}')

    code, out = await aidsafe(live_api, auth, "submit", str(prompts), "--no-follow")

    assert code == 0, out
    [line] = out.splitlines()
    assert line.startswith("Job ") and ": 2 prompts, policy set aidsafe-default@" in line


async def test_cli_lists_jobs_newest_first_with_filters(live_api: str, auth: Headers, tmp_path: Path) -> None:
    prompts = write(tmp_path, "p.jsonl", '{"prompt": "Dice an onion?"}', '{"prompt": "Boil an egg?"}')
    submitted = []
    for n in range(3):
        code, out = await aidsafe(
            live_api, auth, "submit", str(prompts), "--label", f"run-{n % 2}",
            "--metadata", json.dumps({"n": n}), "--mode", "zero_shot" if n == 2 else "aidsafe",
            "--no-follow", "--no-show",
        )  # fmt: skip
        assert code == 0, out
        submitted.append(out.split()[1].rstrip(":"))

    code, everything = await aidsafe(live_api, auth, "jobs", "list", "--limit", "0")
    _, newest = await aidsafe(live_api, auth, "jobs", "list", "--limit", "1")
    _, run_0 = await aidsafe(live_api, auth, "jobs", "list", "--label", "run-0", "--status", "queued")
    _, second = await aidsafe(live_api, auth, "jobs", "list", "--metadata", '{"n": 1}')
    _, zero_shot = await aidsafe(live_api, auth, "jobs", "list", "--kind", "zero_shot")
    bad_code, bad = await aidsafe(live_api, auth, "jobs", "list", "--metadata", "[1]")

    assert code == 0, everything
    assert [line.split()[0] for line in everything.splitlines()] == submitted[::-1]
    # No endpoint has prices here: the cost is unknown.
    assert everything.splitlines()[0].split()[2:] == ["zero_shot", "queued", "0/2", "unknown", "run-0"]
    assert [line.split()[0] for line in newest.splitlines()] == submitted[2:]
    assert [line.split()[0] for line in run_0.splitlines()] == [submitted[2], submitted[0]]
    assert [line.split()[0] for line in second.splitlines()] == [submitted[1]]
    assert [line.split()[0] for line in zero_shot.splitlines()] == [submitted[2]]
    assert bad_code == 1 and "invalid_filter" in bad, bad


async def test_cli_estimates_submits_with_a_budget_stops_following_when_it_is_spent_and_raises_it(
    live_api: str,
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    scripted_llm: ScriptedLLM,
    tmp_path: Path,
) -> None:
    scripted_llm.usage = (1000, 200, 0)  # 1,200 tokens a call: three calls reach 3,600
    prompts = write(tmp_path, "prompts.txt.jsonl", json.dumps({"prompt": "How do I sharpen a knife?"}))
    options = ["--agents", "2", "--max-rounds", "2", "--max-tokens", "64", "--budget-tokens", "3600"]

    code, out = await aidsafe(live_api, auth, "submit", str(prompts), *options, "--estimate")
    assert code == 0, out
    assert "1 items: 4-7 LLM calls" in out and "cost unknown (unpriced: default)" in out
    assert await job_ids(sessions) == []  # an estimate creates nothing

    cli_run = asyncio.create_task(aidsafe(live_api, auth, "submit", str(prompts), *options, "--no-show"))
    [job_id] = await eventually(lambda: job_ids(sessions), 20, "the CLI's job")
    assert (await api.get(f"/v1/jobs/{job_id}", headers=auth)).json()["budget"]["max_tokens"] == 3600
    await asyncio.sleep(0.5)  # the CLI connects to the event stream before the items stop
    await run_worker_burst(settings)
    code, out = await cli_run

    assert code == 0, out
    assert "budget 3,600 tokens" in out
    assert "budget_exhausted" in out and "cost unknown" in out
    # the hint raises the limit reached: a cost limit would be refused on the unpriced endpoint
    assert f"aidsafe jobs budget {job_id} --tokens <more>" in out
    code, out = await aidsafe(live_api, auth, "jobs", "budget", job_id, "--tokens", "100000")
    assert code == 0, out
    assert "queued" in out and "budget 100,000 tokens" in out
    code, out = await aidsafe(live_api, auth, "jobs", "budget", job_id)
    assert code == 2 and "--none" in out


async def test_cli_compares_two_jobs_with_two_judges_and_prints_each_ones_shares_and_their_agreement(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    prompts = ["How do I sharpen a knife?", "How do I store knives?"]
    baseline = await submit(api, auth, prompts, config={"mode": "zero_shot", "grading": {}})
    candidate = await submit(api, auth, prompts, config={"grading": {}})
    await run_worker_burst(settings)
    process = await asyncio.create_subprocess_exec(
        *(AIDSAFE, "compare", baseline["id"], candidate["id"]),
        *("--judge", "judge-a", "--judge", "judge-b@default", "--label", "zs-vs-aidsafe"),
        env=cli_env(live_api, auth),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    first = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    await run_worker_burst(settings)
    rest = (await asyncio.wait_for(process.stdout.read(), 30)).decode()

    assert await asyncio.wait_for(process.wait(), 30) == 0
    assert first.startswith("Comparison ") and "2 prompts in common" in first
    # The scripted judge calls every pair a tie: 2 of 2, Wilson 95 % [34.2 %, 100.0 %].
    assert (
        "Judge judge-a@default: candidate wins 0.0% [0.0%, 65.8%] (n=2), ties 100.0% [34.2%, 100.0%]" in rest
    )
    assert "Judge judge-b@default: candidate wins" in rest
    assert "Agreement of 2 judges: unanimous 100.0% [34.2%, 100.0%] (n=2), Cohen's kappa n/a" in rest
    assert "relevance: baseline 4.00 [4.00, 4.00] (n=2)" in rest
    models = {r.body["model"] for r in scripted_llm.requests_for("pairwise_judgement")}
    assert models == {"judge-a", "judge-b"}


def test_a_comparisons_judge_is_printed_as_named_not_as_markup_or_controls() -> None:
    """A judge's model name is the caller's text: `[red]` in it coloured what followed (and an
    unclosed `[/]` stopped the report with a MarkupError), ESC reached the terminal."""
    rate = {"value": 0.5, "low": 0.1, "high": 0.9, "n": 2}
    comparison = Comparison.model_validate(
        {
            **{"id": str(uuid4()), "status": "completed", "created_at": "2026-01-01T00:00:00Z"},
            **{"label": None, "metadata": {}, "baseline_job_id": str(uuid4())},
            **{"candidate_job_id": str(uuid4()), "prompts": 2, "metrics": {}},
            "counts": {"total": 2, "by_status": {"completed": 2}, "by_stage": {}},
            "usage": {"llm_calls": 2, "prompt_tokens": 2, "completion_tokens": 2},
            "judges": [
                {
                    "judge": {"model": "judge-[red]a[/]\x1b]0;owned\x07", "endpoint": "default"},
                    **{"wins": 1, "ties": 0, "losses": 1, "unreadable": 0},
                    **{"win_rate": rate, "tie_rate": rate, "loss_rate": rate},
                }
            ],
        }
    )
    with console.capture() as captured:
        print_comparison(comparison)
    assert "Judge judge-[red]a[/]\\x1b]0;owned\\x07@default: candidate wins" in captured.get()


async def test_refusals_worded_for_http_callers_name_the_clis_flag_or_command_too(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    prompts = ["How do I sharpen a knife?"]
    ungraded = await submit(api, auth, prompts, config={"mode": "zero_shot"})
    graded = await submit(api, auth, prompts, config={"grading": {}})

    wide = 1000  # a refusal on a line of its own
    code, running = await aidsafe(live_api, auth, "jobs", "delete", ungraded["id"], columns=wide)
    await run_worker_burst(settings)
    mismatch_code, mismatch = await aidsafe(
        live_api, auth, "compare", ungraded["id"], graded["id"], columns=wide
    )
    _, allowed = await aidsafe(
        live_api, auth, "compare", ungraded["id"], graded["id"], "--allow-mismatch", "--no-follow"
    )
    comparison_id = allowed.split()[1].removesuffix(":")  # "Comparison ID: 1 prompts in common"
    compared_code, compared = await aidsafe(live_api, auth, "jobs", "delete", ungraded["id"], columns=wide)

    # The API's words stay as HTTP callers need them; the CLI's way follows.
    assert code == 1 and "409: job_running" in running and f"POST /v1/jobs/{ungraded['id']}/cancel" in running
    assert f"(with the CLI: `aidsafe jobs cancel {ungraded['id']}`)" in running, running
    assert (
        mismatch_code == 1 and "422: comparison_mismatch" in mismatch and "allow_mismatch: true" in mismatch
    )
    assert "(with the CLI: --allow-mismatch)" in mismatch, mismatch
    assert compared_code == 1 and "409: job_in_comparison" in compared
    assert f"(with the CLI: `aidsafe jobs delete ID` for each of {comparison_id})" in compared, compared


@pytest.mark.parametrize(
    ("spec", "role"),
    [
        ("m", {"model": "m"}),
        ("org/m:7b@vllm", {"model": "org/m:7b", "endpoint": "vllm"}),
        ("@vllm", {"endpoint": "vllm"}),
    ],
)
def test_a_judge_is_a_model_an_endpoint_or_both(spec: str, role: dict[str, str]) -> None:
    assert judge_role(spec) == role


def test_a_judge_naming_nothing_is_refused() -> None:
    with pytest.raises(typer.BadParameter):
        judge_role(" @ ")


def test_every_command_is_summed_up_on_one_line_of_its_groups_help(monkeypatch: pytest.MonkeyPatch) -> None:
    """Typer's commands panel keeps the line breaks of a command's summary (its docstring's
    first paragraph; fastapi/typer#1844), so a summary wrapped in the source broke mid-sentence
    in `aidsafe --help`, at any terminal width: each summary is one line, the rest after it."""
    # Wide and plain whatever the environment says (Typer reads TERMINAL_WIDTH, FORCE_COLOR...
    # as it is imported): a summary's row must fit on one line, and start with its name.
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 400)
    monkeypatch.setattr(typer.rich_utils, "FORCE_TERMINAL", False)
    for path, group in COMMANDS.items():
        shown = CliRunner().invoke(cli, [*path, "--help"])
        assert shown.exit_code == 0, shown.output
        rows = shown.output.splitlines()
        for name, command in getattr(group, "commands", {}).items():
            summary = " ".join((command.short_help or command.help or "").split("\n\n")[0].split())
            row = next(row for row in rows if row.startswith(f"│ {name} "))
            assert summary in row, f"aidsafe {' '.join(path)} --help: {name!r} shows {row!r}"
