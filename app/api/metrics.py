"""/metrics for Prometheus: queue depth, spooled webhook deliveries (and those that could not
be read), and items waiting or running, read at scrape time.
LLM and per-item metrics live in the workers (AIDSAFE_WORKER_METRICS_PORT)."""

from __future__ import annotations

import hmac
import logging
import math

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from sqlalchemy import func, select

from app.api.deps import SettingsDep
from app.api.errors import documented
from app.api.state import ApiState, api_state
from app.errors import Unauthorized
from app.labeling import deliveries
from app.metrics import API_REGISTRY, DELIVERIES_DEAD, DELIVERIES_WAITING, ITEMS, QUEUE_DEPTH
from app.store.db import closed_quietly
from app.store.models import Item, ItemStatus

log = logging.getLogger("aidsafe.api")
router = APIRouter(tags=["health"])
# Without AIDSAFE_METRICS_TOKEN anyone may scrape, and each scrape counted items on a
# connection of the pool: one page serves every scrape for this long, and the scrapes that come
# while it is made wait for it, so a flood of them takes one connection, as /readyz's does.
SCRAPE_MAX_AGE_S = 1.0


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **documented(401, 503)},
)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus text format: counts only, no job data, as read at most SCRAPE_MAX_AGE_S
    ago. No API key; the server's `AIDSAFE_METRICS_TOKEN`, if set, as a bearer token
    (`Authorization: Bearer <token>`)."""
    authorization = request.headers.get("Authorization")
    if settings.metrics_token is not None and not _bears(authorization, settings.metrics_token):
        raise Unauthorized("/metrics needs the server's metrics token: Authorization: Bearer <token>")
    state = api_state(request)
    return Response(await state.scrapes.get(None, lambda: _page(state)), media_type=CONTENT_TYPE_LATEST)


async def _page(state: ApiState) -> bytes:
    """The metrics read now, as Prometheus text."""
    settings, arq = state.settings, state.arq
    async with closed_quietly(state.sessions) as session:
        for status in (ItemStatus.QUEUED, ItemStatus.RUNNING):
            # Partial indexes on items make each count cheap however many items have finished.
            count = await session.scalar(select(func.count()).select_from(Item).where(Item.status == status))
            ITEMS.labels(status.value).set(count or 0)
    try:
        QUEUE_DEPTH.set(await arq.zcard(settings.queue_name))
        DELIVERIES_WAITING.set(await deliveries.spooled_count(arq, settings.redis_key_prefix))
        DELIVERIES_DEAD.set(await deliveries.dead_count(arq, settings.redis_key_prefix))
    except RedisError:  # the counts from Postgres are worth a scrape: the depths are unknown (NaN)
        log.warning("queue depth unreadable: Redis unavailable", exc_info=True)
        for depth in (QUEUE_DEPTH, DELIVERIES_WAITING, DELIVERIES_DEAD):
            depth.set(math.nan)
    return generate_latest(API_REGISTRY)


def _bears(authorization: str | None, token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    # Compared in constant time: a scrape answered faster for a closer guess would leak the token.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
