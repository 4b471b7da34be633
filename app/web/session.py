"""The viewer's login session: a row in `web_sessions` (app/store/web_sessions.py) naming an
API key, live until it expires, the key is revoked, or it is ended at logout; the browser
holds a signed token naming the row, in an HttpOnly, SameSite=Strict cookie.

The cookie never holds the API key itself: a leaked cookie then opens the read-only viewer
until the session ends, never the API. The token is `<session id>.<HMAC-SHA256 of it>`; the
signature turns away tokens we never issued before any database read, and every request then
checks the row, so logging out or revoking the key ends the session at once."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from uuid import UUID

from app.config import Settings

COOKIE = "aidsafe_view"
# Used when AIDSAFE_WEB_SECRET is unset: tokens are then good only in this process.
_PROCESS_SECRET = secrets.token_bytes(32)


def signing_secret(settings: Settings) -> bytes:
    return settings.web_secret.encode() if settings.web_secret else _PROCESS_SECRET


def _signature(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def issue(session_id: UUID, secret: bytes) -> str:
    return f"{session_id}.{_signature(secret, str(session_id))}"


def session_id_of(token: str, secret: bytes) -> UUID | None:
    """The session a token names, if the token is ours and unaltered; else None. Whether the
    session is still live is the database's to say."""
    payload, _, signature = token.rpartition(".")
    if not hmac.compare_digest(signature.encode(), _signature(secret, payload).encode()):
        return None
    try:
        return UUID(payload)
    except ValueError:
        return None
