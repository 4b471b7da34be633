"""/v1/comparisons/{id}/report and /plots: a comparison as a report a reader takes away
(Markdown or CSV) and its plots (PNG), the same files `aidsafe reproduce` writes."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response

from app.api.deps import CurrentKey, SessionDep
from app.api.errors import documented_beside_a_stream
from app.reports import comparisons, plots, render
from app.reports.figures import ComparisonFigures
from app.reports.plots import Plot
from app.store import jobs

router = APIRouter(prefix="/v1/comparisons", tags=["comparisons"])


class ReportFormat(StrEnum):
    MARKDOWN = "markdown"
    CSV = "csv"


_MEDIA = {ReportFormat.MARKDOWN: "text/markdown; charset=utf-8", ReportFormat.CSV: "text/csv; charset=utf-8"}


@router.get(
    "/{comparison_id}/report",
    response_class=Response,
    responses={
        200: {"content": {media: {"schema": {"type": "string"}} for media in _MEDIA.values()}},
        **documented_beside_a_stream(401, 404, 422, 503),
    },
)
async def comparison_report(
    comparison_id: UUID,
    session: SessionDep,
    key: CurrentKey,
    format: Annotated[ReportFormat, Query(description="`markdown` for people, `csv` for tools.")] = (
        ReportFormat.MARKDOWN
    ),
) -> Response:
    """The grader's means of both sides with 95 % intervals, the judge's win/tie/loss shares
    with Wilson intervals and the candidate's pair gaps. The Markdown links the plots by the
    file names `aidsafe reproduce` saves them under."""
    lay_out = render.table if format is ReportFormat.CSV else _markdown
    comparison = await jobs.get_owned(session, comparison_id, key.id)
    return Response(await comparisons.report(session, comparison, lay_out), media_type=_MEDIA[format])


def _markdown(figures: ComparisonFigures) -> str:
    """The report linking its plots (the gaps' only when there are pairs)."""
    shown = {"Grader score distributions": Plot.SCORES.file_name}
    if figures.gaps:
        shown["Preference-pair gaps"] = Plot.GAPS.file_name
    return render.markdown(figures, shown)


@router.get(
    "/{comparison_id}/plots/{plot}.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        **documented_beside_a_stream(401, 404, 422, 503),
    },
)
async def comparison_plot(comparison_id: UUID, plot: Plot, session: SessionDep, key: CurrentKey) -> Response:
    """`scores`: per metric, the share of samples at each score on both sides. `gaps`: the
    chosen-minus-rejected gap of the candidate's preference pairs."""
    # Its connection given back once the figures are read (comparisons.report): a plot waits for
    # its key's turn for a thread, and waiting, a request held it, one key's plot requests the pool.
    figures = await comparisons.figures(session, await jobs.get_owned(session, comparison_id, key.id))
    return Response(await plots.png(plot, figures), media_type="image/png")
