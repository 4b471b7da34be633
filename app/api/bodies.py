"""JSON request bodies, read and checked without stalling the event loop.

FastAPI decodes and validates a body on the event loop, so one large or hostile body (a few
MiB of `[],` take seconds) holds up every other request, /healthz included. Routes take their
body through `JsonBody` instead: its bytes are capped as they arrive, its values are counted
on the raw bytes and capped before anything is decoded, and decoding, the storable-data check
and validation run in a worker thread.

The value cap matters as much as the byte cap: the C decoder and pydantic hold the GIL for a
whole call, so a worker thread still stalls the loop for as long as one such call takes, and
that grows with the number of values (each a Python object), not with the bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from fastapi import Request
from pydantic import TypeAdapter

from app.api.deps import CurrentKey, SettingsDep
from app.api.errors import described
from app.api.state import api_state
from app.config import Settings
from app.errors import BodyStalled, MalformedBody, PayloadTooLarge, shown_name
from app.storable import decoded
from app.threads import in_thread

T = TypeVar("T")


def _request_cap(settings: Settings) -> int:
    return settings.max_request_bytes


class JsonBody(Generic[T]):
    """A route's JSON body as a dependency: `body: Annotated[JobIn, Depends(JOB_BODY)]`.
    Declare it after the key, so an unauthenticated request is refused unread. It is read in
    one of the key's body turns (ApiState.body_turns), held until the request is answered."""

    def __init__(
        self, type_: Any, max_values: int, max_bytes: Callable[[Settings], int] = _request_cap
    ) -> None:
        self.adapter: TypeAdapter[T] = TypeAdapter(type_)
        self.max_values = max_values
        self.max_bytes = max_bytes

    @property
    def openapi(self) -> dict[str, Any]:
        """The route's `openapi_extra` (`body_openapi`): FastAPI sees no body parameter, so it
        documents none. The schema is inlined, as the operation cannot add its models to the
        components."""
        return body_openapi({"application/json": {"schema": inlined(self.adapter.json_schema())}})

    async def __call__(self, request: Request, settings: SettingsDep, key: CurrentKey) -> AsyncIterator[T]:
        # The turn is held until the answer: decoded, the body waits for the key's row still.
        async with api_state(request).body_turns.turn(key.id):
            yield await in_thread(self.decode, await self.read(request, settings))

    async def read(self, request: Request, settings: Settings) -> bytes:
        """The body's bytes, undecoded: MalformedBody unless it is declared JSON, and
        PayloadTooLarge past the byte cap."""
        # As FastAPI's own bodies: JSON only when declared so, so that no browser form
        # (text/plain needs no CORS preflight) can pass for one.
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not (
            media_type.startswith("application/") and media_type.endswith("+json")
        ):
            raise MalformedBody("send the body as JSON, with the header Content-Type: application/json")
        return await read_capped(request, self.max_bytes(settings), settings.body_stall_s)

    def decode(self, raw: bytes) -> T:
        """The body as `type_` (app.storable.decoded). Slow for a big body: call it off the
        event loop."""
        return decoded(raw, self.adapter, self.max_values)


def body_openapi(content: dict[str, Any]) -> dict[str, Any]:
    """The `openapi_extra` of a route whose body, of `content` (a schema by media type), is
    read by `read_capped`: the body, and the 408 its read answers when the body stalls."""
    return {
        "requestBody": {"required": True, "content": content},
        "responses": {"408": described(408)},
    }


async def read_capped(request: Request, max_bytes: int, stall_s: float) -> bytes:
    """The request body; MalformedBody, unread, if it is sent compressed (refuse_compressed),
    PayloadTooLarge as soon as it is known to exceed `max_bytes`,
    and BodyStalled once none of it has come for `stall_s` (the server has no body timeout)."""
    refuse_compressed(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge.body_over(max_bytes)
    chunks: list[bytes] = []
    size = 0
    stream = aiter(request.stream())
    while True:
        try:
            async with asyncio.timeout(stall_s):
                chunk = await anext(stream, None)
        except TimeoutError:
            raise BodyStalled(f"no byte of the request's body came for {stall_s:g} s") from None
        if chunk is None:
            break
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge.body_over(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


# The codings a body may name: the server passes every other on undecoded.
_READ_AS_SENT = {"content-encoding": ("", "identity"), "transfer-encoding": ("", "identity", "chunked")}


def refuse_compressed(request: Request) -> None:
    """MalformedBody if the body is sent with a content coding other than identity, or a transfer
    coding other than chunked: a gzipped body was read whole (up to the byte cap), then refused
    as "not UTF-8"."""
    for header, passed in _READ_AS_SENT.items():
        codings = [
            coding.strip().lower() for value in request.headers.getlist(header) for coding in value.split(",")
        ]
        if sent := [coding for coding in codings if coding not in passed]:
            name = header.title()
            raise MalformedBody(
                f"the body is sent with {name}: {shown_name(', '.join(sent))}; this API reads bodies "
                f"uncompressed: send it again without that {name}"
            )


def inlined(schema: dict[str, Any]) -> Any:
    """A model's JSON schema with every `$ref` replaced by its definition, for a part of the
    OpenAPI document that cannot add models to the components (the model is not recursive)."""
    return _inlined(schema, schema.pop("$defs", {}))


def _inlined(node: Any, definitions: dict[str, Any]) -> Any:
    """`node` with every `$ref` replaced by its definition."""
    if isinstance(node, list):
        return [_inlined(value, definitions) for value in node]
    if not isinstance(node, dict):
        return node
    inlined = {key: _inlined(value, definitions) for key, value in node.items() if key != "$ref"}
    if "$ref" in node:
        return {**_inlined(definitions[node["$ref"].removeprefix("#/$defs/")], definitions), **inlined}
    return inlined
