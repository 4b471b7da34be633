"""/metrics for Prometheus: queue depth, spooled webhook deliveries and items waiting or
running, read at scrape time.
LLM and per-item metrics live in the workers (AIDSAFE_WORKER_METRICS_PORT)."""

from __future__ import annotations

import hmac
import logging
import math

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from sqlalchemy import func, select

from app.api.deps import ArqDep, SessionDep, SettingsDep
from app.api.errors import documented
from app.errors import Unauthorized
from app.labeling import deliveries
from app.metrics import DELIVERIES_WAITING, ITEMS, QUEUE_DEPTH
from app.store.models import Item, ItemStatus

log = logging.getLogger("aidsafe.api")
router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **documented(401, 503)},
)
async def metrics(request: Request, session: SessionDep, arq: ArqDep, settings: SettingsDep) -> Response:
    """Prometheus text format: counts only, no job data. No API key; the server's
    `AIDSAFE_METRICS_TOKEN`, if set, as a bearer token (`Authorization: Bearer <token>`)."""
    authorization = request.headers.get("Authorization")
    if settings.metrics_token is not None and not _bears(authorization, settings.metrics_token):
        raise Unauthorized("/metrics needs the server's metrics token: Authorization: Bearer <token>")
    for status in (ItemStatus.QUEUED, ItemStatus.RUNNING):
        # Partial indexes on items make each count cheap however many items have finished.
        count = await session.scalar(select(func.count()).select_from(Item).where(Item.status == status))
        ITEMS.labels(status.value).set(count or 0)
    try:
        QUEUE_DEPTH.set(await arq.zcard(settings.queue_name))
        DELIVERIES_WAITING.set(await deliveries.spooled_count(arq, settings.redis_key_prefix))
    except RedisError:  # the counts from Postgres are worth a scrape: the depths are unknown (NaN)
        log.warning("queue depth unreadable: Redis unavailable", exc_info=True)
        QUEUE_DEPTH.set(math.nan)
        DELIVERIES_WAITING.set(math.nan)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _bears(authorization: str | None, token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    # Compared in constant time: a scrape answered faster for a closer guess would leak the token.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
