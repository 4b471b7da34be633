"""What the API process holds for its lifetime, typed: made at startup, read by dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from arq.connections import ArqRedis
from fastapi import FastAPI, Request

from app.api.failures import Failures
from app.api.key_turns import KeyTurns
from app.api.known_keys import KnownKeys
from app.api.known_values import KnownValues
from app.api.open_streams import OpenStreams
from app.api.recent import Recent
from app.api.summaries import JobSummaries
from app.api.verified_webhooks import VerifiedWebhooks
from app.config import Settings
from app.presets import Presets
from app.store.budgets import Spending
from app.store.db import Sessions


@dataclass(frozen=True)
class ApiState:
    settings: Settings
    sessions: Sessions
    arq: ArqRedis
    streams: ArqRedis  # for progress streams only: its calls may wait on XREAD BLOCK
    summaries: JobSummaries
    known_keys: KnownKeys
    presets: Presets
    spending: Spending  # what jobs with a budget have spent (read and reset by PATCH)
    open_streams: OpenStreams  # progress streams open now, per API key
    key_turns: KeyTurns  # whose turn it is to lock each key's row (KeyWriteSession)
    open_exports: OpenStreams  # exports being sent now, per API key
    body_turns: KeyTurns  # each key's request bodies in memory, from reading to answer, a few at a time
    # Each key's Label Studio deliveries being read, apart from its requests' bodies: waiting
    # behind those (held to their answers) past Label Studio's 1 s timeout lost the delivery.
    delivery_turns: KeyTurns
    thread_turns: KeyTurns  # each key's requests' calls for a worker thread (app/threads.py), a few at a time
    readiness: Recent[None, list[str]]  # what /readyz found not answering, checked lately
    scrapes: Recent[None, bytes]  # the /metrics page, made lately
    wrong_secrets: Failures  # sent to each webhook lately, per client address
    wrong_keys: Failures  # unknown API keys and webhooks sent lately, per client address
    known_webhooks: KnownValues[UUID]  # the webhooks' ids, read while an address is past wrong_keys
    # Webhooks whose deliveries were verified lately: read at once, spooled while Postgres is away.
    verified_webhooks: VerifiedWebhooks


def install(app: FastAPI, state: ApiState) -> None:
    app.state.api = state


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state
