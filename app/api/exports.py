"""GET /v1/jobs/{id}/export: a job's results as one training-data file, streamed."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from app.api.deps import OwnedJob, ReadsHazardous, SessionDep, StateDep
from app.api.errors import documented
from app.api.jobs import min_gap_query
from app.api.state import api_state
from app.errors import InvalidFilter, InvalidRequest, JobDeleted, MissingScope
from app.exports.formats import FORMATS, JSON
from app.exports.options import CotStyle, ExportOptions, parse_min_scores
from app.exports.streaming import encoded
from app.store import keys
from app.store.db import database_away
from app.store.export_rows import ExportFilter, Source
from app.store.jobs import pairs_min_gap

router = APIRouter(prefix="/v1/jobs", tags=["exports"])
log = logging.getLogger("aidsafe.api")

# Built from the registry, so a format added there is accepted and documented here.
FormatName = StrEnum("FormatName", {name: name for name in FORMATS})  # type: ignore[misc]
_BINARY = {"type": "string", "format": "binary"}


async def _seat(request: Request, job: OwnedJob) -> AsyncIterator[None]:
    """One of the job's key's export seats, held until the response has been sent (FastAPI
    closes dependencies with yield after the response)."""
    with api_state(request).open_exports.seat(job.owner_key_id):
        yield


@router.get(
    "/{job_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file, streamed. JSON Lines, CSV, Parquet or a JSON array, per `format`.",
            "content": {
                # A JSON array (label_studio's tasks) is read as JSON by clients, not as bytes.
                fmt.media_type: {"schema": {"type": "array"} if fmt.media_type == JSON else _BINARY}
                for fmt in FORMATS.values()
            },
        },
        **documented(401, 403, 404, 422, 429, 503),
    },
    dependencies=[Depends(_seat)],
)
async def export_job(
    job: OwnedJob,
    session: SessionDep,
    state: StateDep,
    reads_hazardous: ReadsHazardous,
    format: Annotated[FormatName, Query(description="The file format; see the README's Exports section.")],
    cot: Annotated[
        CotStyle, Query(description="How chat formats carry the chain of thought.")
    ] = CotStyle.THINK,
    system: Annotated[
        str | None,
        Query(min_length=1, max_length=20_000, description="A system message to put first in chat formats."),
    ] = None,
    accepted_only: Annotated[bool, Query(description="Only CoTs the quality gate accepted.")] = False,
    min_score: Annotated[
        list[str], Query(description="`<metric>:<score>`, repeatable: only CoTs graded at least this.")
    ] = [],  # noqa: B006 (FastAPI copies query defaults)
    human_approved: Annotated[
        bool, Query(description="Only CoTs a reviewer accepted and no reviewer currently rejects.")
    ] = False,
    exclude_human_rejected: Annotated[
        bool, Query(description="Leave out CoTs a reviewer currently rejects (unreviewed ones stay).")
    ] = False,
    human_edits: Annotated[
        bool,
        Query(
            description="The latest reviewer's edited response replaces the model's; each record names "
            "the edit in `human_edit` (training formats only)."
        ),
    ] = False,
    min_gap: Annotated[
        float | None,
        min_gap_query(
            "Pair formats (`trl_dpo`): only pairs with at least this policy-faithfulness gap. "
            "Default: the job's `pairs.min_gap`."
        ),
    ] = None,
) -> StreamingResponse:
    """Completed items' results in prompt order, streamed with flat memory whatever the job's
    size. `trl_dpo` holds rejected (hazardous) text: it needs a key with `hazardous:read`.
    429 `too_many_streams` if the key has `AIDSAFE_MAX_EXPORTS_PER_KEY` exports under way (4
    unless the server says otherwise), or the server `AIDSAFE_MAX_EXPORTS` (10), or the key
    has one and the server is into its last fifth, kept for keys that have none."""
    fmt = FORMATS[format.value]
    if human_edits and not fmt.takes_human_edits:
        raise InvalidRequest(
            f"human_edits: the {format.value} format's tasks carry the model's output for review",
            [{"field": "human_edits", "problem": f"not for {format.value}"}],
        )
    pairs = fmt.source is Source.KEPT_PAIRS
    if min_gap is not None and not pairs:
        raise InvalidFilter(f"min_gap filters preference pairs: the {format.value} export has none")
    filters = ExportFilter(
        accepted_only,
        tuple(sorted(parse_min_scores(min_score).items())),
        human_approved,
        exclude_human_rejected,
        min_gap=pairs_min_gap(job.plan) if min_gap is None else min_gap,
    )
    if fmt.needs_hazardous_scope and not reads_hazardous:
        raise MissingScope(
            f"the {format.value} export holds hazardous text (rejected CoTs): "
            f"it needs a key with the {keys.HAZARDOUS_READ} scope"
        )
    filename = f"aidsafe-{job.id}-{format.value}.{fmt.extension}"
    # The request's session would stay open until the response has been sent (FastAPI closes
    # dependencies with yield after the response): give its connection back now; the stream
    # reads each batch by a statement of its own, on a connection it gives back at once.
    await session.close()
    return _StallingEnds(
        encoded(state.sessions, job.id, fmt, ExportOptions(cot, system, human_edits), filters),
        job_id=job.id,
        stall_s=state.settings.export_stall_s,
        media_type=fmt.media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# The most of a body sent at once. The server's send waits until the client has taken
# (nearly) all that was sent before it: a batch's chunk of megabytes sent whole would have to
# be taken within stall_s, and a client reading steadily but slowly was cut off.
_PIECE_BYTES = 256 * 1024


class _StallingEnds(StreamingResponse):
    """A stream ended once its client has taken none of it for `stall_s` (less than a piece of
    _PIECE_BYTES): a client that stopped reading but kept its connection open held the key's
    seat (and one of the process's) for good, and a few keys' stalled exports every seat there
    is. Ended so, the response is cut off without its last chunk, which clients report as an
    incomplete body; so is one whose rows the database could not send (a restart)."""

    def __init__(
        self, content: AsyncGenerator[bytes, None], *, job_id: UUID, stall_s: float, **options: Any
    ) -> None:
        super().__init__(content, **options)
        self.content = content
        self.job_id = job_id
        self.stall_s = stall_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stalled = False  # a send gave up: a TimeoutError may be a batch read's too (a failover)

        async def send_or_give_up(message: Message) -> None:
            nonlocal stalled
            for piece in _pieces(message):
                # The server's send waits while the client's window is full.
                try:
                    with anyio.fail_after(self.stall_s):
                        await send(piece)
                except TimeoutError:
                    stalled = True
                    raise

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except JobDeleted:
            # Its owner's doing, not a bug: no traceback. Returning cuts the response off (see
            # below), so the file never looks complete with rows missing.
            log.warning("the export of job %s was cut off: the job was deleted meanwhile", self.job_id)
        except Exception as error:
            if stalled and isinstance(error, TimeoutError):
                log.info(
                    "the export of job %s was ended: its client took nothing for %.0f s",
                    self.job_id,
                    self.stall_s,
                )
                return
            if not database_away(error):
                raise
            # Not a bug: a traceback ("Exception in ASGI application") for every export under
            # way at a Postgres restart. Returning cuts the response off as raising did (uvicorn
            # closes the connection, with a line that the response was not completed).
            log.warning("the export of job %s was cut off: the database went away (%r)", self.job_id, error)
        finally:
            # Closed now, not whenever the response is freed: a client gone or stalled leaves
            # the content waiting at a yield for the send given up, and a batch read under way
            # holding its Postgres connection until then; closed, the read is cancelled and
            # gives it back (encoded's finally). Ended by an error of its own, it is closed already.
            await self.content.aclose()


def _pieces(message: Message) -> Iterator[Message]:
    """The message, its body cut into pieces of at most _PIECE_BYTES."""
    body = message.get("body", b"")
    if message["type"] != "http.response.body" or len(body) <= _PIECE_BYTES:
        yield message
        return
    more_body = message.get("more_body", False)
    for start in range(0, len(body), _PIECE_BYTES):
        end = start + _PIECE_BYTES
        more = more_body or end < len(body)
        yield {"type": "http.response.body", "body": body[start:end], "more_body": more}
