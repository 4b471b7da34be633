"""A request's head (URL and headers) is capped as it is read: uvicorn's httptools protocol
gathered any length of either in memory, so one client could grow the API without bound.
Requests go over a raw socket to the real app served as `aidsafe-api` serves it (live_api)."""

from __future__ import annotations

import asyncio

import httpx

from app.config import Settings
from tests.test_api import error_of

CLOSE = b"connection: close\r\n"


async def exchange(base_url: str, *parts: bytes, pause_s: float = 0) -> httpx.Response:
    """Sends the parts (`pause_s` apart) on a new connection and reads the answer until the
    server closes the connection."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause_s)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


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
    over_the_limit = settings.max_header_bytes + 1
    pieces = [b"e" * 4096] * (over_the_limit // 4096) + [b"e" * (over_the_limit % 4096)]

    await refused(live_api, 431, "headers_too_large", start, *pieces, pause_s=0.2)


async def test_a_request_that_is_not_http_is_a_json_400(live_api: str) -> None:
    message = await refused(live_api, 400, "bad_request", b"HELLO THERE\r\n\r\n")

    assert message == "the request is not valid HTTP"
