"""Sampling profiles of running service processes with py-spy, summarised as hotspots.

py-spy (a dev dependency: `.venv/bin/pip install py-spy==0.4.3`) attaches to a pid and
samples its Python stacks without changing the code. Only busy threads are sampled, so
sample shares approximate CPU shares. The summary lists where time is spent by package
(self time), the functions with the most self time, and the project's own frames (app/,
workers/) with the most inclusive time, each as file:line.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.machine import ROOT

# py-spy counts a thread blocked in these as active; they are idle pool threads.
_IDLE_LEAVES = ("stdlib/threading.py", "stdlib/queue.py", "stdlib/concurrent/futures/thread.py")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record on some pids until stop(); raw (collapsed-stack) files in out_dir."""

    def __init__(self, out_dir: Path, rate_hz: int = 200) -> None:
        self.out_dir = out_dir
        self.rate_hz = rate_hz
        self._procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Path] = []

    def start(self, pids: dict[str, int]) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy==0.4.3")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            out = self.out_dir / f"{name}.raw.txt"
            argv = [exe, "record", "--pid", str(pid), "--rate", str(self.rate_hz), "--format", "raw"]
            argv += ["--output", str(out), "--full-filenames"]
            log = (self.out_dir / f"{name}.py-spy.log").open("wb")
            self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            log.close()
            self.files.append(out)

    def stop(self) -> None:
        """Ctrl-C each py-spy (it then writes its file), waiting up to 20 s each."""
        for proc in self._procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _frames(stack: str) -> list[tuple[str, str, str]]:
    out = []
    for raw in stack.split(";"):
        found = _FRAME.match(raw.strip())
        if found:
            out.append((found["func"], _short(found["file"]), found["line"] or "?"))
    return out


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(ROOT))
    if "/lib/python3" in path:
        return "stdlib/" + path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return path


def _package(file: str) -> str:
    if file.startswith(("app/", "workers/", "bench/")):
        return "/".join(file.split("/")[:2]) if file.startswith("app/") else file.split("/")[0]
    if file.startswith("stdlib/"):
        parts = file.split("/")
        return "stdlib/" + (parts[1] if len(parts) > 2 else parts[-1].removesuffix(".py"))
    if file.startswith("<"):
        return "native/frozen"
    return file.split("/")[0].removesuffix(".py")


def _innermost_own(frames: list[tuple[str, str, str]]) -> str:
    """The deepest app/ or workers/ frame of a stack: the project line that led to the cost.
    Stacks without one are charged to their outermost library frame (e.g. arq's poll loop)."""
    for func, file, lineno in reversed(frames):
        if file.startswith(("app/", "workers/")):
            return f"{func} ({file}:{lineno})"
    for func, file, lineno in frames:
        if not file.startswith(("stdlib/", "native", "<")):
            return f"(no project frame) {func} ({file}:{lineno})"
    func, file, lineno = frames[0]
    return f"(no project frame) {func} ({file}:{lineno})"


_LAYERS = (  # first match wins, so the order says which layer a mixed stack belongs to
    ("http client (httpx, httpcore, h11, anyio)", ("httpx/", "httpcore/", "h11/")),
    ("redis via arq (queue, job bookkeeping)", ("arq/",)),
    ("redis (limiter, other)", ("redis/",)),
    ("postgres (sqlalchemy, asyncpg)", ("sqlalchemy/", "asyncpg/")),
    ("fastapi, pydantic", ("fastapi/", "pydantic/", "pydantic_core/")),
    ("uvicorn, starlette", ("uvicorn/", "starlette/")),
    ("logging", ("stdlib/logging/",)),
)


def _layer(frames: list[tuple[str, str, str]]) -> str:
    files = [file for _, file, _ in frames]
    for name, prefixes in _LAYERS:
        if name.startswith("redis via arq"):
            # arq is the root of every worker stack: count it only when arq talks to Redis
            arq_redis = any(f.startswith("redis/") for f in files) and not any(
                f.startswith("app/") for f in files
            )
            if arq_redis and any(f.startswith("arq/") for f in files):
                return name
            continue
        if any(f.startswith(prefixes) for f in files):
            return name
    if any(f.startswith("app/") for f in files):
        return "project code (app/, workers/)"
    return "event loop, other"


def summarize(files: list[Path], top: int = 15) -> dict[str, Any]:
    """Hotspots of the samples in py-spy raw files (one stack and a count per line)."""
    total = idle = 0
    by_package: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    own_inclusive: Counter[str] = Counter()
    innermost_own: Counter[str] = Counter()
    by_layer: Counter[str] = Counter()
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            frames = _frames(stack)
            if not frames:
                continue
            if frames[-1][1].startswith(_IDLE_LEAVES):
                idle += count
                continue
            total += count
            func, file, lineno = frames[-1]
            by_package[_package(file)] += count
            self_time[f"{func} ({file}:{lineno})"] += count
            innermost_own[_innermost_own(frames)] += count
            by_layer[_layer(frames)] += count
            seen = set()
            for func, file, lineno in frames:
                if file.startswith(("app/", "workers/")):
                    where = f"{func} ({file}:{lineno})"
                    if where not in seen:
                        seen.add(where)
                        own_inclusive[where] += count

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"where": where, "share": round(count / total, 4), "samples": count}
            for where, count in counter.most_common(top)
        ]

    return {
        "samples": total,
        "idle_thread_samples_left_out": idle,
        "by_layer": shares(by_layer),
        "self_by_package": shares(by_package),
        "self_top": shares(self_time),
        "project_frames_inclusive": shares(own_inclusive),
        "charged_to_innermost_project_line": shares(innermost_own),
    }


def print_summary(title: str, summary: dict[str, Any], file: Any = sys.stderr) -> None:
    print(f"\n== {title}: {summary['samples']} samples", file=file)
    for heading, key in (
        ("by layer (a stack belongs to the first layer it touches)", "by_layer"),
        ("self time by package", "self_by_package"),
        ("self time by function", "self_top"),
        ("project frames, inclusive", "project_frames_inclusive"),
        ("charged to the innermost project line", "charged_to_innermost_project_line"),
    ):
        print(f"-- {heading}", file=file)
        for row in summary[key]:
            print(f"  {row['share'] * 100:5.1f}%  {row['where']}", file=file)
