"""The one error the client raises."""

from __future__ import annotations

from typing import Any

import httpx


class AidsafeError(Exception):
    """The API refused a request, or could not be reached.

    `code` is the API's stable error code (`not_found`, `validation_error`, ...; see the
    README's "HTTP API"), `status` its HTTP status. An answer that is not the API's error
    shape (a proxy's page) has code `http_error`; a request that got no answer at all, or a
    follower (`events`, `wait`) the API did not answer for as long as it waits for a restart,
    has code `connection_failed` and status None."""

    def __init__(self, code: str, message: str, status: int | None = None, details: Any = None) -> None:
        super().__init__(f"{status or 'no answer'}: {code}: {message}")
        self.code, self.message, self.status, self.details = code, message, status, details

    @classmethod
    def of(cls, response: httpx.Response) -> AidsafeError:
        """The error an answer carries (the response must have been read)."""
        try:
            error = response.json()["error"]
            return cls(str(error["code"]), str(error["message"]), response.status_code, error.get("details"))
        except (ValueError, KeyError, TypeError):
            return cls("http_error", response.text[:500], response.status_code)


class EventStreamUnavailable(AidsafeError):
    """The job's event stream cannot be read here (a 5xx, a proxy that does not stream, a
    connection that keeps dropping, the API key's streams at their cap: 429 too_many_streams):
    poll the job instead, as `Client.wait` does."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__("event_stream_unavailable", message, status)
