"""README's settings tables name every `AIDSAFE_` setting of app/config.py, with its default.

A row names one setting or several (`AIDSAFE_LLM_HEDGE_FACTOR` / `_HEDGE_MIN_S`: the second
shares the first's prefix) and gives their defaults in the same order: a literal in
backticks, `none`/`unset` for None, `empty` for "", or words that describe a default the
code computes (not compared). And every `AIDSAFE_` name the docs use is one the code reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from app.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
FIELDS = Settings.model_fields
DESCRIBED = object()  # a default given in words
DOCS = ("README.md", "Dockerfile", "docker-compose.yml", "benchmarks/README.md")
# Where variables other than settings are read: the client, the scripts, the test fixtures.
READERS = ("aidsafe/*.py", "scripts/*.sh", "tests/conftest.py")


def _rows() -> list[tuple[str, str]]:
    """(names cell, default cell) of each table row that starts with a setting."""
    text = README.read_text(encoding="utf-8")
    return re.findall(r"^\| (`AIDSAFE_[^|]*?) \| ([^|]*?) \|", text, re.MULTILINE)


def _field(name: str, first: str) -> str:
    """The Settings field a name of the row stands for (a `_SUFFIX` takes the longest
    prefix of the row's first name that makes a setting)."""
    if name.startswith("AIDSAFE_"):
        return name.removeprefix("AIDSAFE_").lower()
    parts = first.removeprefix("AIDSAFE_").split("_")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = "_".join(parts[:cut]).lower() + name.lower()
        if candidate in FIELDS:
            return candidate
    return name.lower()


def _value(cell: str) -> Any:
    literal = re.match(r"`([^`]*)`", cell)
    if literal:
        return literal.group(1)
    if cell.startswith(("none", "unset")):
        return None
    if cell.startswith("empty"):
        return ""
    return DESCRIBED


def _documented() -> dict[str, Any]:
    documented: dict[str, Any] = {}
    for names_cell, default_cell in _rows():
        names = re.findall(r"`([A-Z_]+)`", names_cell)
        defaults = [_value(part.strip()) for part in re.split(r" / |, (?=`)", default_cell)]
        if len(defaults) == 1:  # one default for every name of the row
            defaults *= len(names)
        assert len(defaults) == len(names), names_cell
        for name, default in zip(names, defaults, strict=True):
            documented[_field(name, names[0])] = default
    return documented


def _matches(documented: Any, default: Any) -> bool:
    if documented is DESCRIBED or isinstance(default, Path):
        return True  # words, or a path that depends on where the code is
    if documented is None or default is None:
        return documented is default
    if isinstance(default, bool):
        return str(documented) == str(default).lower()
    if isinstance(default, int | float):
        return float(documented) == float(default)
    if isinstance(default, dict):
        return documented == "{}" and default == {}
    return bool(documented == default)


def test_readme_documents_every_setting_and_its_default() -> None:
    documented = _documented()

    assert set(documented) - set(FIELDS) == set(), "README names settings that do not exist"
    assert set(FIELDS) - set(documented) == set(), "settings missing from README's tables"
    wrong = {
        name: (documented[name], field.get_default(call_default_factory=True))
        for name, field in FIELDS.items()
        if not _matches(documented[name], field.get_default(call_default_factory=True))
    }
    assert wrong == {}, "README's default (left) is not the code's (right)"


def test_every_variable_the_docs_name_is_one_the_code_reads() -> None:
    """An `AIDSAFE_` variable named anywhere in README, the Dockerfile or the compose file (its
    prose, examples and comments too) is a setting, or a variable the client, the scripts or
    the test fixtures read: a renamed or mistyped one would be set and silently ignored."""
    root = README.parent
    docs = {name: (root / name).read_text(encoding="utf-8") for name in DOCS}
    code = "\n".join(path.read_text(encoding="utf-8") for pattern in READERS for path in root.glob(pattern))

    unknown = {
        f"{doc}: {name}"
        for doc, text in docs.items()
        for name in set(re.findall(r"AIDSAFE_[A-Z0-9_]*[A-Z0-9]", text))
        # `AIDSAFE_LLM_ENDPOINTS__vllm__API_KEY`: a nested field of a setting
        if name.removeprefix("AIDSAFE_").split("__")[0].lower() not in FIELDS
        and not re.search(rf"\b{name}\b", code)
    }

    assert unknown == set()
