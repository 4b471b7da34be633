"""Structured JSON logs; every record made while an item runs carries its job and item ids."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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


def configure(level: str = "INFO", json: bool = True) -> None:
    """One stderr handler on the root logger; arq's and uvicorn's loggers flow into it.
    Idempotent; other handlers on the root logger (a test runner's) are kept."""
    root = logging.getLogger()
    if any(isinstance(h, _Handler) for h in root.handlers):
        return
    handler = _Handler()
    handler.addFilter(_WithIds())
    if json:
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("arq", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))  # one line per request is noise
