"""The test fixtures themselves: every pytest session (an xdist worker, or a session forked
from a test process, as mutmut runs each mutant) has a database and Redis keys of its own and
leaves neither behind; `serial` tests never run beside others."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from sqlalchemy import make_url

from tests.conftest import ARQ_JOB_KEY_PREFIXES, PG_ADMIN_DSN, REDIS_URL, ROOT

PROBE = """
import json
import os

from tests.conftest import submit


async def test_probe(api, auth, settings, redis):
    await submit(api, auth, ["Left in the queue"])
    queued = [job_id.decode() for job_id in await redis.zrange(settings.queue_name, 0, -1)]
    record = {"database_url": settings.database_url, "prefix": settings.redis_key_prefix, "queued": queued}
    with open(os.environ["PROBE_RECORDS"], "a") as records:
        records.write(json.dumps(record) + "\\n")
"""


async def test_a_session_forked_from_a_test_process_has_its_own_database_and_keys_and_leaves_none(
    tmp_path: Path,
) -> None:
    probe, records = tmp_path / "test_probe.py", tmp_path / "records.jsonl"
    probe.write_text(PROBE)
    plugins = ["-p", "pytest_asyncio.plugin", "-p", "tests.conftest"]
    args = [str(probe), *plugins, "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-q"]
    # What mutmut does: pytest in this process, then in a forked child; tests.conftest is
    # imported once.
    code = f"""
        import os, sys
        import pytest

        first = pytest.main({args!r})
        child = os.fork()
        if child == 0:
            os._exit(int(pytest.main({args!r})))
        _, status = os.waitpid(child, 0)
        sys.exit(int(first) or os.waitstatus_to_exitcode(status))
        """
    environ = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    # Only the plugins named: the others (schemathesis's, hypothesis's...) take seconds to load.
    environ.update(PROBE_RECORDS=str(records), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")

    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(code), cwd=ROOT, env=environ, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await child.communicate()

    assert child.returncode == 0, output.decode()
    parent, forked = [json.loads(line) for line in records.read_text().splitlines()]
    assert parent["database_url"] != forked["database_url"]
    assert parent["prefix"] != forked["prefix"]
    databases = [make_url(probe["database_url"]).database for probe in (parent, forked)]
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        assert await admin.fetch("SELECT 1 FROM pg_database WHERE datname = ANY($1::text[])", databases) == []
    finally:
        await admin.close()
    redis = Redis.from_url(REDIS_URL)
    try:
        for probe in (parent, forked):
            assert probe["queued"], "the probe left a job in its queue"
            assert [key async for key in redis.scan_iter(f"{probe['prefix']}:*")] == []
            arq_keys = [prefix + job_id for job_id in probe["queued"] for prefix in ARQ_JOB_KEY_PREFIXES]
            assert await redis.exists(*arq_keys) == 0
    finally:
        await redis.aclose()


SETTINGS_PROBE = """
from app.config import Settings
from tests.conftest import worker_env


def test_probe(settings):
    fields = Settings.model_fields
    defaults = fields["llm_max_concurrency"].default, fields["api_key_cache_s"].default
    assert (settings.llm_max_concurrency, settings.api_key_cache_s) == defaults
    assert worker_env(settings)["AIDSAFE_LLM_MAX_CONCURRENCY"] == str(defaults[0])
    assert "AIDSAFE_REDIS_URL" not in worker_env(settings.model_copy(update={"redis_url": None}))
"""


async def test_the_suite_ignores_the_aidsafe_variables_its_shell_exported(tmp_path: Path) -> None:
    """Someone who ran the service from this shell (the README's `export AIDSAFE_...`) and then
    the tests gets the tests' settings, not a mix, in the tests and in the workers they start."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(SETTINGS_PROBE)
    environ = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    environ.update(
        AIDSAFE_LLM_MAX_CONCURRENCY="3",
        AIDSAFE_API_KEY_CACHE_S="60",
        AIDSAFE_REDIS_URL="redis://127.0.0.1:1/0",
        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
    )
    args = [
        str(probe),
        "-p",
        "pytest_asyncio.plugin",
        "-p",
        "tests.conftest",
        "-c",
        str(ROOT / "pyproject.toml"),
    ]

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        *args,
        "--rootdir",
        str(ROOT),
        "-q",
        cwd=ROOT,
        env=environ,
        stdout=PIPE,
        stderr=STDOUT,
    )
    output, _ = await child.communicate()

    assert child.returncode == 0, output.decode()


# scripts/test.sh runs the suite with -n auto, then with --only-serial: these two fail there
# if a serial test ran in an xdist worker or --only-serial ran anything else.


@pytest.mark.serial
def test_a_serial_test_never_runs_in_an_xdist_worker() -> None:
    assert "PYTEST_XDIST_WORKER" not in os.environ


def test_only_serial_runs_serial_tests_only(pytestconfig: pytest.Config) -> None:
    assert not pytestconfig.getoption("only_serial")
