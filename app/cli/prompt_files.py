"""The file of prompts `submit` and `reproduce` read: JSONL or CSV."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    pass


# Where a line ends, in CSV readers and old Mac files alike: JSON text holds none of these
# in a string as it is (str.splitlines also cuts at U+2028 and the like, which it may hold).
LINE_BREAK = r"\r\n|\r|\n"


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Items from a JSONL ({"prompt", "metadata"?} per line) or CSV (a `prompt` column,
    other columns become metadata). Any bad line fails the whole file, naming the line."""
    text = _text(path)
    items = _csv_items(path, text) if path.suffix.lower() == ".csv" else _jsonl_items(path, text)
    if not items:
        raise PromptFileError(f"{path}: no prompts")
    return items


def _text(path: Path) -> str:
    """The file's text, without the byte order mark Excel's "CSV UTF-8" starts with (else
    part of the first column's name); bytes that are not UTF-8 named by line and offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        after_mark: bytes = exc.object  # the codec's positions are in the bytes after a mark
        line = len(re.findall(LINE_BREAK.encode(), after_mark[: exc.start])) + 1
        offset = len(raw) - len(after_mark) + exc.start
        raise PromptFileError(
            f"{path}:{line}: not UTF-8 text (byte {after_mark[exc.start]:#04x} at offset {offset}); "
            "save the file as UTF-8"
        ) from None


def _csv_items(path: Path, text: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    # strict: a quote left open is an error, not a prompt that runs on to the end of the file.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        if "prompt" not in (reader.fieldnames or []):
            raise PromptFileError(f"{path}: the CSV needs a 'prompt' column")
        for row in reader:
            line = reader.line_num  # where the row ends: a quoted prompt may span lines
            if None in row or None in row.values():  # more fields than the header, or fewer
                raise PromptFileError(
                    f"{path}:{line}: not the header's {len(reader.fieldnames or [])} fields "
                    "(a comma or line break in a prompt that is not quoted?)"
                )
            prompt = (row.pop("prompt") or "").strip()
            if not prompt:
                raise PromptFileError(f"{path}:{line}: empty prompt")
            items.append({"prompt": prompt, "metadata": {k: v for k, v in row.items() if k}})
    except csv.Error as exc:  # DictReader's line_num is the last row's: its reader's is this one's
        raise PromptFileError(f"{path}:{reader.reader.line_num}: not a readable CSV ({exc})") from exc
    return items


def _jsonl_items(path: Path, text: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for line, record_text in enumerate(re.split(LINE_BREAK, text), start=1):
        if not record_text.strip():
            continue
        try:
            record = json.loads(record_text)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{line}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise PromptFileError(f"{path}:{line}: expected an object with a string 'prompt'")
        if not record["prompt"].strip():
            raise PromptFileError(f"{path}:{line}: empty prompt")
        if not isinstance(record.get("metadata") or {}, dict):
            raise PromptFileError(f"{path}:{line}: 'metadata' must be an object")
        items.append({"prompt": record["prompt"], "metadata": record.get("metadata") or {}})
    return items
