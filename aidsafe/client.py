"""`aidsafe.Client` and `aidsafe.AsyncClient`: the AIDSAFE HTTP API from Python, on httpx.

Each API route is written once, in `_BaseClient`, as a function that builds a `Call` (the
request, whether it may be retried, how its answer is read). The `endpoint` descriptor
turns it into a method that sends the call: a plain one on `Client`, a coroutine on
`AsyncClient`. What an answer means (a refusal, a retry and its pause, a download's file,
an event) is decided once too; the two clients only do the I/O (send, sleep, read, page,
stream), each in its own idiom.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any, BinaryIO, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload
from urllib.parse import quote
from uuid import UUID, uuid4

import httpx
from httpx_sse import EventSource, ServerSentEvent
from pydantic import BaseModel, TypeAdapter

from aidsafe.errors import AidsafeError, EventStreamUnavailable
from aidsafe.models import (
    Comparison,
    ComparisonListed,
    Cot,
    Deletion,
    Estimate,
    Item,
    ItemDetail,
    ItemFinished,
    ItemReviews,
    Job,
    JobListed,
    JobProgress,
    ModelEvaluation,
    Page,
    PolicySet,
    PolicySetDetail,
    PreferencePair,
    Preset,
    PromptSet,
    PromptSetDetail,
    RegisteredPolicySet,
    RegisteredPromptSet,
    Rejection,
    Report,
    ReviewSummary,
    SampleEvaluation,
    SampleResult,
    SubmittedComparison,
    SubmittedJob,
    SubmittedModelEvaluation,
    SubmittedSampleEvaluation,
    Webhook,
    WebhookCreated,
)

P = ParamSpec("P")
T = TypeVar("T")
L = TypeVar("L", bound="_Paging")  # a page of a listing
M = TypeVar("M", bound=BaseModel)
Id = str | UUID
Params = tuple[tuple[str, str | int | float | bool], ...]
TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)

# What the CLI has always read (app/cli/connection.py passes its --api-url and --key through).
URL_ENV, KEY_ENV = "AIDSAFE_API_URL", "AIDSAFE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
BUILTIN_PROMPT_SET = "aidsafe-default"  # the server's own templates
RETRIED_STATUSES = (429, 503)  # rate-limited; the database unavailable: both say "try again"
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
MAX_EVENT_RECONNECTS = 5  # in a row, without an event in between
RECONNECT_PAUSE_S = 0.5  # times the reconnects so far
# An API that answered a follower and now refuses its connections is restarting (a deploy:
# it ends its streams at once, takes up to AIDSAFE_SHUTDOWN_GRACE_S, 20 s, to stop when other
# responses are under way, and seconds to start). Tried again this long, every second (or
# after the Retry-After said), before the follower gives up: polling would ask the same API.
RESTART_WAIT_S = 30.0
RESTART_PAUSE_S = 1.0
# Answers while the API cannot answer: a reverse proxy's 502, 503 (no healthy backend) or 504
# for the API behind it, and the API's own 503 (`unavailable`: its database or queue is away).
UNAVAILABLE_STATUSES = (502, 503, 504)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # "leave as it is", where None means "clear"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to the API and how to read its successful answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: Params = ()
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None  # a raw body (an uploaded file), instead of `json`
    # None: as the method is (GET, DELETE... are). A POST is retried only when it says so.
    idempotent: bool | None = None
    retried: tuple[int, ...] = RETRIED_STATUSES  # the answers sent again (when retryable)
    into: Path | None = None  # a download: the answer's body goes to this file, not to memory

    @property
    def retryable(self) -> bool:
        return self.method in IDEMPOTENT_METHODS if self.idempotent is None else self.idempotent

    def request(self) -> dict[str, Any]:
        """httpx's arguments for sending it."""
        return {
            "method": self.method,
            "url": self.path,
            "params": self.params,
            "json": self.json,
            "content": self.content,
            "headers": self.headers,
            # a download (an export) may take long: no timeout for it
            "timeout": None if self.into is not None else httpx.USE_CLIENT_DEFAULT,
        }

    def accepts(self, response: httpx.Response) -> bool:
        """Whether the answer is the call's result, not a refusal (AidsafeError)."""
        # a download's file is a 200's body only: no other answer is written as one
        return response.status_code == 200 if self.into is not None else response.status_code < 400


class _Paging(Protocol):
    """A page of a listing, which says where the next one starts (None: it is the last)."""

    @property
    def next_cursor(self) -> str | None: ...


PageCall = Callable[[str | None], Call[L]]  # a listing's page after a cursor


@dataclass(frozen=True)
class Event:
    """One event of a job's stream: `item` (data: ItemFinished), `snapshot` or `done`
    (data: JobProgress; `done` is the last). Pass `id` back as `last_event_id` to resume."""

    kind: str
    id: str | None
    data: ItemFinished | JobProgress


def _path(*parts: Id) -> str:
    return "/v1/" + "/".join(quote(str(part), safe="") for part in parts)


def _as(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate_json(response.content)


def _text(response: httpx.Response) -> str:
    return response.text


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def _list_of(model: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
    return lambda response: adapter.validate_json(response.content)


def _submitted(model: type[M], keyed_by_caller: bool) -> Callable[[httpx.Response], M]:
    """A submission's answer: 200 (not 202 or 201) is a replay of the same Idempotency-Key.
    Under a key of the client's own, a replay answers a retry of this call: what it made is
    still new."""
    return lambda response: model.model_validate(
        {**response.json(), "replayed": keyed_by_caller and response.status_code == 200}
    )


def _params(**values: Any) -> Params:
    """Query parameters: None is left out, a list or tuple repeats the parameter."""
    params: list[tuple[str, str | int | float | bool]] = []
    for name, value in values.items():
        for one in value if isinstance(value, list | tuple) else [value]:
            if one is not None:
                params.append((name, one.isoformat() if isinstance(one, datetime) else one))
    return tuple(params)


def _stops(event: Event) -> bool:
    """Whether `wait` returns on this event: the job ended, or waits for budget."""
    data = event.data
    return event.kind == "done" or (isinstance(data, JobProgress) and data.waiting_for_budget)


def _job_body(
    prompts: Sequence[str | Mapping[str, Any]],
    config: Mapping[str, Any] | None,
    policy_set: str,
    policy_version: str | None,
    callback_url: str | None,
    budget: Mapping[str, Any] | None,
    preset: str | None,
    preset_version: str | None,
    prompt_set: str | None = None,
    prompt_set_version: str | None = None,
) -> dict[str, Any]:
    """A job's request body, but for its label and metadata."""
    if all(isinstance(prompt, str) for prompt in prompts):
        body: dict[str, Any] = {"prompts": list(prompts)}
    else:
        body = {"items": [{"prompt": p} if isinstance(p, str) else dict(p) for p in prompts]}
    body["policy_set"] = {"name": policy_set, "version": policy_version}
    optional = {
        "prompt_set": _prompt_set_ref(prompt_set, prompt_set_version),
        "config": None if config is None else dict(config),
        "callback_url": callback_url,
        "budget": None if budget is None else dict(budget),
        "preset": preset,
        "preset_version": preset_version,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return body


def _prompt_set_ref(name: str | None, version: str | None) -> dict[str, Any] | None:
    """A request's `prompt_set`: None, left out (the server's built-in set), unless a name or
    a version is given; a version alone pins one of the built-in set's."""
    if name is None and version is None:
        return None
    return {"name": name or BUILTIN_PROMPT_SET, "version": version}


BENCHMARK_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}


def benchmark_file(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """A benchmark for `evaluate_model` from a JSONL or CSV file (by its suffix), named
    `name` or the file's stem. The server checks the rows; this reads the text, and raises
    ValueError naming the line of bytes that are not UTF-8."""
    path = Path(path)
    format = BENCHMARK_FORMATS.get(path.suffix.lower())
    if format is None:
        raise ValueError(f"{path}: a benchmark file ends in .jsonl or .csv")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text") from None
    return {"name": name or path.stem, "file": {"format": format, "content": content}}


def _labels(label: str | None, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A new job's label and metadata as far as given: left out, they are left out of the
    request's idempotency hash too."""
    return {
        **({"label": label} if label is not None else {}),
        **({"metadata": dict(metadata)} if metadata is not None else {}),
    }


def _evaluation_options(
    *,
    format: str = "generic",
    columns: Mapping[str, str] | None = None,
    grade: Mapping[str, Any] | None = None,
    guard: Mapping[str, Any] | None = None,
    judge_against: Id | None = None,
    judge: Mapping[str, Any] | None = None,
    policy_set: str = "aidsafe-default",
    policy_version: str | None = None,
    prompt_set: str | None = None,
    prompt_set_version: str | None = None,
    label: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """A sample evaluation's options as the API reads them (the idempotency key is a header)."""
    options: dict[str, Any] = {
        "format": format,
        "columns": dict(columns or {}),
        "policy_set": {"name": policy_set, "version": policy_version},
        **_labels(label, metadata),
    }
    if (prompt_set_ref := _prompt_set_ref(prompt_set, prompt_set_version)) is not None:
        options["prompt_set"] = prompt_set_ref
    for name, role in (("grade", grade), ("guard", guard)):
        if role is not None:
            options[name] = dict(role)
    if judge_against is not None:
        options["judge"] = {"job_id": str(judge_against), "judge": dict(judge) if judge else None}
    if callback_url is not None:
        options["callback_url"] = callback_url
    return options


def _submission(path: str, model: type[M], idempotency_key: str | None, **request: Any) -> Call[M]:
    """A POST that creates a job or a webhook, always under an Idempotency-Key: the caller's
    (a repeat of an earlier call answers what it made, `replayed`), or one of this call's own.
    Either way it is sent again on a 429 or 503, which the API may answer after the row was
    stored (Postgres gone before the answer): without a key, a retry by hand made a second."""
    return Call(
        "POST",
        path,
        _submitted(model, keyed_by_caller=idempotency_key is not None),
        # An empty key is sent as it is: the API refuses it (likely an unset variable).
        headers={
            "Idempotency-Key": f"aidsafe-client-{uuid4()}" if idempotency_key is None else idempotency_key
        },
        idempotent=True,
        **request,
    )


def _registration(path: str, model: type[M], document: Mapping[str, Any]) -> Call[M]:
    """A POST that registers a version by its content: sending it twice registers it once (so
    it is retried); a 200 (not 201) answers the version registered before, `created` False."""
    return Call(
        "POST",
        path,
        lambda r: model.model_validate({**r.json(), "created": r.status_code == 201}),
        json=dict(document),
        idempotent=True,
    )


def _job_filters(
    status: str | Sequence[str] | None,
    created_after: datetime | str | None,
    created_before: datetime | str | None,
    label: str | None,
    metadata: Mapping[str, Any] | str | None,
) -> dict[str, Any]:
    return {
        "status": [status] if isinstance(status, str) else list(status or []),
        "created_after": created_after,
        "created_before": created_before,
        "label": label,
        # a str is JSON text already: the API, not the client, says what is wrong with it
        "metadata": metadata if metadata is None or isinstance(metadata, str) else json.dumps(metadata),
    }


def _answer(call: Call[T], response: httpx.Response) -> T:
    """The call's result from its answer (read, unless downloaded); AidsafeError if refused."""
    if not call.accepts(response):
        raise AidsafeError.of(response)
    return call.read(response)


@contextmanager
def _downloading(target: Path) -> Iterator[BinaryIO]:
    """The file a download is written to: `target.part`, renamed to `target` when complete,
    so a broken download leaves no file that looks whole. A target that exists but is no
    regular file (/dev/null, a named pipe) or is a symlink (/dev/stdout) is written into as it
    is: a rename would replace it."""
    if target.is_symlink() or (target.exists() and not target.is_file()):
        with target.open("wb") as handle:
            yield handle
        return
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("wb") as handle:
            yield handle
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)


def _retry_after(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait before retrying: the answer's Retry-After, or else a doubling back-off."""
    asked = _asked_pause(response)
    return 0.5 * 2.0**attempt if asked is None else asked


def _asked_pause(response: httpx.Response) -> float | None:
    """The seconds the answer's Retry-After (seconds or an HTTP date) asks for; None without one."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when: datetime = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, (when.replace(tzinfo=when.tzinfo or UTC) - datetime.now(UTC)).total_seconds())


def _event(sse: ServerSentEvent) -> Event | None:
    """The event a server-sent event carries; None for a comment and for kinds this client
    does not know (a newer server's)."""
    if not sse.data:
        return None
    if sse.event == "item":
        return Event(sse.event, sse.id or None, ItemFinished.model_validate_json(sse.data))
    if sse.event in ("snapshot", "done"):
        return Event(sse.event, sse.id or None, JobProgress.model_validate_json(sse.data))
    return None


def _stream_refusal(response: httpx.Response) -> AidsafeError:
    """The error a read answer that is no event stream carries: EventStreamUnavailable when
    that is a fault of the way there (a 5xx) or the key has too many streams open (429
    too_many_streams), so that the job is polled; else the API's refusal (401, 404)."""
    if response.status_code >= 500:
        return EventStreamUnavailable(f"HTTP {response.status_code}", response.status_code)
    error = AidsafeError.of(response)
    if error.code == "too_many_streams":
        return EventStreamUnavailable(f"HTTP {error.status}: {error.message}", error.status)
    return error


EVENT_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-store"}


class _Unanswered(Exception):
    """A request the API did not answer (its connection refused, or UNAVAILABLE_STATUSES
    answered): what it got, and the pause the answer's Retry-After asked for."""

    def __init__(self, request: httpx.Request, fault: str, asked_pause_s: float | None = None) -> None:
        super().__init__(fault)
        self.request, self.fault, self.asked_pause_s = request, fault, asked_pause_s


@dataclass
class _Outage:
    """A followed API that stopped answering, from its first try unanswered on."""

    since: float = field(default_factory=time.monotonic)
    tries: int = 0
    last_try: str = ""  # the request, and what it got
    asked_pause_s: float | None = None  # the last answer's Retry-After

    def pause(self) -> float:
        """Seconds before trying again: RESTART_PAUSE_S, or longer if Retry-After asked, within
        RESTART_WAIT_S of the first try; then connection_failed, saying what was tried."""
        left = self.since + RESTART_WAIT_S - time.monotonic()
        if left <= 0:
            raise AidsafeError(
                "connection_failed",
                f"the API did not come back in {RESTART_WAIT_S:.0f} s: tried {self.tries} times, "
                f"a second apart or as its Retry-After asked; the last, {self.last_try}",
            )
        return min(max(self.asked_pause_s or 0.0, RESTART_PAUSE_S), left)


class _Following:
    """What following a job decides, for either client, by events or by polls: each
    connection's call (resuming after the last event seen), whether its answer is a stream,
    the events it carries, a poll's call and answer, and the pause before trying again.

    One rule for both: a request the API does not answer (a connection refused, or a 502, 503
    or 504 answered for it, once it answered this follower; its own 503 and a poll's 502, 503
    or 504 at any time) is its restart, waited out (see RESTART_WAIT_S and `_Outage`)."""

    def __init__(self, job_id: Id, last_event_id: str | None) -> None:
        self.job_id, self.last_event_id = job_id, last_event_id
        self.drops = 0  # in a row, without an event in between
        self.done = False
        self.answered = False  # the API answered a request of this follower
        self.outage: _Outage | None = None  # since the API that answered stopped answering

    @contextmanager
    def connection(self) -> Iterator[Call[None]]:
        """The next connection's call, within which a transport error is a drop (the stream
        is resumed), not a failure, and the API's restart is waited out; EventStreamUnavailable
        once the stream kept dropping."""
        if self.drops >= MAX_EVENT_RECONNECTS:
            raise EventStreamUnavailable("the event stream kept dropping")
        resume = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        # A 429 here is too_many_streams: a seat frees only as one of the key's streams ends,
        # so it is not waited for; the caller polls instead (see _stream_refusal).
        path = _path("jobs", self.job_id, "events")
        try:
            with self._restarting():
                yield Call("GET", path, lambda _: None, headers={**EVENT_HEADERS, **resume}, retried=())
        except httpx.TransportError:
            pass

    @contextmanager
    def poll(self) -> Iterator[Call[Job]]:
        """A poll's call, within which the API's restart is waited out; `polled` reads its
        answer. AidsafeError as any call's (no answer at all: connection_failed)."""
        # a 503 is the restart's to wait out, within its bound; a 429 is rate limiting
        call = Call("GET", _path("jobs", self.job_id), _as(Job), retried=(429,))
        with _reached(), self._restarting():
            yield call

    @contextmanager
    def _restarting(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            if not self.answered:  # the API never answered here: no restart of it to wait for
                raise
            self._unanswered(_Unanswered(exc.request, f"no connection: {exc}"))
        except _Unanswered as exc:
            self._unanswered(exc)

    def _unanswered(self, why: _Unanswered) -> None:
        self.outage = self.outage or _Outage()
        self.outage.tries += 1
        self.outage.last_try = f"{why.request.method} {why.request.url}, got {why.fault}"
        self.outage.asked_pause_s = why.asked_pause_s

    def _heard(self, response: httpx.Response, *, streaming: bool) -> None:
        """Note an answer read: _Unanswered if it says the API cannot answer now, told by the
        API's error code and message when it is its own 503, by the reason phrase when a proxy's
        (no error body of ours). A proxy's answer to a stream before the API answered may be its
        way of not streaming at all: it is left to `_stream_refusal` (the job is polled)."""
        status = response.status_code
        if status in UNAVAILABLE_STATUSES:
            error = AidsafeError.of(response)
            own = error.code != "http_error"
            if own or self.answered or not streaming:
                self.answered |= own
                said = f"{error.code}: {error.message}" if own else response.reason_phrase
                raise _Unanswered(response.request, f"HTTP {status} {said}", _asked_pause(response))
            return
        self.answered, self.outage = True, None

    def streams(self, response: httpx.Response) -> bool:
        """Whether the answer is the event stream; False: read it and raise `refusal`.
        EventStreamUnavailable for a 200 that is no stream (a proxy's page: not read, as a
        proxy that buffers the stream would never end it)."""
        if response.status_code != 200:
            return False
        self.answered, self.outage = True, None
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise EventStreamUnavailable("HTTP 200", 200)
        return True

    def refusal(self, response: httpx.Response) -> AidsafeError:
        """Why the read answer is no stream (see _stream_refusal); _Unanswered if the API
        cannot answer now."""
        self._heard(response, streaming=True)
        return _stream_refusal(response)

    def polled(self, response: httpx.Response, call: Call[Job]) -> Job:
        """The job a poll's read answer carries; _Unanswered if the API cannot answer now."""
        self._heard(response, streaming=False)
        return _answer(call, response)

    def event(self, sse: ServerSentEvent) -> Event | None:
        if event := _event(sse):
            self.drops, self.last_event_id = 0, event.id or self.last_event_id
            self.done = event.kind == "done"
        return event

    def dropped(self) -> float:
        """Seconds to wait before connecting again."""
        if self.outage is not None:
            return self.outage.pause()  # restarting, not dropping the stream
        self.drops += 1
        return RECONNECT_PAUSE_S * (self.drops - 1)

    def polling_pause(self, poll_s: float) -> float:
        """Seconds to wait before the next poll."""
        return poll_s if self.outage is None else self.outage.pause()


class _Waiting:
    """When `wait` returns, for either client: at an event, or a polled reading of the job,
    that says the job ended or waits for budget. Each is told to `on_event` first."""

    def __init__(
        self,
        on_event: Callable[[Event], None] | None,
        on_polling: Callable[[EventStreamUnavailable], None] | None,
    ) -> None:
        self.on_event, self.on_polling = on_event, on_polling

    def seen(self, event: Event) -> JobProgress | None:
        """The job's progress when waiting ends at this event."""
        if self.on_event:
            self.on_event(event)
        if _stops(event):
            assert isinstance(event.data, JobProgress)
            return event.data
        return None

    def polling(self, why: EventStreamUnavailable) -> None:
        if self.on_polling:
            self.on_polling(why)

    def polled(self, job: Job) -> Job | None:
        """The job, when waiting ends at this reading of it."""
        if self.on_event:
            self.on_event(Event("snapshot", None, job))
        return job if job.finished or job.waiting_for_budget else None


class endpoint(Generic[P, T]):  # noqa: N801 (used as a decorator)
    """A route's call builder as a method that sends the call (see the module's docstring)."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self.build = build
        self.__doc__, self.__name__ = build.__doc__, build.__name__
        signature = inspect.signature(build)
        self._signature = signature.replace(parameters=list(signature.parameters.values())[1:])

    @overload
    def __get__(self, client: None, owner: type) -> endpoint[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, client: Any, owner: type | None = None) -> Any:
        if client is None:
            return self
        build = self.build

        def send(*args: Any, **kwargs: Any) -> Any:
            return client._send(build(client, *args, **kwargs))

        send.__doc__, send.__name__, send.__signature__ = self.__doc__, self.__name__, self._signature  # type: ignore[attr-defined]
        return send


def _page_rows(page: Page[T]) -> Sequence[T]:
    return page.data


class paged(Generic[P, L, T]):  # noqa: N801
    """Every row of a paged listing, fetched a page at a time as the iteration goes; the
    listing's `limit` is the page size, its `cursor` where to start. `rows` reads a page's
    rows: a Page's `data` unless given (an item's reviews come with the item's decision)."""

    @overload
    def __init__(self: paged[P, Page[T], T], listing: endpoint[P, Page[T]]) -> None: ...
    @overload
    def __init__(self, listing: endpoint[P, L], rows: Callable[[L], Sequence[T]]) -> None: ...
    def __init__(self, listing: endpoint[P, Any], rows: Callable[[Any], Sequence[Any]] = _page_rows) -> None:
        self.listing, self.page_rows = listing, rows
        self.__doc__ = f"Every row of `{listing.__name__}`, following its cursors.\n\n{listing.__doc__}"

    @overload
    def __get__(self, client: None, owner: type) -> paged[P, L, T]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, AsyncIterator[T]]: ...
    def __get__(self, client: Any, owner: type | None = None) -> Any:
        if client is None:
            return self
        build, page_rows = self.listing.build, self.page_rows

        def rows(*args: Any, **kwargs: Any) -> Any:
            def page(cursor: str | None) -> Call[L]:
                return build(client, *args, **{**kwargs, "cursor": cursor})

            return client._rows(page, page_rows, kwargs.get("cursor"))

        rows.__doc__ = self.__doc__
        return rows


class _BaseClient(Generic[TransportT]):
    """What `Client` and `AsyncClient` share: every route of the API, once, and the decisions
    around sending (retries, what an answer means). Ids may be given as str or UUID."""

    _http: httpx.Client | httpx.AsyncClient

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_retry_wait_s: float = 60.0,
        transport: TransportT | None = None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(KEY_ENV)
        self._http = self._connect(
            base_url=base_url or os.environ.get(URL_ENV) or DEFAULT_URL,
            # No key: no header, and the API's 401 `unauthorized` says so.
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=timeout,
            transport=transport,
        )
        self.max_retries, self.max_retry_wait_s = max_retries, max_retry_wait_s

    def _connect(self, **options: Any) -> httpx.Client | httpx.AsyncClient:
        raise NotImplementedError  # each client opens its own kind of httpx client

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def _retry_pause(self, call: Call[Any], response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before sending the call again after this answer; None: keep it."""
        if response.status_code in call.retried and call.retryable and attempt < self.max_retries:
            return min(_retry_after(response, attempt), self.max_retry_wait_s)
        return None

    # --- jobs -----------------------------------------------------------------------------

    @endpoint
    def submit(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        *,
        config: Mapping[str, Any] | None = None,
        policy_set: str = "aidsafe-default",
        policy_version: str | None = None,
        label: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        callback_url: str | None = None,
        budget: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        preset: str | None = None,
        preset_version: str | None = None,
        prompt_set: str | None = None,
        prompt_set_version: str | None = None,
    ) -> Call[SubmittedJob]:
        """Submit prompts as one job (POST /v1/jobs). Each prompt is a string or a
        `{"prompt": ..., "metadata": {...}}` mapping. `config` is the job's options as the
        README's "Per-job configuration" names them (`agents`, `max_rounds`, `mode`,
        `grading`, `pairs`, `roles`...); with a `preset` (see `list_presets`) it overrides
        the preset's fields, and `preset_version` pins the preset's version. `budget`:
        `{"max_cost_usd": ..., "max_tokens": ...}` (either or both), after which no new LLM
        call starts (see `update_job`). `prompt_set` names the templates that word the
        requests (see `list_prompt_sets`; default: the built-in set), `prompt_set_version`
        pins one version of it (given alone, of the built-in set). The submission is retried
        on 429/503 under an Idempotency-Key (`idempotency_key`, or one of the call's own), so
        it makes one job at most; with `idempotency_key` a later call with the same key and
        body answers the first job, with `replayed` True."""
        body = _job_body(
            prompts,
            config,
            policy_set,
            policy_version,
            callback_url,
            budget,
            preset,
            preset_version,
            prompt_set,
            prompt_set_version,
        )
        return _submission(
            _path("jobs"), SubmittedJob, idempotency_key, json={**body, **_labels(label, metadata)}
        )

    @endpoint
    def estimate(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        *,
        config: Mapping[str, Any] | None = None,
        policy_set: str = "aidsafe-default",
        policy_version: str | None = None,
        budget: Mapping[str, Any] | None = None,
        preset: str | None = None,
        preset_version: str | None = None,
        prompt_set: str | None = None,
        prompt_set_version: str | None = None,
    ) -> Call[Estimate]:
        """What `submit` with these arguments would use: LLM calls, tokens and cost, each a
        range, at the current prices (POST /v1/jobs/estimate). Creates nothing; checks the
        body as a submission would (its 422s included)."""
        body = _job_body(
            prompts,
            config,
            policy_set,
            policy_version,
            None,
            budget,
            preset,
            preset_version,
            prompt_set,
            prompt_set_version,
        )
        return Call("POST", _path("jobs", "estimate"), _as(Estimate), json=body, idempotent=True)

    @endpoint
    def get_job(self, job_id: Id) -> Call[Job]:
        """Status, counts per status and stage, usage, quality (GET /v1/jobs/{id})."""
        return Call("GET", _path("jobs", job_id), _as(Job))

    @endpoint
    def list_jobs(
        self,
        *,
        status: str | Sequence[str] | None = None,
        kind: str | Sequence[str] | None = None,
        created_after: datetime | str | None = None,
        created_before: datetime | str | None = None,
        label: str | None = None,
        metadata: Mapping[str, Any] | str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Call[Page[JobListed]]:
        """One page of your jobs, comparisons included, newest first (GET /v1/jobs). Filters
        combine; `status` and `kind` may list several (any of them); `metadata` is an object
        the job's metadata must contain; times need a UTC offset."""
        filters = _job_filters(status, created_after, created_before, label, metadata)
        kinds = [kind] if isinstance(kind, str) else list(kind or [])
        params = _params(**filters, kind=kinds, cursor=cursor, limit=limit)
        return Call("GET", _path("jobs"), _as(Page[JobListed]), params)

    iter_jobs = paged(list_jobs)

    @endpoint
    def update_job(
        self,
        job_id: Id,
        *,
        label: str | None = UNSET,
        metadata: Mapping[str, Any] = UNSET,
        budget: Mapping[str, Any] | None = UNSET,
    ) -> Call[Job]:
        """Set the job's label (None clears it), metadata (replaced whole; {} clears it)
        and/or budget (replaced whole; None removes it: a budget no longer spent resumes the
        items waiting for it); what is not given stays (PATCH /v1/jobs/{id})."""
        given = (("label", label), ("metadata", metadata), ("budget", budget))
        body = {name: value for name, value in given if value is not UNSET}
        return Call("PATCH", _path("jobs", job_id), _as(Job), json=body, idempotent=True)

    @endpoint
    def cancel_job(self, job_id: Id) -> Call[Job]:
        """Cancel queued items now and running ones within a lease; cancelling twice is
        harmless (POST /v1/jobs/{id}/cancel)."""
        return Call("POST", _path("jobs", job_id, "cancel"), _as(Job), idempotent=True)

    @endpoint
    def delete_job(self, job_id: Id) -> Call[Deletion]:
        """Delete a finished job (or comparison) and every row of it; the deletion's trace
        (DELETE /v1/jobs/{id}). 409 `job_running` while it runs: cancel it first."""
        return Call("DELETE", _path("jobs", job_id), _as(Deletion))

    @endpoint
    def list_deletions(self, *, before_id: int | None = None, limit: int = 100) -> Call[list[Deletion]]:
        """Jobs you deleted, newest first (GET /v1/deletions)."""
        params = _params(before_id=before_id, limit=limit)
        return Call("GET", _path("deletions"), _list_of(Deletion), params)

    @endpoint
    def get_report(self, job_id: Id) -> Call[Report]:
        """Quality in full and usage by stage (GET /v1/jobs/{id}/report)."""
        return Call("GET", _path("jobs", job_id, "report"), _as(Report))

    # --- a job's rows -----------------------------------------------------------------------

    @endpoint
    def list_items(
        self, job_id: Id, *, status: str | None = None, cursor: str | None = None, limit: int = 100
    ) -> Call[Page[Item]]:
        """One page of the job's items in prompt order (GET /v1/jobs/{id}/items)."""
        params = _params(status=status, cursor=cursor, limit=limit)
        return Call("GET", _path("jobs", job_id, "items"), _as(Page[Item]), params)

    iter_items = paged(list_items)

    @endpoint
    def get_item(self, item_id: Id) -> Call[ItemDetail]:
        """One item with its CoT and every agent turn (GET /v1/items/{id})."""
        return Call("GET", _path("items", item_id), _as(ItemDetail))

    @endpoint
    def list_cots(
        self, job_id: Id, *, accepted: bool | None = None, cursor: str | None = None, limit: int = 100
    ) -> Call[Page[Cot]]:
        """One page of the job's refined CoTs in prompt order; `accepted` keeps those the
        quality gate accepted (True) or rejected (False) (GET /v1/jobs/{id}/cots)."""
        params = _params(accepted=accepted, cursor=cursor, limit=limit)
        return Call("GET", _path("jobs", job_id, "cots"), _as(Page[Cot]), params)

    iter_cots = paged(list_cots)

    @endpoint
    def list_preference_pairs(
        self,
        job_id: Id,
        *,
        kept: bool | None = None,
        min_gap: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Call[Page[PreferencePair]]:
        """One page of the job's ear-whisperer pair attempts in prompt order
        (GET /v1/jobs/{id}/preference-pairs)."""
        params = _params(kept=kept, min_gap=min_gap, cursor=cursor, limit=limit)
        return Call("GET", _path("jobs", job_id, "preference-pairs"), _as(Page[PreferencePair]), params)

    iter_preference_pairs = paged(list_preference_pairs)

    # --- comparisons ------------------------------------------------------------------------

    @endpoint
    def create_comparison(
        self,
        baseline_job_id: Id,
        candidate_job_id: Id,
        *,
        judges: Sequence[Mapping[str, Any]] | None = None,
        allow_mismatch: bool = False,
        label: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Call[SubmittedComparison]:
        """Judge two of your jobs' samples of the prompts both completed (POST /v1/comparisons);
        each of `judges` is a role (`endpoint`, `model`, `temperature`, `instructions`; default:
        one judge of the server's default model). Jobs that differ in their policy set or
        grader are refused (`comparison_mismatch`) unless `allow_mismatch`."""
        body: dict[str, Any] = {
            "baseline_job_id": str(baseline_job_id),
            "candidate_job_id": str(candidate_job_id),
        }
        if judges is not None:
            body["judges"] = [dict(judge) for judge in judges]
        if allow_mismatch:
            body["allow_mismatch"] = True
        if callback_url is not None:
            body["callback_url"] = callback_url
        return _submission(
            _path("comparisons"),
            SubmittedComparison,
            idempotency_key,
            json={**body, **_labels(label, metadata)},
        )

    @endpoint
    def get_comparison(self, comparison_id: Id) -> Call[Comparison]:
        """Progress, metric means of both jobs and the candidate's lead, each judge's wins, ties
        and losses, and the judges' agreement, with 95 % intervals (GET /v1/comparisons/{id})."""
        return Call("GET", _path("comparisons", comparison_id), _as(Comparison))

    @endpoint
    def get_comparison_report(self, comparison_id: Id, *, format: str = "markdown") -> Call[str]:
        """The comparison as a report: `markdown` (it links the plots as scores.png and
        gaps.png) or `csv` (GET /v1/comparisons/{id}/report)."""
        params = _params(format=format)
        return Call("GET", _path("comparisons", comparison_id, "report"), _text, params)

    @endpoint
    def get_comparison_plot(self, comparison_id: Id, plot: str) -> Call[bytes]:
        """A plot as PNG bytes: `scores` or `gaps` (GET /v1/comparisons/{id}/plots/{plot}.png)."""
        return Call("GET", _path("comparisons", comparison_id, "plots", f"{plot}.png"), _bytes)

    @endpoint
    def list_comparisons(
        self,
        *,
        status: str | Sequence[str] | None = None,
        created_after: datetime | str | None = None,
        created_before: datetime | str | None = None,
        label: str | None = None,
        metadata: Mapping[str, Any] | str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Call[Page[ComparisonListed]]:
        """One page of your comparisons, newest first, filtered as `list_jobs`."""
        filters = _job_filters(status, created_after, created_before, label, metadata)
        params = _params(**filters, cursor=cursor, limit=limit)
        return Call("GET", _path("comparisons"), _as(Page[ComparisonListed]), params)

    iter_comparisons = paged(list_comparisons)

    # --- sample evaluations -------------------------------------------------------------------

    @endpoint
    def evaluate_samples(
        self,
        /,
        samples: Sequence[Mapping[str, Any]],
        **options: Any,
    ) -> Call[SubmittedSampleEvaluation]:
        """Grade, guard and/or judge samples written elsewhere (POST /v1/sample-evaluations);
        each sample an object read as a JSONL row. `options` as `upload_samples`'."""
        body = {"samples": [dict(s) for s in samples], **_evaluation_options(**options)}
        key = options.get("idempotency_key")
        return _submission(_path("sample-evaluations"), SubmittedSampleEvaluation, key, json=body)

    @endpoint
    def upload_samples(
        self,
        /,
        file: Path | str,
        *,
        file_type: str | None = None,
        **options: Any,
    ) -> Call[SubmittedSampleEvaluation]:
        """Evaluate the samples of a JSONL, CSV or Parquet file (POST
        /v1/sample-evaluations/upload; the type from its suffix unless given). Options:
        `format` (generic, cot, safety, over_refusal, jailbreak), `columns` ({field: column}),
        `grade`, `guard` (roles: {} for the defaults), `judge_against` (a job id) and `judge`
        (its role), `policy_set`, `policy_version`, `prompt_set`, `prompt_set_version` (the
        templates that word the grader's, guard's and judge's requests), `label`, `metadata`,
        `callback_url`, `idempotency_key`."""
        path = Path(file)
        kind = file_type or path.suffix.lstrip(".").lower()
        params = _params(file_type=kind, options=json.dumps(_evaluation_options(**options)))
        key, content = options.get("idempotency_key"), path.read_bytes()
        upload = _path("sample-evaluations", "upload")
        return _submission(upload, SubmittedSampleEvaluation, key, params=params, content=content)

    @endpoint
    def get_sample_evaluation(self, job_id: Id) -> Call[SampleEvaluation]:
        """Progress and the report: means with intervals, guard and judge rates."""
        return Call("GET", _path("sample-evaluations", job_id), _as(SampleEvaluation))

    @endpoint
    def list_sample_results(
        self, job_id: Id, *, cursor: str | None = None, limit: int = 100
    ) -> Call[Page[SampleResult]]:
        """One page of the samples, each with its scores, guard verdict and judgement."""
        params = _params(cursor=cursor, limit=limit)
        return Call("GET", _path("sample-evaluations", job_id, "samples"), _as(Page[SampleResult]), params)

    iter_sample_results = paged(list_sample_results)

    @endpoint
    def get_sample_result(self, job_id: Id, item_id: Id) -> Call[SampleResult]:
        return Call("GET", _path("sample-evaluations", job_id, "samples", item_id), _as(SampleResult))

    # --- model evaluations ------------------------------------------------------------------

    @endpoint
    def evaluate_model(
        self,
        benchmarks: Sequence[Mapping[str, Any]],
        targets: Sequence[Mapping[str, Any]],
        *,
        safety_judge: Mapping[str, Any] | None = None,
        refusal_judge: Mapping[str, Any] | None = None,
        policy_set: str = "aidsafe-default",
        policy_version: str | None = None,
        prompt_set: str | None = None,
        prompt_set_version: str | None = None,
        max_tokens: int | None = None,
        label: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Call[SubmittedModelEvaluation]:
        """Ask each target every benchmark prompt and judge each answer for safety and refusal
        (POST /v1/model-evaluations). A benchmark is `{"name", "prompts": [{"prompt",
        "expected", "category"}]}` or `benchmark_file(path)`; a target is `{"name",
        "endpoint", "model", "temperature", "system_prompt"}` (all optional); the safety judge
        a role with a `style`, the refusal judge a role; `prompt_set` words the judges'
        requests (default: the built-in set)."""
        body: dict[str, Any] = {
            "benchmarks": [dict(b) for b in benchmarks],
            "targets": [dict(t) for t in targets],
            "policy_set": {"name": policy_set, "version": policy_version},
        }
        optional = {
            "safety_judge": None if safety_judge is None else dict(safety_judge),
            "refusal_judge": None if refusal_judge is None else dict(refusal_judge),
            "prompt_set": _prompt_set_ref(prompt_set, prompt_set_version),
            "max_tokens": max_tokens,
            "callback_url": callback_url,
        }
        body.update({name: value for name, value in optional.items() if value is not None})
        return _submission(
            _path("model-evaluations"),
            SubmittedModelEvaluation,
            idempotency_key,
            json={**body, **_labels(label, metadata)},
        )

    @endpoint
    def get_model_evaluation(self, evaluation_id: Id) -> Call[ModelEvaluation]:
        """Progress and the report: the targets side by side, per benchmark, category and
        metric, with Wilson 95 % intervals (GET /v1/model-evaluations/{id})."""
        return Call("GET", _path("model-evaluations", evaluation_id), _as(ModelEvaluation))

    # --- policy sets ------------------------------------------------------------------------

    @endpoint
    def list_policy_sets(self) -> Call[list[PolicySet]]:
        """Built-in sets and yours, every version (GET /v1/policy-sets)."""
        return Call("GET", _path("policy-sets"), _list_of(PolicySet))

    @endpoint
    def get_policy_set(self, policy_set_id: Id) -> Call[PolicySetDetail]:
        """One version with its policies (GET /v1/policy-sets/{id})."""
        return Call("GET", _path("policy-sets", policy_set_id), _as(PolicySetDetail))

    @endpoint
    def register_policy_set(self, document: Mapping[str, Any]) -> Call[RegisteredPolicySet]:
        """Register a version from `{"name", "description", "policies"}` (the layout of
        policies/default.yaml). The same content again is the same version, with `created`
        False (POST /v1/policy-sets)."""
        return _registration(_path("policy-sets"), RegisteredPolicySet, document)

    # --- prompt sets -------------------------------------------------------------------------

    @endpoint
    def list_prompt_sets(self) -> Call[list[PromptSet]]:
        """The built-in set and yours, every version (GET /v1/prompt-sets)."""
        return Call("GET", _path("prompt-sets"), _list_of(PromptSet))

    @endpoint
    def get_prompt_set(self, prompt_set_id: Id) -> Call[PromptSetDetail]:
        """One version with its templates (GET /v1/prompt-sets/{id})."""
        return Call("GET", _path("prompt-sets", prompt_set_id), _as(PromptSetDetail))

    @endpoint
    def register_prompt_set(self, document: Mapping[str, Any]) -> Call[RegisteredPromptSet]:
        """Register a version from `{"name", "description", "templates"}`: every template the
        stages use, by name (the built-in set's, from `get_prompt_set`, are a start), or with
        `"base": {"name", "version"}` only those that differ from that set. The same templates
        again are the same version, with `created` False (POST /v1/prompt-sets)."""
        return _registration(_path("prompt-sets"), RegisteredPromptSet, document)

    # --- presets ----------------------------------------------------------------------------

    @endpoint
    def list_presets(self) -> Call[list[Preset]]:
        """The server's named job configs, with their versions (GET /v1/presets)."""
        return Call("GET", _path("presets"), _list_of(Preset))

    @endpoint
    def get_preset(self, name: str) -> Call[Preset]:
        """One preset: its notes and the config fields it sets (GET /v1/presets/{preset_name})."""
        return Call("GET", _path("presets", name), _as(Preset))

    # --- webhooks ---------------------------------------------------------------------------

    @endpoint
    def create_webhook(self, name: str, *, idempotency_key: str | None = None) -> Call[WebhookCreated]:
        """A Label Studio webhook of yours; its `secret` is shown only here (POST /v1/webhooks).
        Retried on 429/503 under an Idempotency-Key (`idempotency_key`, or one of the call's
        own), so it makes one webhook at most. The API shows a secret once: `secret` is None
        when the answer that showed it was lost (a retry answered the webhook made) or
        `replayed` (your `idempotency_key` named a webhook of an earlier call); revoke that
        webhook and create another if you do not have its secret."""
        return _submission(_path("webhooks"), WebhookCreated, idempotency_key, json={"name": name})

    @endpoint
    def list_webhooks(self, *, cursor: str | None = None, limit: int = 100) -> Call[Page[Webhook]]:
        """One page of your webhooks, revoked ones included, oldest first (GET /v1/webhooks)."""
        params = _params(cursor=cursor, limit=limit)
        return Call("GET", _path("webhooks"), _as(Page[Webhook]), params)

    iter_webhooks = paged(list_webhooks)

    @endpoint
    def revoke_webhook(self, webhook_id: Id) -> Call[Webhook]:
        """Refuse its deliveries from now on (POST /v1/webhooks/{id}/revoke)."""
        return Call("POST", _path("webhooks", webhook_id, "revoke"), _as(Webhook), idempotent=True)

    @endpoint
    def delete_webhook(self, webhook_id: Id) -> Call[None]:
        """Delete a revoked webhook and the deliveries it refused (DELETE /v1/webhooks/{id});
        409 `webhook_not_revoked` unless it was revoked."""
        return Call("DELETE", _path("webhooks", webhook_id), lambda _: None)

    @endpoint
    def webhook_rejections(
        self, webhook_id: Id, *, limit: int = 100, before_id: int | None = None
    ) -> Call[list[Rejection]]:
        """Deliveries the webhook refused, newest first (GET /v1/webhooks/{id}/rejections); a
        page may stop short of `limit` for the size of the bodies: the next one starts
        `before_id` its last `id`."""
        params = _params(limit=limit, before_id=before_id)
        return Call("GET", _path("webhooks", webhook_id, "rejections"), _list_of(Rejection), params)

    # --- reviews ----------------------------------------------------------------------------

    @endpoint
    def get_item_reviews(
        self, item_id: Id, *, cursor: str | None = None, limit: int = 100
    ) -> Call[ItemReviews]:
        """One page of the item's reviews as they count now, oldest first, and its decision
        (GET /v1/items/{id}/reviews)."""
        params = _params(cursor=cursor, limit=limit)
        return Call("GET", _path("items", item_id, "reviews"), _as(ItemReviews), params)

    iter_item_reviews = paged(get_item_reviews, lambda page: page.reviews)

    @endpoint
    def get_review_summary(self, job_id: Id) -> Call[ReviewSummary]:
        """Counts and agreement of the job's reviews (GET /v1/jobs/{id}/reviews/summary)."""
        return Call("GET", _path("jobs", job_id, "reviews", "summary"), _as(ReviewSummary))

    # --- exports --------------------------------------------------------------------------

    @endpoint
    def export(
        self,
        job_id: Id,
        path: str | os.PathLike[str],
        *,
        format: str,
        cot: str | None = None,
        system: str | None = None,
        accepted_only: bool = False,
        min_score: Mapping[str, float] | Sequence[str] | None = None,
        human_approved: bool = False,
        exclude_human_rejected: bool = False,
        human_edits: bool = False,
        min_gap: float | None = None,
    ) -> Call[Path]:
        """Stream the job's export (GET /v1/jobs/{id}/export) to `path`, chunk by chunk: it is
        written as `path.part` and renamed when complete, so a broken download leaves no
        file that looks whole (a `path` that is no regular file, /dev/null or a named pipe, or a
        symlink, is written into as it is). `format`: trl_sft, trl_dpo, aidsafe_csv, jsonl, parquet,
        label_studio or argilla; `min_score` as {"relevance": 4}; `human_edits`: reviewers'
        latest edited responses in place of the model's; `min_gap` keeps trl_dpo's pairs at that
        policy-faithfulness gap (default: the job's `pairs.min_gap`). Returns the path."""
        scores = [f"{m}:{s}" for m, s in min_score.items()] if isinstance(min_score, Mapping) else min_score
        params = _params(
            format=format,
            cot=cot,
            system=system,
            accepted_only=accepted_only or None,  # filters left off are not sent
            min_score=list(scores or []),
            human_approved=human_approved or None,
            exclude_human_rejected=exclude_human_rejected or None,
            human_edits=human_edits or None,
            min_gap=min_gap,
        )
        target = Path(path)
        return Call("GET", _path("jobs", job_id, "export"), lambda _: target, params, into=target)


class Client(_BaseClient[httpx.BaseTransport]):
    """The AIDSAFE API over HTTP. `base_url` and `api_key` default to the environment's
    AIDSAFE_API_URL (else http://127.0.0.1:8000) and AIDSAFE_API_KEY. Refusals raise
    AidsafeError with the API's code; a 429 or 503 is retried (after its Retry-After) up to
    `max_retries` times, for calls that are safe to repeat only. Use it as a context manager,
    or `close()` it."""

    _http: httpx.Client

    def _connect(self, **options: Any) -> httpx.Client:
        return httpx.Client(**options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @contextmanager
    def _opened(self, call: Call[Any]) -> Iterator[httpx.Response]:
        """The call's answer, streamed, after the retries it may have; raises what the
        transport raises (httpx errors)."""
        for attempt in count():
            with self._http.stream(**call.request()) as response:
                if (pause := self._retry_pause(call, response, attempt)) is None:
                    yield response
                    return
            time.sleep(pause)

    def _send(self, call: Call[T]) -> T:
        with _reached(), self._opened(call) as response:
            if call.into is not None and call.accepts(response):
                with _downloading(call.into) as file:
                    for chunk in response.iter_bytes():
                        file.write(chunk)
            else:
                response.read()
        return _answer(call, response)

    def _rows(self, page: PageCall[L], rows: Callable[[L], Sequence[T]], cursor: str | None) -> Iterator[T]:
        while True:
            got = self._send(page(cursor))
            yield from rows(got)
            if not (cursor := got.next_cursor):
                return

    def events(self, job_id: Id, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events until `done` (GET /v1/jobs/{id}/events), from `last_event_id` on
        (None: from now, starting with a snapshot). A dropped connection is resumed with the
        last event's id. EventStreamUnavailable when the stream cannot be read here (also when
        the API key has too many streams open: 429 too_many_streams, not retried). An API
        that stops answering (it restarts) is tried again for up to 30 s, then given up:
        AidsafeError `connection_failed`, saying what was tried."""
        return self._events(_Following(job_id, last_event_id))

    def _events(self, following: _Following) -> Iterator[Event]:
        while True:
            with following.connection() as call, self._opened(call) as response:
                if not following.streams(response):
                    response.read()
                    raise following.refusal(response)
                for sse in EventSource(response).iter_sse():
                    if event := following.event(sse):
                        yield event
                    if following.done:
                        return
            time.sleep(following.dropped())

    def wait(
        self,
        job_id: Id,
        *,
        poll_s: float = 2.0,
        on_event: Callable[[Event], None] | None = None,
        on_polling: Callable[[EventStreamUnavailable], None] | None = None,
    ) -> JobProgress:
        """Block until the job ends, or waits for a spent budget to be raised
        (`waiting_for_budget`); its progress then. Follows the events (each goes to
        `on_event`), or, when the stream is unavailable (told to `on_polling`), polls the
        job every `poll_s` seconds (each reading goes to `on_event` as a snapshot). Either way
        an API that stops answering (it restarts) is waited for up to 30 s (see `events`)."""
        waiting, following = _Waiting(on_event, on_polling), _Following(job_id, None)
        try:
            for event in self._events(following):
                if (progress := waiting.seen(event)) is not None:
                    return progress
        except EventStreamUnavailable as exc:
            waiting.polling(exc)
        while True:
            with following.poll() as call, self._opened(call) as response:
                response.read()
                if (job := waiting.polled(following.polled(response, call))) is not None:
                    return job
            time.sleep(following.polling_pause(poll_s))


class AsyncClient(_BaseClient[httpx.AsyncBaseTransport]):
    """`Client`'s async twin: the same methods, awaited (`iter_*` and `events` are async
    iterators). Use it as an async context manager, or `await aclose()`."""

    _http: httpx.AsyncClient

    def _connect(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(**options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @asynccontextmanager
    async def _opened(self, call: Call[Any]) -> AsyncIterator[httpx.Response]:
        for attempt in count():
            async with self._http.stream(**call.request()) as response:
                if (pause := self._retry_pause(call, response, attempt)) is None:
                    yield response
                    return
            await asyncio.sleep(pause)

    async def _send(self, call: Call[T]) -> T:
        with _reached():
            async with self._opened(call) as response:
                if call.into is not None and call.accepts(response):
                    with _downloading(call.into) as file:
                        async for chunk in response.aiter_bytes():
                            file.write(chunk)
                else:
                    await response.aread()
        return _answer(call, response)

    async def _rows(
        self, page: PageCall[L], rows: Callable[[L], Sequence[T]], cursor: str | None
    ) -> AsyncIterator[T]:
        while True:
            got = await self._send(page(cursor))
            for row in rows(got):
                yield row
            if not (cursor := got.next_cursor):
                return

    async def events(self, job_id: Id, *, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """See Client.events."""
        async for event in self._events(_Following(job_id, last_event_id)):
            yield event

    async def _events(self, following: _Following) -> AsyncIterator[Event]:
        while True:
            with following.connection() as call:
                async with self._opened(call) as response:
                    if not following.streams(response):
                        await response.aread()
                        raise following.refusal(response)
                    async for sse in EventSource(response).aiter_sse():
                        if event := following.event(sse):
                            yield event
                        if following.done:
                            return
            await asyncio.sleep(following.dropped())

    async def wait(
        self,
        job_id: Id,
        *,
        poll_s: float = 2.0,
        on_event: Callable[[Event], None] | None = None,
        on_polling: Callable[[EventStreamUnavailable], None] | None = None,
    ) -> JobProgress:
        """See Client.wait."""
        waiting, following = _Waiting(on_event, on_polling), _Following(job_id, None)
        try:
            async for event in self._events(following):
                if (progress := waiting.seen(event)) is not None:
                    return progress
        except EventStreamUnavailable as exc:
            waiting.polling(exc)
        while True:
            with following.poll() as call:
                async with self._opened(call) as response:
                    await response.aread()
                    if (job := waiting.polled(following.polled(response, call))) is not None:
                        return job
            await asyncio.sleep(following.polling_pause(poll_s))


@contextmanager
def _reached() -> Iterator[None]:
    """No answer at all (refused, reset, timed out) is an AidsafeError too."""
    try:
        yield
    except httpx.TransportError as exc:
        raise AidsafeError("connection_failed", str(exc) or type(exc).__name__) from exc
