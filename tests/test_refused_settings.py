"""The servers' entry points with settings they refuse: a line for each, naming the variable
and why (never its value), exit status 1, and no traceback of pydantic's internals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.config import Settings, get_settings, refusals, settings_or_exit
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
PASSWORD = "s3cret-do-not-print"
# Settings refused, and the lines naming them, by field, by a model validator, and not JSON.
REFUSED_FIELDS = (
    {"AIDSAFE_MAX_EXPORTS": "0", "AIDSAFE_DATABASE_URL": f"http://user:{PASSWORD}@127.0.0.1/aidsafe"},
    [
        "  AIDSAFE_DATABASE_URL: the database URL's scheme http:// is none the service connects with: "
        "write postgresql:// (or postgres://, postgresql+asyncpg://)",
        "  AIDSAFE_MAX_EXPORTS: Input should be greater than or equal to 1",
    ],
)
REFUSED_TOGETHER = (
    {"AIDSAFE_HEARTBEAT_INTERVAL_S": "5", "AIDSAFE_HEARTBEAT_TTL_S": "10"},
    ["  the AIDSAFE_* settings: heartbeat_ttl_s must be at least three times heartbeat_interval_s"],
)
NOT_JSON = (
    {"AIDSAFE_LLM_ENDPOINTS": f'{{"fast": {{"api_key": "{PASSWORD}"'},
    ["  AIDSAFE_LLM_ENDPOINTS: not JSON (Expecting ',' delimiter: line 1 column 43 (char 42))"],
)


def start(program: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    command, env = [str(BIN / program), *args], {**os.environ, **settings}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("program", ["aidsafe-api", "aidsafe-worker"])
def test_a_server_refused_its_settings_names_each_and_exits_without_a_traceback(program: str) -> None:
    settings, refused = REFUSED_FIELDS
    ended = start(program, **settings)

    assert ended.returncode == 1, ended.stderr
    assert "Traceback" not in ended.stdout + ended.stderr and PASSWORD not in ended.stderr, ended.stderr
    assert ended.stderr.splitlines() == [f"{program}: cannot start, the settings are refused:", *refused]


def test_a_worker_checking_its_deployment_names_settings_refused_together() -> None:
    """A refusal of settings taken together (a model validator's) names no one field."""
    settings, refused = REFUSED_TOGETHER
    ended = start("aidsafe-worker", "--check", **settings)

    assert ended.returncode == 1 and "Traceback" not in ended.stderr, ended.stderr
    assert ended.stderr.splitlines() == ["aidsafe-worker: cannot start, the settings are refused:", *refused]


@pytest.mark.parametrize(
    ("preset", "problem"),
    [
        (
            "description: d\nconfig: {agents: 99}\n",
            "bad.yaml: not a preset (config.agents: Input should be less than or equal to 8)",
        ),
        (
            "description: [unclosed\n",
            "bad.yaml: not YAML (expected ',' or ']', but got '<stream end>', line 2, column 1)",
        ),
        (None, "the presets directory {presets} does not exist"),
    ],
    ids=["not a preset", "not YAML", "no directory"],
)
def test_an_api_given_a_preset_that_does_not_load_names_it_on_one_line_without_a_traceback(
    tmp_path: Path, preset: str | None, problem: str
) -> None:
    """It was a traceback of some 20 frames of uvicorn's and Starlette's start-up, and exit status 3."""
    presets = tmp_path / "presets"
    if preset is not None:
        presets.mkdir()
        (presets / "good.yaml").write_text("description: fine\nconfig: {agents: 1}\n", encoding="utf-8")
        (presets / "bad.yaml").write_text(preset, encoding="utf-8")
        problem = f"{presets}/{problem}"
    ended = start("aidsafe-api", AIDSAFE_PRESETS_DIR=str(presets))

    assert ended.returncode == 1, ended.stderr
    assert ended.stderr.splitlines() == [
        "aidsafe-api: cannot start, the settings are refused:",
        f"  AIDSAFE_PRESETS_DIR: {problem.format(presets=presets)}",
    ]


@pytest.mark.parametrize(
    ("setting", "value"),
    [("default_agents", 0), ("default_agents", 9), ("default_max_rounds", -1), ("default_max_tokens", 32)],
)
def test_a_job_default_outside_a_jobs_own_bounds_is_refused(setting: str, value: int) -> None:
    """Taken, every job that set none ran unlike any a job may ask for: with no agents, none
    deliberated; with 32 tokens, every call was cut short."""
    with pytest.raises(ValidationError, match=setting):
        Settings.model_validate({setting: value})


@pytest.mark.parametrize("program", ["aidsafe-api", "aidsafe-worker"])
def test_a_server_given_a_json_setting_that_is_not_json_names_it_without_a_traceback(program: str) -> None:
    """pydantic-settings reads a setting of JSON (endpoints, prices) before validating any,
    and raised its own error for one that is not JSON: a traceback, not the line for it."""
    settings, refused = NOT_JSON
    ended = start(program, **settings)

    assert ended.returncode == 1, ended.stderr
    assert "Traceback" not in ended.stderr and PASSWORD not in ended.stderr, ended.stderr
    assert ended.stderr.splitlines() == [f"{program}: cannot start, the settings are refused:", *refused]


@pytest.mark.parametrize(("settings", "refused"), [REFUSED_FIELDS, REFUSED_TOGETHER, NOT_JSON])
def test_settings_or_exit_ends_with_a_line_for_each_refused_setting(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, str], refused: list[str]
) -> None:
    """What the servers above print, made in this process (where mutation testing sees it): the
    exit's message is its lines, which Python writes to stderr with status 1."""
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            settings_or_exit("aidsafe-api")
    finally:
        get_settings.cache_clear()  # read again, with this test's variables gone

    assert exited.value.code == "\n".join(["aidsafe-api: cannot start, the settings are refused:", *refused])


def test_a_settings_error_naming_no_field_is_refused_as_the_settings() -> None:
    """pydantic-settings' errors of other kinds than a variable it could not read (its CLI
    source's, say) name no variable: the line is the settings', with the error's message."""
    assert refusals(SettingsError("error parsing CLI: no such option")) == [
        ("the AIDSAFE_* settings", "error parsing CLI: no such option")
    ]


def test_a_refusal_within_a_setting_of_json_names_the_entry_and_its_field() -> None:
    """`AIDSAFE_LLM_ENDPOINTS: Input should be greater than or equal to 1` left an operator with
    several endpoints to guess which one, and which of its fields."""
    endpoint = {"base_url": "http://127.0.0.1:9/v1", "max_concurrency": 0, "batch": {"unknown": 1}}
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate({"llm_endpoints": {"fast": endpoint}, "max_exports": 0})

    assert sorted(refusals(refused.value)) == [
        ("AIDSAFE_LLM_ENDPOINTS", "fast.batch.unknown: Extra inputs are not permitted"),
        ("AIDSAFE_LLM_ENDPOINTS", "fast.max_concurrency: Input should be greater than or equal to 1"),
        ("AIDSAFE_MAX_EXPORTS", "Input should be greater than or equal to 1"),
    ]
