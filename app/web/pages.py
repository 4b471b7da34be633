"""/view: the read-only web viewer. Jobs, one job's progress, report and items, one item's
deliberation timeline. Browsers cannot send Bearer headers, so a login form turns an API key
into a signed session cookie (see session.py); every page then checks it as the API checks a
key, and another key's job or item is a 404. Jinja autoescapes everything: model output is
untrusted, and the Content-Security-Policy allows no inline script besides."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Annotated, Any, get_args
from urllib.parse import parse_qs
from uuid import UUID

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from markupsafe import escape as markup_escape
from pydantic import BeforeValidator, TypeAdapter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.api import model_evaluations as model_evaluation_api
from app.api import sample_evaluations as sample_evaluation_api
from app.api import views
from app.api.bodies import read_capped
from app.api.deps import SessionDep, SettingsDep, StateDep, client_address, job_owned_by, threads_in_turns_of
from app.api.events import LastEventIdHeader, ResumedEvents, resumed, server_sent
from app.api.schemas import CandidateStats, ItemStatus
from app.api.state import api_state
from app.api.summaries import job_out
from app.bidi import BIDI_CONTROLS
from app.config import Settings
from app.costs import job_cost
from app.errors import CrossSiteRequest, NotFound, ServiceError, TooManyWrongKeys, Unauthorized
from app.plan import ComparisonPlan, GenerationPlan, ModelEvaluationPlan, SampleEvaluationPlan
from app.reports import comparisons, plots, render
from app.reports.figures import SCORES, Side
from app.store import job_listing, jobs, keys, policy_sets, quality, sample_evaluations, web_sessions
from app.store.job_listing import JobFilter
from app.store.models import ApiKey, Cot, Job, PreferencePair
from app.store.positions import Listing
from app.threads import in_thread
from app.web import session as session_token
from app.web import timeline

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape is on for .html


def _usd(cost: float | None) -> str:
    """A cost as the viewer shows it: null is an unpriced endpoint, not free."""
    return "unknown (unpriced endpoint)" if cost is None else f"${cost:,.4f}"


# Bidirectional controls (app/bidi.py) in any value a page shows, as one character class.
_BIDI = re.compile("[" + "".join(map(chr, sorted(BIDI_CONTROLS))) + "]")


def _bidi_shown(value: Any) -> Any:
    """A value a template shows (Jinja's `finalize`, so every one) with its bidirectional
    controls shown as marked escapes (`\\u202e`), not applied: autoescaping leaves them, and
    one in a prompt, a model's output or a name would show the text after it reordered. The
    text is escaped first, as autoescaping would; other values are left to it. (In an
    attribute the mark would read as text: no template puts the server's text in one.)"""
    if not isinstance(value, str) or not _BIDI.search(value):
        return value
    escaped = value if isinstance(value, Markup) else markup_escape(value)
    return Markup(_BIDI.sub(lambda control: f"<span class=control>\\u{ord(control[0]):04x}</span>", escaped))


templates.env.finalize = _bidi_shown
templates.env.filters["usd"] = _usd
templates.env.filters["interval"] = render.interval
templates.env.filters["percent"] = render.percent
templates.env.globals["scores"] = SCORES
# GET /v1/jobs/{id}/report's `pairs.candidates`, typed as the API shows it.
_CANDIDATES: TypeAdapter[dict[str, CandidateStats]] = TypeAdapter(dict[str, CandidateStats])
# The viewer's stylesheet and script, a few KB each, read once and served whole whatever
# Range a request names (HTTP lets a server ignore it): FileResponse answered a malformed one
# with a bare 400 or 416 of its own, without the viewer's headers.
STATIC = {
    name: ((HERE / "static" / name).read_bytes(), media_type)
    for name, media_type in (("viewer.css", "text/css"), ("viewer.js", "text/javascript"))
}
PAGE_SIZE = 100
LOGIN_FORM_BYTES = 4096  # an API key and some; parsing more would only stall the event loop
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class LoginRequired(Exception):
    pass


class PageRoute(APIRoute):
    """Errors become pages (or a redirect to the login form), not the API's JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                response = RedirectResponse("/view/login", status_code=303)
            except (ServiceError, RequestValidationError) as exc:
                status, message = (
                    (exc.status, exc.message) if isinstance(exc, ServiceError) else (400, "Bad request.")
                )
                response = templates.TemplateResponse(
                    request, "error.html", {"status": status, "message": message}, status_code=status
                )
            response.headers.update(SECURITY_HEADERS)
            return response

        return page


router = APIRouter(prefix="/view", include_in_schema=False, route_class=PageRoute)


def _session_id(request: Request, settings: Settings) -> UUID | None:
    token = request.cookies.get(session_token.COOKIE)
    return session_token.session_id_of(token, session_token.signing_secret(settings)) if token else None


async def _viewer_key(
    request: Request, session: SessionDep, settings: SettingsDep, state: StateDep
) -> AsyncIterator[ApiKey]:
    session_id = _session_id(request, settings)
    key = session_id and await web_sessions.live_key(session, session_id)
    if not key:
        raise LoginRequired()
    with threads_in_turns_of(state, key.id):
        yield key


ViewerKey = Annotated[ApiKey, Depends(_viewer_key)]
# The viewer's job named by the path's `job_id`, or 404.
ViewedJob = Annotated[Job, Depends(job_owned_by(_viewer_key))]


async def _refuse_cross_site(request: Request) -> None:
    """Login and logout take only posts from the viewer's own pages: SameSite=Strict keeps the
    cookie off cross-site posts, but a forged login would plant the attacker's session and a
    forged logout end the user's. Checked by the headers browsers set themselves (Origin on
    every cross-site POST, Sec-Fetch-Site in current ones) rather than a CSRF token, which
    would need a pre-login cookie to match; a client sending neither is no browser and
    carries no victim's cookie."""
    fetch_site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    own_origin = f"{request.url.scheme}://{request.url.netloc}"
    if (fetch_site is not None and fetch_site not in ("same-origin", "none")) or (
        origin is not None and origin.lower() != own_origin.lower()
    ):
        raise CrossSiteRequest("Log in and out from the viewer's own pages.")


SameOriginPost = Depends(_refuse_cross_site)


@router.get("")
async def home() -> RedirectResponse:
    return RedirectResponse("/view/jobs", status_code=303)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound(f"no file {name}")
    content, media_type = STATIC[name]
    return Response(content, media_type=media_type)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> Response:
    return templates.TemplateResponse(request, "login.html", {"error": None})


@router.post("/login", response_class=HTMLResponse, dependencies=[SameOriginPost])
async def login(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """Check the key like the API does; on success set the session cookie and go to the jobs."""
    body = await read_capped(request, LOGIN_FORM_BYTES, settings.body_stall_s)
    form = parse_qs(body.decode("utf-8", errors="replace"))
    secret = (form.get("api_key") or [""])[0].strip()
    try:
        # As the API checks a Bearer key: an address that sent too many unknown keys is
        # refused more without a lookup each, and a known key is never refused.
        key = await api_state(request).known_keys.authenticate(secret, client_address(request))
    except Unauthorized:
        context = {"error": "Unknown or revoked API key."}
        return templates.TemplateResponse(request, "login.html", context, status_code=401)
    except TooManyWrongKeys as refused:
        headers = {"Retry-After": str(refused.retry_after_s)}
        context = {"error": refused.message}
        return templates.TemplateResponse(request, "login.html", context, status_code=429, headers=headers)
    lifetime_s = settings.web_session_hours * 3600
    session_id = await web_sessions.start(session, key.id, lifetime_s, settings.max_viewer_sessions_per_key)
    await session.commit()
    token = session_token.issue(session_id, session_token.signing_secret(settings))
    response = RedirectResponse("/view/jobs", status_code=303)
    response.set_cookie(
        session_token.COOKIE,
        token,
        max_age=int(lifetime_s),
        path="/view",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", dependencies=[SameOriginPost])
async def logout(request: Request, session: SessionDep, settings: SettingsDep) -> RedirectResponse:
    """End the session server-side (a copy of the cookie kept elsewhere opens nothing), then
    drop the cookie."""
    if session_id := _session_id(request, settings):
        await web_sessions.end(session, session_id)
        await session.commit()
    response = RedirectResponse("/view/login", status_code=303)
    response.delete_cookie(session_token.COOKIE, path="/view")
    return response


@router.get("/jobs", response_class=HTMLResponse)
async def job_list(request: Request, session: SessionDep, key: ViewerKey) -> Response:
    """This key's newest jobs, read as GET /v1/jobs reads a page: each plan as text, and no
    duplicates report (some 20,000 values a job of 10,000 prompts in pairs: decoded on the
    event loop for a page of 100, they held it for 0.12 s of CPU). Nor metadata, which the
    list does not show: 100 jobs of 8 KiB of it took 30-40 ms of the loop's CPU, 8 without."""
    listed, _ = await job_listing.page(
        session, key.id, Listing.JOBS, JobFilter(), None, PAGE_SIZE, with_metadata=False
    )
    # Rendered in a worker thread, where each plan is decoded (ListedJob.plan): decoded on the
    # event loop as their rows came, 100 model evaluations' plans (8 system prompts of 10,000
    # lines) took 150-170 ms of its CPU, 30-48 ms now.
    await session.close()
    return await in_thread(_rendered_job_list, request, {"key": key, "jobs": listed})


def _rendered_job_list(request: Request, context: dict[str, Any]) -> Response:
    costs = {listed.job.id: job_cost(listed.plan, listed.spent_usd) for listed in context["jobs"]}
    return templates.TemplateResponse(request, "jobs.html", {**context, "costs": costs})


def _blank_is_none(value: Any) -> Any:
    """The filter form sends `status=` for "any"."""
    return value or None


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(
    request: Request,
    job: ViewedJob,
    session: SessionDep,
    key: ViewerKey,
    status: Annotated[ItemStatus | None, BeforeValidator(_blank_is_none)] = None,
    accepted: Annotated[bool | None, BeforeValidator(_blank_is_none)] = None,
    cursor: Annotated[str | None, BeforeValidator(_blank_is_none)] = None,
) -> Response:
    """Progress, counts per stage and status, quality, and a page of items (filtered by status
    and by the quality gate's decision)."""
    if accepted is None:
        items, next_cursor = await jobs.page_items(session, job.id, status, cursor, PAGE_SIZE)
        gate = await _gate_decisions(session, [item.id for item in items])
    else:  # only items with a CoT have a gate decision
        rows, next_cursor = await jobs.page_cots(session, job.id, accepted, cursor, PAGE_SIZE)
        items = [item for _, item in rows if status in (None, item.status)]
        gate = {cot.item_id: cot.accepted for cot, _ in rows}
    context = {
        "key": key,
        "job": await job_out(session, job, with_duplicates=False),  # not on the page
        "mode": job.plan.mode,
        "items": items,
        "gate": gate,
        "filters": {
            "status": status or "",
            "accepted": "" if accepted is None else str(accepted).lower(),
        },
        "next_cursor": next_cursor,
        "statuses": get_args(ItemStatus),
    }
    report = await _report(session, job)
    # Computed and rendered in a worker thread: an evaluation's table of thousands of categories
    # or labels held every other request for 50-60 ms on the event loop, a comparison's means
    # and Wilson intervals 10 ms. Its connection given back first, as the API's routes give
    # theirs (app/api/json_answers.py).
    await session.close()
    return await in_thread(_rendered_job_page, request, context, report)


def _rendered_job_page(
    request: Request, context: dict[str, Any], report: Callable[[], dict[str, Any]]
) -> Response:
    return templates.TemplateResponse(request, "job.html", {**context, **report()})


async def _report(session: AsyncSession, job: Job) -> Callable[[], dict[str, Any]]:
    """The job's report as its own API route computes it, under the name job.html shows it by:
    a comparison's `report`, a sample or model evaluation's `samples` or `models`, a
    generation job's pair `candidates` (none without pairs). Read now; the callable computes
    it, with no more reads."""
    plan = job.plan
    if isinstance(plan, ComparisonPlan):
        figures = await comparisons.read(session, job)
        return lambda: {"report": figures()}
    if isinstance(plan, SampleEvaluationPlan):
        samples = await sample_evaluation_api.evaluation_read(session, job)
        return lambda: {"samples": samples()}
    if isinstance(plan, ModelEvaluationPlan):
        models = await model_evaluation_api.evaluation_read(session, job)
        return lambda: {"models": models()}
    candidates = await jobs.pair_candidates_read(session, job)
    return lambda: {"candidates": None if candidates is None else _CANDIDATES.validate_python(candidates())}


@router.get("/jobs/{job_id}/plots/{plot}.png")
async def job_plot(job: ViewedJob, session: SessionDep, plot: plots.Plot) -> Response:
    """A comparison's plots (as GET /v1/comparisons/{id}/plots/{plot}.png draws them), a
    sample evaluation's grader scores, a generation job's pair gaps; 404 for the others."""
    drawing = await _plot_drawing(session, job, plot)
    # Given back before the drawing's turn comes, as the API's plots give theirs.
    await session.close()
    return Response(await drawing(), media_type="image/png")


async def _plot_drawing(session: AsyncSession, job: Job, plot: plots.Plot) -> Callable[[], Awaitable[bytes]]:
    """The job's plot, its figures read now, to be drawn; NotFound if it has none."""
    plan, title = job.plan, job.label or f"Job {job.id}"
    if isinstance(plan, ComparisonPlan):
        return partial(plots.png, plot, await comparisons.figures(session, job))
    if plot is plots.Plot.SCORES and isinstance(plan, SampleEvaluationPlan) and plan.grader is not None:
        grades = await sample_evaluations.grades(session, job.id)
        return partial(plots.scores_png, title, [Side.of("samples", grades["metrics"])])
    if plot is plots.Plot.GAPS and isinstance(plan, GenerationPlan) and plan.pairs is not None:
        return partial(plots.gaps_png, title, await quality.pair_gap_counts(session, job.id))
    raise NotFound(f"job {job.id} has no {plot.value} plot")


async def _gate_decisions(session: AsyncSession, item_ids: list[UUID]) -> dict[UUID, bool | None]:
    rows = await session.execute(select(Cot.item_id, Cot.accepted).where(Cot.item_id.in_(item_ids)))
    return {item_id: accepted for item_id, accepted in rows}


async def _viewed(
    request: Request,
    job: ViewedJob,
    session: SessionDep,
    settings: SettingsDep,
    last_event_id: LastEventIdHeader = None,
) -> AsyncIterator[ResumedEvents]:
    session_id = _session_id(request, settings)

    async def session_live(own: AsyncSession) -> bool:  # not logged out, expired, or of a revoked key
        return session_id is not None and await web_sessions.live_key(own, session_id) is not None

    async with resumed(request, session, job, last_event_id, session_live) as events:
        yield events


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def job_events(events: Annotated[ResumedEvents, Depends(_viewed)]) -> AsyncIterator[ServerSentEvent]:
    """The job's progress events (as GET /v1/jobs/{id}/events) for the page's live progress."""
    async for event in server_sent(events):
        yield event


@router.get("/items/{item_id}", response_class=HTMLResponse)
async def item_page(request: Request, item_id: UUID, session: SessionDep, key: ViewerKey) -> Response:
    """The deliberation timeline, scores and gate, and the preference pair side by side.
    Hazardous text (beliefs, rejected CoTs) only for keys with `hazardous:read`."""
    reads_hazardous = keys.reads_hazardous(key)
    item, job = await jobs.get_item_owned(session, item_id, key.id)
    cot_row = await jobs.item_cot(session, item_id)
    turn_rows = await jobs.item_turns(session, item_id)
    turns = [views.turn_out(turn, reads_hazardous) for turn in turn_rows]
    cot = views.cot_out(cot_row, item) if cot_row else None
    kept = quality.kept_at(jobs.pairs_min_gap(job.plan))
    pair_row = (
        await session.execute(select(PreferencePair, kept).where(PreferencePair.item_id == item_id))
    ).one_or_none()
    known = views.policy_ids(await policy_sets.by_id(session, job.policy_set_id))
    pair = None
    if pair_row and cot_row:
        pair = views.pair_out(pair_row[0], item, cot_row, pair_row[1], reads_hazardous, known)
    context = {
        "key": key,
        "item": item,
        "job": job,
        "cot": cot,
        "turns": turns,
        "usage": views.item_usage(turn_rows),
        "pair": pair,
        "reads_hazardous": reads_hazardous,
    }
    # In a worker thread: the timeline diffs each revised response against the one before it,
    # in Python, up to some 10 ms each for up to 160 revisions (0.5 s on the event loop for 80
    # revisions of 190 repeated words), and the page holds every turn the item took. Its
    # connection given back first: eight such pages at once held seven for seconds, and a
    # key's score of them the API's whole pool.
    await session.close()
    return await in_thread(_rendered_item_page, request, context)


def _rendered_item_page(request: Request, context: dict[str, Any]) -> Response:
    cot = context["cot"]
    built = timeline.build(cot, context["turns"]) if cot else None
    return templates.TemplateResponse(request, "item.html", {**context, "timeline": built})
