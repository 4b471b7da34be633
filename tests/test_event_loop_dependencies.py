"""No route or dependency of the API is a plain `def`: FastAPI runs those in its thread pool,
a thread hop per request, which cost a tenth of the API's CPU on a cached GET
(bench/RESULTS.md, "The API's dependencies off the thread pool")."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from app.config import Settings
from app.main import create_app


def api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (included := getattr(route, "original_router", None)) is not None:  # include_router's
            yield from api_routes(included.routes)


def calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dependency in dependant.dependencies:
        if dependency.call is not None:
            yield dependency.call
        yield from calls(dependency)


def runs_on_the_loop(call: Callable[..., Any]) -> bool:
    function = call if inspect.isroutine(call) else type(call).__call__
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


def test_every_route_and_dependency_runs_on_the_event_loop(settings: Settings) -> None:
    routes = list(api_routes(create_app(settings).routes))
    assert len(routes) > 50, "the routes were not all found: has FastAPI's include_router changed?"

    in_thread_pool = {
        f"{route.path}: {getattr(call, '__qualname__', call)}"
        for route in routes
        for call in [route.endpoint, *calls(route.dependant)]
        if not runs_on_the_loop(call)
    }

    assert not in_thread_pool
