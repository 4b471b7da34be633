"""The viewer's login session: a signed, expiring token naming an API key, kept in an
HttpOnly, SameSite=Strict cookie.

The cookie never holds the API key itself: a leaked cookie then opens the read-only viewer
until it expires (or the key is revoked), never the API. The token is
`<key id>.<expiry, unix seconds>.<HMAC-SHA256 of both>`; every request also checks the key
still exists and is not revoked, so revoking a key ends its viewer sessions at once."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from uuid import UUID

from app.config import Settings

COOKIE = "aidsafe_view"
# Used when AIDSAFE_WEB_SECRET is unset: sessions then last as long as this process.
_PROCESS_SECRET = secrets.token_bytes(32)


def signing_secret(settings: Settings) -> bytes:
    return settings.web_secret.encode() if settings.web_secret else _PROCESS_SECRET


def _signature(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def issue(key_id: UUID, secret: bytes, now: float, lifetime_s: float) -> str:
    payload = f"{key_id}.{int(now + lifetime_s)}"
    return f"{payload}.{_signature(secret, payload)}"


def key_id_of(token: str, secret: bytes, now: float) -> UUID | None:
    """The key a token names, if the token is ours, unaltered and not expired; else None."""
    payload, _, signature = token.rpartition(".")
    key_id, _, expires = payload.partition(".")
    if not hmac.compare_digest(signature.encode(), _signature(secret, payload).encode()):
        return None
    if not expires.isdigit() or int(expires) < now:
        return None
    try:
        return UUID(key_id)
    except ValueError:
        return None
