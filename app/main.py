"""The FastAPI application (`app.main:app`; `aidsafe-api` serves it). It never calls an LLM."""

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq.connections import create_pool
from fastapi import FastAPI
from sqlalchemy import select

from app import logs, preflight, stats
from app.api import (
    annotations,
    callbacks,
    comparisons,
    deletions,
    errors,
    events,
    exports,
    health,
    items,
    jobs,
    metrics,
    model_evaluations,
    policy_sets,
    presets,
    prompt_sets,
    reports,
    sample_evaluations,
    state,
    webhooks,
)
from app.api.draining import DRAINING
from app.api.failures import Failures
from app.api.key_turns import KeyTurns
from app.api.known_keys import KnownKeys
from app.api.known_values import KnownValues
from app.api.limits import BodySizeLimit
from app.api.open_streams import OpenStreams
from app.api.recent import Recent
from app.api.state import ApiState
from app.api.summaries import JobSummaries
from app.api.verified_webhooks import VerifiedWebhooks
from app.config import Settings, get_settings
from app.presets import InvalidPresets
from app.presets import load as load_presets
from app.queue import REQUEST_RETRIES, bound_calls, redis_settings
from app.store.budgets import Spending
from app.store.db import dispose, make_engine, make_sessions
from app.store.models import Webhook
from app.threads import in_thread
from app.web import pages

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        logs.configure(settings.log_level, settings.log_json)
        # In a thread as the API starts, not at the first interval a request asks for: on the
        # event loop, that held every request 0.7-1.7 s.
        first_load = "scipy.stats" not in sys.modules
        await in_thread(stats.load_scipy)
        if first_load:
            # Its ~38,000 objects live as long as the process: frozen as the rest of start-up
            # (below), so that no full collection walks them, each 17-28 ms longer otherwise.
            # Once a process: each later freeze would keep what is garbage then for good.
            gc.freeze()
        try:
            shipped = load_presets(settings.presets_dir, settings)
        except InvalidPresets as exc:  # stops the start; `aidsafe-api` says so before (check_or_exit)
            raise InvalidPresets(f"AIDSAFE_PRESETS_DIR: {exc}") from None
        engine = make_engine(settings.database_url, settings.database_timeout_s, settings.api_db_connections)
        sessions = make_sessions(engine)
        arq = await create_pool(redis_settings(settings.redis_url, REQUEST_RETRIES))
        await bound_calls(arq, settings.redis_timeout_s)
        # Progress streams wait on Redis (XREAD BLOCK) until their next snapshot is due: a pool
        # of their own, so that a silent Redis holds the API's other calls (enqueues, budget
        # counters) seconds, not those waits.
        streams = await create_pool(redis_settings(settings.redis_url, REQUEST_RETRIES))
        longest_wait_s = max(settings.events_resync_s, settings.events_snapshot_interval_s)
        await bound_calls(streams, settings.redis_timeout_s + longest_wait_s)
        summaries = JobSummaries(sessions, settings.job_summary_max_age_s, settings.job_summary_read_share)
        # One count for unknown API keys and deliveries to unknown webhooks: both are a lookup
        # anyone may send, and an id guessed is a key guessed.
        wrong_keys = Failures(
            arq,
            settings.redis_key_prefix,
            "unknown keys and webhooks",
            settings.wrong_keys_per_address,
            settings.wrong_keys_window_s,
        )
        known_keys = KnownKeys(sessions, settings.api_key_cache_s, wrong_keys)
        readiness: Recent[None, list[str]] = Recent(health.READINESS_MAX_AGE_S)
        scrapes: Recent[None, bytes] = Recent(metrics.SCRAPE_MAX_AGE_S)
        known_webhooks = KnownValues(sessions, select(Webhook.id).where(Webhook.source == "label_studio"))
        state.install(
            app,
            ApiState(
                settings,
                sessions,
                arq,
                streams,
                summaries,
                known_keys,
                shipped,
                Spending(arq, sessions, settings.redis_key_prefix),
                OpenStreams(
                    settings.events_max_streams_per_key,
                    settings.events_max_streams,
                    "progress streams",
                    "poll GET /v1/jobs/{id} instead",
                ),
                KeyTurns(max_waiting=settings.max_waiting_per_key),
                OpenStreams(
                    settings.max_exports_per_key,
                    settings.max_exports,
                    "exports",
                    "wait for one to end",
                ),
                KeyTurns(settings.max_bodies_per_key, max_waiting=settings.max_waiting_per_key),
                KeyTurns(settings.max_bodies_per_key, max_waiting=settings.max_waiting_per_key),  # deliveries
                KeyTurns(settings.threads_per_key, max_waiting=None),  # threads: accepted work waits
                readiness,
                scrapes,
                Failures(
                    arq,
                    settings.redis_key_prefix,
                    "wrong secrets",
                    settings.webhook_wrong_secrets_per_address,
                    settings.webhook_wrong_secrets_window_s,
                ),
                wrong_keys,
                known_webhooks,
                VerifiedWebhooks(arq, settings.redis_key_prefix),
            ),
        )
        # Logged, not refused: the API starts without Postgres, to spool webhook deliveries.
        # Before the first request (a hung database delays the start by its timeout, 5 s), so
        # that its connection is no request's.
        await preflight.log_problems(settings, log)
        try:
            yield {DRAINING: asyncio.Event()}  # the server's protocol sets it as it stops
        finally:
            # Their reads in flight, before their database goes.
            await summaries.aclose()
            await known_keys.aclose()
            await known_webhooks.aclose()
            await readiness.aclose()
            await scrapes.aclose()
            await streams.aclose()
            await arq.aclose()
            await dispose(engine)

    app = FastAPI(
        title="AIDSAFE data service",
        version="0.1.0",
        description=(
            "Multi-agent deliberation (AIDSAFE) that turns prompts into policy-embedded "
            "chains of thought for safety-reasoning training data."
        ),
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    routers = (
        health,
        metrics,
        jobs,
        callbacks,
        events,
        exports,
        annotations,
        webhooks,
        items,
        comparisons,
        model_evaluations,
        reports,
        sample_evaluations,
        policy_sets,
        prompt_sets,
        presets,
        deletions,
    )
    for module in routers:
        # Every keyed route may answer 429 (too_many_wrong_keys, too_many_waiting): documented once
        # here; a route's own 429 (the webhook delivery's) goes before it.
        keyed = module not in (health, metrics)
        app.include_router(module.router, responses=errors.documented(429) if keyed else None)
    app.include_router(pages.router)  # the web viewer, /view
    return app


app = create_app()
# The event loop shares the GIL with the threads that parse request bodies (app/api/bodies.py).
# What exists now (modules, classes, the app) lives as long as the process: frozen, it is not
# walked by every full garbage collection, each of which held the GIL for ~200 ms on the 2-core
# test machine. And the loop waits at most 1 ms, not 5, for the GIL while a body is parsed.
gc.freeze()
sys.setswitchinterval(0.001)
