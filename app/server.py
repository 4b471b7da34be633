"""`aidsafe-api`: the API under uvicorn, with a request's head capped (app/api/head_limits.py)
and its event streams ended as it stops (app/api/draining.py). The tests serve the app with
the same options (`uvicorn_options`)."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import uvicorn

from app import logs, presets
from app.api.draining import DrainingProtocol
from app.api.head_limits import HeadLimits
from app.config import Settings, settings_or_exit


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the API, beside where it listens and how it logs."""
    limits = HeadLimits(
        settings.max_url_bytes, settings.max_header_bytes, settings.max_header_fields, settings.head_timeout_s
    )
    return {
        "http": partial(DrainingProtocol, limits=limits),
        # Then what is still under way is cancelled: uvicorn would wait for it without end.
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        # The API cannot serve without what its lifespan sets up. uvicorn's default ("auto")
        # takes a lifespan that raised before the app could report its failure (building the
        # middleware, say) for an app without one, and serves every request an error.
        "lifespan": "on",
    }


def run() -> None:
    parser = argparse.ArgumentParser(prog="aidsafe-api", description="Serve the AIDSAFE HTTP API.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="API processes (default: %(default)s)")
    # uvicorn's own, for running behind a reverse proxy.
    parser.add_argument("--root-path", default="", help="the path prefix a proxy serves the API under")
    parser.add_argument(
        "--forwarded-allow-ips",
        default=None,
        help="proxies trusted for X-Forwarded-For/-Proto (default: $FORWARDED_ALLOW_IPS, else 127.0.0.1)",
    )
    args = parser.parse_args()
    settings = settings_or_exit(parser.prog)
    presets.check_or_exit(parser.prog, settings)  # as each process's start-up will
    # An import string, as --workers needs: each process imports the app (and app.main's
    # tuning of the garbage collector) for itself.
    uvicorn.run(
        "app.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        root_path=args.root_path,
        forwarded_allow_ips=args.forwarded_allow_ips,
        # Ours from uvicorn's first line, in every process: with uvicorn's own, its first lines
        # ("Started server process") came as plain text, before the app's start-up set ours.
        log_config=logs.uvicorn_log_config(settings.log_level, settings.log_json),
        **uvicorn_options(settings),
    )


if __name__ == "__main__":
    run()
