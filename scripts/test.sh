#!/usr/bin/env bash
# The test command: install, make sure Postgres and Redis run, run every test.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not embedded_llm"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install-browser.sh
bash scripts/services.sh
.venv/bin/ruff check app workers tests migrations bench
exec .venv/bin/pytest -q "$@"
