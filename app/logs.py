"""Structured JSON logs; every record made while an item runs carries its job and item ids."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

_ids: ContextVar[dict[str, str]] = ContextVar("aidsafe_log_ids", default={})  # noqa: B039 - never mutated


class _WithIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _ids.get().items():
            setattr(record, name, value)
        return True


@contextmanager
def ids(**values: str) -> Iterator[None]:
    """Add these ids (e.g. job_id, item_id) to every record logged inside the block."""
    token = _ids.set({**_ids.get(), **values})
    try:
        yield
    finally:
        _ids.reset(token)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so configure() can tell it is already installed."""


# Loggers whose records go to the root logger's handler, as ours.
_FLOWING_TO_ROOT = ("arq", "uvicorn", "uvicorn.error", "uvicorn.access")


def handler(json: bool = True) -> logging.Handler:
    """Our stderr handler: JSON lines (or plain ones) carrying the item's ids."""
    made = _Handler()
    made.addFilter(_WithIds())
    if json:
        made.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    return made


def _quiet_httpx(root_level: int) -> int:
    return max(logging.WARNING, root_level)  # one line per request is noise


def configure(level: str = "INFO", json: bool = True) -> None:
    """One stderr handler on the root logger; arq's and uvicorn's loggers flow into it.
    Idempotent; other handlers on the root logger (a test runner's) are kept."""
    root = logging.getLogger()
    if any(isinstance(h, _Handler) for h in root.handlers):
        return
    root.addHandler(handler(json))
    root.setLevel(level)
    for name in _FLOWING_TO_ROOT:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("httpx").setLevel(_quiet_httpx(root.level))


def uvicorn_log_config(level: str = "INFO", json: bool = True) -> dict[str, Any]:
    """configure()'s setup as uvicorn's `log_config`, which uvicorn applies before its first
    line in each process it starts: a worker of `--workers` is a process of its own, where
    configure() in the parent never reaches (its first lines were lost, or plain text)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"aidsafe": {"()": "app.logs.handler", "json": json}},
        "root": {"handlers": ["aidsafe"], "level": level.upper()},
        "loggers": {
            **{name: {"handlers": [], "propagate": True} for name in _FLOWING_TO_ROOT},
            "httpx": {"level": _quiet_httpx(logging.getLevelNamesMapping()[level.upper()])},
        },
    }
