"""The web viewer: login sessions, ownership, escaping, filters, and (in real headless Debian
Chromium driven by Playwright) the job page's live progress and an item's deliberation
timeline with its preference pair, redacted or not by the key's scope."""

from __future__ import annotations

import asyncio
import io
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select, update

from app.api.schemas import MAX_TARGETS, CotOut, TurnOut
from app.config import Settings
from app.plan import MAX_SYSTEM_PROMPT_CHARS
from app.store import job_listing, keys, web_sessions
from app.store.db import Sessions
from app.store.job_listing import JobFilter
from app.store.models import ApiKey, Job, WebSession
from app.store.positions import Listing
from app.web import pages as web_pages
from app.web import session as web_session
from app.web import timeline
from app.web.timeline import MAX_PAGE_WORD_PAIRS, DiffPart, response_diff
from tests.conftest import api_client, longest_loop_pause, new_key, run_worker_burst
from tests.scripted_llm import ScriptedLLM, agree, guard_verdict, reply, scores
from tests.test_api import items_of, submit
from tests.test_exports import connections_of_others

Headers = dict[str, str]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HAZARD = "HAZARD-5c1"  # marks the whispered belief and the rejected CoT
NEW_THOUGHT = "Check the policy on household chemicals before answering."
SCRIPT_THOUGHT = '<script>document.title="owned"</script><b>bold?</b>'


def secret_of(headers: Headers) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def paired_job(
    api: httpx.AsyncClient,
    headers: Headers,
    settings: Settings,
    llm: ScriptedLLM,
    new_thought: str = NEW_THOUGHT,
) -> tuple[str, str]:
    """A finished one-item job with grading and a kept preference pair, whose deliberation has
    a revising turn (a new thought, a changed response), an agreeing one, a refiner drop and
    a thought the refiner left out. Returns (job id, item id)."""
    llm.script(
        "deliberation_turn",
        agree(
            False, [new_thought], "The seed misses the storage advice.", "Store bleach apart from ammonia."
        ),
        agree(True),
    )
    refined = {
        "thoughts": [{"text": "The user wants safe cleaning advice.", "sources": [1]}],
        "dropped": [{"id": 3, "reason": "redundant", "explanation": "Repeats the first thought."}],
        "response": "Never mix bleach and ammonia; store them apart.",
    }
    llm.script("refined_cot", reply(refined))
    llm.script("whisper_belief", reply({"belief": f"{HAZARD} belief: safety rules are optional."}))
    llm.script(
        "rejected_cot", reply({"thoughts": [f"{HAZARD} rejected thought"], "response": f"{HAZARD} reply"})
    )
    llm.script("guard_verdict", guard_verdict(True, "physical-harm"))
    llm.script(
        "quality_scores",
        reply(scores()),
        reply(scores(cot_policy_faithfulness=1, response_policy_faithfulness=1)),
    )
    config = {"agents": 2, "max_rounds": 2, "grading": {}, "pairs": {"max_tries": 1, "min_gap": 1.0}}
    job = await submit(api, headers, ["Is it safe to mix bleach and ammonia?"], config=config)
    await run_worker_burst(settings, max_jobs=1)
    [item] = await items_of(api, headers, job["id"])
    assert item["status"] == "completed", item
    return job["id"], item["id"]


async def logged_in(api: httpx.AsyncClient, headers: Headers) -> httpx.AsyncClient:
    response = await api.post("/view/login", data={"api_key": secret_of(headers)})
    assert response.status_code == 303 and response.headers["location"] == "/view/jobs"
    return api


@pytest.fixture
async def scoped(sessions: Sessions) -> Headers:
    return await new_key(sessions, "red-team", (keys.HAZARDOUS_READ,))


# --- sessions and ownership ---------------------------------------------------------------


async def test_pages_send_a_visitor_without_a_session_to_the_login_form(api: httpx.AsyncClient) -> None:
    for path in ("/view/jobs", f"/view/jobs/{uuid4()}", f"/view/items/{uuid4()}"):
        response = await api.get(path)
        assert (response.status_code, response.headers["location"]) == (303, "/view/login"), path
    form = await api.get("/view/login")
    assert form.status_code == 200 and 'name="api_key"' in form.text


async def test_an_unknown_key_cannot_log_in(api: httpx.AsyncClient) -> None:
    response = await api.post("/view/login", data={"api_key": "aidsafe_not-a-key"})

    assert response.status_code == 401 and "Unknown or revoked API key." in response.text
    assert "set-cookie" not in response.headers


async def test_login_sets_a_signed_httponly_strict_cookie_that_is_not_the_key(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    response = await api.post("/view/login", data={"api_key": secret_of(auth)})

    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/view" in cookie
    assert secret_of(auth) not in cookie
    assert (await api.get("/view/jobs")).status_code == 200


def test_a_session_token_is_refused_when_altered_or_signed_with_another_secret() -> None:
    session_id, secret = uuid4(), b"s" * 32
    token = web_session.issue(session_id, secret)

    assert web_session.session_id_of(token, secret) == session_id
    assert web_session.session_id_of(token, b"t" * 32) is None
    assert web_session.session_id_of(token.replace(str(session_id), str(uuid4())), secret) is None


async def test_an_expired_session_no_longer_opens_the_viewer(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    await logged_in(api, auth)
    async with sessions.begin() as session:
        await session.execute(update(WebSession).values(expires_at=WebSession.created_at))

    response = await api.get("/view/jobs")

    assert (response.status_code, response.headers["location"]) == (303, "/view/login")


async def test_revoking_the_key_ends_its_viewer_session(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    await logged_in(api, auth)
    async with sessions.begin() as session:
        await session.execute(update(ApiKey).values(revoked_at=ApiKey.created_at))

    response = await api.get("/view/jobs")

    assert (response.status_code, response.headers["location"]) == (303, "/view/login")


async def test_another_keys_job_and_item_are_not_found(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    job = await submit(api, auth, ["mine"])
    [item] = await items_of(api, auth, job["id"])
    await logged_in(api, await new_key(sessions, "bob"))

    for path in (f"/view/jobs/{job['id']}", f"/view/items/{item['id']}", f"/view/jobs/{job['id']}/events"):
        response = await api.get(path)
        assert response.status_code == 404 and "Not found" in response.text, path
    listing = await api.get("/view/jobs")
    assert job["id"] not in listing.text


async def test_logging_out_ends_the_session(api: httpx.AsyncClient, auth: Headers) -> None:
    await logged_in(api, auth)

    await api.post("/view/logout")

    assert (await api.get("/view/jobs")).status_code == 303


async def test_a_logged_out_session_cookie_no_longer_opens_the_viewer(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    await logged_in(api, auth)
    kept = api.cookies[web_session.COOKIE]

    await api.post("/view/logout")

    response = await api.get("/view/jobs", headers={"Cookie": f"{web_session.COOKIE}={kept}"})
    assert (response.status_code, response.headers["location"]) == (303, "/view/login")


VIEWER_SESSIONS = 3  # per key, in the tests of the cap


async def login_cookie(api: httpx.AsyncClient, headers: Headers) -> str:
    """The session cookie of a new login with the key of `headers`."""
    response = await api.post("/view/login", data={"api_key": secret_of(headers)})
    assert response.status_code == 303 and response.headers["location"] == "/view/jobs"
    return response.cookies[web_session.COOKIE]


async def opens_the_viewer(api: httpx.AsyncClient, cookie: str) -> bool:
    response = await api.get("/view/jobs", headers={"Cookie": f"{web_session.COOKIE}={cookie}"})
    assert response.status_code == 200 or response.headers["location"] == "/view/login"
    return response.status_code == 200


async def stored_sessions_per_key(sessions: Sessions) -> dict[UUID, int]:
    async with sessions() as session:
        counted = await session.execute(select(WebSession.key_id, func.count()).group_by(WebSession.key_id))
        return {key_id: count for key_id, count in counted}


@pytest.fixture
async def capped_api(settings: Settings, sessions: Sessions) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(
        settings.model_copy(update={"max_viewer_sessions_per_key": VIEWER_SESSIONS})
    ) as api:
        yield api


async def test_a_login_past_the_keys_cap_ends_its_oldest_session_only(
    capped_api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Each login makes a row that lives for hours: a key logging in in a loop made 150 a
    second, live and so never purged, without bound. A login past the cap is not refused:
    the browser logged in longest ago is logged out."""
    other = await new_key(sessions, "other")
    other_cookies = [await login_cookie(capped_api, other) for _ in range(VIEWER_SESSIONS)]
    cookies = [await login_cookie(capped_api, auth) for _ in range(VIEWER_SESSIONS + 1)]

    assert sorted((await stored_sessions_per_key(sessions)).values()) == [VIEWER_SESSIONS, VIEWER_SESSIONS]
    assert [await opens_the_viewer(capped_api, cookie) for cookie in cookies] == [False, True, True, True]
    assert all([await opens_the_viewer(capped_api, cookie) for cookie in other_cookies])


async def test_logins_at_once_never_leave_a_key_more_sessions_than_its_cap(
    capped_api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Each login that counted the key's sessions missed those of the logins under way beside
    it, not committed yet, and kept the cap's worth beside its own."""
    cookies = await asyncio.gather(*(login_cookie(capped_api, auth) for _ in range(6 * VIEWER_SESSIONS)))

    assert list((await stored_sessions_per_key(sessions)).values()) == [VIEWER_SESSIONS]
    assert sum([await opens_the_viewer(capped_api, cookie) for cookie in cookies]) == VIEWER_SESSIONS


async def test_logged_out_sessions_take_none_of_a_keys_places_among_its_newest(sessions: Sessions) -> None:
    """The newest sessions a key keeps counted those it had logged out of: a script logging in
    and out with the key ended, after as many rounds as the cap, the login of every browser
    still using it."""
    async with sessions.begin() as session:
        key, _ = await keys.create_key(session, "in-and-out")
        browser = await web_sessions.start(session, key.id, 3600, VIEWER_SESSIONS)
    for _ in range(VIEWER_SESSIONS):
        async with sessions.begin() as session:
            await web_sessions.end(session, await web_sessions.start(session, key.id, 3600, VIEWER_SESSIONS))
    async with sessions() as session:
        assert await web_sessions.live_key(session, browser) is not None


CROSS_SITE = {
    "another origin": {"Origin": "https://evil.example"},
    "an opaque origin": {"Origin": "null"},
    "another scheme": {"Origin": "https://api"},
    "fetch metadata cross-site": {"Sec-Fetch-Site": "cross-site"},
    "fetch metadata same-site": {"Sec-Fetch-Site": "same-site"},
}


@pytest.mark.parametrize("headers", CROSS_SITE.values(), ids=CROSS_SITE.keys())
async def test_a_cross_site_login_is_refused(api: httpx.AsyncClient, auth: Headers, headers: Headers) -> None:
    response = await api.post("/view/login", data={"api_key": secret_of(auth)}, headers=headers)

    assert response.status_code == 403 and "set-cookie" not in response.headers
    assert (await api.get("/view/jobs")).status_code == 303


@pytest.mark.parametrize("headers", CROSS_SITE.values(), ids=CROSS_SITE.keys())
async def test_a_cross_site_logout_is_refused(
    api: httpx.AsyncClient, auth: Headers, headers: Headers
) -> None:
    await logged_in(api, auth)

    response = await api.post("/view/logout", headers=headers)

    assert response.status_code == 403 and "set-cookie" not in response.headers
    assert (await api.get("/view/jobs")).status_code == 200


async def test_a_same_origin_login_and_logout_from_a_browser_are_accepted(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    browser = {"Origin": "http://api", "Sec-Fetch-Site": "same-origin"}

    login = await api.post("/view/login", data={"api_key": secret_of(auth)}, headers=browser)
    logout = await api.post("/view/logout", headers=browser)

    assert (login.status_code, logout.status_code) == (303, 303)
    assert (await api.get("/view/jobs")).status_code == 303


# --- what the pages show ------------------------------------------------------------------


async def test_model_output_is_shown_as_text_never_as_markup(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    _, item_id = await paired_job(api, auth, settings, scripted_llm, new_thought=SCRIPT_THOUGHT)
    await logged_in(api, auth)

    page = await api.get(f"/view/items/{item_id}")

    assert page.status_code == 200
    assert "&lt;script&gt;document.title=&#34;owned&#34;&lt;/script&gt;&lt;b&gt;bold?&lt;/b&gt;" in page.text
    assert "<script>document.title" not in page.text and "<b>bold?" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


async def test_bidirectional_controls_are_shown_as_marked_escapes_not_applied(
    api: httpx.AsyncClient, auth: Headers
) -> None:
    """Autoescaping leaves a right-to-left override or isolate as it is, and the browser showed
    the text after it reversed: a prompt or a label read as what it is not (Trojan Source).
    Shown marked, it reads apart from the same escape written as text."""
    controls = "".join(map(chr, (*range(0x202A, 0x202F), *range(0x2066, 0x206A))))
    prompt = "<b>written \\u202e, sent \u202edesrever\u202c</b>"
    job = await submit(api, auth, [prompt], label="run\u2067 1")
    [item] = await items_of(api, auth, job["id"])
    await logged_in(api, auth)

    listing = (await api.get("/view/jobs")).text
    job_page = (await api.get(f"/view/jobs/{job['id']}")).text
    item_page = (await api.get(f"/view/items/{item['id']}")).text

    assert "<td>run<span class=control>\\u2067</span> 1</td>" in listing
    marked = "<span class=control>\\u202e</span>desrever<span class=control>\\u202c</span>"
    shown = f"&lt;b&gt;written \\u202e, sent {marked}&lt;/b&gt;"
    assert shown in job_page and shown in item_page
    assert not set(controls) & set(listing + job_page + item_page)


async def test_each_explicit_intent_shows_its_label(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    explicit = [
        {"intent": "Store bleach.", "label": "benign"},
        {"intent": "Make a toxic gas.", "label": "possibly_harmful"},
    ]
    scripted_llm.script("intent_decomposition", reply({"explicit_intents": explicit, "implicit_intents": []}))
    _, item_id = await paired_job(api, auth, settings, scripted_llm)
    await logged_in(api, auth)

    page = (await api.get(f"/view/items/{item_id}")).text

    assert 'Store bleach. <span class="tag ok">benign</span>' in page
    assert 'Make a toxic gas. <span class="tag bad">possibly harmful</span>' in page


async def test_the_job_page_filters_items_by_status_and_gate(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("quality_scores", reply(scores()), reply(scores(relevance=1)))
    job = await submit(api, auth, ["first prompt", "second prompt", "third prompt"], config={"grading": {}})
    scripted_llm.script("intent_decomposition", reply({"explicit_intents": [], "implicit_intents": []}))
    await run_worker_burst(settings, max_jobs=1)
    await logged_in(api, auth)
    url = f"/view/jobs/{job['id']}"

    async def rows(**filters: str) -> int:
        page = await api.get(url, params=filters)
        assert page.status_code == 200, page.text
        return page.text.count('class="item-row"')

    assert await rows() == 3
    assert await rows(status="", accepted="") == 3  # the form's "any"
    assert await rows(accepted="true") + await rows(accepted="false") == (await rows(status="completed"))
    assert await rows(status="failed") == 3 - await rows(status="completed")
    assert (await api.get(url, params={"status": "lost"})).status_code == 400


@pytest.mark.parametrize("range_", ["bytes=abc", "bytes=5-2", "items=0-1", "bytes=999999-", "bytes=0-9"])
async def test_the_viewers_static_files_are_served_whole_with_its_headers_whatever_range_is_asked(
    api: httpx.AsyncClient, range_: str
) -> None:
    """A malformed or unsatisfiable Range had FileResponse's own bare 400 or empty 416, without
    the viewer's headers (and HTTP says a Range of an unknown unit is ignored, not refused)."""
    whole = (Path(web_pages.__file__).parent / "static" / "viewer.css").read_bytes()

    response = await api.get("/view/static/viewer.css", headers={"Range": range_})

    assert (response.status_code, response.content) == (200, whole), response.text[:100]
    assert response.headers["content-type"].startswith("text/css")
    assert {
        name: response.headers.get(name) for name in web_pages.SECURITY_HEADERS
    } == web_pages.SECURITY_HEADERS


def test_a_response_diff_marks_words_added_and_removed() -> None:
    assert response_diff("Mix a and b.", "Mix a or b.") == [
        DiffPart("same", "Mix a "),
        DiffPart("removed", "and "),
        DiffPart("added", "or "),
        DiffPart("same", "b."),
    ]
    parts = response_diff("Mix them carefully.", "Never mix them, ever.")
    assert "".join(p.text for p in parts if p.kind != "added") == "Mix them carefully."
    assert "".join(p.text for p in parts if p.kind != "removed") == "Never mix them, ever."


def test_a_long_response_repeating_its_words_is_diffed_in_well_under_a_second() -> None:
    before, after = "a " * 2_000, "a " * 1_000 + "b " + "a " * 1_000

    started = time.perf_counter()
    parts = response_diff(before, after)

    assert time.perf_counter() - started < 0.5  # 3-4 s matching every "a" against every other
    assert "".join(p.text for p in parts if p.kind != "added") == before
    assert "".join(p.text for p in parts if p.kind != "removed") == after


def test_a_long_response_of_words_drawn_from_a_few_score_is_diffed_in_well_under_a_second() -> None:
    """The model's words are the tenant's to steer: 10,000 drawn from 120 (none in over 1 % of
    the response, so none is autojunk) took 0.6-2 s a diff, and an item's page diffs up to 160
    revisions in one of the API's few worker threads (minutes of CPU for one page). A revision
    in one place is still shown word by word."""
    draw, vocabulary = random.Random(1), [f"w{n} " for n in range(120)]
    words, rewritten = ([draw.choice(vocabulary) for _ in range(10_000)] for _ in range(2))
    before, after = "".join(words), "".join(rewritten)

    started = time.perf_counter()
    parts = response_diff(before, after)

    assert time.perf_counter() - started < 0.1
    assert "".join(p.text for p in parts if p.kind != "added") == before
    assert "".join(p.text for p in parts if p.kind != "removed") == after
    assert response_diff(before, "".join([*words[:5_000], "changed ", *words[5_001:]])) == [
        DiffPart("same", "".join(words[:5_000])),
        DiffPart("removed", words[5_000]),
        DiffPart("added", "changed "),
        DiffPart("same", "".join(words[5_001:])),
    ]


def test_an_items_page_matches_a_bounded_number_of_word_pairs_in_all() -> None:
    """Each diff is bounded, but a page may show 160 revisions: of the worst words, 1.6 s of one
    of the API's few worker threads, which every request shares. Past the page's budget a
    revision is shown replaced whole."""
    draw, vocabulary = random.Random(2), [f"w{n} " for n in range(120)]
    responses = ["".join(draw.choice(vocabulary) for _ in range(480)) for _ in range(41)]

    def turn(stage: str, round_no: int, **answer: Any) -> TurnOut:
        return TurnOut.model_construct(stage=stage, round=round_no, agent=0, outcome="ok", parsed=answer)

    turns = [turn("seed", 0, response=responses[0])] + [
        turn("deliberation", n, agree=False, response=response)
        for n, response in enumerate(responses[1:], start=1)
    ]

    cot = CotOut.model_construct(thoughts=[], intents={}, unaccounted_thought_ids=[])
    shown = timeline.build(cot, turns)

    diffs = [step.response_diff for step in shown.steps]
    assert len(diffs) == 40 and all(diff is not None for diff in diffs)
    matched = [diff for diff in diffs if diff is not None and len(diff) > 2]
    assert len(matched) == MAX_PAGE_WORD_PAIRS // 480**2 == 10
    assert diffs[-1] == [DiffPart("removed", responses[-2]), DiffPart("added", responses[-1])]


async def test_an_items_page_diffs_its_revised_responses_off_the_event_loop(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    # Under 200 words, where every word is matched however common: some 10 ms of Python each.
    revisions = [("a " * 95 + "b ") * 2, ("b " + "a " * 95) * 2]
    scripted_llm.script("deliberation_turn", *(agree(False, response=revisions[n % 2]) for n in range(80)))
    job = await submit(api, auth, ["How do I store rice?"], config={"agents": 4, "max_rounds": 20})
    await run_worker_burst(settings)
    [item] = await items_of(api, auth, job["id"])
    await logged_in(api, auth)

    response, held = await longest_loop_pause(api.get(f"/view/items/{item['id']}"))

    assert response.status_code == 200, response.text
    assert response.text.count("<ins>") >= 80  # every revision diffed against the one before
    assert held < 0.1, held  # 0.5 s and more on the event loop


async def loop_cpu(
    route: Callable[[], Awaitable[httpx.Response]], on_the_loop: Callable[[], Awaitable[None]]
) -> tuple[httpx.Response, float, float]:
    """The CPU the event loop's thread spent on the route (what worker threads spend is not
    counted), and on `on_the_loop`: the route's work before, done on the loop. Each the least of
    five, taken in turn: a loaded machine slows all code for a while."""
    spent = spent_on_the_loop = float("inf")
    for _ in range(5):
        started = time.thread_time()
        response = await route()
        spent = min(spent, time.thread_time() - started)
        started = time.thread_time()
        await on_the_loop()
        spent_on_the_loop = min(spent_on_the_loop, time.thread_time() - started)
    return response, spent, spent_on_the_loop


async def test_the_job_list_decodes_its_jobs_plans_off_the_event_loop(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A model evaluation's plan holds its targets' system prompts, up to 8 of 20,000
    characters. The list of 100 such jobs decoded and validated their plans on the event loop,
    a row at a time as the rows came: its longest pause grew little (6 ms against 3), but with
    prompts of many lines, each line break escaped in the JSON, the loop's thread spent
    150-170 ms of CPU on the page. Read as text and decoded in the thread that renders the page,
    30-48 ms (reading the rows)."""
    # Imported here: tests.test_page_sizes imports this module.
    from tests.test_page_sizes import older_copies

    system_prompt = "-\n" * (MAX_SYSTEM_PROMPT_CHARS // 2)
    targets = [
        {"name": f"t{n}", "model": f"m{n}", "system_prompt": system_prompt} for n in range(MAX_TARGETS)
    ]
    benchmark = {"name": "b", "prompts": [{"prompt": "p", "expected": "refuse", "category": "c"}]}
    body = {"benchmarks": [benchmark], "targets": targets}
    submitted = await api.post("/v1/model-evaluations", json=body, headers=auth)
    assert submitted.status_code == 202, submitted.text
    async with sessions.begin() as session:
        job = await session.get_one(Job, UUID(submitted.json()["id"]))
        await older_copies(session, job.id, web_pages.PAGE_SIZE - 1)
    await logged_in(api, auth)

    async def decoded_on_the_loop() -> None:
        """The page read and its plans decoded on the event loop: the route's work before."""
        async with sessions() as session:
            listed, _ = await job_listing.page(
                session, job.owner_key_id, Listing.JOBS, JobFilter(), None, web_pages.PAGE_SIZE
            )
        assert {listed_job.plan.mode for listed_job in listed} == {"model_evaluation"}

    response, spent, spent_on_the_loop = await loop_cpu(lambda: api.get("/view/jobs"), decoded_on_the_loop)

    assert response.status_code == 200, response.text
    assert response.text.count("<td>model_evaluation</td>") == web_pages.PAGE_SIZE
    # Against 150-165 ms on the loop; the old route, 150-173 against the same.
    assert spent < 0.5 * spent_on_the_loop, f"the loop spent {spent:.3f} s of CPU; {spent_on_the_loop:.3f} s"


async def test_the_job_list_reads_none_of_its_jobs_metadata(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """A job's metadata may be 8 KiB of JSON, some 4,000 values: the list does not show it, yet
    read the page with it, as GET /v1/jobs does, decoded on the event loop as the rows came (100
    such jobs: 30-40 ms of its CPU; 8 ms without)."""
    # Imported here: tests.test_page_sizes imports this module.
    from tests.test_page_sizes import older_copies

    job = await submit(api, auth, ["a"])
    async with sessions.begin() as session:
        await session.execute(
            update(Job).where(Job.id == UUID(job["id"])).values(job_metadata={"v": [0] * 4_000})
        )
        await older_copies(session, UUID(job["id"]), web_pages.PAGE_SIZE - 1)
        owner_key_id = (await session.get_one(Job, UUID(job["id"]))).owner_key_id
    await logged_in(api, auth)

    async def read_with_metadata() -> None:
        """The page read with its metadata, on the event loop: the route's read before."""
        async with sessions() as session:
            await job_listing.page(
                session, owner_key_id, Listing.JOBS, JobFilter(), None, web_pages.PAGE_SIZE
            )

    response, spent, spent_on_the_loop = await loop_cpu(lambda: api.get("/view/jobs"), read_with_metadata)

    assert response.status_code == 200, response.text
    assert response.text.count('<a href="/view/jobs/') == web_pages.PAGE_SIZE
    assert spent < 0.6 * spent_on_the_loop, f"the loop spent {spent:.3f} s of CPU; {spent_on_the_loop:.3f} s"


async def test_items_pages_being_rendered_hold_no_database_connection(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    """A page of many revisions takes a second or so to render on a busy machine, in a worker
    thread: rendering, a request held its Postgres connection in an open transaction, and
    one key's score of such pages held the API's whole pool."""
    revisions = [("a " * 95 + "b ") * 2, ("b " + "a " * 95) * 2]
    scripted_llm.script("deliberation_turn", *(agree(False, response=revisions[n % 2]) for n in range(80)))
    job = await submit(api, auth, ["How do I store rice?"], config={"agents": 4, "max_rounds": 20})
    await run_worker_burst(settings)
    [item] = await items_of(api, auth, job["id"])
    await logged_in(api, auth)
    pages = [asyncio.ensure_future(api.get(f"/view/items/{item['id']}")) for _ in range(8)]

    # Each read what it shows long before the first is rendered: from then on, only rendering.
    await asyncio.wait(pages, return_when=asyncio.FIRST_COMPLETED)
    held = []
    while not all(page.done() for page in pages):
        held.append(await connections_of_others(sessions, "idle in transaction"))
        await asyncio.sleep(0.02)

    assert [(await page).status_code for page in pages] == [200] * 8
    assert not any(held), held


# --- in real headless Chromium ------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: scripts/install-browser.sh installs Debian's chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        await browser.close()


async def browser_login(browser: Any, live_api: str, headers: Headers) -> Any:
    context = await browser.new_context(base_url=live_api, viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto("/view/jobs")  # redirected to the form
    assert page.url.endswith("/view/login")
    await page.fill("#api_key", secret_of(headers))
    await page.click("#login button[type=submit]")
    await page.wait_for_url("**/view/jobs")
    return page


async def test_in_chromium_a_default_key_sees_the_timeline_with_the_hazardous_side_redacted(
    live_api: str,
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    scripted_llm: ScriptedLLM,
    browser: Any,
    tmp_path: Path,
) -> None:
    job_id, item_id = await paired_job(api, auth, settings, scripted_llm)
    page = await browser_login(browser, live_api, auth)

    await page.click(f"a[href='/view/jobs/{job_id}']")
    await page.wait_for_url(f"**/view/jobs/{job_id}")
    assert await page.text_content("#job-status") == "completed"
    assert "1 kept of 1" in (await page.text_content("#pairs-summary") or "")
    await page.select_option("select[name=accepted]", "true")
    await page.click(".filters button")
    await page.wait_for_url("**accepted=true**")
    assert await page.locator(".item-row").count() == 1
    await page.click(f"#item-list a[href='/view/items/{item_id}'] >> nth=0")
    await page.wait_for_url(f"**/view/items/{item_id}")

    assert await page.locator("#intents .intent").count() >= 1
    assert await page.locator("#seed .thought").count() == 2
    rounds = page.locator(".timeline .round")
    assert await rounds.count() == 2
    revising = rounds.nth(0)
    assert NEW_THOUGHT in (await revising.locator(".thoughts.new").text_content() or "")
    added = " ".join(await revising.locator(".diff ins").all_text_contents())
    assert "Store bleach apart from ammonia." in added
    assert "agreed" in (await rounds.nth(1).get_attribute("class") or "")
    dropped = page.locator("#refiner .dropped")
    assert await dropped.count() == 1 and "redundant" in (await dropped.text_content() or "")
    assert await page.locator("#refiner .unaccounted").count() == 1  # T2: neither kept nor dropped
    assert await page.locator("#scores tr").count() == 7  # a header and six metrics
    assert "accepted" in (await page.text_content("#gate") or "")
    assert (
        await page.locator("#pair .chosen").is_visible()
        and await page.locator("#pair .rejected").is_visible()
    )
    assert await page.locator("#redacted-note").is_visible()
    assert HAZARD not in await page.content()

    shot = tmp_path / "item-redacted.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert_rendered(shot)


async def test_in_chromium_a_scoped_key_reads_the_belief_and_the_rejected_cot(
    live_api: str,
    api: httpx.AsyncClient,
    scoped: Headers,
    settings: Settings,
    scripted_llm: ScriptedLLM,
    browser: Any,
    tmp_path: Path,
) -> None:
    _, item_id = await paired_job(api, scoped, settings, scripted_llm)
    page = await browser_login(browser, live_api, scoped)

    await page.goto(f"/view/items/{item_id}")

    rejected = await page.text_content("#pair .rejected") or ""
    assert (
        f"{HAZARD} belief" in rejected
        and f"{HAZARD} rejected thought" in rejected
        and f"{HAZARD} reply" in rejected
    )
    assert await page.locator("#redacted-note").count() == 0
    await page.screenshot(path=str(tmp_path / "item-scoped.png"), full_page=True)
    assert_rendered(tmp_path / "item-scoped.png")


async def test_in_chromium_the_job_page_follows_progress_live(
    live_api: str, api: httpx.AsyncClient, auth: Headers, settings: Settings, browser: Any
) -> None:
    job = await submit(api, auth, ["a", "b"])
    page = await browser_login(browser, live_api, auth)
    await page.goto(f"/view/jobs/{job['id']}")
    assert await page.text_content("#job-status") == "queued"
    await page.wait_for_timeout(500)  # the EventSource connects

    await run_worker_burst(settings)

    await page.wait_for_selector("#job-status.completed", timeout=20_000)
    assert await page.locator("#live-note").count() == 0  # reloaded as a finished job
    assert await page.locator(".item-row").count() == 2


def assert_rendered(png: Path) -> None:
    """The screenshot is a real page: a decodable PNG of plausible size, not one flat colour."""
    data = png.read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width == 1280 and image.height >= 900
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the page rendered (almost) blank"
