"""Request-body size cap: refuse an oversized body with 413 before parsing any of it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import service_error_response
from app.errors import PayloadTooLarge


class BodySizeLimit:
    """Pure ASGI middleware. Trusts Content-Length when present; otherwise counts the
    streamed bytes as the app reads them, and refuses (413) past the cap."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        if declared is not None:  # the server reads no more than the declared length
            await self.app(scope, receive, send)
            return
        # Chunked: capped as the app reads it, so that a request refused before its body is read
        # (no key, a wrong webhook secret, not JSON) is refused unread. Buffering it here first
        # held up to the cap in memory for any client, with a key or without.
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge.body_over(self.max_bytes)
            return message

        await self.app(scope, capped_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await service_error_response(PayloadTooLarge.body_over(self.max_bytes))(scope, receive, send)
