"""Webhooks a labeling tool delivers reviews to: one per key and tool instance, each with its
own secret, so a leaked secret admits reviews of one tenant's items at most. Deliveries
refused are kept (the newest per webhook, for a while) for the owner to read.

A refused delivery's body quotes the reviewed CoTs (a Label Studio task carries its item's
prompt, thoughts and response), and it outlives them: the workers delete rejections older
than `webhook_rejections_kept_days` (`purge_old_rejections`) rather than deleting or
blanking them with their job. No link from a job to the bodies that quote it can be made
reliably: a body is kept exactly when it could not be read as reviews of the owner's items
(malformed, truncated at MAX_KEPT_BODY_CHARS, or naming items that are not there), and a
delivery about a deleted job's task arrives, and is refused as `unknown_items`, after the
deletion, which no deletion-time search could find. A short retention bounds them all.
The hazardous-text purge has nothing to blank in them: a task carries only the chosen CoT
(app/labeling/label_studio.py), which the purge keeps.

A revoked webhook may be deleted, its rejections with it (`delete_revoked`); the reviews it
delivered keep its id, which no longer references a row."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from uuid import UUID

from sqlalchemy import CursorResult, delete, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import NotFound, Unauthorized, WebhookNotRevoked, WrongSecret
from app.idempotency import RequestHash
from app.storable import replace_unstorable
from app.store import key_limits, keys, page_sizes, positions
from app.store.keys import hash_key
from app.store.models import ApiKey, Webhook, WebhookRejection

SECRET_PREFIX = "aidsafe_whsec_"
SOURCES = ("label_studio",)
KEPT_REJECTIONS = 1000  # per webhook; older ones are dropped as new ones come
# Of deliveries refused for their secret (anyone who knows a webhook's URL can send them), per
# webhook, apart: they show an owner a misconfigured secret, and must not push out the
# authenticated refusals, whose bodies are the owner's only copy of the reviews refused.
KEPT_UNAUTHORIZED = 20
MAX_KEPT_BODY_CHARS = 1_000_000  # of a refused delivery's body


@dataclass(frozen=True)
class NewWebhook:
    """What a POST /v1/webhooks asks for: the webhook's owner, source and name, and the
    request's Idempotency-Key (None: it sent none) and hash."""

    owner_key_id: UUID
    source: str
    name: str
    idempotency_key: str | None
    request_hash: RequestHash


async def create(session: AsyncSession, request: NewWebhook, max_live: int) -> tuple[Webhook, str | None]:
    """A new webhook and its secret; the secret is stored only as a hash. LimitReached if the
    key has `max_live` webhooks not revoked already.

    A repeated Idempotency-Key with the same request returns the webhook it made and no
    secret (only its hash is kept, and the first answer alone shows it); with a different
    request it is IdempotencyConflict. A replay is answered at the cap too."""
    # Held first: a replay sent while its first request is under way waits for that request's
    # commit, and finds its webhook, rather than being counted against the cap.
    await keys.hold(session, request.owner_key_id)
    if request.idempotency_key is not None:
        made = await session.scalar(
            select(Webhook).where(
                Webhook.owner_key_id == request.owner_key_id,
                Webhook.idempotency_key == request.idempotency_key,
            )
        )
        if made is not None:
            # Webhooks took Idempotency-Keys (migration 0036) after requests were hashed by the
            # fields sent: none holds the legacy hash.
            await request.request_hash.check_replay(made.request_hash or "", may_be_legacy=False)
            return made, None
    await key_limits.refuse_at_cap(
        session, key_limits.WEBHOOKS, max_live, key_limits.live_webhooks(request.owner_key_id)
    )
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    webhook = Webhook(
        owner_key_id=request.owner_key_id,
        source=request.source,
        name=request.name,
        secret_hash=hash_key(secret),
        idempotency_key=request.idempotency_key,
        request_hash=request.request_hash.value,
    )
    session.add(webhook)
    await session.flush()
    await session.refresh(webhook)
    return webhook, secret


async def page_owned(
    session: AsyncSession, owner_key_id: UUID, cursor: str | None, limit: int
) -> tuple[list[Webhook], str | None]:
    """A page of the key's webhooks, revoked ones included, oldest first, after the place
    `cursor` holds (app/store/positions.py): at most `limit`; with the cursor of the next
    page, None when none is left out."""
    oldest_first = (Webhook.created_at, Webhook.id)
    query = select(Webhook).where(Webhook.owner_key_id == owner_key_id)
    if cursor:
        query = query.where(
            tuple_(*oldest_first) > tuple_(*positions.decode_position(positions.Listing.WEBHOOKS, cursor))
        )
    rows = list(await session.scalars(query.order_by(*oldest_first).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], positions.encode_position(positions.Listing.WEBHOOKS, last.created_at, last.id)


async def get_owned(session: AsyncSession, webhook_id: UUID, owner_key_id: UUID) -> Webhook:
    """The key's webhook; NotFound for another key's, which is never read (jobs.get_owned)."""
    owned = select(Webhook).where(Webhook.id == webhook_id, Webhook.owner_key_id == owner_key_id)
    if (webhook := await session.scalar(owned)) is None:
        raise NotFound("no such webhook")
    return webhook


async def revoke(session: AsyncSession, webhook: Webhook) -> None:
    """From now on its deliveries are refused (and logged). Revoking twice is harmless."""
    await session.execute(
        update(Webhook)
        .where(Webhook.id == webhook.id, Webhook.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    await session.refresh(webhook)


async def delete_revoked(session: AsyncSession, webhook_id: UUID, owner_key_id: UUID) -> None:
    """Delete the owner's webhook and its rejections, in the caller's transaction; NotFound
    for another key's or an unknown one, WebhookNotRevoked unless it was revoked (a live
    one's deliveries would turn into 404s the tool never reports). The row is held first, so
    a delivery under way (`find` holds it too) ends before, and one that comes after finds
    no webhook."""
    revoked_at = (
        await session.execute(
            select(Webhook.revoked_at)
            .where(Webhook.id == webhook_id, Webhook.owner_key_id == owner_key_id)
            .with_for_update()
        )
    ).one_or_none()
    if revoked_at is None:
        raise NotFound("no such webhook")
    if revoked_at[0] is None:
        raise WebhookNotRevoked("revoke the webhook first (POST /v1/webhooks/{id}/revoke)")
    await session.execute(delete(WebhookRejection).where(WebhookRejection.webhook_id == webhook_id))
    await session.execute(delete(Webhook).where(Webhook.id == webhook_id))


async def find(session: AsyncSession, webhook_id: UUID, source: str) -> tuple[Webhook, bool]:
    """The webhook a delivery is addressed to, and whether its owner key was revoked;
    NotFound for an unknown one (which tells a caller without its secret nothing about
    anyone's data). The webhook is held (FOR KEY SHARE: a revocation still goes ahead) until
    the caller's transaction ends, so that a deletion waits for the delivery."""
    found = (
        await session.execute(
            select(Webhook, ApiKey.revoked_at.is_not(None))
            .join(ApiKey, ApiKey.id == Webhook.owner_key_id)
            .where(Webhook.id == webhook_id, Webhook.source == source)
            .with_for_update(read=True, key_share=True, of=Webhook)
        )
    ).one_or_none()
    if found is None:
        raise NotFound("no such webhook")
    webhook, owner_revoked = found
    return webhook, owner_revoked


def check_secret(webhook: Webhook, owner_revoked: bool, sent_hash: str | None, header: str) -> None:
    """Unauthorized unless `sent_hash` (hash_key of the secret sent, None if none was) is the
    webhook's secret's, and neither it nor its owner key is revoked: a delivery imports reviews
    as the owner, which a revoked key may no longer do. The secret is checked first, so that
    only its holder learns of a revocation. By hash: a spooled delivery keeps no secret."""
    if sent_hash is None or not hmac.compare_digest(sent_hash, webhook.secret_hash):
        raise WrongSecret(f"send the webhook's secret in the {header} header")
    if webhook.revoked_at is not None:
        raise Unauthorized("this webhook was revoked")
    if owner_revoked:
        raise Unauthorized("the API key this webhook belongs to was revoked")


async def record_rejection(
    session: AsyncSession,
    webhook_id: UUID,
    code: str,
    message: str,
    body: str | None,
    received_at: datetime | None = None,
) -> None:
    """Keep a refused delivery for the webhook's owner, as its row says (its body only if it
    was authenticated: the owner's data; a NUL in it as U+FFFD, which PostgreSQL text can
    hold), and drop the webhook's rejections beyond the newest KEPT_REJECTIONS, or, of those
    refused for their secret, beyond the newest KEPT_UNAUTHORIZED. NotFound if the webhook was
    deleted since the delivery found it (its refusal rolled back, and with it the hold `find`
    took): nothing is kept of it.

    `received_at`: when a delivery received earlier (a spooled one) arrived, which tells it
    apart: its refusal is kept once, however often it is replayed (a worker killed after
    keeping it, before taking it off the spool, leaves it to be replayed again). None: now."""
    owner = select(Webhook.owner_key_id).where(Webhook.id == webhook_id)
    held = owner.with_for_update(read=True, key_share=True)
    if (owner_key_id := await session.scalar(held)) is None:
        raise NotFound("no such webhook")
    if received_at is not None:
        kept = select(WebhookRejection.id).where(
            WebhookRejection.webhook_id == webhook_id, WebhookRejection.received_at == received_at
        )
        if await session.scalar(kept) is not None:
            return
    unauthorized = code == Unauthorized.code
    same_kind = (WebhookRejection.code == Unauthorized.code) == unauthorized
    session.add(
        WebhookRejection(
            webhook_id=webhook_id,
            owner_key_id=owner_key_id,
            code=code,
            message=message,
            body=None if body is None else replace_unstorable(body[:MAX_KEPT_BODY_CHARS]),
            **({} if received_at is None else {"received_at": received_at}),
        )
    )
    await session.flush()
    newest = (
        select(WebhookRejection.id)
        .where(WebhookRejection.webhook_id == webhook_id, same_kind)
        .order_by(WebhookRejection.id.desc())
        .limit(KEPT_UNAUTHORIZED if unauthorized else KEPT_REJECTIONS)
    )
    await session.execute(
        delete(WebhookRejection).where(
            WebhookRejection.webhook_id == webhook_id, same_kind, WebhookRejection.id.not_in(newest)
        )
    )


async def recent_rejections(
    session: AsyncSession, webhook: Webhook, limit: int, before_id: int | None = None
) -> list[WebhookRejection]:
    """The webhook's rejections newest first (older than `before_id`, if given): at most `limit`,
    and no more than PAGE_ROW_BYTES of them as JSON (a first rejection larger than that comes
    alone): a body is sized as JSON escapes it, up to six bytes a character."""
    owned = [WebhookRejection.webhook_id == webhook.id, WebhookRejection.owner_key_id == webhook.owner_key_id]
    if before_id is not None:
        owned.append(WebhookRejection.id < before_id)
    newest_first = WebhookRejection.id.desc()
    candidates = (
        select(WebhookRejection.id).where(*owned).order_by(newest_first).limit(limit).cte("candidates")
    )
    read = select(WebhookRejection)
    ids, _ = page_sizes.on_page(read, WebhookRejection.id, candidates, [candidates.c.id.desc()], limit)
    return list(await session.scalars(read.where(WebhookRejection.id.in_(ids)).order_by(newest_first)))


async def purge_old_rejections(session: AsyncSession, older_than: timedelta, limit: int) -> int:
    """Delete, in the caller's transaction, up to `limit` of every webhook's rejections
    received longer than `older_than` ago; how many. Rows another transaction holds are left
    for a later call."""
    old = (
        select(WebhookRejection.id)
        .where(WebhookRejection.received_at < func.now() - older_than)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    deleted = await session.execute(delete(WebhookRejection).where(WebhookRejection.id.in_(old)))
    return cast(CursorResult[Any], deleted).rowcount  # a DELETE's result
