"""A request's head (URL and headers) is capped as it is read: uvicorn's httptools protocol
gathered any length of either in memory, so one client could grow the API without bound; and
it waited for a head for ever, so a client sending nothing, or a byte now and then, held its
connection. Requests go over a raw socket to the real app served as `aidsafe-api` serves it
(live_api, or impatient_api with a short head timeout)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from app.config import Settings
from app.store.db import Sessions
from tests.conftest import eventually, served, serving
from tests.test_api import error_of

CLOSE = b"connection: close\r\n"
HEAD_TIMEOUT_S = 1.0
TIMED_OUT = f"the request's head did not arrive within {HEAD_TIMEOUT_S:g} s"


@pytest.fixture
def impatient_api(settings: Settings, sessions: Sessions) -> Iterator[str]:
    """live_api, with a head timeout short enough to wait for."""
    with served(settings.model_copy(update={"head_timeout_s": HEAD_TIMEOUT_S})) as base_url:
        yield base_url


async def conversation(base_url: str, *parts: bytes, pause_s: float = 0) -> list[httpx.Response]:
    """Sends the parts (`pause_s` apart) on a new connection until the server closes it (a
    client sends no more once answered), and returns the responses it read until then."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause_s)

    sending = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        sending.cancel()
        writer.close()
    responses = []
    while answer:  # each response has a content-length
        head, _, answer = answer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
        length = int(dict(headers)["content-length"])
        responses.append(
            httpx.Response(int(status_line.split()[1]), headers=headers, content=answer[:length])
        )
        answer = answer[length:]
    return responses


async def exchange(base_url: str, *parts: bytes, pause_s: float = 0) -> httpx.Response:
    """conversation's one response."""
    [response] = await conversation(base_url, *parts, pause_s=pause_s)
    return response


def get(url: bytes, headers: bytes = b"host: api\r\n" + CLOSE) -> bytes:
    return b"GET " + url + b" HTTP/1.1\r\n" + headers + b"\r\n"


async def refused(base_url: str, status: int, code: str, *parts: bytes, pause_s: float = 0) -> str:
    """Asserts the request is refused in the one error shape on a closed connection, and that
    the API goes on answering; returns the refusal's message."""
    response = await exchange(base_url, *parts, pause_s=pause_s)
    error = error_of(response, status, code)
    assert response.headers["connection"] == "close"
    assert (await exchange(base_url, get(b"/healthz"))).status_code == 200
    return str(error["message"])


async def test_a_url_over_the_limit_is_a_414_before_the_request_ends(
    live_api: str, settings: Settings
) -> None:
    at_limit = b"/healthz?pad=" + b"a" * (settings.max_url_bytes - len(b"/healthz?pad="))
    assert (await exchange(live_api, get(at_limit))).status_code == 200

    # the request line is never finished: the answer does not wait for it
    message = await refused(live_api, 414, "url_too_long", b"GET " + at_limit + b"a")

    assert message == f"the URL is over the limit of {settings.max_url_bytes} bytes"


async def test_headers_over_the_byte_limit_are_a_431(live_api: str, settings: Settings) -> None:
    def with_filler(value_bytes: int) -> bytes:  # host, connection and x-filler
        return get(b"/healthz", b"host: api\r\n" + CLOSE + b"x-filler: " + b"f" * value_bytes + b"\r\n")

    filler = settings.max_header_bytes - len(b"hostapiconnectionclosex-filler")
    assert (await exchange(live_api, with_filler(filler))).status_code == 200

    message = await refused(live_api, 431, "headers_too_large", with_filler(filler + 1))

    assert message == f"the headers are over the limit of {settings.max_header_bytes} bytes"


async def test_more_header_fields_than_the_limit_are_a_431(live_api: str, settings: Settings) -> None:
    def with_fields(count: int) -> bytes:  # host, connection and x-<n>
        return get(
            b"/healthz", b"host: api\r\n" + CLOSE + b"".join(b"x-%d: v\r\n" % n for n in range(count - 2))
        )

    assert (await exchange(live_api, with_fields(settings.max_header_fields))).status_code == 200

    message = await refused(live_api, 431, "headers_too_large", with_fields(settings.max_header_fields + 1))

    assert message == f"the request has more than {settings.max_header_fields} headers"


async def test_trailers_count_against_the_header_limits(
    live_api: str, settings: Settings, auth: dict[str, str]
) -> None:
    """Headers may follow a chunked body (trailers): uvicorn added each to the request's
    headers, however many came."""
    key = "".join(f"{name}: {value}\r\n" for name, value in auth.items()).encode()

    def with_trailers(count: int) -> bytes:
        head = b"host: api\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n" + key + CLOSE
        trailers = b"".join(b"x-%d: v\r\n" % n for n in range(count))
        return b"POST /v1/jobs HTTP/1.1\r\n" + head + b"\r\n2\r\n{}\r\n0\r\n" + trailers + b"\r\n"

    error_of(await exchange(live_api, with_trailers(2)), 422, "validation_error")  # the body was read

    await refused(live_api, 431, "headers_too_large", with_trailers(settings.max_header_fields))


async def test_a_header_that_never_ends_is_a_431_once_it_is_over_the_limit(
    live_api: str, settings: Settings
) -> None:
    """httptools hands a header over only once it ends: until then it grew inside the parser,
    as long as the client kept sending. Here it comes in pieces and never ends; the client
    stops sending once it is past the limit (more would meet a closed connection)."""
    start = b"GET /healthz HTTP/1.1\r\nhost: api\r\nx-endless: "

    await refused(live_api, 431, "headers_too_large", start, *_past_the_limit(settings), pause_s=0.2)


async def test_a_trailer_that_never_ends_is_a_431_once_it_is_over_the_limit(
    live_api: str, settings: Settings, auth: dict[str, str]
) -> None:
    """The same after a chunked body: httptools holds a trailer as it holds a header."""
    key = "".join(f"{name}: {value}\r\n" for name, value in auth.items()).encode()
    head = b"host: api\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n" + key
    start = b"POST /v1/jobs HTTP/1.1\r\n" + head + b"\r\n2\r\n{}\r\n0\r\nx-endless: "

    await refused(live_api, 431, "headers_too_large", start, *_past_the_limit(settings), pause_s=0.2)


async def test_a_trailer_refused_after_its_answer_only_closes_the_connection(
    live_api: str, settings: Settings
) -> None:
    """/healthz answers without reading its body: a refusal written after that answer would
    read as the answer to a request the client never sent."""
    head = b"GET /healthz HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n"
    start = head + b"2\r\n{}\r\n0\r\nx-endless: "

    responses = await conversation(live_api, start, *_past_the_limit(settings), pause_s=0.2)

    assert [response.status_code for response in responses] == [200]


async def test_a_pipelined_requests_refusal_is_not_taken_for_the_answer_before_it(
    live_api: str, settings: Settings
) -> None:
    """A request and the next, whose trailers are refused, in one read: the first one's answer
    is not out yet, and a refusal written then is the first answer the client reads."""
    first = b"GET /healthz HTTP/1.1\r\nhost: api\r\n\r\n"
    trailers = b"".join(b"x-%d: v\r\n" % n for n in range(settings.max_header_fields + 1))
    second = b"POST /healthz HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"

    responses = await conversation(live_api, first + second + trailers + b"\r\n")

    assert [response.status_code for response in responses] == [200]  # the first's answer, whole


async def test_a_pipelined_requests_refused_head_is_not_taken_for_the_answer_before_it(
    live_api: str, settings: Settings
) -> None:
    """As above, the second request refused in its head: more header fields than the limit."""
    first = b"GET /healthz HTTP/1.1\r\nhost: api\r\n\r\n"
    fields = b"".join(b"x-%d: v\r\n" % n for n in range(settings.max_header_fields + 1))
    second = b"GET /healthz HTTP/1.1\r\nhost: api\r\n" + fields + b"\r\n"

    responses = await conversation(live_api, first + second)

    assert [response.status_code for response in responses] == [200]  # the first's answer, whole


@pytest.mark.parametrize("sent_after", [0, 2**20], ids=["nothing more", "a MiB more"])
async def test_a_request_carried_out_gets_its_answer_before_what_follows_it_is_refused(
    live_api: str, auth: dict[str, str], sent_after: int
) -> None:
    """A submission, then bytes that are no request (a client whose Content-Length fell short of
    its body): the connection was closed as soon as they came, and the job the submission made
    was never answered (retried, it was made twice). Now its answer goes out, then the close.
    What the client sends on is read and dropped: left unread, the close reset the connection
    and the client read no answer."""
    body = json.dumps({"prompts": ["How do tides work?"]}).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in auth.items())
    submission = (
        f"POST /v1/jobs HTTP/1.1\r\nhost: api\r\n{head}content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body

    more = [b"x" * 2**16] * (sent_after // 2**16)
    responses = await conversation(live_api, submission + b"garbage\r\n\r\n", *more, pause_s=0.01)

    assert [response.status_code for response in responses] == [202]
    async with httpx.AsyncClient(base_url=live_api, headers=auth) as client:
        listed = (await client.get("/v1/jobs")).json()["data"]
    assert [job["id"] for job in listed] == [responses[0].json()["id"]]


async def test_a_refusal_is_logged_once_with_its_reason(live_api: str, settings: Settings) -> None:
    """As a warning; uvicorn logs what is not HTTP itself. Here the read that passes the URL's
    cap is over the header limit too: once refused, what it held is not refused again."""
    logged: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        await refused(live_api, 400, "bad_request", b"HELLO THERE\r\n\r\n")
        await refused(
            live_api, 414, "url_too_long", b"GET /", b"a" * (settings.max_header_bytes + 1), pause_s=0.2
        )
    finally:
        logger.removeHandler(handler)

    assert [message for message in logged if message.startswith("Refused")] == [
        f"Refused a request: the URL is over the limit of {settings.max_url_bytes} bytes."
    ]


async def test_headers_of_exactly_the_limit_sent_in_pieces_are_read_and_the_connection_kept(
    live_api: str, settings: Settings
) -> None:
    """httptools holds an unfinished header until it ends: what it holds (the reads since it
    last handed anything over) counts from the header's first byte, and up to the limit, with
    the headers before it, is not refused. The read that ends it hands it over: it counts as a
    header's name and value then, not as what is held besides."""
    # A header is handed over once the next one begins: "host" and "api" here, 7 bytes.
    start = b"GET /healthz HTTP/1.1\r\nhost: api\r\nx"
    held = b"-e: " + b"e" * (settings.max_header_bytes - 7 - len(b"-e: "))  # then 3 + its value
    pieces = [held[at : at + 4096] for at in range(0, len(held), 4096)]

    responses = await conversation(live_api, start, *pieces, b"\r\n\r\n", get(b"/healthz"), pause_s=0.2)

    assert [response.status_code for response in responses] == [200, 200]


async def test_a_body_larger_than_the_header_limit_is_read_when_it_comes_apart_from_its_head(
    live_api: str, auth: dict[str, str], settings: Settings
) -> None:
    """A body's pieces are handed over as they come: none is held as an unfinished header."""
    body = b'{"prompts": ["a body in pieces"]' + b" " * 2 * settings.max_header_bytes + b"}"
    key = "".join(f"{name}: {value}\r\n" for name, value in auth.items()).encode()
    head = b"POST /v1/jobs HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\n" + key + CLOSE
    head += b"content-length: %d\r\n\r\n" % len(body)
    half = len(body) // 2

    response = await exchange(live_api, head, body[:half], body[half:], pause_s=0.2)

    assert response.status_code == 202, response.text


async def test_a_closed_connection_is_let_go(settings: Settings, sessions: Sessions) -> None:
    """Once closed, it is no longer among the server's connections (which a shutdown waits for),
    whether it was answered, timed out or refused."""
    impatient = settings.model_copy(update={"head_timeout_s": HEAD_TIMEOUT_S})
    with serving(impatient) as server:
        assert (await exchange(server.url, get(b"/healthz"))).status_code == 200
        error_of(await exchange(server.url), 408, "request_timeout")
        error_of(await exchange(server.url, get(b"/" + b"a" * settings.max_url_bytes)), 414, "url_too_long")

        connections = server.server.server_state.connections

        async def let_go() -> bool:
            return not connections

        await eventually(let_go, 10, "the closed connections to be let go")


def _past_the_limit(settings: Settings) -> list[bytes]:
    """A header's value one byte past the header limit, in reads of 4 KiB."""
    over_the_limit = settings.max_header_bytes + 1
    return [b"e" * 4096] * (over_the_limit // 4096) + [b"e" * (over_the_limit % 4096)]


async def test_a_request_that_is_not_http_is_a_json_400(live_api: str) -> None:
    message = await refused(live_api, 400, "bad_request", b"HELLO THERE\r\n\r\n")

    assert message == "the request is not valid HTTP"


async def test_a_connection_that_sends_nothing_is_a_408_after_the_head_timeout(impatient_api: str) -> None:
    message = await refused(impatient_api, 408, "request_timeout")

    assert message == TIMED_OUT


async def test_a_head_trickled_in_slower_than_the_timeout_is_a_408(impatient_api: str) -> None:
    """Each byte comes well within the timeout: the head as a whole does not."""
    head = get(b"/healthz")  # some 5 s at a byte every 0.1 s

    message = await refused(
        impatient_api, 408, "request_timeout", *(bytes([byte]) for byte in head), pause_s=0.1
    )

    assert message == TIMED_OUT


async def test_a_body_slower_than_the_head_timeout_is_read(impatient_api: str, auth: dict[str, str]) -> None:
    """The timer stops once the head is complete (bodies have their own limits), and starts
    again once the response is sent: this client then sends nothing more."""
    body = b'{"prompts": ["a slow one"]}'  # some 3 s at a byte every 0.1 s
    key = "".join(f"{name}: {value}\r\n" for name, value in auth.items()).encode()
    head = b"POST /v1/jobs HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\n" + key
    head += b"content-length: %d\r\n\r\n" % len(body)

    submitted, timed_out = await conversation(
        impatient_api, head, *(bytes([byte]) for byte in body), pause_s=0.1
    )

    assert submitted.status_code == 202, submitted.text
    assert error_of(timed_out, 408, "request_timeout")["message"] == TIMED_OUT


async def test_a_kept_alive_connection_has_the_timeout_for_each_head(impatient_api: str) -> None:
    """The timer runs from the connection's start, and again from the end of each response:
    uvicorn's keep-alive timer ends with a request's first byte, and the last head here
    never ends."""
    kept_alive = get(b"/healthz", b"host: api\r\n")
    pause_s = HEAD_TIMEOUT_S * 0.6  # each within the timeout; all, well over it

    *served_, timed_out = await conversation(
        impatient_api, b"", kept_alive, kept_alive, b"GET /healthz HTTP/1.1\r\n", pause_s=pause_s
    )

    assert [response.status_code for response in served_] == [200, 200]
    assert error_of(timed_out, 408, "request_timeout")["message"] == TIMED_OUT
    assert timed_out.headers["connection"] == "close"


async def test_a_refusal_reaches_a_client_still_sending(live_api: str, settings: Settings) -> None:
    """Refused past the limit while the client sends on, the answer went out and the connection
    was closed with the rest unread: the kernel then resets it, and a client that had not yet
    read the 431 lost it (a "connection reset" instead). The connection is closed lingering:
    the answer, then the end of sending, then what still comes read and dropped."""
    header = b"x-filler: " + b"f" * (64 * settings.max_header_bytes) + b"\r\n"

    message = await refused(live_api, 431, "headers_too_large", get(b"/healthz", b"host: api\r\n" + header))

    assert message == f"the headers are over the limit of {settings.max_header_bytes} bytes"
