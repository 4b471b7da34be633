"""Caps on a request's head (its URL and headers), in the HTTP protocol itself: uvicorn's
httptools protocol gathers both without limit, so one client could grow the API's memory, and
hold its event loop copying what it gathered, for as long as it kept sending. Past a cap the
API answers 414 or 431 in the one JSON error shape and closes the connection, the rest unparsed.

uvicorn also waits for a head without end (its keep-alive timer only covers a connection idle
between requests, until its first byte), so a client could hold a connection, with its socket
and protocol, by sending nothing or a byte now and then: a head not complete in time is a 408."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app.api.errors import error_response


@dataclass(frozen=True)
class HeadLimits:
    url_bytes: int
    header_bytes: int  # header names and values, all together
    header_fields: int
    timeout_s: float  # from the connection's start, or the end of its previous response


class Refusal(NamedTuple):
    status: int
    code: str
    message: str


NOT_HTTP = Refusal(400, "bad_request", "the request is not valid HTTP")
# How long a refused connection is read (and dropped) after its answer, for a client still
# sending: closed with bytes unread, it is reset, and a client that had not read the answer
# yet loses it. nginx's lingering close waits as long for more of the client's bytes.
LINGER_S = 5.0


@dataclass
class _Head:
    """What has been read of the head of the request being parsed, and of its trailers:
    headers sent after a chunked body, capped with the head's."""

    header_bytes: int = 0  # of the headers httptools handed over
    header_fields: int = 0
    complete: bool = False  # the head is: an answer to this request may be under way
    ended: bool = False  # the request is, trailers and all
    # httptools holds a header (or trailer) until it ends: it holds at least the reads that
    # came since it last handed anything over (a piece of the URL or body, a header, the
    # message's end), if the request spanned them whole.
    unfinished_bytes: int = 0
    handed_over: bool = False  # in the read being parsed


class _Stopped(Exception):
    """Raised in a parser callback to stop the parser; send_400_response answers instead."""


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a request's head capped and its refusals (and
    uvicorn's own 400 for what is not HTTP) in the one JSON error shape."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HeadLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._head: _Head | None = None  # None until a request begins
        self._refusal: Refusal | None = None
        self._head_timer: asyncio.TimerHandle | None = None  # runs while a head is awaited
        self._close_after_answer = False  # what came after the answer under way was refused
        self._linger_timer: asyncio.TimerHandle | None = None  # runs while a refused one lingers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._close_after_answer:
            # Read and dropped, not left unread: a close with bytes unread resets the connection
            # (which may cut the answer short), and a client hanging up is only seen by reading.
            return
        before = self._head
        super().data_received(data)
        head = self._head
        if head is None or self._close_after_answer or self.transport.is_closing():
            return  # refused in this read (answered or closing): nothing more to count
        handed_over, head.handed_over = head.handed_over, False
        if head is not before or handed_over:
            return  # not all unfinished header: a request began in it, or parts were handed over
        head.unfinished_bytes += len(data)
        if head.header_bytes + head.unfinished_bytes > self.limits.header_bytes:
            self._answer(self._too_many_header_bytes())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = _Head()

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.limits.url_bytes:
            self._stop(
                Refusal(414, "url_too_long", f"the URL is over the limit of {self.limits.url_bytes} bytes")
            )
        super().on_url(url)
        self._handed_over()

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._handed_over()
        head.header_bytes += len(name) + len(value)
        head.header_fields += 1
        if head.header_bytes > self.limits.header_bytes:
            self._stop(self._too_many_header_bytes())
        if head.header_fields > self.limits.header_fields:
            self._stop(
                Refusal(
                    431, "headers_too_large", f"the request has more than {self.limits.header_fields} headers"
                )
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        assert self._head is not None
        self._head.complete = True
        self._stop_head_timer()  # a slow body is the body limits' business
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._handed_over()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._handed_over().ended = True

    def on_response_complete(self) -> None:
        if self._close_after_answer:  # the answer under way is out: the connection closes
            self.pipeline.clear()  # dropped unanswered, as the close always dropped them
            self._linger()
        super().on_response_complete()
        # uvicorn armed its keep-alive timer: the connection awaits its next request. That timer
        # ends with the request's first byte; this one bounds the whole head.
        if self.timeout_keep_alive_task is not None and not self._close_after_answer:
            self._await_head()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer when the parser stops: on what is not HTTP, or on a refusal above."""
        self._answer(self._refusal or NOT_HTTP)

    def _await_head(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():  # not refused already, nor shut down
            self._answer(
                Refusal(
                    408,
                    "request_timeout",
                    f"the request's head did not arrive within {self.limits.timeout_s:g} s",
                )
            )

    def _handed_over(self) -> _Head:
        head = self._head
        assert head is not None, "httptools hands over a URL or header only within a request"
        head.unfinished_bytes = 0
        head.handed_over = True
        return head

    def _too_many_header_bytes(self) -> Refusal:
        return Refusal(
            431, "headers_too_large", f"the headers are over the limit of {self.limits.header_bytes} bytes"
        )

    def _stop(self, refusal: Refusal) -> NoReturn:
        self._refusal = refusal
        raise _Stopped(refusal.message)

    def _answer(self, refusal: Refusal) -> None:
        """Answers the request with the refusal and closes the connection, the rest of the
        request read and dropped for LINGER_S at most (a lingering close). Where an
        answer is under way (to this request, refused in its trailers; or to the one before
        it on the connection), that answer goes out whole and the connection is then closed,
        the refusal unsent: the client would take it for part of that answer, or for that
        answer. Closed at once, a request already carried out (a job made) lost its answer."""
        if refusal is not NOT_HTTP:  # uvicorn logged that one
            self.logger.warning("Refused a request: %s.", refusal.message)
        cycle, head = self.cycle, self._head
        if head is not None and head.complete and not head.ended:  # refused in its trailers
            under_way = cycle.response_started
        else:
            under_way = cycle is not None and not cycle.response_complete
        # A pipelined request's cycle waits behind the answer under way to the one before.
        if under_way or self.pipeline:
            if cycle is not None and cycle.response_complete:  # sent already, its body unread
                self.transport.close()
            else:
                self._close_after_answer = True  # what comes next is dropped unparsed (data_received)
            return
        response = error_response(refusal.status, refusal.code, refusal.message)
        lines = [*self.server_state.default_headers, *response.raw_headers, (b"connection", b"close")]
        response_head = [
            STATUS_LINE[refusal.status],
            *(name + b": " + value + b"\r\n" for name, value in lines),
            b"\r\n",
        ]
        self.transport.write(b"".join(response_head) + response.body)
        self._close_after_answer = True  # what still comes is dropped unparsed (data_received)
        self._linger()

    def _linger(self) -> None:
        """Close lingering: the answer sent, end sending and read (and drop) what still comes
        until the client closes, for LINGER_S at most."""
        self._stop_head_timer()
        self.flow.resume_reading()
        if self.transport.can_write_eof():  # TLS cannot half-close: there the client or the timer ends it
            self.transport.write_eof()  # the answer, then the end: a client reads it whole, then closes
        # Its close ends the connection (eof_received); one that never closes is cut off.
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
