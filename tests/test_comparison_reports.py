"""A comparison's report over HTTP: Markdown and CSV with intervals, and PNG plots, for the
comparison's owner only."""

from __future__ import annotations

import asyncio
import csv
import io
from collections import Counter
from dataclasses import asdict
from typing import Any
from uuid import UUID

import httpx
import pytest
from PIL import Image
from sqlalchemy import (
    ColumnElement,
    Integer,
    cast,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.config import Settings
from app.deliberation.results import METRICS, SCORE_SCALE
from app.reports.comparison_stats import counted_results
from app.stats import cohen_kappa, fleiss_kappa, mean, proportion
from app.store.db import Sessions
from app.store.models import Cot, Item, Judgement, PairCandidate
from tests.conftest import least_loop_pause, new_key, run_worker_burst
from tests.scripted_llm import ScriptedLLM
from tests.test_api import error_of
from tests.test_exports import connections_of_others
from tests.test_quality_api import (
    GRADED,
    PAIRED,
    a_grade,
    compare,
    completed,
    finished_job,
    judged,
    kept_pair,
)
from tests.test_viewer import logged_in

Headers = dict[str, str]
PROMPTS = ["a", "b", "c"]


async def finished_comparison(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> str:
    """Baseline scored 3 and candidate 5 on CoT policy faithfulness; the candidate has pairs
    with gaps 2 and 3; the judge prefers the candidate twice and ties once."""
    weaker = [completed(a_grade(cot_policy_faithfulness=3))] * 3
    baseline = await finished_job(api, auth, sessions, weaker, {**GRADED, "mode": "zero_shot"}, PROMPTS)
    stronger = [completed(a_grade(cot_policy_faithfulness=5), kept_pair(gap)) for gap in (2.0, 3.0, 3.0)]
    candidate = await finished_job(api, auth, sessions, stronger, PAIRED, PROMPTS)
    scripted_llm.script("pairwise_judgement", *judged("B", "A"), *judged("B", "A"), *judged("A", "A"))
    response = await compare(
        api, auth, baseline, candidate, label="rice and bleach", judge={"model": "judge-model"}
    )
    assert response.status_code == 202, response.text
    await run_worker_burst(settings, max_jobs=1)
    return str(response.json()["id"])


async def test_the_report_gives_means_shares_and_gaps_with_intervals(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    comparison = await finished_comparison(api, auth, sessions, settings, scripted_llm)

    markdown = await api.get(f"/v1/comparisons/{comparison}/report", headers=auth)
    assert markdown.status_code == 200
    assert markdown.headers["content-type"].startswith("text/markdown")
    text = markdown.text
    assert text.startswith("# rice and bleach\n") and "3 prompts compared" in text
    assert "| cot_policy_faithfulness | 3.00 [3.00, 3.00] | 5.00 [5.00, 5.00] | +2.00 |" in text
    assert "| baseline (zero-shot) | candidate (AIDSAFE) |" in text
    assert "| judge-model | 3 | 67% [21%, 94%] | 33% [6%, 79%] | 0% [0%, 56%] |" in text
    assert "| whisper | 3 | 2.67 [1.23, 4.00] |" in text
    assert "![Grader score distributions](scores.png)" in text and "(gaps.png)" in text
    assert (
        "> baseline written by scripted-model; candidate written by scripted-model; judged by judge-model."
        in text
    )

    table = await api.get(f"/v1/comparisons/{comparison}/report", params={"format": "csv"}, headers=auth)
    assert table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    faithfulness = {r["side"]: float(r["value"]) for r in rows if r["name"] == "cot_policy_faithfulness"}
    assert faithfulness == {"baseline (zero-shot)": 3.0, "candidate (AIDSAFE)": 5.0}


async def test_plots_are_pngs_served_to_the_api_and_shown_in_the_viewer(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, settings: Settings, scripted_llm: ScriptedLLM
) -> None:
    comparison = await finished_comparison(api, auth, sessions, settings, scripted_llm)
    for plot in ("scores", "gaps"):
        response = await api.get(f"/v1/comparisons/{comparison}/plots/{plot}.png", headers=auth)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).format == "PNG"
    unknown = await api.get(f"/v1/comparisons/{comparison}/plots/violin.png", headers=auth)
    error_of(unknown, 422, "validation_error")

    await logged_in(api, auth)
    page = (await api.get(f"/view/jobs/{comparison}")).text
    assert 'id="comparison-report"' in page and "candidate (AIDSAFE)" in page
    assert "Judge judge-model, 3 judged:" in " ".join(page.split())
    for plot in ("scores", "gaps"):
        assert f'src="/view/jobs/{comparison}/plots/{plot}.png"' in page
        shown = await api.get(f"/view/jobs/{comparison}/plots/{plot}.png")
        assert shown.status_code == 200 and Image.open(io.BytesIO(shown.content)).format == "PNG"


@pytest.mark.parametrize("plot", ["scores", "gaps"])
async def test_a_label_matplotlib_would_read_as_math_titles_the_plots_as_written(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, plot: str
) -> None:
    """The label is the plots' title, the client's text: matplotlib read `$...$` in it as
    math, and one it could not parse (an unknown command) made the plot a 500."""
    baseline = await finished_job(api, auth, sessions, [completed()], prompts=["x"])
    candidate = await finished_job(api, auth, sessions, [completed()], prompts=["x"])
    comparison = (await compare(api, auth, baseline, candidate, label="costs $\\undefined$")).json()["id"]

    response = await api.get(f"/v1/comparisons/{comparison}/plots/{plot}.png", headers=auth)

    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).format == "PNG"


@pytest.mark.parametrize("path", ["/v1/comparisons/{id}/plots/gaps.png", "/view/jobs/{id}/plots/gaps.png"])
async def test_plots_waiting_their_turn_to_be_drawn_hold_no_database_connection(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, path: str
) -> None:
    """Plots are drawn two at a time, a second or so each on a busy machine, and a request
    waiting its turn held its Postgres connection, in an open transaction: one key's 20 plot
    requests held the API's 20, and every tenant's requests waited for them."""
    baseline = await finished_job(api, auth, sessions, [completed()], prompts=["x"])
    candidate = await finished_job(api, auth, sessions, [completed()], prompts=["x"])
    comparison = (await compare(api, auth, baseline, candidate)).json()["id"]
    await logged_in(api, auth)
    url = path.format(id=comparison)
    plots = [asyncio.ensure_future(api.get(url, headers=auth)) for _ in range(6)]

    # Each read what it draws long before the first is drawn: from then on, only drawing.
    await asyncio.wait(plots, return_when=asyncio.FIRST_COMPLETED)
    held = []
    while not all(plot.done() for plot in plots):
        held.append(await connections_of_others(sessions, "idle in transaction"))
        await asyncio.sleep(0.02)

    assert [(await plot).status_code for plot in plots] == [200] * 6
    assert not any(held), held


async def test_another_keys_comparison_and_a_plain_job_have_no_report(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    baseline = await finished_job(api, auth, sessions, [completed()], prompts=["x"])
    candidate = await finished_job(api, auth, sessions, [completed()], prompts=["x"])
    comparison = (await compare(api, auth, baseline, candidate)).json()["id"]
    assert (await api.get(f"/v1/comparisons/{comparison}/report", headers=auth)).status_code == 200
    other = await new_key(sessions, "mallory")
    for path in ("report", "plots/scores.png"):
        error_of(await api.get(f"/v1/comparisons/{comparison}/{path}", headers=other), 404, "not_found")
    error_of(await api.get(f"/v1/comparisons/{baseline}/report", headers=auth), 404, "not_found")


def every_metric_scored(score: ColumnElement[Any]) -> ColumnElement[Any]:
    """SQL: the CoT's scores with every metric's score set to `score`."""
    scores: ColumnElement[Any] = Cot.__table__.c.scores
    for metric in METRICS:
        scores = func.jsonb_set(scores, [metric, "score"], score)
    return scores


async def copies_of_the_first_cot(session: AsyncSession, job_id: str) -> None:
    """Every other item of the job given the CoT its first item completed with, as if the
    workers had written them all, each scored 1 to 5 on every metric by its position."""
    first = select(Cot).where(Cot.job_id == UUID(job_id)).subquery()
    copied = [c.name for c in Cot.__table__.columns if c.name not in ("id", "item_id", "position")]
    rows = (
        select(func.gen_random_uuid(), Item.id, Item.position, *(first.c[name] for name in copied))
        .select_from(Item)
        .join(first, Item.id != first.c.item_id)
        .where(Item.job_id == UUID(job_id))
    )
    await session.execute(insert(Cot).from_select(["id", "item_id", "position", *copied], rows))
    score = func.to_jsonb(1 + Cot.position % 5)
    scores = every_metric_scored(score)
    await session.execute(update(Cot).where(Cot.job_id == UUID(job_id)).values(scores=scores))


async def judged_comparison(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, prompts: int, judges: int, winner: str
) -> UUID:
    """A comparison of `prompts` prompts, each side's CoTs scored 1 to 5 by position, the
    candidate with a pair candidate of each method per prompt, and every prompt judged by each
    of `judges` judges as the workers would leave them: `winner`, SQL over items.position and
    judges.judge, gives the verdict."""
    texts = [f"prompt {n}" for n in range(prompts)]
    weaker = [completed(a_grade(cot_policy_faithfulness=3))]
    baseline = await finished_job(api, auth, sessions, weaker, {**GRADED, "mode": "zero_shot"}, texts)
    candidate = await finished_job(api, auth, sessions, [completed(a_grade())], GRADED, texts)
    async with sessions.begin() as session:
        for job in (baseline, candidate):
            await copies_of_the_first_cot(session, job)
        for method in ("whisper", "standard"):  # a pair candidate of each method per prompt
            gap = (Item.position % 9 - 4) / 2.0
            made = select(Item.id, literal(method), literal(1), Item.job_id, gap).where(
                Item.job_id == UUID(candidate)
            )
            columns = ["item_id", "method", "number", "job_id", "gap"]
            await session.execute(insert(PairCandidate).from_select(columns, made))
    submitted = await compare(
        api, auth, baseline, candidate, judges=[{"model": f"judge-{n}"} for n in range(judges)]
    )
    assert submitted.status_code == 202, submitted.text
    comparison = UUID(submitted.json()["id"])
    async with sessions.begin() as session:
        judge = func.generate_series(0, judges - 1).table_valued("judge").render_derived("judges")
        verdicts = (
            select(
                func.gen_random_uuid(),
                Item.id,
                judge.c.judge,
                Item.job_id,
                Item.position,
                Item.baseline_item_id,
                Item.candidate_item_id,
                literal_column(winner),
                literal([], Judgement.votes.type),
            )
            .select_from(Item)
            .join(judge, literal(True))
            .where(Item.job_id == comparison)
        )
        columns = ["id", "item_id", "judge", "job_id", "position", "a_item_id", "b_item_id", "winner"]
        await session.execute(insert(Judgement).from_select([*columns, "votes"], verdicts))
    return comparison


# Each of the four verdicts in turn, by prompt and judge.
IN_TURN = "(ARRAY['a', 'b', 'tie', NULL])[1 + (items.position + judges.judge) % 4]"


@pytest.mark.parametrize("format", ["markdown", "csv"])
async def test_a_report_of_10000_prompts_and_5_judges_is_computed_off_the_event_loop(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, format: str
) -> None:
    """The verdict counts, means and intervals of a comparison this large (with 20,000 pair
    candidates) took a core for a tenth of a second, and held every other request meanwhile;
    computed in a thread, the loop still read the 20,000 gaps: 14-17 ms at a stretch; counted
    in SQL, 7 ms."""
    comparison = await judged_comparison(api, auth, sessions, 10_000, 5, IN_TURN)

    # The loop thread's own CPU: on a machine as loaded as the route is long, wall-clock
    # pauses vary by more than the route's hold.
    response, held = await least_loop_pause(
        lambda: api.get(f"/v1/comparisons/{comparison}/report", params={"format": format}, headers=auth),
        times=5,
    )

    assert response.status_code == 200, response.text
    assert "judge-4" in response.text and "whisper" in response.text
    # Under CI's load the 7 ms reached 11.3: the bound keeps the tenth of a second out, not
    # the last milliseconds.
    assert held < 0.04, f"the event loop was held for {held:.3f} s of CPU"


async def test_a_comparison_of_10000_prompts_and_5_judges_is_shown_without_reading_every_verdict(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """Its 50,000 verdicts and 10,000 pairs of scores, read row by row on the event loop,
    held every other request for 60 ms of CPU at a stretch; the verdicts counted in SQL, 14
    ms; the scores too, 3 ms."""
    comparison = await judged_comparison(api, auth, sessions, 10_000, 5, IN_TURN)

    response, held = await least_loop_pause(
        lambda: api.get(f"/v1/comparisons/{comparison}", headers=auth), times=5
    )

    assert response.status_code == 200, response.text
    shown = response.json()
    assert [judge["wins"] for judge in shown["judges"]] == [2_500] * 5
    assert shown["agreement"]["items"] == 0  # every prompt has one judge's unreadable verdict
    # 3 ms when quiet; CI's load inflates the loop's CPU by half again or more.
    assert held < 0.025, f"the event loop was held for {held:.3f} s of CPU"


async def every_verdict(session: AsyncSession, comparison: UUID, judges: int) -> list[dict[UUID, str | None]]:
    """Each judge's verdicts by item, read row by row (as GET /v1/comparisons/{id} read them)."""
    by_judge: list[dict[UUID, str | None]] = [{} for _ in range(judges)]
    rows = await session.execute(
        select(Judgement.judge, Judgement.item_id, Judgement.winner).where(Judgement.job_id == comparison)
    )
    for judge, item_id, winner in rows:
        by_judge[judge][item_id] = winner
    return by_judge


def agreement_of(by_judge: list[dict[UUID, str | None]]) -> dict[str, Any]:
    """The judges' agreement as GET /v1/comparisons/{id} measured it from every verdict."""
    first, *others = by_judge
    ratings = [
        (verdict, *(other.get(item) for other in others))
        for item, verdict in first.items()
        if verdict is not None and all(other.get(item) is not None for other in others)
    ]
    two = len(by_judge) == 2
    return {
        "judges": len(by_judge),
        "items": len(ratings),
        "unanimous": asdict(proportion(sum(len(set(r)) == 1 for r in ratings), len(ratings))),
        "kappa": cohen_kappa([(a, b) for a, b in ratings])
        if two
        else fleiss_kappa([Counter(r) for r in ratings]),
        "kappa_kind": "cohen" if two else "fleiss",
    }


async def every_score_pair(session: AsyncSession, comparison: UUID) -> dict[str, list[tuple[Any, Any]]]:
    """Per metric each compared prompt's scores (baseline, candidate), read row by row (as GET
    /v1/comparisons/{id} read them)."""
    sides = aliased(Cot), aliased(Cot)
    scores = [cast(cot.scores[metric]["score"].astext, Integer) for metric in METRICS for cot in sides]
    rows = await session.execute(
        select(*scores)
        .select_from(Item)
        .join(sides[0], sides[0].item_id == Item.baseline_item_id)
        .join(sides[1], sides[1].item_id == Item.candidate_item_id)
        .where(Item.job_id == comparison)
    )
    by_item = [tuple(row) for row in rows]
    return {metric: [(row[2 * n], row[2 * n + 1]) for row in by_item] for n, metric in enumerate(METRICS)}


def metrics_of(paired: dict[str, list[tuple[Any, Any]]]) -> dict[str, Any]:
    """Per metric graded, each side's mean and the candidate's paired lead, as GET
    /v1/comparisons/{id} computed them from every prompt's scores."""
    lowest, highest = SCORE_SCALE
    return {
        metric: {
            "baseline": asdict(mean([b for b, _ in pairs if b is not None], within=SCORE_SCALE)),
            "candidate": asdict(mean([c for _, c in pairs if c is not None], within=SCORE_SCALE)),
            "delta": asdict(
                mean(
                    [c - b for b, c in pairs if b is not None and c is not None],
                    within=(lowest - highest, highest - lowest),
                )
            ),
        }
        for metric, pairs in sorted(paired.items())
        if any(score is not None for pair in pairs for score in pair)
    }


@pytest.mark.parametrize("judges", [2, 3, 5])
async def test_verdicts_and_scores_counted_in_sql_give_what_reading_every_one_gave(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions, judges: int
) -> None:
    random_verdict = "(ARRAY['a', 'a', 'b', 'b', 'b', 'tie', NULL])[1 + floor(random() * 7)::int]"
    comparison = await judged_comparison(api, auth, sessions, 400, judges, random_verdict)
    async with sessions.begin() as session:
        # A judge that has not got to some prompts yet.
        await session.execute(delete(Judgement).where(Judgement.job_id == comparison, func.random() < 0.05))
        compared = (
            select(Item.baseline_item_id)
            .where(Item.job_id == comparison)
            .union(select(Item.candidate_item_id).where(Item.job_id == comparison))
        )
        score = func.to_jsonb(1 + func.floor(func.random() * 5).cast(Integer))
        scores = every_metric_scored(score)
        await session.execute(update(Cot).where(Cot.item_id.in_(compared)).values(scores=scores))
        ungraded = update(Cot).where(Cot.item_id.in_(compared), func.random() < 0.1).values(scores=None)
        await session.execute(ungraded)
        by_judge = await every_verdict(session, comparison, judges)
        paired = await every_score_pair(session, comparison)

    shown = (await api.get(f"/v1/comparisons/{comparison}", headers=auth)).json()

    expected = agreement_of(by_judge)
    assert expected["items"] > 100
    assert shown["agreement"] == expected
    for judge, verdicts in zip(shown["judges"], by_judge, strict=True):
        assert judge == {"judge": judge["judge"], **counted_results(Counter(verdicts.values()))}
    assert shown["metrics"] == metrics_of(paired)
    assert shown["metrics"]["cot_policy_faithfulness"]["delta"]["n"] < 400


async def test_the_viewers_page_of_a_comparison_of_10000_prompts_and_5_judges_holds_the_loop_briefly(
    api: httpx.AsyncClient, auth: Headers, sessions: Sessions
) -> None:
    """job.html computed the means and 15 Wilson intervals as it rendered, on the event loop:
    with the means from counts and the gaps counted in SQL, still 11-12 ms at a stretch (41
    ms before); rendered with the whole page in a worker thread, 3-4 ms."""
    comparison = await judged_comparison(api, auth, sessions, 10_000, 5, IN_TURN)
    await logged_in(api, auth)
    await api.get(f"/view/jobs/{comparison}")  # its templates compiled, once for every job

    response, held = await least_loop_pause(lambda: api.get(f"/view/jobs/{comparison}"))

    assert response.status_code == 200, response.text
    page = " ".join(response.text.split())
    assert 'id="comparison-means"' in page and "Judge judge-4, 7500 judged: wins 33%" in page
    # 3-4 ms when quiet; the least of three requests: CI's load inflates one's loop CPU by half
    # again or more.
    assert held < 0.02, f"the event loop was held for {held:.3f} s of CPU"
