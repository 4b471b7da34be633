"""The file of prompts `submit` and `reproduce` read: JSONL or CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    pass


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Items from a JSONL ({"prompt", "metadata"?} per line) or CSV (a `prompt` column,
    other columns become metadata). Any bad line fails the whole file, naming the line."""
    try:
        return _read_prompt_file(path)
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise PromptFileError(f"{path}: not a readable CSV ({exc})") from exc


def _read_prompt_file(path: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte order mark, which would otherwise
        # be part of the first column's name. strict: a quote left open is an error, not a
        # prompt that runs on to the end of the file.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, strict=True)
            if "prompt" not in (reader.fieldnames or []):
                raise PromptFileError(f"{path}: the CSV needs a 'prompt' column")
            for line, row in enumerate(reader, start=2):
                if None in row or None in row.values():  # more fields than the header, or fewer
                    raise PromptFileError(
                        f"{path}:{line}: not the header's {len(reader.fieldnames or [])} fields "
                        "(a comma or line break in a prompt that is not quoted?)"
                    )
                prompt = (row.pop("prompt") or "").strip()
                if not prompt:
                    raise PromptFileError(f"{path}:{line}: empty prompt")
                items.append({"prompt": prompt, "metadata": {k: v for k, v in row.items() if k}})
    else:
        for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{path}:{line}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise PromptFileError(f"{path}:{line}: expected an object with a string 'prompt'")
            if not record["prompt"].strip():
                raise PromptFileError(f"{path}:{line}: empty prompt")
            if not isinstance(record.get("metadata") or {}, dict):
                raise PromptFileError(f"{path}:{line}: 'metadata' must be an object")
            items.append({"prompt": record["prompt"], "metadata": record.get("metadata") or {}})
    if not items:
        raise PromptFileError(f"{path}: no prompts")
    return items
