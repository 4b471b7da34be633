"""Request bodies sent compressed: nothing here decodes a Content-Encoding (nor the server a
Transfer-Encoding but chunked), so such a body is refused before it is read, with a message
that says why, on every route that reads one."""

from __future__ import annotations

import gzip
import json

import httpx

from app.config import Settings
from app.store.db import Sessions
from tests.test_api import error_of
from tests.test_hostile_input import answers_to_a_body_begun

Headers = dict[str, str]
JSON = {"Content-Type": "application/json"}


async def test_a_gzipped_body_is_a_bad_request_that_names_its_content_encoding(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """It was read as it came and refused as "not UTF-8 JSON text: 'utf-8' codec can't decode
    byte 0x8b", which tells a client nothing of what to change (a server passes a transfer
    coding but chunked on undecoded too)."""
    body = json.dumps({"prompts": ["How do I store rice?"]}).encode()

    gzipped = await api.post(
        "/v1/jobs", content=gzip.compress(body), headers={**auth, **JSON, "Content-Encoding": "gzip"}
    )
    stacked = await api.post(
        "/v1/jobs", content=body, headers={**auth, **JSON, "Content-Encoding": "identity, br, deflate"}
    )
    identity = await api.post(
        "/v1/jobs", content=body, headers={**auth, **JSON, "Content-Encoding": "identity"}
    )

    transferred = await api.post(
        "/v1/jobs", content=body, headers={**auth, **JSON, "Transfer-Encoding": "gzip, chunked"}
    )

    assert "Content-Encoding: gzip" in error_of(gzipped, 400, "bad_request")["message"]
    assert "Transfer-Encoding: gzip" in error_of(transferred, 400, "bad_request")["message"]
    assert "Content-Encoding: br, deflate;" in error_of(stacked, 400, "bad_request")["message"]
    assert identity.status_code == 202, identity.text


async def test_a_compressed_body_is_refused_unread_on_every_route_that_reads_one(
    settings: Settings, sessions: Sessions
) -> None:
    """Only the body's first byte comes, and the rest never does: the 400 must not wait for it
    (it waited for the whole body, up to the 32 MiB cap, or for AIDSAFE_BODY_STALL_S)."""
    answers = await answers_to_a_body_begun(
        settings, sessions, "Content-Encoding: gzip\r\n", gzip.compress(b"[")[:1], 5
    )

    for path, answer in answers.items():
        assert answer.startswith(b"HTTP/1.1 400"), (path, answer)
        assert b"Content-Encoding: gzip" in answer, (path, answer)
