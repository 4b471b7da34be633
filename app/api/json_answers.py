"""Large answers built and encoded in a worker thread: FastAPI encodes the model a route returns
on the event loop, and a model evaluation's report of 4,000 rows (2 MB of JSON) held it for
10-25 ms of CPU."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from app.threads import in_thread


async def json_answer(session: AsyncSession, build: Callable[[], BaseModel]) -> Response:
    """The model `build` makes, as FastAPI would answer with it (by alias), made and encoded in
    one worker thread. FastAPI passes a Response on as it is, so the route declares the model
    as its `response_model` for the OpenAPI document.

    `build` makes it from what the route has read: the request's session is closed first, its
    connection given back (what it read stays loaded, detached). Waiting for a thread of the
    shared pool, behind other requests' work, a route held it in an open transaction, and a
    key's burst of them the API's whole pool."""
    await session.close()
    return Response(await in_thread(lambda: as_answered(build())), media_type="application/json")


def as_answered(model: BaseModel) -> bytes:
    """`model` in JSON as FastAPI would answer with it (by alias). CPU: for a worker thread."""
    return model.model_dump_json(by_alias=True).encode()
