"""Prometheus metrics. Workers expose theirs on AIDSAFE_WORKER_METRICS_PORT (the default
registry); the API serves its own (queue depth, items by state, webhook deliveries) at
/metrics, from API_REGISTRY."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

LLM_REQUEST_SECONDS = Histogram(
    "aidsafe_llm_request_seconds",
    "One HTTP attempt to an LLM endpoint, by outcome (ok, rate_limited, server_error, "
    "timeout, connection, rejected, bad_body, limiter, cancelled: the losing copy of a hedge).",
    ["endpoint", "role", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LLM_HEDGES = Counter(
    "aidsafe_llm_hedges_total",
    "Requests that ran long enough to be hedged (app/llm/hedging.py), by what happened: sent, "
    "skipped because the hedge budget was spent (no_budget), or refused, unsent, because the "
    "endpoint's circuit breaker was open (breaker_open).",
    ["endpoint", "role", "outcome"],
)
LLM_BREAKER_REFUSALS = Counter(
    "aidsafe_llm_breaker_refusals_total",
    "Attempts refused, unsent, because their endpoint's circuit breaker was open (app/llm/breaker.py); "
    "a refused hedge is not one (aidsafe_llm_hedges_total, breaker_open).",
    ["endpoint", "role"],
)
LLM_TOKENS = Counter(
    "aidsafe_llm_tokens_total", "Tokens used, by kind (prompt, completion).", ["endpoint", "role", "kind"]
)
LLM_COST_USD = Counter(
    "aidsafe_llm_cost_usd_total",
    "USD of recorded LLM calls at their jobs' pinned prices (calls to unpriced endpoints are not counted).",
    ["endpoint"],
)
LIMIT_WAIT_SECONDS = Counter(
    "aidsafe_llm_limit_wait_seconds_total", "Time spent waiting for a shared endpoint slot.", ["endpoint"]
)
LIMIT_CAP = Gauge(
    "aidsafe_llm_limit_cap",
    "An endpoint's adaptive concurrency cap (shared by every worker), as of this worker's last release.",
    ["endpoint"],
)
LIMIT_PAUSE_SECONDS = Counter(
    "aidsafe_llm_limit_pause_seconds_total",
    "Seconds this worker paused an endpoint for every worker (Retry-After, x-ratelimit-reset-*); "
    "overlapping pauses count once.",
    ["endpoint"],
)
LIMIT_PAUSED_UNTIL = Gauge(
    "aidsafe_llm_limit_paused_until_seconds",
    "Unix time the last pause this worker set on an endpoint ends.",
    ["endpoint"],
)
ITEMS_FINISHED = Counter("aidsafe_items_finished_total", "Items ended by this worker, by status.", ["status"])
BATCHES_CREATED = Counter(
    "aidsafe_batches_created_total",
    "Provider batches this worker created for batch delivery (one found, made by a worker that "
    "died before storing its id, is not counted again).",
    ["endpoint"],
)
BATCHES_ENDED = Counter(
    "aidsafe_batches_ended_total",
    "Batches this worker ended, by status: collected, refused (split, or its lone request "
    "rejected), cancelled (their job was) or lost.",
    ["endpoint", "status"],
)
BATCH_REQUESTS_RESENT = Counter(
    "aidsafe_batch_requests_resent_total",
    "Requests a batch this worker ended left unanswered and sent again, by how: in the job's "
    "next wave (next_wave) or online (online).",
    ["endpoint", "via"],
)
DELIVERIES_REPLAYED = Counter(
    "aidsafe_webhook_deliveries_replayed_total",
    "Spooled Label Studio deliveries this worker recorded, by outcome: recorded (reviews "
    "stored) or refused (kept as a rejection, as a live delivery's would be).",
    ["outcome"],
)
# The API's families apart from the workers': on the default registry, /metrics listed every
# LLM and per-item family, which the API never gives a value. The process's own (CPU, memory,
# Python) are on both.
API_REGISTRY = CollectorRegistry()
ProcessCollector(registry=API_REGISTRY)
PlatformCollector(registry=API_REGISTRY)
GCCollector(registry=API_REGISTRY)
ITEMS = Gauge("aidsafe_items", "Items waiting or running, over all jobs.", ["status"], registry=API_REGISTRY)
QUEUE_DEPTH = Gauge(
    "aidsafe_queue_depth", "arq jobs in the queue (waiting, deferred or running).", registry=API_REGISTRY
)
DELIVERIES_SPOOLED = Counter(
    "aidsafe_webhook_deliveries_spooled_total",
    "Label Studio deliveries this API process spooled to Redis because Postgres was away "
    "(answered 202; a worker records them once it is back).",
    registry=API_REGISTRY,
)
DELIVERIES_WAITING = Gauge(
    "aidsafe_webhook_deliveries_waiting",
    "Spooled Label Studio deliveries not yet recorded (being replayed included), over all API processes.",
    registry=API_REGISTRY,
)
DELIVERIES_DEAD = Gauge(
    "aidsafe_webhook_deliveries_dead",
    "Spooled Label Studio deliveries a worker could not read, moved to the dead list "
    "(`aidsafe deliveries dead` shows them).",
    registry=API_REGISTRY,
)
