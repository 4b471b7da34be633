"""The test fixtures themselves: every pytest session (a session forked from a test process,
as mutmut runs each mutant, or an xdist worker) has a database and Redis keys of its own and
leaves neither behind; `serial` tests never run beside others.

Each test runs pytest on a probe file in a subprocess, with tests/conftest.py as a plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from sqlalchemy import make_url

from tests.conftest import ARQ_JOB_KEY_PREFIXES, PG_ADMIN_DSN, REDIS_URL, ROOT

PROBE = """
import json
import os

import pytest

from tests.conftest import submit


async def test_probe(api, auth, settings, redis):
    await submit(api, auth, ["Left in the queue"])
    queued = [job_id.decode() for job_id in await redis.zrange(settings.queue_name, 0, -1)]
    record = {"database_url": settings.database_url, "prefix": settings.redis_key_prefix, "queued": queued}
    with open(os.environ["PROBE_RECORDS"], "a") as records:
        records.write(json.dumps(record) + "\\n")


@pytest.mark.serial
def test_serial_probe():
    with open(os.environ["PROBE_RECORDS"], "a") as records:
        records.write(json.dumps({"serial": True}) + "\\n")
"""


def probe_pytest_args(tmp_path: Path, *args: str) -> list[str]:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    plugins = ["-p", "pytest_asyncio.plugin", "-p", "xdist.plugin", "-p", "tests.conftest"]
    return [str(probe), *plugins, "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-q", *args]


def run_probe(tmp_path: Path, code: str) -> list[dict[str, Any]]:
    """Run Python `code` (which runs pytest on the probe) in a child; the probe's records."""
    records = tmp_path / "records.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        # Only the plugins named: the others (schemathesis's, hypothesis's...) take seconds to load.
        env={**_clean_environ(), "PROBE_RECORDS": str(records), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []


def _clean_environ() -> dict[str, str]:
    """This process's environment without what marks it an xdist worker."""
    return {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}


async def assert_nothing_left(probes: list[dict[str, Any]]) -> None:
    databases = [make_url(probe["database_url"]).database for probe in probes]
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        left = await admin.fetch("SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", databases)
    finally:
        await admin.close()
    assert left == [], "a session's database outlived it"
    redis = Redis.from_url(REDIS_URL)
    try:
        for probe in probes:
            assert [key async for key in redis.scan_iter(f"{probe['prefix']}:*")] == []
            arq_keys = [prefix + job_id for job_id in probe["queued"] for prefix in ARQ_JOB_KEY_PREFIXES]
            assert await redis.exists(*arq_keys) == 0, "arq keys of a job left in the queue"
    finally:
        await redis.aclose()


async def test_a_session_forked_from_a_test_process_has_its_own_database_and_keys(tmp_path: Path) -> None:
    args = probe_pytest_args(tmp_path, "-m", "not serial")
    # What mutmut does: pytest in this process, then pytest in a forked child, tests.conftest
    # imported once.
    code = textwrap.dedent(
        f"""
        import os, sys
        import pytest

        first = pytest.main({args!r})
        child = os.fork()
        if child == 0:
            os._exit(int(pytest.main({args!r})))
        _, status = os.waitpid(child, 0)
        sys.exit(int(first) or os.waitstatus_to_exitcode(status))
        """
    )

    parent, forked = run_probe(tmp_path, code)

    assert parent["database_url"] != forked["database_url"]
    assert parent["prefix"] != forked["prefix"]
    assert parent["queued"] and forked["queued"]
    await assert_nothing_left([parent, forked])


def test_serial_tests_never_run_in_an_xdist_worker_and_run_alone_with_only_serial(tmp_path: Path) -> None:
    in_worker = probe_pytest_args(tmp_path, "-n", "1", "-m", "serial")
    alone = probe_pytest_args(tmp_path, "--only-serial")

    assert run_probe(tmp_path, f"import pytest, sys; sys.exit(pytest.main({in_worker!r}))") == []
    assert run_probe(tmp_path, f"import pytest, sys; sys.exit(pytest.main({alone!r}))") == [{"serial": True}]
