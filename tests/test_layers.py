"""The layering rule, read from the code's imports: the engine at the bottom imports none of
the packages around it; the store reads and writes rows and imports none of the packages
above it; the export and import flows sit above the store, exports above labeling (the
registry of formats lists the labeling tools' formats), never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Above the store: what turns its rows into files and reviews into rows, and who serves them.
ABOVE_THE_STORE = (
    "app.api",
    "app.cli",
    "app.exports",
    "app.labeling",
    "app.main",
    "app.reports",
    "app.web",
    "workers",
)
# Around the engine: its adapters (the LLM client, the store) and everything above them.
OUTSIDE_THE_ENGINE = (*ABOVE_THE_STORE, "app.llm", "app.store")


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imported(path: Path) -> set[str]:
    """Every module the file imports, wherever in the file (also under TYPE_CHECKING or in a
    function): `from a.b import c` counts as both a.b and a.b.c, since c may be a module."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"  # the project imports absolutely
            assert node.module is not None
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def _imports_into(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """`importer -> imported` for each import from the package's files into a forbidden one."""
    files = sorted((ROOT / package.replace(".", "/")).rglob("*.py"))
    assert files, f"no files in {package}"
    found = []
    for path in files:
        into = {module for module in _imported(path) if _within(module, forbidden)}
        # Name `from a.b import c` once, as a.b, when a.b is forbidden already.
        found += [
            f"{_module(path)} -> {m}" for m in sorted(into) if not _within(m.rpartition(".")[0], tuple(into))
        ]
    return found


def test_the_store_imports_nothing_from_the_layers_above_it() -> None:
    assert _imports_into("app.store", ABOVE_THE_STORE) == []


def test_the_engine_imports_none_of_the_packages_around_it() -> None:
    assert _imports_into("app.deliberation", OUTSIDE_THE_ENGINE) == []


def test_labeling_does_not_import_the_exports_that_list_its_formats() -> None:
    # app.exports.formats imports app.labeling: an arrow back would close a cycle.
    assert _imports_into("app.exports", ("app.labeling",)) != []
    assert _imports_into("app.labeling", ("app.exports",)) == []


def test_the_workers_and_the_flows_do_not_import_the_http_layer() -> None:
    # HTTP and workers are shells around the same flows: a worker that needs what a route does
    # (the replay of a spooled webhook delivery) finds it in the flows, not in app.api.
    for package in ("workers", "app.labeling", "app.exports", "app.reports"):
        assert _imports_into(package, ("app.api", "app.web")) == [], package
