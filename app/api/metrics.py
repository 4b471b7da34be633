"""/metrics for Prometheus: queue depth and items waiting or running, read at scrape time.
LLM and per-item metrics live in the workers (AIDSAFE_WORKER_METRICS_PORT)."""

from __future__ import annotations

import logging
import math

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from sqlalchemy import func, select

from app.api.deps import ArqDep, SessionDep, SettingsDep
from app.api.errors import documented
from app.metrics import ITEMS, QUEUE_DEPTH
from app.store.models import Item, ItemStatus

log = logging.getLogger("aidsafe.api")
router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **documented(503)},
)
async def metrics(session: SessionDep, arq: ArqDep, settings: SettingsDep) -> Response:
    """Prometheus text format. No key needed: it holds counts only, no job data."""
    for status in (ItemStatus.QUEUED, ItemStatus.RUNNING):
        # Partial indexes on items make each count cheap however many items have finished.
        count = await session.scalar(select(func.count()).select_from(Item).where(Item.status == status))
        ITEMS.labels(status.value).set(count or 0)
    try:
        QUEUE_DEPTH.set(await arq.zcard(settings.queue_name))
    except RedisError:  # the counts from Postgres are worth a scrape: the depth is unknown (NaN)
        log.warning("queue depth unreadable: Redis unavailable", exc_info=True)
        QUEUE_DEPTH.set(math.nan)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
