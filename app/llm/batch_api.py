"""OpenAI-style batch APIs over HTTP: upload a JSONL input file (`/files`, purpose `batch`),
create a batch of chat completions on it (`/batches`), find, retrieve and cancel batches,
and download their output and error files. Plus the wire format of those files.

Faults come in three kinds: BatchRefused (a 4xx other than 401/403 and 408/409/425/429:
the provider will not take, or show, this file or batch, e.g. a 404 for one it does not
know; asking again will not help), BatchForbidden (a 401 or 403: the key may not do it) and
BatchUnavailable (anything else: try again later). A search of the batch list refused at a
later page, or failed (a 5xx) at any, is BatchListIncomplete (see BatchAPI.find). Some
proxies answer 404 (or another 4xx) for a while before a batch or file is there:
workers/waves.py believes a retrieve's or a download's refusal only once it has lasted.
Their messages may quote the provider: for operators only.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from app.config import EndpointConfig

CHAT_COMPLETIONS = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# The metadata key a batch is created with, naming our batch (app/store/models.py's Batch).
TAG = "aidsafe_batch"
_ERROR_BODY_CHARS = 500
_TRANSIENT = {408, 409, 425, 429}


class BatchFault(Exception):
    """A batch API call that did not succeed; the message is for operators."""


class BatchRefused(BatchFault):
    """The provider refused the call itself (a 4xx): e.g. a file over its size limit, or a
    batch or file it does not know (a 404)."""


class BatchForbidden(BatchFault):
    """The provider will not let this key do it (a 401 or 403): access, which the operator
    can mend. Not a refusal of the batch or file: split, bought again or taken for none
    found, the batch would meet the same (or be created twice); asked again, it goes on."""


class BatchUnavailable(BatchFault):
    """No usable answer (5xx, 429, a connection fault, a timeout): try again later.
    `status`: the provider's HTTP status, if it answered one."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.status = status


class BatchListIncomplete(BatchFault):
    """A search of the batch list (find) whose later page the provider refused, or any of
    whose pages failed (a 5xx): the batch looked for may be on a page not seen, so none was
    found, but it is not known that none exists."""


@dataclass(frozen=True)
class OutputLine:
    """One line of a batch's output or error file: the request's answer, or why it has none."""

    custom_id: str
    status_code: int | None  # the request's HTTP status; None: never executed (expired, cancelled)
    body: Any  # the response body: a chat completion when status_code is 2xx
    error: str | None  # the provider's code when never executed (batch_expired, ...)


def input_file(requests: list[tuple[str, dict[str, Any]]]) -> bytes:
    """The JSONL input file of (custom_id, chat completion body) requests."""
    return b"".join(input_line(custom_id, body) for custom_id, body in requests)


def input_line(custom_id: str, body: dict[str, Any]) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_COMPLETIONS, "body": body}
    return orjson.dumps(line) + b"\n"


def output_lines(content: bytes) -> list[OutputLine]:
    """The lines of an output or error file; unreadable lines are skipped (their requests
    count as unanswered)."""
    lines = []
    for raw in content.splitlines():
        try:
            line = json.loads(raw)
            response = line.get("response") or {}
            error = line.get("error") or {}
            lines.append(
                OutputLine(
                    str(line["custom_id"]),
                    response.get("status_code"),
                    response.get("body"),
                    error.get("code") or error.get("message") if error else None,
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return lines


class BatchAPI:
    """The batch APIs of the configured endpoints, over one aiohttp session; aclose() it."""

    def __init__(self, endpoints: dict[str, EndpointConfig], timeout_s: float) -> None:
        self._endpoints = endpoints
        # Per call (uploads and downloads may be large): Settings.batch_call_timeout_s.
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def upload(self, endpoint: str, content: bytes, filename: str) -> str:
        """The id of the uploaded input file."""
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=filename, content_type="application/jsonl")
        uploaded = await self._call(endpoint, "POST", "/files", data=form)
        return str(uploaded["id"])

    async def create(self, endpoint: str, input_file_id: str, tag: str) -> dict[str, Any]:
        """The batch of the uploaded input file's requests, tagged with `tag` (see find)."""
        config = self._config(endpoint)
        assert config.batch is not None
        body = {
            "input_file_id": input_file_id,
            "endpoint": CHAT_COMPLETIONS,
            "completion_window": config.batch.completion_window,
            "metadata": {TAG: tag},
        }
        return await self._call(endpoint, "POST", "/batches", json=body)

    async def find(self, endpoint: str, tag: str, input_file_id: str, since: float) -> dict[str, Any] | None:
        """The batch created with this tag, or of this input file (for proxies that drop
        metadata): one whose creator died, or lost its lease, before it stored its id. The
        provider lists batches newest first, 100 a page at most: this pages back to `since`
        (a Unix time, on the provider's clock, before which no such batch can exist). The whole
        search is one call's time at most, and stops where the pages stop moving back: a
        proxy that ignores `after`, or always has more, would have held it for ever.
        BatchRefused if the first page is refused (a provider without a batch list, or one
        refusing it for a while); BatchListIncomplete if a later one is, or a page fails (a
        5xx: the provider's list is broken, not away; left to the caller's retries, such a
        list held the batch's creation for ever)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._find(endpoint, tag, input_file_id, since)
        except TimeoutError as error:
            detail = f"{endpoint}: listing batches took over {self._timeout_s:g} s"
            raise BatchUnavailable(detail) from error

    async def _find(self, endpoint: str, tag: str, input_file_id: str, since: float) -> dict[str, Any] | None:
        after: str | None = None
        seen: set[str] = set()
        while True:
            query = {"limit": "100"} | ({"after": after} if after else {})
            try:
                listed = await self._call(endpoint, "GET", "/batches", params=query)
            except BatchRefused as refused:
                if after is None:
                    raise
                raise BatchListIncomplete(f"its batch list refused after {after}: {refused}") from refused
            except BatchUnavailable as failed:
                if failed.status is None or failed.status < 500:
                    raise
                where = f"after {after}" if after else "at its first page"
                raise BatchListIncomplete(f"its batch list failed {where}: {failed}") from failed
            page = [batch for batch in listed.get("data") or [] if isinstance(batch, dict)]
            mine = (
                b
                for b in page
                if (b.get("metadata") or {}).get(TAG) == tag or b.get("input_file_id") == input_file_id
            )
            if (found := next(mine, None)) is not None:
                return found
            oldest = page[-1] if page else {}
            further = listed.get("has_more") and oldest.get("id") and str(oldest["id"]) not in seen
            if not (further and (oldest.get("created_at") or 0) >= since):
                return None
            seen.update(str(b.get("id")) for b in page)
            after = str(oldest["id"])

    async def retrieve(self, endpoint: str, batch_id: str) -> dict[str, Any]:
        return await self._call(endpoint, "GET", f"/batches/{batch_id}")

    async def cancel(self, endpoint: str, batch_id: str) -> dict[str, Any]:
        return await self._call(endpoint, "POST", f"/batches/{batch_id}/cancel")

    async def content(self, endpoint: str, file_id: str) -> bytes:
        status, body = await self._send(endpoint, "GET", f"/files/{file_id}/content")
        _raise_for(status, body, endpoint)
        return body

    def _config(self, endpoint: str) -> EndpointConfig:
        config = self._endpoints.get(endpoint)
        if config is None or config.batch is None:
            raise BatchRefused(f"endpoint {endpoint!r} has no batch API configured")
        return config

    async def _call(self, endpoint: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        status, body = await self._send(endpoint, method, path, **kwargs)
        _raise_for(status, body, endpoint)
        try:
            answer = json.loads(body)
        except ValueError as error:
            raise BatchUnavailable(f"{endpoint}: {method} {path} answered no JSON: {body[:200]!r}") from error
        if not isinstance(answer, dict):
            raise BatchUnavailable(f"{endpoint}: {method} {path} answered {type(answer).__name__}")
        return answer

    async def _send(self, endpoint: str, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        config = self._config(endpoint)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        try:
            async with asyncio.timeout(self._timeout_s):
                url = f"{config.base_url.rstrip('/')}{path}"
                async with self._session.request(method, url, headers=headers, **kwargs) as response:
                    return response.status, await response.read()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise BatchUnavailable(f"{endpoint}: {method} {path}: {type(error).__name__}: {error}") from error


def _raise_for(status: int, body: bytes, endpoint: str) -> None:
    if status < 400:
        return
    detail = f"{endpoint}: HTTP {status}: {body[:_ERROR_BODY_CHARS].decode('utf-8', 'replace')}"
    if status in _TRANSIENT or status >= 500:
        raise BatchUnavailable(detail, status)
    raise BatchForbidden(detail) if status in (401, 403) else BatchRefused(detail)
