"""Private PostgreSQL and Redis servers that a run may restart at will.

The machine's own servers are shared with other people, so a benchmark that restarts its
database or Redis starts its own: a throw-away cluster made by `initdb` in a temporary
directory, and a `redis-server` child process without persistence, each on a free port.
Leaving the `with` stops them and deletes the cluster, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.stack import StackError, free_port


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        raise StackError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return found[-1].parent


class PrivatePostgres:
    """A PostgreSQL cluster of our own (trust auth, user postgres, fsync off).
    `statement_stats`: pg_stat_statements loaded, tracking nested statements too (the
    foreign keys' checks), for `statement_stats()` after a database's `CREATE EXTENSION`."""

    def __init__(self, log_dir: Path, statement_stats: bool = False) -> None:
        self.port = free_port()
        self.statement_stats = statement_stats
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._bin = _postgres_bin()
        # The server refuses to run as root: as root, the cluster belongs to `postgres`.
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._dir = Path(tempfile.mkdtemp(prefix="aidsafe-private-pg-"))
        if self._as_user:
            shutil.chown(self._dir, "postgres")
        # Written inside the cluster's directory (the server's user may not reach log_dir),
        # copied to log_dir when the cluster is deleted.
        self._log = self._dir / "postgres.log"
        self._kept_log = log_dir / "postgres.log"

    def _pg_ctl(self, *args: str) -> None:
        # start and restart need -l: a server writing to our pipe would keep run() waiting.
        command = [*self._as_user, str(self._bin / "pg_ctl"), "-D", str(self._dir / "data"), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise StackError(f"pg_ctl {' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    def start(self) -> None:
        initdb = [
            *self._as_user, str(self._bin / "initdb"), "-D", str(self._dir / "data"),
            "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8",
        ]  # fmt: skip
        done = subprocess.run(initdb, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise StackError(f"initdb failed:\n{done.stdout}{done.stderr}")
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self._dir} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        if self.statement_stats:
            options += " -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
        self._pg_ctl("start", "-w", "-l", str(self._log), "-o", options)

    def postmaster_pid(self) -> int:
        """The server's main process; every other process of the cluster is its child."""
        return int((self._dir / "data" / "postmaster.pid").read_text().split()[0])

    def restart(self) -> None:
        """Stop (fast: open connections are cut) and start again; returns once it accepts."""
        self._pg_ctl("restart", "-w", "-m", "fast", "-l", str(self._log))

    def stop(self) -> None:
        with contextlib.suppress(StackError, subprocess.TimeoutExpired):
            self._pg_ctl("stop", "-m", "immediate")
        with contextlib.suppress(OSError):
            shutil.copyfile(self._log, self._kept_log)
        shutil.rmtree(self._dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server child process on a free port, with nothing saved to disk."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = log_dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while not self._answers_ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"redis-server on port {self.port} did not start; see {self._log}")
            time.sleep(0.05)

    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def _answers_ping(self) -> bool:
        ping = ["redis-cli", "-p", str(self.port), "ping"]
        return subprocess.run(ping, capture_output=True, text=True).stdout.strip() == "PONG"

    def restart(self) -> None:
        """Stop and start again: everything in it (queue, jobs, limiter keys) is gone."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


@contextlib.contextmanager
def private_services(
    log_dir: Path, statement_stats: bool = False
) -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    """Start both servers; stop them and delete the cluster on the way out."""
    postgres, redis = PrivatePostgres(log_dir, statement_stats), PrivateRedis(log_dir)
    try:
        postgres.start()
        redis.start()
        yield postgres, redis
    finally:
        redis.stop()
        postgres.stop()
