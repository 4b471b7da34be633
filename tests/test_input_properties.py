"""A property of every route that reads a JSON body a client writes (the job submission, the
Label Studio and Argilla imports, the Label Studio webhook): whatever the body, the answer is
a 2xx, or a 4xx in the one JSON error shape, never a 5xx.

Hypothesis takes a valid body (a job; the tools' fixture files, naming items of a finished
job) and changes one to three of its values, of one kind per test: times for times (the
whole calendar, in any UTC offset, and strings that are not times), numbers for numbers
(unbounded, too long to read, infinite), text for text (Unicode edge cases, huge digit
strings, "-1"), and for any value, one of another type or shape (nesting deep and deeper,
lists for ids, objects for choices), or a key added or dropped. Bodies that are not JSON at
all have a property of their own. Generation is derandomized and bounded (a few hundred
requests in all), so the run is quick and the same every time."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import Settings
from tests.conftest import WebhookTarget
from tests.test_labeling import fixture, graded_job, item_ids

Headers = dict[str, str]
JSON = {"Content-Type": "application/json"}
EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JOB = {
    "items": [{"prompt": "How do I store rice safely?", "metadata": {"source": "kitchen", "n": 1}}],
    "policy_set": {"name": "aidsafe-default"},
    "config": {"agents": 2, "max_rounds": 2, "grading": {"thresholds": {"relevance": 3}}},
}


@dataclass(frozen=True)
class Raw:
    """JSON text put in a body as is: what Python's json cannot write."""

    text: str


def encode(value: Any) -> str:
    """JSON text, Raw values as they are; NaN and infinities as Python's json writes them."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    return json.dumps(value)


offsets = st.none() | st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)),
)
# Edge cases drawn as often as generated values: they are what readers get wrong.
EDGE_TIMES = [
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00",
    "9999-12-31T23:59:59.999999Z",
    "2026-02-30T00:00:00Z",
    "2026-11-20T10:00:00+25:00",
    "infinity",
]
EDGE_NUMBERS = [Raw("9" * 5_000), Raw("-" + "9" * 4_301), Raw("1e400"), Raw("-Infinity"), 2**63, -1, 0, 0.5]
EDGE_TEXTS = [
    "\x00",
    "\ud800",
    "\ufeff",
    "\u202e",
    "\U0001d518",
    "٣",
    "",
    " ",
    "-1",
    "Thought 0",
    "9" * 5_000,
]
EDGE_TEXTS += ["1" * 30_000 + "x", "x" * 50_000]
times = (
    st.sampled_from(EDGE_TIMES)
    | st.integers()
    # hypothesis' overloads leave out bounds with an optional time zone, which it takes.
    | st.datetimes(
        min_value=datetime(1, 1, 1),
        max_value=datetime(9999, 12, 31, 23, 59, 59),
        timezones=offsets,  # type: ignore[arg-type]
    ).map(datetime.isoformat)
)
numbers = st.sampled_from(EDGE_NUMBERS) | st.integers() | st.floats()
texts = st.sampled_from(EDGE_TEXTS) | st.text(max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
shapes: st.SearchStrategy[Any] = json_values | st.sampled_from(
    [None, True, 7, "x", [], {}, [[]], {"id": [1]}, ["-1"], [{}], [None]]
    + [Raw("[" * 33 + "]" * 33), Raw("[" * 5_000 + "]" * 5_000), Raw('{"a": ' * 300 + "1" + "}" * 300)]
)
_TIME = re.compile(r"\d{4}-\d\d-\d\dT")
KINDS: dict[str, tuple[Callable[[Any], bool], st.SearchStrategy[Any]]] = {
    "times": (lambda value: isinstance(value, str) and bool(_TIME.match(value)), times),
    "numbers": (lambda value: isinstance(value, int | float) and not isinstance(value, bool), numbers),
    "texts": (lambda value: isinstance(value, str), texts),
    "shapes": (lambda _: True, shapes),
}
ADDED_KEYS = ["id", "task", "value", "choices", "rating", "text", "created_at", "metadata", "extra"]
# What the service reads of each body: places under other keys (Label Studio's `lead_time`,
# a result's `origin`) are kept as they came, so changing them teaches little.
READ = {
    *("items", "prompt", "prompts", "metadata", "policy_set", "name", "version", "config"),
    *("agents", "max_rounds", "grading", "thresholds", "relevance", "action", "task", "data"),
    *("item_id", "response", "annotation", "annotations", "id", "completed_by", "result"),
    *("was_cancelled", "created_at", "updated_at", "from_name", "value", "choices", "rating"),
    *("text", "external_id", "responses", "values", "status", "user_id", "email"),
}


def places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """Every value in `value` with its path, itself included."""
    found = [(path, value)]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += places(inner, (*path, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += places(inner, (*path, index))
    return found


@st.composite
def changed(draw: st.DrawFn, body: Any, kind: str) -> str:
    """`body` as JSON text with one to three of its values of `kind` changed (a value of
    another kind for "shapes", or a key added or dropped)."""
    body = json.loads(json.dumps(body))
    matches, values = KINDS[kind]
    for _ in range(draw(st.integers(1, 3))):
        candidates = [
            path
            for path, value in places(body)
            if path and matches(value) and all(step in READ for step in path if isinstance(step, str))
        ]
        if not candidates:
            break
        *parents, last = draw(st.sampled_from(candidates))
        container = body
        for step in parents:
            container = container[step]
        action = draw(
            st.sampled_from(["replace", "replace", "add", "drop"] if kind == "shapes" else ["replace"])
        )
        value = copy.deepcopy(draw(values))  # sampled lists and dicts are shared: never change them
        if action == "add" and isinstance(container[last], dict):
            container[last][draw(st.sampled_from(ADDED_KEYS))] = value
        elif action == "drop":
            del container[last]
        else:
            container[last] = value
    return encode(body)


def answered_without_a_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
        assert isinstance(body["error"]["code"], str) and body["error"]["message"], body


@pytest.fixture
async def reviewed_items(api: httpx.AsyncClient, auth: Headers, settings: Settings) -> tuple[str, list[str]]:
    """A graded job of three completed items, and their ids."""
    job_id = await graded_job(api, auth, settings)
    return job_id, await item_ids(api, auth, job_id)


@pytest.mark.parametrize("kind", KINDS)
@EXAMPLES
@given(data=st.data())
async def test_no_job_body_is_a_server_error(
    api: httpx.AsyncClient, auth: Headers, kind: str, data: st.DataObject
) -> None:
    body = data.draw(changed(JOB, kind))

    answered_without_a_server_error(await api.post("/v1/jobs", content=body, headers={**auth, **JSON}))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("tool", "file"), [("label-studio", "label_studio_export.json"), ("argilla", "argilla_records.json")]
)
@EXAMPLES
@given(data=st.data())
async def test_no_import_is_a_server_error(
    api: httpx.AsyncClient,
    auth: Headers,
    reviewed_items: tuple[str, list[str]],
    tool: str,
    file: str,
    kind: str,
    data: st.DataObject,
) -> None:
    job_id, ids = reviewed_items
    body = data.draw(changed(fixture(file, ids), kind))

    response = await api.post(f"/v1/jobs/{job_id}/annotations/{tool}", content=body, headers={**auth, **JSON})

    answered_without_a_server_error(response)


@pytest.mark.parametrize("kind", KINDS)
@EXAMPLES
@given(data=st.data())
async def test_no_label_studio_event_is_a_server_error(
    api: httpx.AsyncClient,
    ls_webhook: WebhookTarget,
    reviewed_items: tuple[str, list[str]],
    kind: str,
    data: st.DataObject,
) -> None:
    _, ids = reviewed_items
    body = data.draw(changed(fixture("label_studio_webhook.json", ids), kind))

    response = await api.post(ls_webhook.path, content=body, headers=ls_webhook.headers)

    answered_without_a_server_error(response)


@EXAMPLES
@given(
    body=st.binary(max_size=64) | st.sampled_from([b"", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b'{"a":'])
)
async def test_no_body_that_is_not_json_is_a_server_error(
    api: httpx.AsyncClient, auth: Headers, reviewed_items: tuple[str, list[str]], body: bytes
) -> None:
    job_id, _ = reviewed_items
    for url in (
        "/v1/jobs",
        f"/v1/jobs/{job_id}/annotations/label-studio",
        f"/v1/jobs/{job_id}/annotations/argilla",
    ):
        answered_without_a_server_error(await api.post(url, content=body, headers={**auth, **JSON}))
