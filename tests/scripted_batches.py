"""The OpenAI-style batch API of the scripted LLM server: files and batches, on loopback.

`POST /v1/files` (multipart: `file`, `purpose=batch`), `GET /v1/files/{id}`,
`GET /v1/files/{id}/content`, `POST /v1/batches` (`input_file_id`, `endpoint`
`/v1/chat/completions`, `completion_window` `24h`, optional `metadata`: at most 16 string
pairs, keys up to 64 characters, values up to 512), `GET /v1/batches` (newest first, pages of
`limit` (1 to 100, default 20) after the batch id `after`, with `has_more`, `first_id` and
`last_id`), `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`.

A batch moves one step each time it is retrieved: validating -> in_progress -> finalizing ->
completed, so a poller sees every status without the test sleeping. Each line is answered,
when the batch leaves in_progress, by the server's chat answer (`ScriptedLLM.answer_now`):
the same scripts, per-model answers and defaults as an online call, so a batch job and an
online job given the same scripts get the same answers. A 2xx answer goes to the output
file, any other to the error file; output lines are written in reverse order (a provider
keeps none). The test drives the rest:

    batches.hold = True           # batches stay in_progress until the test ends them
    batches.expire(batch_id, answered=3)   # the first 3 lines answered, the rest batch_expired
    batches.progress(batch_id, answered=2) # the first 2 lines answered, the batch runs on (held)
    batches.fail(batch_id)        # failed in validation, no files
    batches.max_file_bytes = 2000 # larger uploads are refused with 400 file_too_large
    batches.max_file_lines = 2    # uploads of more lines are refused with 400 file_too_large
    batches.create_delay_s = 30   # a create answers that late (the batch exists at once)
    batches.list_delays = [3.0]   # the next list answers that late, with the batches of when it was asked
    batches.list_ignores_after = True  # every list answers the first page (a proxy that drops `after`)
    batches.list_refused = True   # a list answers 404 (a proxy without it), or list_refusal_status
    batches.list_cursor_refused = True  # a list given `after` (a later page) answers list_refusal_status
    batches.create_failures = 1   # the next create answers 503 and makes nothing
    batches.content_failures = 1  # the next download of a file answers 503
    batches.cancelling_s = 1.0    # a cancel answers `cancelling`, no files yet (OpenAI's answer);
                                  # asked of after 1 s (retrieve, cancel, list), it is `cancelled`
    batches.recancel_refused = True  # a cancel of a batch cancelling or ended answers 400
    batches.forget(batch_id)      # the provider lost the batch: asked of it, it answers 404
    batches.delete_file(file_id)  # the provider deleted the file (or kept it no longer): 404
    batches.refuse(batch_or_file_id, 404, times=2)  # its next 2 asks answer 404 (None: every ask)
    batches.refuse(batch_id, 200, body=b"<html>")  # ... answer that body as it is (a proxy's page)
    batches.authorizations        # every request's Authorization header (None: it sent none)
    batches.downloads[file_id]    # how often the file's content was asked for
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CHAT_COMPLETIONS = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
_NEXT = {"validating": "in_progress", "in_progress": "finalizing", "finalizing": "completed"}


@dataclass
class _File:
    id: str
    purpose: str
    filename: str
    content: bytes
    created_at: int

    def out(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, Any] | None
    created_at: int
    lines: list[dict[str, Any]]
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    answered: int = 0  # lines answered so far (the rest are cut off if it expires or is cancelled)
    # The output and error file lines of the lines answered so far (written out when it ends).
    outputs: list[dict[str, Any]] = field(default_factory=list)
    line_errors: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0  # request_counts
    failed: int = 0
    retrievals: int = 0
    cancelled_after: float = 0.0  # while cancelling: when (time.monotonic()) it is cancelled

    def out(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": CHAT_COMPLETIONS,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "request_counts": {"total": len(self.lines), "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": code}}, status
    )


def _no_such_file(file_id: str) -> JSONResponse:
    """OpenAI's answer for a file it does not have (never had, deleted, or kept no longer)."""
    message = f"No such File object: {file_id}"
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": "id", "code": None}}, 404
    )


class ScriptedBatches:
    """The batch API's state and the test's controls; thread-safe like ScriptedLLM."""

    def __init__(self, answer: Callable[[dict[str, Any]], Response]) -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.files: dict[str, _File] = {}
            self.batches: dict[str, _Batch] = {}
            self.hold = False
            self.max_file_bytes = 10 * 1024 * 1024
            self.max_requests = 50_000
            self.max_file_lines = 50_000
            self.refused_uploads = 0
            self.create_delay_s = 0.0
            self.list_delays: list[float] = []
            self.list_ignores_after = False
            self.list_refused = False
            self.list_cursor_refused = False
            self.list_refusal_status = 404
            self.create_failures = 0  # the next creates answer 503, making nothing
            self.content_failures = 0  # the next downloads answer 503
            self.cancelling_s = 0.0  # how long a cancelled batch is `cancelling` (0: not at all)
            self.recancel_refused = False  # a cancel of a batch cancelling or ended answers 400
            self.lists = 0  # batch list requests answered or refused
            self.cancel_requests: list[str] = []
            self.downloads: dict[str, int] = {}  # file id: content asks, answered or refused
            # id: (status, asks left, the body as it is, or None for the provider's error)
            self.refusals: dict[str, tuple[int, int | None, bytes | None]] = {}
            self.authorizations: list[str | None] = []

    def routes(self) -> list[Route]:
        handlers = [
            ("/v1/files", self._upload, "POST"),
            ("/v1/files/{file_id}", self._file, "GET"),
            ("/v1/files/{file_id}/content", self._content, "GET"),
            ("/v1/batches", self._create, "POST"),
            ("/v1/batches", self._list, "GET"),
            ("/v1/batches/{batch_id}", self._retrieve, "GET"),
            ("/v1/batches/{batch_id}/cancel", self._cancel, "POST"),
        ]
        return [Route(path, self._keyed(handler), methods=[method]) for path, handler, method in handlers]

    def _keyed(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """The handler, noting the request's Authorization header first."""

        async def keyed(request: Request) -> Response:
            with self._lock:
                self.authorizations.append(request.headers.get("authorization"))
            return await handler(request)

        return keyed

    # --- the test's controls ----------------------------------------------------------------

    def created(self) -> list[dict[str, Any]]:
        """Every batch created so far, oldest first, as the API shows it."""
        with self._lock:
            return [batch.out() for batch in self.batches.values()]

    def input_lines(self, batch_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.batches[batch_id].lines)

    def expire(self, batch_id: str, answered: int = 0) -> None:
        """The completion window ran out: the first `answered` lines were answered, the
        others get `batch_expired` in the error file."""
        self._end(batch_id, "expired", answered, "batch_expired", "not executed before the window expired")

    def progress(self, batch_id: str, answered: int) -> None:
        """The first `answered` lines are answered; the batch runs on (its files are written
        when it ends: expired, cancelled or completed)."""
        self._answer_lines(batch_id, answered)

    def finish(self, batch_id: str) -> None:
        """Answer every line now (for a held batch)."""
        with self._lock:
            batch = self.batches[batch_id]
        self._end(batch_id, "completed", len(batch.lines), "", "")

    def fail(self, batch_id: str, message: str = "the input file failed validation") -> None:
        with self._lock:
            batch = self.batches[batch_id]
            batch.status = "failed"
            batch.errors = [{"code": "invalid_request", "message": message, "line": 1, "param": None}]

    def forget(self, batch_id: str) -> None:
        with self._lock:
            del self.batches[batch_id]

    def refuse(
        self, object_id: str, status: int = 404, times: int | None = None, body: bytes | None = None
    ) -> None:
        """The next `times` asks of the batch (its retrieve) or file (its content) answer
        `status`, as a proxy may before it is there (None: every ask from now on); with
        `body` as it is instead of the provider's error (a proxy's own page)."""
        with self._lock:
            self.refusals[object_id] = (status, times, body)

    def delete_file(self, file_id: str) -> None:
        """The file is gone (deleted, or kept no longer): asked for, it answers 404; a batch
        whose output or error file it was still names it, as OpenAI's do."""
        with self._lock:
            del self.files[file_id]

    # --- the routes ---------------------------------------------------------------------

    async def _upload(self, request: Request) -> Response:
        body = await request.body()
        parts = _form(request.headers.get("content-type", ""), body)
        content, purpose = parts.get("file"), (parts.get("purpose") or (b"", ""))[0].decode()
        if content is None or purpose != "batch":
            return _error(400, "a file with purpose 'batch' is required", "invalid_request")
        if len(content[0]) > self.max_file_bytes or content[0].count(b"\n") > self.max_file_lines:
            with self._lock:
                self.refused_uploads += 1
            limits = f"{self.max_file_bytes} bytes, {self.max_file_lines} lines"
            return _error(400, f"file exceeds the limits ({limits})", "file_too_large")
        with self._lock:
            file = _File(f"file-{next(self._ids)}", purpose, content[1], content[0], int(time.time()))
            self.files[file.id] = file
        return JSONResponse(file.out())

    async def _file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        file = self.files.get(file_id)
        return JSONResponse(file.out()) if file else _no_such_file(file_id)

    async def _content(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        with self._lock:
            self.downloads[file_id] = self.downloads.get(file_id, 0) + 1
            if self.content_failures:
                self.content_failures -= 1
                return _error(503, "the file service is overloaded", "server_error")
        if refusal := self._refusal(file_id):
            return refusal
        file = self.files.get(file_id)
        if file is None:
            return _no_such_file(file_id)
        return Response(file.content, media_type="application/jsonl")

    async def _create(self, request: Request) -> Response:
        body = await request.json()
        file = self.files.get(body.get("input_file_id", ""))
        if file is None or file.purpose != "batch":
            return _error(400, "input_file_id names no batch file", "invalid_request")
        if body.get("endpoint") != CHAT_COMPLETIONS or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and the window 24h", "invalid_request")
        if not _valid_metadata(body.get("metadata")):
            return _error(
                400, "metadata: at most 16 pairs of strings (keys 64, values 512)", "invalid_request"
            )
        lines = [json.loads(line) for line in file.content.splitlines() if line.strip()]
        with self._lock:
            if self.create_failures:
                self.create_failures -= 1
                return _error(503, "the batch service is overloaded", "server_error")
            batch = _Batch(
                f"batch_{next(self._ids)}",
                file.id,
                body["completion_window"],
                body.get("metadata"),
                int(time.time()),
                lines,
            )
            self.batches[batch.id] = batch
        if self.create_delay_s:  # the caller may die before it learns the batch's id
            await asyncio.sleep(self.create_delay_s)
        return JSONResponse(batch.out())

    async def _list(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return _error(400, "limit must be from 1 to 100", "invalid_request")
        after = None if self.list_ignores_after else request.query_params.get("after")
        with self._lock:
            self.lists += 1
        if self.list_refused or (self.list_cursor_refused and request.query_params.get("after")):
            return _error(self.list_refusal_status, "Invalid URL (GET /v1/batches)", "not_found")
        with self._lock:
            cancelling = [batch.id for batch in self.batches.values() if batch.status == "cancelling"]
        for batch_id in cancelling:
            self._settle(batch_id)
        with self._lock:
            newest_first = list(reversed(self.batches.values()))
            ids = [batch.id for batch in newest_first]
            # After a batch it no longer knows: nothing (a cursor, not a restart from the top).
            start = (ids.index(after) + 1 if after in ids else len(ids)) if after else 0
            data = [batch.out() for batch in newest_first[start : start + limit]]
            delay = self.list_delays.pop(0) if self.list_delays else 0.0
        if delay:  # what was there when asked, answered late (as over a slow network)
            await asyncio.sleep(delay)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": start + limit < len(newest_first),
            }
        )

    async def _retrieve(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        if refusal := self._refusal(batch_id):
            return refusal
        self._settle(batch_id)
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return _error(404, "no such batch", "not_found")
            batch.retrievals += 1
            status = batch.status
            if status == "validating":
                self._validate(batch)
            elif status == "finalizing":
                batch.status = "completed"
        if status == "in_progress" and not self.hold:
            self._end(batch_id, "finalizing", len(batch.lines), "", "")
        with self._lock:
            return JSONResponse(batch.out())

    def _refusal(self, object_id: str) -> Response | None:
        """The answer `refuse` asked for this ask of the batch or file, if any."""
        with self._lock:
            status, left, body = self.refusals.get(object_id, (0, 0, None))
            if left == 0:
                return None
            self.refusals[object_id] = (status, None if left is None else left - 1, body)
        if body is not None:
            return Response(body, status)
        code = {404: "not_found", 401: "unauthorized", 403: "forbidden"}.get(status, "invalid_request")
        return _error(status, f"{object_id} is not available", code)

    def _validate(self, batch: _Batch) -> None:
        custom_ids = [line.get("custom_id") for line in batch.lines]
        urls = {line.get("url") for line in batch.lines}
        if (
            len(batch.lines) > self.max_requests
            or len(set(custom_ids)) < len(custom_ids)
            or urls != {CHAT_COMPLETIONS}
        ):
            batch.status = "failed"
            message = "too many requests, a duplicate custom_id or a url other than the batch's endpoint"
            batch.errors = [{"code": "invalid_file", "message": message, "line": None, "param": None}]
        else:
            batch.status = "in_progress"

    async def _cancel(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        with self._lock:
            batch = self.batches.get(batch_id)
            self.cancel_requests.append(batch_id)
        if batch is None:
            return _error(404, "no such batch", "not_found")
        self._settle(batch_id)
        if self.recancel_refused and batch.status in (*TERMINAL, "cancelling"):
            return _error(400, f"Cannot cancel a batch with status '{batch.status}'", "invalid_request")
        if batch.status not in (*TERMINAL, "cancelling"):
            if self.cancelling_s:
                with self._lock:
                    batch.status = "cancelling"
                    batch.cancelled_after = time.monotonic() + self.cancelling_s
            else:
                self._end(batch_id, "cancelled", batch.answered, "batch_cancelled", "the batch was cancelled")
        with self._lock:
            return JSONResponse(batch.out())

    def _settle(self, batch_id: str) -> None:
        """A batch cancelling long enough is cancelled: its files are written."""
        with self._lock:
            batch = self.batches.get(batch_id)
            due = (
                batch is not None
                and batch.status == "cancelling"
                and time.monotonic() >= batch.cancelled_after
            )
        if due and batch is not None:
            self._end(batch_id, "cancelled", batch.answered, "batch_cancelled", "the batch was cancelled")

    def _end(self, batch_id: str, status: str, answered: int, code: str, message: str) -> None:
        """Answer lines up to `answered` and write the output and error files of every line
        answered; the lines after it get the error `code`."""
        self._answer_lines(batch_id, answered)
        with self._lock:
            batch = self.batches[batch_id]
            cut_off = [
                {
                    "id": f"batch_req_{next(self._ids)}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {"code": code, "message": message},
                }
                for line in batch.lines[answered:]
            ]
            batch.failed += len(cut_off)
            batch.status = status
            # A provider keeps no order.
            for kind, entries in (("output", batch.outputs[::-1]), ("error", [*batch.line_errors, *cut_off])):
                if not entries:
                    continue
                content = b"".join(json.dumps(entry).encode() + b"\n" for entry in entries)
                file = _File(
                    f"file-{next(self._ids)}", f"batch_{kind}", f"{batch.id}_{kind}.jsonl", content, 0
                )
                self.files[file.id] = file
                setattr(batch, f"{kind}_file_id", file.id)

    def _answer_lines(self, batch_id: str, answered: int) -> None:
        """Answer the lines not answered yet up to `answered`, keeping their file lines."""
        with self._lock:
            batch = self.batches[batch_id]
            todo = batch.lines[batch.answered : answered]
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for line in todo:
            response = self._answer(line["body"])
            answer = json.loads(bytes(response.body)) if response.body else None
            entry = {
                "id": f"batch_req_{next(self._ids)}",
                "custom_id": line["custom_id"],
                "response": {"status_code": response.status_code, "request_id": "scripted", "body": answer},
                "error": None,
            }
            (outputs if response.status_code < 300 else errors).append(entry)
        with self._lock:
            batch.answered = max(batch.answered, answered)
            batch.completed += len(outputs)
            batch.failed += len(errors)
            batch.outputs += outputs
            batch.line_errors += errors


def _valid_metadata(metadata: Any) -> bool:
    if metadata is None:
        return True
    return (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in metadata.items()
        )
    )


def _form(content_type: str, body: bytes) -> dict[str, tuple[bytes, str]]:
    """A multipart/form-data body's fields: name -> (bytes, filename)."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[bytes, str]] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        payload = part.get_payload(decode=True)
        fields[name] = (payload if isinstance(payload, bytes) else b"", part.get_filename() or "")
    return fields
