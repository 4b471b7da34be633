"""Structured logs carry the ids of the item being worked on."""

from __future__ import annotations

import json
import logging
import subprocess

import httpx
import pytest

from app import logs
from app.config import Settings
from app.store.db import Sessions
from tests.conftest import api_subprocess


@pytest.fixture
def fresh_logging() -> None:
    """Drop a handler an earlier test's app installed: it writes to that test's stderr."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logs._Handler)]:
        root.removeHandler(handler)


def test_records_inside_an_item_carry_its_job_and_item_ids(
    fresh_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("INFO", json=True)
    logger = logging.getLogger("aidsafe.test")

    with logs.ids(item_id="i-1"), logs.ids(job_id="j-1"):
        logger.info("inside")
    logger.info("outside")

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    inside, outside = (next(r for r in lines if r["message"] == m) for m in ("inside", "outside"))
    assert (inside["job_id"], inside["item_id"], inside["level"], inside["logger"]) == (
        "j-1",
        "i-1",
        "INFO",
        "aidsafe.test",
    )
    assert "job_id" not in outside and "item_id" not in outside


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_api_as_deployed_writes_every_line_as_json_from_its_first(
    settings: Settings, sessions: Sessions, workers: str
) -> None:
    """uvicorn's own first lines ("Started server process", "Waiting for application
    startup") came as plain text, before the app's start-up installed the JSON handler: a log
    shipper reading JSON lines choked on them. A worker of `--workers` is a process of its
    own, which the parent's logging never reaches."""
    with api_subprocess(settings, "--workers", workers, stderr=subprocess.PIPE) as (url, process):
        assert httpx.get(f"{url}/healthz").status_code == 200
    assert process.stderr is not None
    lines = process.stderr.read().decode().splitlines()

    records = [json.loads(line) for line in lines]  # each line is JSON, or this raises
    messages = [record["message"] for record in records]
    assert any(m.startswith("Started server process") for m in messages), messages
    assert "Application startup complete." in messages
