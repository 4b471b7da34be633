"""The batch API client (app/llm/batch_api.py) against the scripted batch API on loopback:
the wire format of the input and output files, a batch's calls, the search for a batch whose
id was never stored, and what a provider's answer is taken for: refused (asking again will
not help), forbidden (the key's access) or unavailable (try again later)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from app.config import BatchConfig, EndpointConfig
from app.llm.batch_api import (
    TAG,
    TERMINAL,
    BatchAPI,
    BatchFault,
    BatchForbidden,
    BatchListIncomplete,
    BatchRefused,
    BatchUnavailable,
    OutputLine,
    input_file,
    output_lines,
)
from tests.scripted_llm import ScriptedLLM, http_error

EP = "provider"


def _endpoints(base_url: str) -> dict[str, EndpointConfig]:
    return {EP: EndpointConfig(base_url=base_url, api_key="sk-batch", batch=BatchConfig())}


@pytest.fixture
async def client(scripted_llm: ScriptedLLM) -> AsyncIterator[BatchAPI]:
    # The base URL as an operator may write it, with a trailing slash.
    api = BatchAPI(_endpoints(scripted_llm.base_url + "/"), timeout_s=5.0)
    yield api
    await api.aclose()


def _body(n: int) -> dict[str, Any]:
    return {
        "model": "scripted-model",
        "messages": [{"role": "user", "content": f"prompt {n}"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "seed_cot", "schema": {}}},
    }


async def _batch(client: BatchAPI, tag: str, *bodies: dict[str, Any]) -> dict[str, Any]:
    """A provider batch of these bodies (custom ids 0, 1, ...), created with `tag`."""
    content = input_file([(str(n), body) for n, body in enumerate(bodies or (_body(0),))])
    return await client.create(EP, await client.upload(EP, content, f"{tag}.jsonl"), tag)


async def _ended(client: BatchAPI, batch_id: str) -> dict[str, Any]:
    while (seen := await client.retrieve(EP, batch_id))["status"] not in TERMINAL:
        pass
    return seen


def test_an_input_file_is_one_chat_completion_request_a_line_named_by_its_custom_id() -> None:
    content = input_file([("1", _body(1)), ("22", _body(2))])

    assert content.endswith(b"}\n")
    assert [orjson.loads(line) for line in content.split(b"\n")[:-1]] == [
        {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": _body(1)},
        {"custom_id": "22", "method": "POST", "url": "/v1/chat/completions", "body": _body(2)},
    ]


def test_an_output_or_error_file_is_read_line_by_line_and_unreadable_lines_are_skipped() -> None:
    completion = {"object": "chat.completion", "choices": []}
    lines = [
        {"custom_id": "1", "response": {"status_code": 200, "body": completion}, "error": None},
        {"custom_id": 2, "response": {"status_code": 400, "body": {"error": {"code": "bad"}}}},
        {"custom_id": "3", "response": None, "error": {"code": "batch_expired", "message": "not executed"}},
        {"custom_id": "4", "error": {"code": None, "message": "the batch was cancelled"}},
        {"custom_id": "5", "response": {}, "error": {}},
        {"response": {"status_code": 200, "body": completion}},  # no custom_id: whose answer?
        ["6", {"status_code": 200}],
        {"custom_id": "7", "response": "200 OK"},
        {"custom_id": "8", "error": "expired"},
        {"custom_id": "9", "response": {"status_code": 500, "body": None}},
    ]
    content = b"\r\n".join(orjson.dumps(line) for line in lines) + b"\n\n{not json\n"

    assert output_lines(content) == [
        OutputLine("1", 200, completion, None),
        OutputLine("2", 400, {"error": {"code": "bad"}}, None),
        OutputLine("3", None, None, "batch_expired"),
        OutputLine("4", None, None, "the batch was cancelled"),
        OutputLine("5", None, None, None),
        OutputLine("9", 500, None, None),
    ]


async def test_a_batch_is_uploaded_created_with_its_tag_and_read_back_by_custom_id(
    client: BatchAPI, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", http_error(400))

    created = await _batch(client, "7", _body(0), _body(1), _body(2))
    ended = await _ended(client, created["id"])
    outputs = output_lines(await client.content(EP, ended["output_file_id"]))
    errors = output_lines(await client.content(EP, ended["error_file_id"]))

    uploaded = scripted_llm.batches.files[created["input_file_id"]]
    assert (uploaded.purpose, uploaded.filename) == ("batch", "7.jsonl")
    assert scripted_llm.batches.input_lines(created["id"]) == [
        {"custom_id": str(n), "method": "POST", "url": "/v1/chat/completions", "body": _body(n)}
        for n in range(3)
    ]
    assert (created["metadata"], created["completion_window"]) == ({TAG: "7"}, "24h")
    assert sorted((line.custom_id, line.status_code, line.error) for line in outputs) == [
        ("1", 200, None),
        ("2", 200, None),
    ]
    assert all(line.body["object"] == "chat.completion" for line in outputs)
    assert [(line.custom_id, line.status_code) for line in errors] == [("0", 400)]
    assert set(scripted_llm.batches.authorizations) == {"Bearer sk-batch"}


async def test_an_endpoint_without_a_key_sends_no_authorization(scripted_llm: ScriptedLLM) -> None:
    api = BatchAPI({EP: EndpointConfig(base_url=scripted_llm.base_url, batch=BatchConfig())}, timeout_s=5.0)
    try:
        await _batch(api, "keyless")
    finally:
        await api.aclose()

    assert scripted_llm.batches.authorizations == [None, None]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>" + b"x" * 300, "answered no JSON: b'<html>" + "x" * 194 + "'"),
        (b'["batch_1"]', "answered list"),
    ],
)
async def test_an_answer_that_is_no_json_object_is_unavailable(
    client: BatchAPI, scripted_llm: ScriptedLLM, body: bytes, message: str
) -> None:
    """A proxy's page where the batch should be: not the provider's word on it."""
    scripted_llm.batches.refuse("batch_1", 200, body=body)

    with pytest.raises(BatchUnavailable) as unavailable:
        await client.retrieve(EP, "batch_1")

    assert str(unavailable.value) == f"{EP}: GET /batches/batch_1 {message}"


async def test_a_batch_cancelled_is_cancelled_at_the_provider(
    client: BatchAPI, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.batches.hold = True
    created = await _batch(client, "8")

    cancelled = await client.cancel(EP, created["id"])

    assert (cancelled["id"], cancelled["status"]) == (created["id"], "cancelled")
    assert scripted_llm.batches.cancel_requests == [created["id"]]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BatchRefused),
        (404, BatchRefused),
        (422, BatchRefused),
        (499, BatchRefused),
        (401, BatchForbidden),
        (403, BatchForbidden),
        (408, BatchUnavailable),
        (409, BatchUnavailable),
        (425, BatchUnavailable),
        (429, BatchUnavailable),
        (500, BatchUnavailable),
        (503, BatchUnavailable),
    ],
)
async def test_a_providers_error_is_a_refusal_a_forbidden_key_or_unavailable_by_its_status(
    client: BatchAPI, scripted_llm: ScriptedLLM, status: int, kind: type[BatchFault]
) -> None:
    """A 4xx is a refusal (asking again will not help) but 401/403, the key's access, and
    408/409/425/429, which pass; a 5xx is the provider away. Alike for a batch and a file."""
    scripted_llm.batches.refuse("batch_x", status)
    scripted_llm.batches.refuse("file-x", status)

    with pytest.raises(BatchFault) as batch_fault:
        await client.retrieve(EP, "batch_x")
    with pytest.raises(BatchFault) as file_fault:
        await client.content(EP, "file-x")

    for fault, name in ((batch_fault.value, "batch_x"), (file_fault.value, "file-x")):
        assert type(fault) is kind
        assert str(fault).startswith(f"{EP}: HTTP {status}: "), str(fault)
        assert f"{name} is not available" in str(fault)
        if isinstance(fault, BatchUnavailable):
            assert fault.status == status


async def test_a_refusals_message_quotes_at_most_500_bytes_of_the_providers_answer(
    client: BatchAPI, scripted_llm: ScriptedLLM
) -> None:
    long_id = "é" * 400  # two bytes each: the 500th byte of the answer cuts one in half
    scripted_llm.batches.refuse(long_id, 404)

    with pytest.raises(BatchRefused) as refused:
        await client.retrieve(EP, long_id)

    quoted = str(refused.value).removeprefix(f"{EP}: HTTP 404: ")
    assert quoted == '{"error":{"message":"' + "é" * 239 + "\ufffd"


async def test_an_unreachable_provider_is_unavailable_without_a_status() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    api = BatchAPI(_endpoints(f"http://127.0.0.1:{port}/v1"), timeout_s=5.0)
    try:
        with pytest.raises(BatchUnavailable) as unavailable:
            await api.retrieve(EP, "batch_1")
        with pytest.raises(BatchUnavailable) as unlisted:
            await api.find(EP, "mine", "file-1", since=0)
    finally:
        await api.aclose()

    assert unavailable.value.status is None
    assert str(unavailable.value).startswith(f"{EP}: GET /batches/batch_1: ClientConnectorError")
    assert unlisted.value.status is None


async def test_a_call_answered_too_late_is_unavailable(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.batches.create_delay_s = 1.0
    api = BatchAPI(_endpoints(scripted_llm.base_url), timeout_s=0.2)
    try:
        file_id = await api.upload(EP, input_file([("1", _body(1))]), "late.jsonl")
        with pytest.raises(BatchUnavailable) as late:
            await api.create(EP, file_id, "late")
    finally:
        await api.aclose()

    assert late.value.status is None
    assert str(late.value).startswith(f"{EP}: POST /batches: ")


@pytest.mark.parametrize("endpoint", ["elsewhere", "online_only"])
async def test_an_endpoint_without_a_batch_api_is_refused_before_any_call(
    scripted_llm: ScriptedLLM, endpoint: str
) -> None:
    online_only = EndpointConfig(base_url=scripted_llm.base_url)
    api = BatchAPI(_endpoints(scripted_llm.base_url) | {"online_only": online_only}, timeout_s=5.0)
    try:
        with pytest.raises(BatchRefused) as refused:
            await api.retrieve(endpoint, "batch_1")
        with pytest.raises(BatchRefused):
            await api.create(endpoint, "file-1", "9")
    finally:
        await api.aclose()

    assert str(refused.value) == f"endpoint {endpoint!r} has no batch API configured"
    assert scripted_llm.batches.batches == {}


# --- the search for a batch (find) --------------------------------------------------------


async def _behind_a_page(client: BatchAPI, scripted_llm: ScriptedLLM) -> dict[str, Any]:
    """The batch tagged "mine", with a full page (100) of newer batches of another file."""
    mine = await _batch(client, "mine")
    other_file = await client.upload(EP, input_file([("1", _body(1))]), "other.jsonl")
    for n in range(100):
        await client.create(EP, other_file, f"other-{n}")
    return mine


async def test_find_pages_back_to_the_batch_by_its_tag_or_else_its_input_file(
    client: BatchAPI, scripted_llm: ScriptedLLM
) -> None:
    mine = await _behind_a_page(client, scripted_llm)
    lists = scripted_llm.batches.lists

    by_tag = await client.find(EP, "mine", "file-unknown", since=0)
    by_file = await client.find(EP, "untagged", mine["input_file_id"], since=0)
    none = await client.find(EP, "nobodys", "file-unknown", since=0)

    assert by_tag is not None and by_tag["id"] == mine["id"]
    assert by_file is not None and by_file["id"] == mine["id"]
    assert none is None
    assert scripted_llm.batches.lists - lists == 6, "two pages each"


async def test_find_stops_at_the_page_whose_oldest_batch_is_older_than_since(
    client: BatchAPI, scripted_llm: ScriptedLLM
) -> None:
    mine = await _behind_a_page(client, scripted_llm)
    # On the provider's clock, mine and the oldest batch of the first page were made an hour
    # before the others: the page's oldest, not any other of it, says how far back it goes.
    an_hour_ago = int(time.time()) - 3600
    for batch in scripted_llm.batches.created()[:2]:
        scripted_llm.batches.batches[batch["id"]].created_at = an_hour_ago
    lists = scripted_llm.batches.lists

    at_since = await client.find(EP, "mine", mine["input_file_id"], since=an_hour_ago)
    after_since = await client.find(EP, "mine", mine["input_file_id"], since=an_hour_ago + 1)

    assert at_since is not None and at_since["id"] == mine["id"]
    assert after_since is None
    assert scripted_llm.batches.lists - lists == 3


async def test_find_on_a_provider_without_batches_finds_none(
    client: BatchAPI, scripted_llm: ScriptedLLM
) -> None:
    assert await client.find(EP, "mine", "file-unknown", since=0) is None
    assert scripted_llm.batches.lists == 1


async def test_find_stops_when_a_list_ignores_its_cursor(client: BatchAPI, scripted_llm: ScriptedLLM) -> None:
    await _behind_a_page(client, scripted_llm)
    scripted_llm.batches.list_ignores_after = True
    lists = scripted_llm.batches.lists

    assert await client.find(EP, "mine", "file-unknown", since=0) is None
    assert scripted_llm.batches.lists - lists == 2


@pytest.mark.parametrize(
    ("first_page", "later_page", "kind", "message"),
    [
        (404, None, BatchRefused, f"{EP}: HTTP 404: "),
        (None, 404, BatchListIncomplete, "its batch list refused after batch_"),
        (None, 400, BatchListIncomplete, "its batch list refused after batch_"),
        (503, None, BatchListIncomplete, "its batch list failed at its first page: "),
        (None, 500, BatchListIncomplete, "its batch list failed after batch_"),
        (429, None, BatchUnavailable, f"{EP}: HTTP 429: "),
        (None, 429, BatchUnavailable, f"{EP}: HTTP 429: "),
        (403, None, BatchForbidden, f"{EP}: HTTP 403: "),
        (None, 401, BatchForbidden, f"{EP}: HTTP 401: "),
    ],
)
async def test_a_batch_list_refused_at_its_first_page_is_a_refusal_and_at_a_later_or_failing_one_incomplete(
    client: BatchAPI,
    scripted_llm: ScriptedLLM,
    first_page: int | None,
    later_page: int | None,
    kind: type[BatchFault],
    message: str,
) -> None:
    """Refused at its first page, the list is one the provider does not have (or will not
    show for a while); refused at a later page, or failing (a 5xx) at any, the batch looked
    for may be on a page not seen. 401/403 and 429 are what they are anywhere."""
    await _behind_a_page(client, scripted_llm)
    batches = scripted_llm.batches
    batches.list_refused, batches.list_cursor_refused = first_page is not None, later_page is not None
    batches.list_refusal_status = first_page or later_page or 0

    with pytest.raises(BatchFault) as fault:
        await client.find(EP, "mine", "file-unknown", since=0)

    assert type(fault.value) is kind
    assert str(fault.value).startswith(message), str(fault.value)


async def test_a_search_longer_than_a_calls_time_is_unavailable(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.batches.list_delays = [0.15, 0.15]
    api = BatchAPI(_endpoints(scripted_llm.base_url), timeout_s=0.25)
    try:
        await _behind_a_page(api, scripted_llm)
        with pytest.raises(BatchUnavailable) as late:
            await api.find(EP, "mine", "file-unknown", since=0)
    finally:
        await api.aclose()

    assert late.value.status is None
    assert str(late.value) == f"{EP}: listing batches took over 0.25 s"
