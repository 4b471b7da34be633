"""/v1/webhooks: per-key webhooks for Label Studio, and their deliveries.

Each webhook belongs to one API key and has its own URL and secret; a delivery is read
against that key's items only, so a leaked secret exposes one tenant at most, and an answer
never says whether another tenant's item exists. Label Studio sends each delivery once and
keeps no failure log, so every refused delivery is kept for the owner to read (and, when it
carried the right secret, with its body, to re-import by hand), for a while: the workers
delete it after `webhook_rejections_kept_days` (app/store/webhooks.py says why)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.annotations import IMPORT_ERRORS, LABEL_STUDIO_EVENT, ImportOut, import_out
from app.api.bodies import JsonBody
from app.api.deps import (
    CurrentKey,
    KeyWriteSession,
    SessionDep,
    SettingsDep,
    client_address,
    threads_in_turns_of,
)
from app.api.errors import documented
from app.api.failures import counted_as
from app.api.jobs import Cursor, Limit
from app.api.known_keys import too_many_wrong_keys
from app.api.schemas import LABEL_PATTERN, ErrorOut
from app.api.state import ApiState, api_state
from app.api.submissions import IdempotencyKey, submit_responses
from app.errors import NotFound, ServiceError, TooManyWrongSecrets, WrongSecret
from app.idempotency import RequestHash
from app.labeling import deliveries
from app.labeling.deliveries import SECRET_HEADER, Delivery, SpoolLimits
from app.metrics import DELIVERIES_SPOOLED
from app.store import webhooks as store
from app.store.keys import hash_key
from app.store.models import Webhook, WebhookRejection
from app.threads import in_thread

router = APIRouter(prefix="/v1/webhooks", tags=["labeling"])
log = logging.getLogger("aidsafe.api")


class SpooledOut(BaseModel):
    status: Literal["spooled"] = "spooled"


DELIVERY_ERRORS = {
    **IMPORT_ERRORS,
    202: {
        "model": SpooledOut,
        "description": "Postgres was away (or no connection came free): the delivery, which "
        "carried the secret of a webhook verified within the hour, was spooled to Redis, and a "
        "worker records it (or keeps its refusal) once Postgres is back. 503 as for any request "
        "instead if the spool holds AIDSAFE_DELIVERY_SPOOL_MAX deliveries or "
        "AIDSAFE_DELIVERY_SPOOL_MAX_BYTES already, or the webhook's API key its share of either "
        "(AIDSAFE_DELIVERY_SPOOL_KEY_SHARE), or Redis is away too.",
    },
    401: {
        "model": ErrorOut,
        "description": f"No {SECRET_HEADER} header, a wrong secret, a revoked webhook, or one whose "
        "API key was revoked.",
    },
    404: {"model": ErrorOut, "description": "No such webhook (or it was deleted)."},
    429: {
        "model": ErrorOut,
        "description": "This client address (an IPv6 one: its /64 network) sent the webhook too "
        "many wrong secrets lately (too_many_wrong_secrets): its wrong ones are refused, unstored, "
        "until Retry-After; or "
        "too many deliveries to unknown webhooks or unknown API keys (too_many_wrong_keys): "
        "its deliveries to unknown webhooks are refused until Retry-After.",
    },
}


class NewWebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["label_studio"] = Field(default="label_studio", description="The tool that delivers.")
    # One line, as a label: listings show a webhook a line.
    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=LABEL_PATTERN,
        description="Which tool instance or project, for you: one line, not blank.",
    )


NEW_WEBHOOK = JsonBody[NewWebhookIn](NewWebhookIn, max_values=10)


class WebhookOut(BaseModel):
    id: UUID
    source: str
    name: str
    url: str = Field(description="Where the tool delivers: set it as the webhook's URL in the tool.")
    secret_header: str = Field(description="The header the tool must send the secret in.")
    created_at: datetime
    revoked_at: datetime | None


class WebhookPage(BaseModel):
    data: list[WebhookOut]
    next_cursor: str | None


class WebhookCreatedOut(WebhookOut):
    secret: str | None = Field(
        description="Shown once: set it as the value of `secret_header` in the tool. Null in the "
        "answer to a replay of the same Idempotency-Key: if the first answer was lost, revoke this "
        "webhook and make another."
    )


class RejectionOut(BaseModel):
    id: int = Field(description="Send the last one of a page as `before_id` for the next.")
    received_at: datetime
    code: str = Field(description="The error code the tool was answered with.")
    message: str
    body: str | None = Field(
        description="The delivery as received (first 1,000,000 characters; bytes that are not "
        "UTF-8, and NUL, as U+FFFD); null when it did not carry the webhook's secret."
    )


def _delivery_urls(request: Request) -> Callable[[UUID], str]:
    """Where a webhook delivers, by its id, as the request's host names it. url_for walks the
    app's routes (some 100 µs): asked for each of a page of 500 webhooks, it held the event
    loop for 50 ms. So it is asked once, for a placeholder id, and each id takes its place."""
    placeholder = UUID(int=0)
    url = str(request.url_for("label_studio_delivery", webhook_id=placeholder))
    base = url.removesuffix(str(placeholder))
    return lambda webhook_id: f"{base}{webhook_id}"


def _webhook_out(request: Request, webhook: Webhook) -> WebhookOut:
    return _listed(webhook, _delivery_urls(request))


def _listed(webhook: Webhook, delivery_url: Callable[[UUID], str]) -> WebhookOut:
    return WebhookOut(
        id=webhook.id,
        source=webhook.source,
        name=webhook.name,
        url=delivery_url(webhook.id),
        secret_header=SECRET_HEADER,
        created_at=webhook.created_at,
        revoked_at=webhook.revoked_at,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=submit_responses(WebhookCreatedOut, 400, 401, 409, 413, 422, 503),
    openapi_extra=NEW_WEBHOOK.openapi,
)
async def create_webhook(
    request: Request,
    response: Response,
    settings: SettingsDep,
    key: CurrentKey,
    body: Annotated[NewWebhookIn, Depends(NEW_WEBHOOK)],
    session: KeyWriteSession,
    idempotency_key: IdempotencyKey = None,
) -> WebhookCreatedOut:
    """A webhook for one tool instance (make one per Label Studio instance). Its deliveries
    may carry reviews of this key's items only. 409 `limit_reached` if the key has
    `AIDSAFE_MAX_WEBHOOKS_PER_KEY` webhooks not revoked (100 unless the server says otherwise).
    The same Idempotency-Key with the same body answers the webhook it made with 200, its
    `secret` null (only the first answer shows it); with another body, 409 `idempotency_conflict`."""
    new = store.NewWebhook(key.id, body.source, body.name, idempotency_key, await RequestHash.of(body))
    webhook, secret = await store.create(session, new, settings.max_webhooks_per_key)
    await session.commit()
    if secret is None:
        response.status_code = status.HTTP_200_OK
    return WebhookCreatedOut(**_webhook_out(request, webhook).model_dump(), secret=secret)


@router.get("", responses=documented(400, 401, 422, 503))
async def list_webhooks(
    request: Request, session: SessionDep, key: CurrentKey, cursor: Cursor = None, limit: Limit = 100
) -> WebhookPage:
    """This key's webhooks, revoked ones included, oldest first. A cursor resumes where its
    page ended, also once the webhooks listed are deleted."""
    rows, next_cursor = await store.page_owned(session, key.id, cursor, limit)
    delivery_url = _delivery_urls(request)
    return WebhookPage(data=[_listed(webhook, delivery_url) for webhook in rows], next_cursor=next_cursor)


@router.post("/{webhook_id}/revoke", responses=documented(401, 404, 422, 503))
async def revoke_webhook(
    webhook_id: UUID, request: Request, session: SessionDep, key: CurrentKey
) -> WebhookOut:
    """Refuse its deliveries from now on (they are still logged). Revoking twice is harmless."""
    webhook = await store.get_owned(session, webhook_id, key.id)
    await store.revoke(session, webhook)
    await session.commit()
    return _webhook_out(request, webhook)


@router.delete(
    "/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=documented(401, 404, 409, 422, 503)
)
async def delete_webhook(webhook_id: UUID, session: SessionDep, key: CurrentKey) -> None:
    """Delete a revoked webhook and the deliveries it refused; the reviews it delivered stay
    (their `webhook_id` names it still). 409 `webhook_not_revoked` unless it was revoked: revoke
    it first. From now on a delivery to it is a 404, as to a webhook that never was; deleting
    again is a 404 too."""
    await store.delete_revoked(session, webhook_id, key.id)
    await session.commit()


@router.get("/{webhook_id}/rejections", responses=documented(401, 404, 422, 503))
async def list_rejections(
    webhook_id: UUID,
    session: SessionDep,
    key: CurrentKey,
    limit: Annotated[int, Query(ge=1, le=store.KEPT_REJECTIONS, description="How many, newest first.")] = 100,
    before_id: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="Only rejections before this `id`.")
    ] = None,
) -> list[RejectionOut]:
    """Deliveries this webhook refused, newest first: the newest 1,000 received in the last
    `AIDSAFE_WEBHOOK_REJECTIONS_KEPT_DAYS` days (7 unless the server says otherwise). A page
    holds at most `limit` and 2,000,000 bytes of JSON (or one larger rejection): pass the
    last one's `id` as `before_id` for the next page, until a page comes back empty."""
    webhook = await store.get_owned(session, webhook_id, key.id)
    rows = await store.recent_rejections(session, webhook, limit, before_id)
    return [_rejection_out(row) for row in rows]


def _rejection_out(row: WebhookRejection) -> RejectionOut:
    return RejectionOut(
        id=row.id, received_at=row.received_at, code=row.code, message=row.message, body=row.body
    )


@router.post(
    "/label-studio/{webhook_id}",
    response_model=ImportOut,
    responses=DELIVERY_ERRORS,
    openapi_extra=LABEL_STUDIO_EVENT.openapi,
)
async def label_studio_delivery(
    webhook_id: UUID,
    request: Request,
    session: SessionDep,
    secret: Annotated[str | None, Header(alias=SECRET_HEADER, description="The webhook's secret.")] = None,
) -> ImportOut | JSONResponse:
    """Label Studio's webhook: ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED store
    reviews; ANNOTATIONS_DELETED withdraws them; other events are acknowledged and skipped.
    A refused delivery is kept: GET /v1/webhooks/{id}/rejections. A client address that sent
    the webhook too many wrong secrets lately has its wrong ones refused with 429
    `too_many_wrong_secrets` until Retry-After, and not kept; the right secret is never
    refused (Label Studio does not send a refused delivery again). Deliveries to unknown
    webhooks count with unknown API keys: past their limit, an address's deliveries to an
    unknown webhook are refused with 429 `too_many_wrong_keys`, never one to a webhook that is.
    A delivery with the secret of a webhook verified lately is read at once, and while the
    database is away (or no connection comes free) it is spooled, answered 202, and recorded
    (or its refusal kept) once it is back."""
    state, address = api_state(request), client_address(request)
    # Past the limit a guessed id costs no lookup (nor a connection): the ids are in memory.
    refused_for_s = state.wrong_keys.refused_for_s(address)
    if refused_for_s is not None and not await state.known_webhooks.holds(webhook_id):
        raise too_many_wrong_keys(state.wrong_keys, address, refused_for_s)
    received_at, sent_hash = time.time(), None if secret is None else hash_key(secret)
    # Label Studio gives up after 1 s and never sends it again: a delivery whose secret an API
    # process verified lately is read before it waits for a connection. A body refused then is
    # refused once its webhook is found, so that its refusal is kept as any other.
    known = await state.verified_webhooks.get(webhook_id, sent_hash)
    raw: bytes | None = None
    unread: ServiceError | None = None
    if known is not None:
        try:
            raw = await _read_delivery(state, known.owner_key_id, request)
        except ServiceError as exc:
            unread = exc
    try:
        webhook, owner_revoked = await store.find(session, webhook_id, "label_studio")
    except NotFound:
        log.warning("a delivery to unknown webhook %s was refused", webhook_id)
        if (refused_for_s := await state.wrong_keys.count(address)) is not None:
            raise too_many_wrong_keys(state.wrong_keys, address, refused_for_s) from None
        raise
    except Exception as error:
        # The database is away: a webhook verified lately (by any API process) is still
        # checked, and its delivery spooled. An unknown one, or a wrong secret, is answered
        # 503 as before, unstored.
        if not deliveries.unrecordable_now(error):
            raise
        if unread is not None:
            raise unread from None
        # Asked again if Redis was slow to answer before: there is no hurry now.
        if (known := known or await state.verified_webhooks.get(webhook_id, sent_hash, None)) is None:
            raise
        if raw is None:
            raw = await _read_delivery(state, known.owner_key_id, request)
        return await _spooled(
            state, Delivery(webhook_id, known.owner_key_id, sent_hash, raw, received_at), error
        )
    owner_key_id = webhook.owner_key_id
    body: str | None = None  # once the secret is checked: a refusal keeps it then
    try:
        store.check_secret(webhook, owner_revoked, sent_hash, SECRET_HEADER)
        secret_hash = webhook.secret_hash  # as the rollback expires the row
        # A body may come slowly (timed only between bytes): read and parsed with no
        # connection held (a key's slow deliveries held the whole pool); `record` finds the
        # webhook again, as it may have gone meanwhile.
        await session.rollback()
        if unread is not None:
            raise unread
        if raw is None:
            raw = await _read_delivery(state, owner_key_id, request)
        body = raw.decode("utf-8", errors="replace")
        # In the owner's turns for a thread, as the owner's requests: one key's flood of
        # deliveries, each parsed unturned, took every thread and held other keys' requests.
        with threads_in_turns_of(state, owner_key_id):
            parsed = await in_thread(deliveries.read_delivery, raw)
        await state.verified_webhooks.remember(webhook_id, secret_hash, owner_key_id)
        report = await deliveries.record(session, webhook_id, sent_hash, parsed)
    except ServiceError as exc:
        # NotFound instead if the webhook was deleted meanwhile: answered as an unknown one.
        # Past the limit a guess costs a Redis call, no rejection row. Refusing the right
        # secret too would hand a guesser behind the tool's proxy its deliveries.
        if (
            isinstance(exc, WrongSecret)
            and (refused_for_s := await state.wrong_secrets.count(address, f"webhook {webhook_id}"))
            is not None
        ):
            await session.rollback()
            limit, window_s = state.wrong_secrets.limit, state.wrong_secrets.window_s
            raise TooManyWrongSecrets(
                f"{counted_as(address)} sent this webhook {limit} wrong secrets in {window_s} s, the most "
                "it may: check the secret the tool sends, and try again after Retry-After",
                retry_after_s=refused_for_s,
            ) from None
        try:
            await deliveries.keep_refusal(session, webhook_id, exc, body)
        except Exception as error:  # the database went away: the replay keeps the refusal
            if raw is None or body is None or not deliveries.unrecordable_now(error):
                raise
            return await _spooled(
                state, Delivery(webhook_id, owner_key_id, sent_hash, raw, received_at), error
            )
        raise
    except Exception as error:
        if raw is None or body is None or not deliveries.unrecordable_now(error):
            raise
        # Read, with the right secret, when the database went away: recorded once it is back.
        return await _spooled(state, Delivery(webhook_id, owner_key_id, sent_hash, raw, received_at), error)
    return import_out(report)


async def _read_delivery(state: ApiState, owner_key_id: UUID, request: Request) -> bytes:
    """Never refused, nor behind the key's requests' bodies, which hold their turns to their
    answers: Label Studio gives up after 1 s (its WEBHOOK_TIMEOUT), and a body not read by
    then is gone."""
    async with state.delivery_turns.turn(owner_key_id, refuse_past_max=False):
        return await LABEL_STUDIO_EVENT.read(request, state.settings)


async def _spooled(state: ApiState, delivery: Delivery, away: Exception) -> JSONResponse:
    """A delivery spooled for a worker to record once the database is back: 202. If the spool
    is full, the database's error (503) as without one."""
    limits = SpoolLimits.of(state.settings)
    if not await deliveries.spool(state.arq, state.settings.redis_key_prefix, limits, delivery):
        log.error(
            "webhook %s: a delivery was refused, the spool is full (%s), or holds its API key's share",
            delivery.webhook_id,
            limits,
        )
        raise away
    DELIVERIES_SPOOLED.inc()
    log.warning("webhook %s: the database is away, a delivery was spooled: %r", delivery.webhook_id, away)
    return JSONResponse(SpooledOut().model_dump(), status_code=status.HTTP_202_ACCEPTED)
