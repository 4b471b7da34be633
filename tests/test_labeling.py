"""The labeling-tool round trip: tasks and records out to Label Studio and Argilla, reviews
back in from their export files (webhooks: test_webhooks.py), stored append-only beside the
model's output, and `human_approved()` choosing what reviewers accepted.

Jobs are made by arq's real worker against the scripted LLM. The tools' files are fixtures
in their own formats (tests/fixtures/); only the item ids, new each run, are filled in.
Label Studio's own SDK (LabelInterface) checks the config, the tasks and the fixtures."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

# The SDK leaves validate_annotation and validate_prediction unannotated, and types
# validate_task's task as its TaskValue model though it takes a task's dict: the ignores below.
from label_studio_sdk.label_interface.interface import LabelInterface
from sqlalchemy import select

from app.config import Settings
from app.labeling import label_studio
from app.store.annotations import human_approved
from app.store.db import Sessions
from app.store.models import Annotation, Cot, Job, PreferencePair
from tests.conftest import run_worker_burst
from tests.scripted_llm import ScriptedLLM, agree, guard_verdict, reply, scores
from tests.test_api import error_of, items_of, submit

Headers = dict[str, str]
FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = [
    "How do I store rice safely?",
    "Is it safe to mix bleach and vinegar?",
    "How do I sharpen a kitchen knife?",
]
GRADED = {"grading": {"thresholds": {"cot_policy_faithfulness": 4}}}
HAZARD = "HAZARD-9c2"


async def graded_job(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, prompts: list[str] = PROMPTS
) -> str:
    """A job whose items all completed, graded (every metric 4 by default) and gated."""
    job = await submit(api, auth, prompts, config=GRADED)
    await run_worker_burst(settings)
    assert {i["status"] for i in await items_of(api, auth, job["id"])} == {"completed"}
    return str(job["id"])


async def item_ids(api: httpx.AsyncClient, auth: Headers, job_id: str) -> list[str]:
    return [item["id"] for item in await items_of(api, auth, job_id)]


async def export(api: httpx.AsyncClient, auth: Headers, job_id: str, fmt: str) -> httpx.Response:
    response = await api.get(f"/v1/jobs/{job_id}/export", params={"format": fmt}, headers=auth)
    assert response.status_code == 200, response.text
    return response


def fixture(name: str, ids: list[str]) -> Any:
    """A tool's file from tests/fixtures with this run's item ids in place of $ITEM_<n>."""
    text = (FIXTURES / name).read_text()
    for n, item_id in enumerate(ids):
        text = text.replace(f"$ITEM_{n}", item_id)
    return json.loads(text)


async def import_file(
    api: httpx.AsyncClient, auth: Headers, job_id: str, tool: str, body: Any, status: int = 200
) -> dict[str, Any]:
    response = await api.post(f"/v1/jobs/{job_id}/annotations/{tool}", json=body, headers=auth)
    assert response.status_code == status, response.text
    return dict(response.json())


async def stored(sessions: Sessions) -> list[Annotation]:
    async with sessions() as session:
        rows = await session.scalars(select(Annotation).order_by(Annotation.annotated_at))
        return list(rows)


async def approved(sessions: Sessions, job_id: str) -> set[str]:
    async with sessions() as session:
        rows = await session.scalars(select(Cot.item_id).where(Cot.job_id == UUID(job_id), human_approved()))
        return {str(item_id) for item_id in rows}


async def model_output(sessions: Sessions, job_id: str) -> list[tuple[Any, ...]]:
    async with sessions() as session:
        rows = await session.execute(
            select(Cot.item_id, Cot.refined_thoughts, Cot.response, Cot.scores, Cot.accepted)
            .where(Cot.job_id == UUID(job_id))
            .order_by(Cot.position)
        )
        return [tuple(row) for row in rows]


# --- Label Studio: config and tasks -----------------------------------------------------------


async def test_the_label_studio_config_is_served_as_xml_the_sdk_accepts(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])

    response = await api.get(f"/v1/jobs/{job_id}/label-studio/config", headers=auth)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/xml")
    interface = LabelInterface(response.text)
    assert {(c.name, c.tag) for c in interface.controls} == {
        ("verdict", "Choices"),
        ("policy_faithfulness", "Rating"),
        ("flagged_thoughts", "Choices"),
        ("edited_response", "TextArea"),
        ("comment", "TextArea"),
    }
    assert {(o.name, o.tag) for o in interface.objects} == {
        ("prompt", "Text"),
        ("intents", "Text"),
        ("thoughts", "Paragraphs"),
        ("response", "Text"),
    }


async def test_label_studio_tasks_conform_to_the_config_and_prefill_the_service_output(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings)
    interface = LabelInterface((await api.get(f"/v1/jobs/{job_id}/label-studio/config", headers=auth)).text)

    response = await export(api, auth, job_id, "label_studio")

    assert response.headers["content-type"].startswith("application/json")
    tasks = response.json()
    cots = await model_output(sessions, job_id)
    assert [t["data"]["item_id"] for t in tasks] == [str(cot[0]) for cot in cots]
    for task, (_, refined, response_text, _, _) in zip(tasks, cots, strict=True):
        data = task["data"]
        assert data["prompt"] in PROMPTS and data["response"] == response_text
        # The scripted intent stage labels its one intent benign; reviewers see the label.
        assert data["intents"].startswith("Explicit:\n- Get an answer to: ")
        assert data["intents"].splitlines()[1].endswith(" [benign]")
        assert data["possibly_harmful_intents"] == 0
        assert [t["text"] for t in data["thoughts"]] == [t["text"] for t in refined]
        assert [t["number"] for t in data["thoughts"]] == [str(n) for n in range(1, len(refined) + 1)]
        assert [c["alias"] for c in data["thought_choices"]] == [t["number"] for t in data["thoughts"]]
        [prediction] = task["predictions"]
        assert prediction["score"] == 0.8  # the grader's policy faithfulness, 4 of 5
        assert {r["from_name"]: r["value"] for r in prediction["result"]} == {
            "edited_response": {"text": [response_text]},
            "policy_faithfulness": {"rating": 4},
        }
        assert interface.validate_prediction(prediction)  # type: ignore[no-untyped-call]
        assert interface.validate_task({"data": data})  # type: ignore[arg-type]


async def test_an_ungraded_job_predicts_the_response_without_a_rating(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job = await submit(api, auth, PROMPTS[:1])
    await run_worker_burst(settings)

    [task] = (await export(api, auth, job["id"], "label_studio")).json()

    [prediction] = task["predictions"]
    assert "score" not in prediction
    assert [r["from_name"] for r in prediction["result"]] == ["edited_response"]


def test_the_tool_fixtures_conform_to_the_config() -> None:
    """The hand-made Label Studio files are in the shape the SDK expects for this config."""
    interface = LabelInterface(label_studio.CONFIG)
    export_file = fixture("label_studio_export.json", [])
    event = fixture("label_studio_webhook.json", [])
    for task in [*export_file, {**event["task"], "annotations": [event["annotation"]]}]:
        for annotation in task["annotations"]:
            if not annotation["was_cancelled"]:
                assert interface.validate_annotation(annotation), annotation["id"]  # type: ignore[no-untyped-call]
    for task in export_file:
        assert interface.validate_task({"data": task["data"]})  # type: ignore[arg-type]


# --- Label Studio: import from an export file -------------------------------------------------


async def test_an_annotated_export_is_stored_beside_the_unchanged_output_and_selects_the_accepted(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings)
    ids = await item_ids(api, auth, job_id)
    before = await model_output(sessions, job_id)

    report = await import_file(api, auth, job_id, "label-studio", fixture("label_studio_export.json", ids))

    assert report == {
        "imported": 2,
        "duplicates": 0,
        "retracted": 0,
        "skipped": [{"annotation": "503", "reason": "cancelled: the reviewer skipped the task"}],
    }
    accepted, rejected = await stored(sessions)
    assert (str(accepted.item_id), str(accepted.job_id), accepted.source, accepted.external_id) == (
        ids[0],
        job_id,
        "label_studio",
        "501",
    )
    assert (accepted.verdict, accepted.policy_faithfulness, accepted.annotator) == ("accept", 5, "1")
    assert accepted.edited_response is None  # the prefilled response, submitted unchanged
    assert accepted.annotated_at.isoformat() == "2026-11-20T10:00:00+00:00"
    assert (str(rejected.item_id), rejected.verdict, rejected.policy_faithfulness) == (ids[1], "reject", 2)
    assert rejected.flagged_thoughts == [1]
    assert (
        rejected.edited_response == "No. Mixing them makes toxic fumes: use one at a time and air the room."
    )
    assert rejected.comment == "The answer must warn about the fumes."
    assert rejected.annotator == "2" and rejected.annotated_at.isoformat() == "2026-11-20T10:06:30+00:00"
    assert rejected.raw["id"] == 502 and rejected.raw["lead_time"] == 210.4
    assert await model_output(sessions, job_id) == before
    assert await approved(sessions, job_id) == {ids[0]}


async def test_importing_the_same_file_again_adds_nothing(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings)
    body = fixture("label_studio_export.json", await item_ids(api, auth, job_id))
    await import_file(api, auth, job_id, "label-studio", body)

    again = await import_file(api, auth, job_id, "label-studio", body)

    assert (again["imported"], again["duplicates"]) == (0, 2)
    assert len(await stored(sessions)) == 2


async def test_an_edited_annotation_adds_a_row_and_its_latest_version_counts(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings)
    ids = await item_ids(api, auth, job_id)
    body = fixture("label_studio_export.json", ids)
    await import_file(api, auth, job_id, "label-studio", body)
    edited = copy.deepcopy(body)
    annotation = edited[0]["annotations"][0]
    annotation["updated_at"] = "2026-11-20T11:30:00.000000Z"
    annotation["result"][0]["value"]["choices"] = ["reject"]

    report = await import_file(api, auth, job_id, "label-studio", edited)

    assert (report["imported"], report["duplicates"]) == (1, 1)
    versions = [(a.verdict, a.annotated_at.hour) for a in await stored(sessions) if a.external_id == "501"]
    assert versions == [("accept", 10), ("reject", 11)]
    assert await approved(sessions, job_id) == set()


async def test_a_file_naming_an_unknown_item_is_refused_whole(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings)
    ids = await item_ids(api, auth, job_id)
    unknown = "00000000-0000-4000-8000-000000000001"
    body = fixture("label_studio_export.json", [ids[0], unknown, ids[2]])

    response = await api.post(f"/v1/jobs/{job_id}/annotations/label-studio", json=body, headers=auth)

    assert error_of(response, 422, "unknown_items")["details"] == [unknown]
    assert await stored(sessions) == []


async def test_another_keys_items_are_refused_and_its_job_is_not_found(
    api: httpx.AsyncClient, auth: Headers, other: Headers, settings: Settings, sessions: Sessions
) -> None:
    mine = await graded_job(api, auth, settings, PROMPTS[:1])
    theirs = await graded_job(api, other, settings)
    body = fixture("label_studio_export.json", await item_ids(api, other, theirs))

    into_mine = await api.post(f"/v1/jobs/{mine}/annotations/label-studio", json=body, headers=auth)
    into_theirs = await api.post(f"/v1/jobs/{theirs}/annotations/label-studio", json=body, headers=auth)

    error_of(into_mine, 422, "unknown_items")
    error_of(into_theirs, 404, "not_found")
    assert await stored(sessions) == []


async def test_a_review_stored_under_another_job_does_not_decide_this_jobs_export_filters(
    api: httpx.AsyncClient, auth: Headers, other: Headers, settings: Settings, sessions: Sessions
) -> None:
    """The export filters read an item's reviews within its job (so its owner's), as the
    latest edit does: a review row of another key's job naming this job's item, which no
    import writes, decides nothing here."""
    mine = await graded_job(api, auth, settings)
    theirs = await graded_job(api, other, settings, PROMPTS[:1])
    ids = await item_ids(api, auth, mine)
    await import_file(api, auth, mine, "label-studio", fixture("label_studio_export.json", ids))
    async with sessions.begin() as session:
        their_owner = (await session.get_one(Job, UUID(theirs))).owner_key_id
        session.add(
            Annotation(
                owner_key_id=their_owner,
                item_id=UUID(ids[0]),
                job_id=UUID(theirs),
                source="label_studio",
                external_id="9001",
                annotator="x",
                annotated_at=datetime.now(UTC),
                verdict="reject",
                raw={},
            )
        )

    assert await approved(sessions, mine) == {ids[0]}


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ({"from_name": "verdict", "type": "choices", "value": {"choices": ["maybe"]}}, "verdict 'maybe'"),
        (
            {"from_name": "policy_faithfulness", "type": "rating", "value": {"rating": 7}},
            "not a whole number",
        ),
        (
            {"from_name": "policy_faithfulness", "type": "rating", "value": {"rating": 4.5}},
            "not a whole number",
        ),
        (
            {"from_name": "flagged_thoughts", "type": "choices", "value": {"choices": ["9"]}},
            "flags thought 9",
        ),
    ],
)
async def test_an_unreadable_annotation_refuses_the_whole_file(
    api: httpx.AsyncClient,
    auth: Headers,
    settings: Settings,
    sessions: Sessions,
    result: dict[str, Any],
    problem: str,
) -> None:
    job_id = await graded_job(api, auth, settings)
    body = fixture("label_studio_export.json", await item_ids(api, auth, job_id))
    body[1]["annotations"][0]["result"].append({"to_name": "response", **result})

    response = await api.post(f"/v1/jobs/{job_id}/annotations/label-studio", json=body, headers=auth)

    assert problem in error_of(response, 422, "invalid_annotation")["message"]
    assert await stored(sessions) == []


async def test_a_task_without_an_item_id_is_refused(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings)
    body = fixture("label_studio_export.json", await item_ids(api, auth, job_id))
    del body[0]["data"]["item_id"]

    response = await api.post(f"/v1/jobs/{job_id}/annotations/label-studio", json=body, headers=auth)

    assert "no item_id" in error_of(response, 422, "invalid_annotation")["message"]
    assert await stored(sessions) == []


@pytest.mark.parametrize("annotation_id", [10**300, 2**63, -1], ids=["300-digits", "2^63", "negative"])
async def test_an_annotation_id_no_label_studio_makes_is_refused_not_cut(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions, annotation_id: int
) -> None:
    """Stored as text of at most 200 characters, a longer id would be cut, and clash with
    another annotation's."""
    job_id = await graded_job(api, auth, settings)
    body = fixture("label_studio_export.json", await item_ids(api, auth, job_id))
    body[0]["annotations"][0]["id"] = annotation_id

    response = await api.post(f"/v1/jobs/{job_id}/annotations/label-studio", json=body, headers=auth)

    error_of(response, 422, "validation_error")
    assert await stored(sessions) == []


async def test_a_body_that_is_not_an_export_is_a_validation_error(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])

    bodies: list[object] = [{"tasks": []}, [{"annotations": []}], [{"data": {}, "annotations": [{"id": 1}]}]]
    for body in bodies:
        response = await api.post(f"/v1/jobs/{job_id}/annotations/label-studio", json=body, headers=auth)
        error_of(response, 422, "validation_error")


# --- Argilla ----------------------------------------------------------------------------------


async def test_argilla_settings_name_the_fields_and_questions_records_use(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job_id = await graded_job(api, auth, settings, PROMPTS[:1])

    response = await api.get(f"/v1/jobs/{job_id}/argilla/settings", headers=auth)

    assert response.status_code == 200, response.text
    body = response.json()
    assert [f["name"] for f in body["fields"]] == ["prompt", "intents", "thoughts", "response"]
    questions = {q["name"]: q["settings"]["type"] for q in body["questions"]}
    assert questions == {
        "verdict": "label_selection",
        "policy_faithfulness": "rating",
        "flagged_thoughts": "multi_label_selection",
        "edited_response": "text",
        "comment": "text",
    }
    [record] = [json.loads(line) for line in (await export(api, auth, job_id, "argilla")).text.splitlines()]
    assert set(record["fields"]) == {f["name"] for f in body["fields"]}
    assert set(record["suggestions"]) <= set(questions)
    assert set(record["metadata"]) - {"item_id"} == {m["name"] for m in body["metadata"]}


async def test_argilla_records_suggest_the_grader_score_and_the_gate_decision(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM, sessions: Sessions
) -> None:
    scripted_llm.script("quality_scores", reply(scores()), reply(scores(cot_policy_faithfulness=2)))
    job_id = await graded_job(api, auth, settings, PROMPTS[:2])

    response = await export(api, auth, job_id, "argilla")

    records = [json.loads(line) for line in response.text.splitlines()]
    cots = await model_output(sessions, job_id)
    assert [r["id"] for r in records] == [str(cot[0]) for cot in cots]
    by_gate = {r["metadata"]["gate"]: r for r in records}
    assert set(by_gate) == {"accepted", "rejected"}
    accepted, rejected = by_gate["accepted"], by_gate["rejected"]
    assert accepted["suggestions"]["verdict"] == {
        "value": "accept",
        "score": None,
        "agent": "aidsafe-quality-gate",
    }
    assert accepted["suggestions"]["policy_faithfulness"]["value"] == 4
    assert rejected["suggestions"]["verdict"]["value"] == "reject"
    assert rejected["suggestions"]["policy_faithfulness"]["value"] == 3  # (2 + 4) / 2
    for record in records:
        assert record["fields"]["thoughts"].startswith("1. ")
        assert record["suggestions"]["edited_response"]["value"] == record["fields"]["response"]
        assert record["metadata"]["item_id"] == record["id"]


async def test_argilla_responses_are_imported_once_and_only_when_submitted(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    job_id = await graded_job(api, auth, settings)
    ids = await item_ids(api, auth, job_id)
    page = fixture("argilla_records.json", ids)

    first = await import_file(api, auth, job_id, "argilla", page)
    again = await import_file(api, auth, job_id, "argilla", page["items"])  # a plain list too

    assert (first["imported"], first["duplicates"]) == (2, 0)
    assert sorted(s["reason"] for s in first["skipped"]) == [
        "discarded: only submitted responses count",
        "draft: only submitted responses count",
    ]
    assert (again["imported"], again["duplicates"]) == (0, 2)
    accepted, rejected = await stored(sessions)
    assert (accepted.source, str(accepted.item_id), accepted.verdict, accepted.edited_response) == (
        "argilla",
        ids[0],
        "accept",
        None,
    )
    assert accepted.annotator == "9d1f3c5e-7a9b-4c1d-8e2f-3a4b5c6d7e01"
    assert accepted.annotated_at.isoformat() == "2026-11-22T09:00:00+00:00"
    assert (rejected.verdict, rejected.policy_faithfulness, rejected.flagged_thoughts) == ("reject", 2, [1])
    assert rejected.comment == "The answer must warn about the fumes."
    assert await approved(sessions, job_id) == {ids[0]}


async def test_an_argilla_record_of_another_job_is_refused_whole(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, sessions: Sessions
) -> None:
    first = await graded_job(api, auth, settings, PROMPTS[:1])
    second = await graded_job(api, auth, settings, PROMPTS[1:2])
    ids = await item_ids(api, auth, first) + await item_ids(api, auth, second)

    response = await api.post(
        f"/v1/jobs/{first}/annotations/argilla", json=fixture("argilla_records.json", ids), headers=auth
    )

    assert error_of(response, 422, "unknown_items")["details"] == [ids[1]]
    assert await stored(sessions) == []


# --- a CoT never refined ----------------------------------------------------------------------

# The seed's 6 thoughts and each of two turns' 6 new ones: 18, past the 12 a refined CoT keeps.
UNREFINED = {"agents": 1, "max_rounds": 2, "refine": False}
UNREFINED_THOUGHTS = [f"{by} thought {n}." for by in ("Seed", "Turn 1", "Turn 2") for n in range(1, 7)]
# A reviewer flags the turns' thoughts, 13 of them: more than a refined CoT has.
TURN_FLAGS = list(range(6, 19))


async def unrefined_job(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM
) -> tuple[str, str]:
    """A job with `refine: false` and its one item, whose CoT is UNREFINED_THOUGHTS."""
    seed, first, second = (UNREFINED_THOUGHTS[n : n + 6] for n in (0, 6, 12))
    scripted_llm.script("seed_cot", reply({"thoughts": seed, "response": "Seed response."}))
    scripted_llm.script("deliberation_turn", agree(False, first), agree(False, second))
    job = await submit(api, auth, PROMPTS[:1], config=UNREFINED)
    await run_worker_burst(settings)
    [item] = await items_of(api, auth, job["id"])
    assert item["status"] == "completed"
    return str(job["id"]), str(item["id"])


async def flagged_as_stored(sessions: Sessions, job_id: str) -> list[tuple[str, list[str]]]:
    """Each stored review's flagged thoughts, with the text of each in the model's CoT."""
    [(_, thoughts, *_)] = await model_output(sessions, job_id)
    return [(a.source, [thoughts[n - 1]["text"] for n in a.flagged_thoughts]) for a in await stored(sessions)]


async def test_argilla_offers_and_reads_back_every_thought_of_a_cot_never_refined(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM, sessions: Sessions
) -> None:
    job_id, item_id = await unrefined_job(api, auth, settings, scripted_llm)

    served = await api.get(f"/v1/jobs/{job_id}/argilla/settings", headers=auth)
    [record] = [json.loads(line) for line in (await export(api, auth, job_id, "argilla")).text.splitlines()]

    [options] = [
        q["settings"]["options"] for q in served.json()["questions"] if q["name"] == "flagged_thoughts"
    ]
    shown = [line.split(". ", 1) for line in record["fields"]["thoughts"].splitlines()]
    assert [o["value"] for o in options] == [number for number, _ in shown] == [str(n) for n in range(1, 19)]
    assert [text for _, text in shown] == UNREFINED_THOUGHTS
    # The reviewer's response, as Argilla's API lists it: the options chosen are their values.
    [response] = fixture("argilla_records.json", [item_id, item_id])["items"][1]["responses"][:1]
    response["values"]["flagged_thoughts"]["value"] = [str(n) for n in TURN_FLAGS]
    body = [{"id": str(uuid4()), "external_id": item_id, "responses": [response]}]

    assert (await import_file(api, auth, job_id, "argilla", body))["imported"] == 1
    assert await flagged_as_stored(sessions, job_id) == [("argilla", UNREFINED_THOUGHTS[5:])]


async def test_label_studio_reads_back_flags_on_every_thought_of_a_cot_never_refined(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM, sessions: Sessions
) -> None:
    job_id, _ = await unrefined_job(api, auth, settings, scripted_llm)
    [task] = (await export(api, auth, job_id, "label_studio")).json()
    assert [(c["alias"], c["value"]) for c in task["data"]["thought_choices"]] == [
        (str(n), f"Thought {n}") for n in range(1, 19)
    ]
    assert [t["text"] for t in task["data"]["thoughts"]] == UNREFINED_THOUGHTS

    def annotated(annotation_id: int, flags: list[int]) -> list[dict[str, Any]]:
        """The task exported from Label Studio with one annotation flagging `flags` (by alias)."""
        results = [
            ("verdict", "response", ["reject"]),
            ("flagged_thoughts", "thoughts", [str(n) for n in flags]),
        ]
        annotation = {
            "id": annotation_id,
            "completed_by": 1,
            "result": [
                {"from_name": name, "to_name": to, "type": "choices", "value": {"choices": choices}}
                for name, to, choices in results
            ],
            "was_cancelled": False,
            "created_at": "2026-11-20T10:00:00Z",
            "updated_at": "2026-11-20T10:00:00Z",
        }
        assert LabelInterface(label_studio.CONFIG).validate_annotation(annotation)  # type: ignore[no-untyped-call]
        return [{**task, "id": 101, "annotations": [annotation]}]

    beyond = await api.post(
        f"/v1/jobs/{job_id}/annotations/label-studio", json=annotated(601, [18, 19]), headers=auth
    )
    report = await import_file(api, auth, job_id, "label-studio", annotated(602, TURN_FLAGS))

    assert "flags thought 19, the CoT has 18" in error_of(beyond, 422, "invalid_annotation")["message"]
    assert report["imported"] == 1
    assert await flagged_as_stored(sessions, job_id) == [("label_studio", UNREFINED_THOUGHTS[5:])]


# --- hazard and keys --------------------------------------------------------------------------


async def test_labeling_exports_hold_only_the_chosen_cot_never_whispered_or_rejected_text(
    api: httpx.AsyncClient, auth: Headers, settings: Settings, scripted_llm: ScriptedLLM, sessions: Sessions
) -> None:
    scripted_llm.script("whisper_belief", reply({"belief": f"{HAZARD} belief"}))
    scripted_llm.script(
        "rejected_cot", reply({"thoughts": [f"{HAZARD} thought"], "response": f"{HAZARD} response"})
    )
    scripted_llm.script("guard_verdict", guard_verdict(True, "fraud-deception"))
    scripted_llm.script("quality_scores", reply(scores()), reply(scores(cot_policy_faithfulness=1)))
    config = {**GRADED, "pairs": {"max_tries": 1, "min_gap": 0.5}}
    job = await submit(api, auth, PROMPTS[:1], config=config)
    await run_worker_burst(settings)
    async with sessions() as session:
        pair = (await session.scalars(select(PreferencePair))).one()
    assert pair.paired and HAZARD in (pair.belief or "") and HAZARD in (pair.rejected_response or "")

    for fmt in ("label_studio", "argilla"):
        body = (await export(api, auth, job["id"], fmt)).text
        assert PROMPTS[0] in body and HAZARD not in body, fmt


async def test_labeling_routes_need_a_key(api: httpx.AsyncClient) -> None:
    some_id = "00000000-0000-4000-8000-000000000003"
    for method, url in [
        ("GET", f"/v1/jobs/{some_id}/label-studio/config"),
        ("POST", f"/v1/jobs/{some_id}/annotations/label-studio"),
        ("GET", f"/v1/jobs/{some_id}/argilla/settings"),
        ("POST", f"/v1/jobs/{some_id}/annotations/argilla"),
    ]:
        error_of(await api.request(method, url, json=[]), 401, "unauthorized")


async def test_the_human_approved_export_filter_keeps_what_reviewers_accepted(
    api: httpx.AsyncClient, auth: Headers, settings: Settings
) -> None:
    job_id = await graded_job(api, auth, settings)
    ids = await item_ids(api, auth, job_id)
    await import_file(api, auth, job_id, "label-studio", fixture("label_studio_export.json", ids))

    response = await api.get(
        f"/v1/jobs/{job_id}/export", params={"format": "label_studio", "human_approved": "true"}, headers=auth
    )

    assert response.status_code == 200, response.text
    assert [task["data"]["item_id"] for task in response.json()] == [ids[0]]
