"""Request bodies sent compressed: nothing here decodes a Content-Encoding (nor the server a
Transfer-Encoding but chunked), so such a body is refused before it is read, with a message
that says why, on every route that reads one."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx

from app.config import Settings
from app.labeling.deliveries import SECRET_HEADER
from app.store import keys
from app.store.db import Sessions
from bench.export import insert_finished_job
from tests.conftest import served
from tests.test_api import error_of
from tests.test_hostile_input import BODY_ROUTES, whole_answer

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
        "/v1/jobs", content=body, headers={**auth, **JSON, "Content-Encoding": "identity, br"}
    )
    identity = await api.post(
        "/v1/jobs", content=body, headers={**auth, **JSON, "Content-Encoding": "identity"}
    )

    transferred = await api.post(
        "/v1/jobs", content=body, headers={**auth, **JSON, "Transfer-Encoding": "gzip, chunked"}
    )

    assert "Content-Encoding: gzip" in error_of(gzipped, 400, "bad_request")["message"]
    assert "Transfer-Encoding: gzip" in error_of(transferred, 400, "bad_request")["message"]
    assert "Content-Encoding: br" in error_of(stacked, 400, "bad_request")["message"]
    assert identity.status_code == 202, identity.text


async def test_a_compressed_body_is_refused_unread_on_every_route_that_reads_one(
    settings: Settings, sessions: Sessions
) -> None:
    """Only the body's first byte comes, and the rest never does: the 400 must not wait for it
    (it waited for the whole body, up to the 32 MiB cap, or for AIDSAFE_BODY_STALL_S)."""
    async with sessions.begin() as session:
        key, secret = await keys.create_key(session, "gzip-sender")
        job_id = await insert_finished_job(session, key.id, 1)
    auth = {"Authorization": f"Bearer {secret}"}
    # The upload's options are checked before its body is read: it asks for a grade here.
    asked = "file_type=jsonl&options=%7B%22grade%22%3A%7B%7D%7D"
    routes = [(method, path.replace("file_type=jsonl", asked), key) for method, path, key in BODY_ROUTES]
    answers = {}
    with served(settings) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            webhook = (await client.post("/v1/webhooks", json={"name": "gzip"}, headers=auth)).json()
        host, port = url.removeprefix("http://").split(":")
        for method, path, with_key in routes:
            headers = {**(auth if with_key else {}), SECRET_HEADER: webhook["secret"]}
            reader, writer = await asyncio.open_connection(host, int(port))
            head = f"{method} {path.format(job=job_id, webhook=webhook['id'])} HTTP/1.1\r\nHost: api\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            head += "Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 1000\r\n\r\n"
            writer.write(head.encode() + gzip.compress(b"[")[:1])
            await writer.drain()
            try:
                answers[path] = await asyncio.wait_for(whole_answer(reader), 5)
            finally:
                writer.close()

    for path, answer in answers.items():
        assert answer.startswith(b"HTTP/1.1 400"), (path, answer)
        assert b"Content-Encoding: gzip" in answer, (path, answer)
