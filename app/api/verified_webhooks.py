"""The webhooks an API process verified a delivery of lately, to check a delivery's secret
with while Postgres is away (app/labeling/deliveries.py spools it then)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from uuid import UUID

from app.store.models import Webhook

VERIFIED_FOR_S = 3600.0
MAX_VERIFIED = 10_000  # webhooks remembered per API process


@dataclass(frozen=True, slots=True)
class Verified:
    secret_hash: str
    owner_key_id: UUID
    at: float


class VerifiedWebhooks:
    """The webhooks this process verified a delivery of lately (for `max_age_s`, the
    `max_held` latest): their secret's hash and owner, to check a delivery with while
    Postgres is away. A plain dict in the order they were last verified."""

    def __init__(self, max_age_s: float = VERIFIED_FOR_S, max_held: int = MAX_VERIFIED) -> None:
        self._max_age_s, self._max_held = max_age_s, max_held
        self._held: dict[UUID, Verified] = {}

    def remember(self, webhook: Webhook) -> None:
        self._held.pop(webhook.id, None)  # to the end: the latest verified
        self._held[webhook.id] = Verified(webhook.secret_hash, webhook.owner_key_id, time.monotonic())
        if len(self._held) > self._max_held:
            del self._held[next(iter(self._held))]

    def get(self, webhook_id: UUID) -> Verified | None:
        held = self._held.get(webhook_id)
        if held is None or time.monotonic() - held.at > self._max_age_s:
            return None
        return held
