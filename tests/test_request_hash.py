"""A turn's request hash is the sha256 of the request's fields as `json.dumps(..., sort_keys=True)`
writes them: what every stored turn has, whatever the way it is computed."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from app.deliberation.calls import _request_hash
from app.deliberation.ports import ChatRequest, Stage, TurnKey

_texts = st.text() | st.text(min_size=1_000, max_size=3_000)  # short ones, and long ones encoded once
_roles = st.sampled_from(["system", "user", "assistant"])
# Also what no stage sends today: other contents, and fields beside role and content.
_unusual = st.fixed_dictionaries(
    {"role": _roles, "content": _texts | st.integers() | st.none() | st.lists(st.text(), max_size=3)},
    optional={"name": st.text()},
)
_messages = st.lists(st.fixed_dictionaries({"role": _roles, "content": _texts}) | _unusual, max_size=4)


def _as_stored(request: ChatRequest) -> str:
    body = [request.model, request.messages, request.schema_name, request.temperature, request.max_tokens]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@given(
    model=st.text(),
    messages=_messages,
    schema_name=st.text() | st.none(),
    temperature=st.floats() | st.integers() | st.booleans(),  # NaN and infinities as json writes them
    max_tokens=st.integers(min_value=1, max_value=2**31),
)
def test_the_request_hash_is_the_hash_of_the_requests_sorted_json(
    model: str,
    messages: list[dict[str, str]],
    schema_name: str | None,
    temperature: float,
    max_tokens: int,
) -> None:
    request = ChatRequest(
        role="seed",
        endpoint="default",
        model=model,
        messages=messages,
        schema_name=schema_name,
        schema=None,
        temperature=temperature,
        max_tokens=max_tokens,
        key=TurnKey(Stage.SEED),
    )
    assert _request_hash(request) == _as_stored(request)
    assert _request_hash(request) == _as_stored(request)  # the second time from the cache
