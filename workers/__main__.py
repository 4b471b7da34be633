"""`python -m workers`: `aidsafe-worker` run from this checkout's code (tests and bench/ use it)."""

from workers.main import run

run()
