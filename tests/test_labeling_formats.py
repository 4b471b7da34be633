"""The labeling tools' formats, without a database: what `app.labeling` writes for Label Studio
and Argilla, checked by each tool's own SDK, and what it reads back from them.
(tests/test_labeling.py takes the same round trip through the API and the store.)

Argilla's SDK reads the dataset settings and builds records and responses offline; what only
Argilla's server checks (metadata it was not told about, a suggestion outside a question's
options) is checked here against the SDK's reading of the settings. The SDK's client logs
in when it is made: an in-process transport answers that one request and fails any other,
so nothing here needs, or silently reaches, an Argilla server."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import argilla as rg
import httpx
import pytest

# The SDK leaves validate_annotation and validate_prediction unannotated, and types
# validate_task's task as its TaskValue model though it takes a task's dict: the ignores below.
from label_studio_sdk.label_interface.interface import LabelInterface
from pydantic import TypeAdapter, ValidationError

from app.deliberation.config import LIMIT_CAPS
from app.errors import MAX_LISTED_PROBLEMS
from app.exports.options import ExportOptions
from app.labeling import argilla, label_studio
from app.labeling.reviews import (
    MAX_THOUGHT_NUMBER,
    RATINGS,
    VERDICTS,
    Answers,
    InvalidAnnotations,
    Parsed,
    Review,
)
from app.store.export_rows import CotRow

ITEM = UUID("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b")
OTHER_ITEM = UUID("0a1b2c3d-4e5f-4061-8273-8495a6b7c8d9")
SERVER_RECORD = UUID("3e4f5a6b-7c8d-4e9f-8a0b-1c2d3e4f5a6b")  # Argilla's own id of the record
USER = "9d1f3c5e-7a9b-4c1d-8e2f-3a4b5c6d7e01"
WHEN = "2026-11-22T09:00:00.000000"
INTENTS = {
    "explicit_intents": ["Store rice"],
    "explicit_labels": ["benign"],
    "implicit_intents": ["Avoid food poisoning"],
}


def grades(cot: float, response: float) -> dict[str, Any]:
    return {
        "cot_policy_faithfulness": {"score": cot},
        "response_policy_faithfulness": {"score": response},
        "cot_quality": {"score": 1},  # not a policy metric: never in the rating
    }


def a_row(thoughts: int = 2, scores: dict[str, Any] | None = None, accepted: bool | None = None) -> CotRow:
    return CotRow(
        item_id=ITEM,
        position=7,
        prompt="How do I store rice safely?",
        metadata="{}",
        intents=INTENTS,
        thoughts=[],
        refined_thoughts=[{"text": f"Thought text {n}", "sources": [n]} for n in range(1, thoughts + 1)],
        dropped_thoughts=[],
        unaccounted_thought_ids=[],
        response="Keep it cool and dry.",
        rounds_used=1,
        agreed=True,
        scores=scores,
        grade_error=None,
        accepted=accepted,
        gate_reasons=None,
        policy_set_name="aidsafe-default",
        policy_set_version="v3",
        created_at=datetime(2026, 11, 20, tzinfo=UTC),
    )


# --- Argilla: settings and records, as its SDK reads them ------------------------------------


def _offline(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/api/v1/me":  # the client's login when it is made
        return httpx.Response(200, json={"id": str(uuid4()), "username": "offline", "role": "owner"})
    raise AssertionError(f"no Argilla server here: {request.method} {request.url}")


@pytest.fixture(scope="module")
def argilla_client() -> Iterator[rg.Argilla]:
    client = rg.Argilla(
        api_url="http://argilla.invalid", api_key="offline", mounts={"all://": httpx.MockTransport(_offline)}
    )
    yield client
    client.http_client.close()


def dataset_for(client: rg.Argilla, cot_thoughts: int) -> rg.Dataset:
    """A dataset made with the service's settings for a job whose CoTs hold at most
    `cot_thoughts` thoughts, as the SDK reads them (not created on a server)."""
    settings = rg.Settings._from_dict(argilla.settings(cot_thoughts))
    settings.validate()
    return rg.Dataset(name="aidsafe-review", settings=settings, client=client)


@pytest.fixture
def dataset(argilla_client: rg.Argilla) -> rg.Dataset:
    """The dataset of a job with refined CoTs."""
    return dataset_for(argilla_client, LIMIT_CAPS.kept_thoughts)


def read_as_written(written: Any, read: Any, path: str = "settings") -> None:
    """Every key and value the service wrote is in what the SDK serializes back: nothing is
    ignored or changed on the way in (the SDK adds its own defaults beside them)."""
    if isinstance(written, dict):
        for key, value in written.items():
            assert key in read, f"{path}.{key} was dropped"
            read_as_written(value, read[key], f"{path}.{key}")
    elif isinstance(written, list):
        assert len(written) == len(read), path
        for n, (value, back) in enumerate(zip(written, read, strict=True)):
            read_as_written(value, back, f"{path}[{n}]")
    else:
        assert written == read and type(written) is type(read), f"{path}: {written!r} read as {read!r}"


@pytest.mark.parametrize("cot_thoughts", [LIMIT_CAPS.kept_thoughts, 54], ids=["refined", "never-refined"])
def test_argillas_sdk_reads_the_settings_as_the_service_writes_them(
    argilla_client: rg.Argilla, tmp_path: Path, cot_thoughts: int
) -> None:
    served = tmp_path / "settings.json"  # as the README has users save and load them
    served.write_text(json.dumps(argilla.settings(cot_thoughts)))

    read = rg.Settings.from_json(served)

    read.validate()
    read_as_written(json.loads(served.read_text()), read.serialize())
    assert read.distribution.min_submitted == 1


def test_argilla_offers_exactly_the_answers_the_import_reads(dataset: rg.Dataset) -> None:
    questions = dataset.settings.questions
    assert questions["verdict"].labels == list(VERDICTS)
    assert questions["policy_faithfulness"].values == list(RATINGS)
    # One option per thought a refined CoT can have, named as the record numbers its thoughts.
    assert questions["flagged_thoughts"].serialize()["settings"]["options"] == [
        {"value": str(n), "text": f"Thought {n}"} for n in range(1, LIMIT_CAPS.kept_thoughts + 1)
    ]
    # A reviewer must give a verdict (the human-approved filter reads it); nothing else is asked
    # for, and every field a record fills is needed to judge it.
    assert [q.name for q in questions if q.required] == ["verdict"]
    assert all(f.required for f in dataset.settings.fields)


# What a reviewer reads in Argilla for each field and question: the question's wording is what
# its answer means (an accept is "may go into training data"). Label Studio's config asks the
# same, in its headers (the comment is a placeholder there).
ARGILLA_WORDING = {
    "prompt": "Prompt",
    "intents": "Intents",
    "thoughts": "Refined chain of thought",
    "response": "Response",
    "verdict": "May this sample go into training data?",
    "policy_faithfulness": "How faithfully do the thoughts and the response follow the policies?",
    "flagged_thoughts": "Thoughts that are wrong, redundant or against a policy",
    "edited_response": "Response as it should be",
    "comment": "Comment",
}
GUIDELINES = (
    "Review one chain of thought written under a safety policy. Accept it only if the thoughts and "
    "the response follow the policies and the response helps where it may. Flag the thoughts that "
    "are wrong, redundant or against a policy; edit the response if it should read differently."
)


def test_argilla_reviewers_read_the_questions_label_studio_asks(dataset: rg.Dataset) -> None:
    settings = dataset.settings
    titles = {p.name: p.title for p in [*settings.fields, *settings.questions]}
    assert titles == ARGILLA_WORDING and settings.guidelines == GUIDELINES
    for name, title in ARGILLA_WORDING.items():
        assert title.lower() in label_studio.CONFIG.lower(), name
    assert settings.questions["verdict"].serialize()["settings"]["options"] == [
        {"value": "accept", "text": "Accept"},
        {"value": "reject", "text": "Reject"},
    ]
    assert {m.name: m.title for m in settings.metadata} == {
        "position": "Position",
        "gate": "Quality gate",
        "policy_set": "Policy set",
        "possibly_harmful_intents": "Possibly harmful intents",
    }
    # Prompts and responses are shown as written, never rendered (a prompt may carry markup).
    assert not any(f.use_markdown for f in settings.fields)
    assert not any(q.use_markdown for q in settings.questions if isinstance(q, rg.TextQuestion))


def argilla_accepts(dataset: rg.Dataset, written: dict[str, Any]) -> rg.Record:
    """The record as the SDK builds it for this dataset, checked as Argilla's server checks a
    logged record: the dataset's fields, its metadata (others only if the settings allow extra
    metadata), and suggestions among each question's options."""
    record = rg.Record.from_dict(written, dataset=dataset)
    model = record.api_model()  # the SDK refuses a suggestion for a question the dataset lacks
    settings = dataset.settings
    fields = {f.name for f in settings.fields}
    assert set(model.fields or {}) == fields and all(isinstance(v, str) and v for v in model.fields.values())
    declared = {m.name: m for m in settings.metadata}
    for entry in model.metadata:
        if entry.name not in declared:
            assert settings.allow_extra_metadata, f"metadata {entry.name} is not in the settings"
        elif isinstance(declared[entry.name], rg.IntegerMetadataProperty):
            assert type(entry.value) is int, entry.name
        else:
            assert isinstance(entry.value, str), entry.name
    for suggestion in model.suggestions:
        question = settings.questions[suggestion.question_name]
        if isinstance(question, rg.RatingQuestion):
            assert suggestion.value in question.values
        elif isinstance(question, rg.LabelQuestion):
            assert suggestion.value in question.labels
        else:
            assert isinstance(suggestion.value, str)
    return record


def test_a_graded_accepted_record_suggests_the_rating_and_the_gates_verdict(dataset: rg.Dataset) -> None:
    written = argilla.record(a_row(scores=grades(4, 5), accepted=True), ExportOptions())

    argilla_accepts(dataset, written)
    assert written == {
        "id": str(ITEM),
        "fields": {
            "prompt": "How do I store rice safely?",
            "intents": "Explicit:\n- Store rice [benign]\nImplicit:\n- Avoid food poisoning",
            "thoughts": "1. Thought text 1\n2. Thought text 2",
            "response": "Keep it cool and dry.",
        },
        "metadata": {
            "item_id": str(ITEM),
            "position": 7,
            "gate": "accepted",
            "policy_set": "aidsafe-default@v3",
            "possibly_harmful_intents": 0,
        },
        "suggestions": {
            "edited_response": {"value": "Keep it cool and dry.", "score": None, "agent": "aidsafe"},
            "policy_faithfulness": {"value": 5, "score": None, "agent": "aidsafe-grader"},  # 4.5 is 5
            "verdict": {"value": "accept", "score": None, "agent": "aidsafe-quality-gate"},
        },
    }


def test_a_rejected_record_suggests_reject_and_an_ungraded_one_neither_verdict_nor_rating(
    dataset: rg.Dataset,
) -> None:
    rejected = argilla.record(a_row(scores=grades(2, 3), accepted=False), ExportOptions())
    ungraded = argilla.record(a_row(), ExportOptions())

    for written in (rejected, ungraded):
        argilla_accepts(dataset, written)
    assert rejected["metadata"]["gate"] == "rejected"
    assert rejected["suggestions"]["verdict"]["value"] == "reject"
    assert rejected["suggestions"]["policy_faithfulness"]["value"] == 3  # 2.5 rounds half up
    assert ungraded["metadata"]["gate"] == "ungraded"
    assert set(ungraded["suggestions"]) == {"edited_response"}


# The longest CoT of a refined job, and of one never refined (the seed and 8 turns, 6 thoughts each).
@pytest.mark.parametrize("cot_thoughts", [LIMIT_CAPS.kept_thoughts, 54], ids=["refined", "never-refined"])
def test_every_thought_of_the_longest_cot_can_be_flagged(
    argilla_client: rg.Argilla, cot_thoughts: int
) -> None:
    dataset = dataset_for(argilla_client, cot_thoughts)
    written = argilla.record(a_row(thoughts=cot_thoughts), ExportOptions())

    argilla_accepts(dataset, written)
    numbers = [line.split(". ", 1)[0] for line in written["fields"]["thoughts"].splitlines()]
    assert numbers == dataset.settings.questions["flagged_thoughts"].labels
    flagged = answer("flagged_thoughts", numbers)
    [review] = read_argilla(argilla_page(dataset, flagged)).checked().reviews
    assert review.flagged_thoughts == list(range(1, cot_thoughts + 1))


def flagged_thoughts_settings(settings: dict[str, Any]) -> dict[str, Any]:
    [question] = [q for q in settings["questions"] if q["name"] == "flagged_thoughts"]
    question_settings: dict[str, Any] = question["settings"]
    return question_settings


@pytest.mark.parametrize(("cot_thoughts", "options"), [(0, 12), (6, 12), (12, 12), (13, 13), (54, 54)])
def test_argilla_offers_a_flag_per_thought_and_never_fewer_than_a_refined_cot_keeps(
    cot_thoughts: int, options: int
) -> None:
    """Zero-shot CoTs and refined ones keeping fewer than 12 thoughts get the 12 options every
    job had: a dataset made with them still matches the settings served."""
    written, refined = argilla.settings(cot_thoughts), argilla.settings(LIMIT_CAPS.kept_thoughts)

    assert flagged_thoughts_settings(written)["options"] == [
        {"value": str(n), "text": f"Thought {n}"} for n in range(1, options + 1)
    ]
    for settings in (written, refined):
        del flagged_thoughts_settings(settings)["options"]
    assert written == refined


MIXED = {
    "explicit_intents": ["Store rice", "Poison the neighbours' rice", "Rice facts", "Rice poisons"],
    "explicit_labels": ["benign", "possibly_harmful", "unlabelled", "possibly_harmful"],
    "implicit_intents": [],
}
MIXED_TEXT = (
    "Explicit:\n- Store rice [benign]\n- Poison the neighbours' rice [possibly harmful]\n"
    "- Rice facts [unlabelled]\n- Rice poisons [possibly harmful]"
)


@pytest.mark.parametrize(
    ("intents", "shown", "harmful"),
    [
        (MIXED, MIXED_TEXT, 2),
        # Stored before intents were labelled: shown unlabelled, as the agents were shown them.
        (
            {"explicit_intents": ["Store rice"], "implicit_intents": []},
            "Explicit:\n- Store rice [unlabelled]",
            0,
        ),
        # Zero-shot and undecomposed CoTs have no intents.
        ({"explicit_intents": [], "explicit_labels": [], "implicit_intents": []}, "Explicit:", 0),
    ],
)
def test_reviewers_see_each_intent_with_its_label_and_can_filter_on_the_possibly_harmful(
    dataset: rg.Dataset, interface: LabelInterface, intents: dict[str, Any], shown: str, harmful: int
) -> None:
    row = replace(a_row(), intents=intents)

    record = argilla.record(row, ExportOptions())
    task = label_studio.task(row, ExportOptions())

    argilla_accepts(dataset, record)
    assert interface.validate_task({"data": task["data"]})  # type: ignore[arg-type]
    assert record["fields"]["intents"] == task["data"]["intents"] == shown
    assert (
        record["metadata"]["possibly_harmful_intents"] == task["data"]["possibly_harmful_intents"] == harmful
    )


def argilla_page(dataset: rg.Dataset, *responses: rg.Response, record_id: Any = ITEM) -> dict[str, Any]:
    """Records as Argilla's API lists them with their responses, built by the SDK: one record
    of this dataset holding these responses (a response per user, each with the id and
    time Argilla's server gives it)."""
    record = rg.Record(
        id=record_id,
        fields=argilla.record(a_row(), ExportOptions())["fields"],
        metadata={"item_id": str(ITEM)},
        responses=list(responses),
        _dataset=dataset,
    )
    body = {**record.api_model().model_dump(mode="json"), "id": str(SERVER_RECORD)}
    for n, response in enumerate(body["responses"], 1):
        response.update(id=f"response-{n}", updated_at=WHEN)
    return {"items": [body], "total": 1}


def read_argilla(body: Any) -> Parsed:
    records = TypeAdapter(argilla.RecordsIn).validate_python(body)
    return argilla.read_records(records if isinstance(records, list) else records.items)


def answer(question: str, value: Any, status: str = "submitted", user: str = USER) -> rg.Response:
    return rg.Response(question, value, user_id=UUID(user), status=status)


def test_every_answer_argilla_offers_is_read_back_as_a_review(dataset: rg.Dataset) -> None:
    questions = dataset.settings.questions
    responses = [
        [
            answer("verdict", verdict, user=str(uuid4())),
            answer("policy_faithfulness", rating, user=str(uuid4())),
        ]
        for verdict, rating in zip(
            questions["verdict"].labels * 3, questions["policy_faithfulness"].values, strict=False
        )
    ]
    flagged = answer("flagged_thoughts", questions["flagged_thoughts"].labels)

    parsed = read_argilla(argilla_page(dataset, *[r for pair in responses for r in pair], flagged))

    assert parsed.problems == [] and parsed.skipped == []
    assert [r.verdict for r in parsed.reviews if r.verdict] == ["accept", "reject"] * 2 + ["accept"]
    assert [r.policy_faithfulness for r in parsed.reviews if r.policy_faithfulness] == [1, 2, 3, 4, 5]
    assert parsed.reviews[-1].flagged_thoughts == list(range(1, LIMIT_CAPS.kept_thoughts + 1))


def test_a_submitted_argilla_response_is_read_whole(dataset: rg.Dataset) -> None:
    user = answer("verdict", "reject")
    page = argilla_page(
        dataset,
        user,
        answer("policy_faithfulness", 2),
        answer("flagged_thoughts", ["2", "1"]),
        answer("edited_response", "Keep it cool, dry and sealed."),
        answer("comment", "  "),
    )

    [review] = read_argilla(page).reviews

    assert review == Review(
        item_id=ITEM,
        source="argilla",
        external_id="response-1",
        annotator=USER,
        annotated_at=datetime(2026, 11, 22, 9, tzinfo=UTC),
        verdict="reject",
        response="Keep it cool, dry and sealed.",
        policy_faithfulness=2,
        flagged_thoughts=[1, 2],
        comment=None,
        raw={**page["items"][0]["responses"][0], "updated_at": "2026-11-22T09:00:00Z"},  # for audit
    )


def test_a_draft_or_discarded_response_is_skipped_and_the_next_submitted_one_still_read(
    dataset: rg.Dataset,
) -> None:
    page = argilla_page(
        dataset,
        answer("verdict", "reject", status="draft", user=str(uuid4())),
        answer("verdict", "reject", status="discarded", user=str(uuid4())),
        answer("verdict", "accept"),
    )

    parsed = read_argilla(page)

    assert [(s.annotation, s.reason) for s in parsed.skipped] == [
        ("response-1", "draft: only submitted responses count"),
        ("response-2", "discarded: only submitted responses count"),
    ]
    assert [(r.external_id, r.verdict) for r in parsed.reviews] == [("response-3", "accept")]


@pytest.mark.parametrize(
    ("question", "value"),
    [
        ("verdict", "maybe"),
        ("policy_faithfulness", 0),
        ("policy_faithfulness", 6),
        ("policy_faithfulness", 4.0),
        ("policy_faithfulness", "4"),
        ("flagged_thoughts", ["0"]),
        ("flagged_thoughts", ["one"]),
        ("flagged_thoughts", "1"),
        ("edited_response", 5),
    ],
)
def test_an_argilla_answer_outside_the_settings_is_a_problem_not_a_review(
    dataset: rg.Dataset, question: str, value: Any
) -> None:
    parsed = read_argilla(argilla_page(dataset, answer(question, value)))

    assert len(parsed.problems) == 1 and parsed.problems[0].startswith(f"record {ITEM} response response-1: ")
    with pytest.raises(InvalidAnnotations):
        parsed.checked()


def test_an_argilla_record_finds_its_item_by_metadata_when_it_has_no_external_id(dataset: rg.Dataset) -> None:
    page = argilla_page(dataset, answer("verdict", "accept"), answer("verdict", "reject", user=str(uuid4())))
    record = page["items"][0]
    without = {key: value for key, value in record.items() if key != "external_id"}
    not_ours = {**record, "external_id": "row-17"}
    nowhere = {**without, "metadata": {"position": 7}}

    found = read_argilla([without, not_ours])
    lost = read_argilla([nowhere])

    assert [r.item_id for r in found.reviews] == [ITEM] * 4 and found.problems == []
    assert lost.reviews == []
    assert lost.problems == [  # each response is named: the record is known by Argilla's id
        f"record {SERVER_RECORD} response response-{n}: the record has no item id of this service"
        for n in (1, 2)
    ]


def test_an_argilla_response_of_a_deleted_user_or_without_values_is_still_read(dataset: rg.Dataset) -> None:
    page = argilla_page(dataset, answer("verdict", "accept"))
    response = page["items"][0]["responses"][0]
    response.update(user_id=None)
    empty = {**response, "id": "response-2", "values": None}
    page["items"][0]["responses"].append(empty)

    first, second = read_argilla(page).reviews

    assert (first.annotator, first.verdict) == ("deleted user", "accept")
    assert (second.verdict, second.response, second.flagged_thoughts) == (None, None, [])


def test_argilla_records_come_as_a_list_or_a_page_and_anything_else_is_refused(dataset: rg.Dataset) -> None:
    page = argilla_page(dataset, answer("verdict", "accept"))

    assert len(read_argilla(page["items"]).reviews) == len(read_argilla(page).reviews) == 1
    for body in ({"records": page["items"]}, [{"responses": [{"id": "r"}]}], "records"):
        with pytest.raises(ValidationError):
            read_argilla(body)


# --- Label Studio: tasks, as its SDK reads them, and annotations read back --------------------


@pytest.fixture(scope="module")
def interface() -> LabelInterface:
    return LabelInterface(label_studio.CONFIG)


def test_a_graded_task_prefills_the_response_and_the_rating_and_conforms_to_the_config(
    interface: LabelInterface,
) -> None:
    task = label_studio.task(a_row(scores=grades(3, 4), accepted=True), ExportOptions())

    assert interface.validate_task({"data": task["data"]})  # type: ignore[arg-type]
    [prediction] = task["predictions"]
    assert interface.validate_prediction(prediction)  # type: ignore[no-untyped-call]
    assert task == {
        "data": {
            "item_id": str(ITEM),
            "position": 7,
            "prompt": "How do I store rice safely?",
            "intents": "Explicit:\n- Store rice [benign]\nImplicit:\n- Avoid food poisoning",
            "thoughts": [
                {"number": "1", "text": "Thought text 1"},
                {"number": "2", "text": "Thought text 2"},
            ],
            "thought_choices": [{"value": "Thought 1", "alias": "1"}, {"value": "Thought 2", "alias": "2"}],
            "response": "Keep it cool and dry.",
            "policy_set": "aidsafe-default@v3",
            "possibly_harmful_intents": 0,
        },
        "predictions": [
            {
                "model_version": "aidsafe aidsafe-default@v3",
                "score": 0.7,  # 3.5 of 5: weaker CoTs sort first
                "result": [
                    {
                        "from_name": "edited_response",
                        "to_name": "response",
                        "type": "textarea",
                        "value": {"text": ["Keep it cool and dry."]},
                    },
                    {
                        "from_name": "policy_faithfulness",
                        "to_name": "response",
                        "type": "rating",
                        "value": {"rating": 4},
                    },
                ],
            }
        ],
    }


def test_an_ungraded_task_predicts_the_response_alone_and_intents_without_implicit_ones(
    interface: LabelInterface,
) -> None:
    row = a_row(thoughts=1)
    task = label_studio.task(
        replace(row, intents={**INTENTS, "implicit_intents": []}),
        ExportOptions(),
    )

    assert interface.validate_task({"data": task["data"]})  # type: ignore[arg-type]
    assert task["data"]["intents"] == "Explicit:\n- Store rice [benign]"
    [prediction] = task["predictions"]
    assert prediction == {
        "model_version": "aidsafe aidsafe-default@v3",
        "result": [
            {
                "from_name": "edited_response",
                "to_name": "response",
                "type": "textarea",
                "value": {"text": ["Keep it cool and dry."]},
            }
        ],
    }


def test_tasks_written_in_batches_make_one_json_array() -> None:
    tasks = [{"data": {"n": n, "text": "é"}} for n in range(3)]
    writer = label_studio.JsonArray()

    written = (
        writer.start()
        + writer.encode(tasks[:2])
        + writer.encode([])
        + writer.encode(tasks[2:])
        + writer.finish()
    )
    nothing = label_studio.JsonArray()

    assert json.loads(written) == tasks
    assert (
        written == ("[\n" + ",\n".join(json.dumps(t, ensure_ascii=False) for t in tasks) + "\n]\n").encode()
    )
    assert json.loads(nothing.start() + nothing.finish()) == []


def annotation(*results: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "id": 501,
        "result": list(results),
        "created_at": "2026-11-20T10:00:00Z",
        "completed_by": 4,
        **fields,
    }


def result(question: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"from_name": question, "to_name": "response", "type": kind, "value": value}


VERDICT = result("verdict", "choices", {"choices": ["accept"]})
PREFILL = result("edited_response", "textarea", {"text": ["Keep it cool and dry."]})
DATA = {"item_id": str(ITEM), "response": "Keep it cool and dry."}


def read_export(*annotations: dict[str, Any], data: dict[str, Any] = DATA) -> Parsed:
    tasks = TypeAdapter(list[label_studio.TaskIn]).validate_python(
        [{"id": 12, "data": data, "annotations": list(annotations)}]
    )
    return label_studio.read_export(tasks)


def test_a_label_studio_annotation_is_read_whole(interface: LabelInterface) -> None:
    written = annotation(
        result("verdict", "choices", {"choices": ["reject"]}),
        result("policy_faithfulness", "rating", {"rating": 2}),
        {**result("flagged_thoughts", "choices", {"choices": ["Thought 2", "1"]}), "to_name": "thoughts"},
        result("edited_response", "textarea", {"text": ["Keep it cool,", "dry and sealed."]}),
        {**result("comment", "textarea", {"text": ["Too short."]}), "to_name": "prompt"},
        result("project_extra", "choices", {"choices": ["x"]}),  # a control the project added
        updated_at="2026-11-20T12:00:00+02:00",
        lead_time=3.5,
    )
    assert interface.validate_annotation({**written, "result": written["result"][:-1]})  # type: ignore[no-untyped-call]

    [review] = read_export(written).reviews

    assert review == Review(
        item_id=ITEM,
        source="label_studio",
        external_id="501",
        annotator="4",
        annotated_at=datetime(2026, 11, 20, 10, tzinfo=UTC),  # updated_at, in UTC
        verdict="reject",
        response="Keep it cool,\ndry and sealed.",
        policy_faithfulness=2,
        flagged_thoughts=[1, 2],
        comment="Too short.",
        raw={**written, "task": None, "was_cancelled": False, "updated_at": "2026-11-20T10:00:00Z"},
    )


def test_an_annotation_without_updated_at_is_timed_by_its_creation() -> None:
    [review] = read_export(annotation(VERDICT)).reviews

    assert review.annotated_at == datetime(2026, 11, 20, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("completed_by", "annotator"),
    [
        (7, "7"),
        ({"id": 7, "email": "ann@example.org"}, "ann@example.org"),
        ({"id": 7, "email": ""}, "7"),
        ({}, "unknown"),
        (None, "unknown"),
        ("x" * 300, "x" * 200),
        ({"email": "y" * 300}, "y" * 200),
    ],
)
def test_the_annotator_is_the_users_email_or_id(completed_by: Any, annotator: str) -> None:
    [review] = read_export(annotation(VERDICT, completed_by=completed_by)).reviews

    assert review.annotator == annotator


def test_annotations_with_no_reviewers_answer_are_skipped() -> None:
    parsed = read_export(
        annotation(id=1),
        annotation(PREFILL, result("policy_faithfulness", "rating", {"rating": 4}), id=2),
        annotation(result("edited_response", "textarea", {"text": ["  Keep it cool and dry.  "]}), id=3),
        annotation(result("verdict", "choices", {"choices": []}), id=4),
        annotation(VERDICT, id=5, was_cancelled=True),
    )

    assert parsed.reviews == [] and parsed.problems == []
    assert [(s.annotation, s.reason) for s in parsed.skipped] == [
        ("1", "no reviewer's answer: only the prefilled prediction"),
        ("2", "no reviewer's answer: only the prefilled prediction"),
        ("3", "no reviewer's answer: only the prefilled prediction"),
        ("4", "no reviewer's answer: only the prefilled prediction"),
        ("5", "cancelled: the reviewer skipped the task"),
    ]


@pytest.mark.parametrize(
    "answered",
    [
        VERDICT,
        result("flagged_thoughts", "choices", {"choices": ["1"]}),
        result("comment", "textarea", {"text": ["Fine."]}),
        result("edited_response", "textarea", {"text": ["Keep it dry."]}),
    ],
)
def test_any_one_reviewers_answer_makes_a_review(answered: dict[str, Any]) -> None:
    parsed = read_export(annotation(PREFILL, answered))

    assert len(parsed.reviews) == 1 and parsed.skipped == []


def test_a_changed_response_to_a_task_without_one_is_a_review() -> None:
    [review] = read_export(annotation(PREFILL), data={"item_id": str(ITEM)}).reviews

    assert review.response == "Keep it cool and dry."


@pytest.mark.parametrize(
    "choices",
    [["accept", "reject"], ["maybe"], [1], {"accept": True}],
)
def test_a_verdict_not_of_one_known_choice_is_a_problem(choices: Any) -> None:
    parsed = read_export(annotation(result("verdict", "choices", {"choices": choices})))

    assert len(parsed.problems) == 1 and parsed.problems[0].startswith("task 12 annotation 501: verdict ")


def test_a_task_without_an_item_id_of_this_service_is_a_problem() -> None:
    for data in ({}, {"item_id": "row-17"}, {"item_id": None}):
        parsed = read_export(annotation(VERDICT), data=data)

        assert parsed.reviews == []
        assert parsed.problems == ["task 12 annotation 501: the task's data has no item_id of this service"]


def read_webhook(event: dict[str, Any]) -> Parsed:
    return label_studio.read_webhook(label_studio.WebhookIn.model_validate(event))


def a_task(task_id: int, item_id: UUID = ITEM) -> dict[str, Any]:
    return {"id": task_id, "data": {"item_id": str(item_id)}}


@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])
@pytest.mark.parametrize("task_ref", [104, {"id": 104, "data": {}}, None])
def test_a_webhook_annotation_is_read_with_its_task_however_it_names_it(action: str, task_ref: Any) -> None:
    event = {"action": action, "annotation": annotation(VERDICT, task=task_ref), "task": a_task(104)}

    parsed = read_webhook(event)

    assert [(r.item_id, r.verdict) for r in parsed.reviews] == [(ITEM, "accept")]
    assert parsed.problems == [] and parsed.skipped == []


def test_annotations_created_together_are_matched_to_their_tasks_by_id() -> None:
    event = {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [annotation(VERDICT, id=1, task=105), annotation(VERDICT, id=2, task={"id": 104})],
        "task": [a_task(104), a_task(105, OTHER_ITEM)],
    }

    parsed = read_webhook(event)

    assert [(r.external_id, r.item_id) for r in parsed.reviews] == [("1", OTHER_ITEM), ("2", ITEM)]


def test_a_webhook_annotation_whose_task_is_not_in_the_event_is_a_problem() -> None:
    unmatched = {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [annotation(VERDICT, task=106), annotation(VERDICT, id=502, task=107)],
        "task": [a_task(104), a_task(105, OTHER_ITEM)],
    }
    taskless = {"action": "ANNOTATION_CREATED", "annotation": annotation(VERDICT, task=104)}
    empty = {"action": "ANNOTATION_CREATED", "task": a_task(104)}

    assert read_webhook(unmatched).problems == [
        "annotation 501: the event has no task 106",
        "annotation 502: the event has no task 107",
    ]
    assert read_webhook(taskless).problems == ["annotation 501: the event has no task 104"]
    assert read_webhook(empty).problems == ["ANNOTATION_CREATED without an annotation"]
    assert read_webhook(unmatched).reviews == read_webhook(taskless).reviews == []


def test_a_deletion_event_retracts_each_annotation_it_names() -> None:
    event = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 501}, {"id": "a-2", "extra": 1}]}

    parsed = read_webhook(event)

    assert [(r.source, r.external_id, r.raw) for r in parsed.retractions] == [
        ("label_studio", "501", {"action": "ANNOTATIONS_DELETED", "annotation": {"id": 501}}),
        ("label_studio", "a-2", {"action": "ANNOTATIONS_DELETED", "annotation": {"id": "a-2", "extra": 1}}),
    ]
    assert parsed.problems == [] and parsed.reviews == []
    for empty in ({"action": "ANNOTATIONS_DELETED"}, {"action": "ANNOTATIONS_DELETED", "annotations": []}):
        assert read_webhook(empty).problems == ["ANNOTATIONS_DELETED without the deleted annotations"]


def test_other_webhook_events_are_skipped_whole() -> None:
    parsed = read_webhook(
        {"action": "PROJECT_UPDATED", "annotation": annotation(VERDICT), "task": a_task(104)}
    )

    assert parsed.reviews == [] and parsed.problems == []
    assert [(s.annotation, s.reason) for s in parsed.skipped] == [
        (None, "PROJECT_UPDATED is not an annotation event")
    ]


# --- The answers' checks, whichever tool sent them --------------------------------------------


def read_answers(**answers: Any) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    return Answers(**answers).read("here", problems), problems


@pytest.mark.parametrize(
    ("choice", "number"),
    [
        (1, 1),
        (3, 3),
        ("3", 3),
        ("Thought 3", 3),
        (" thought  12 ", 12),
        ("THOUGHT3", 3),
        (9_999, 9_999),
        ("0003", 3),
        ("Thought 3" + " " * 11, 3),
    ],
)
def test_a_flagged_thought_is_named_by_its_number_or_its_label(choice: Any, number: int) -> None:
    fields, problems = read_answers(flagged_thoughts=[choice, choice])

    assert (fields["flagged_thoughts"], problems) == ([number], [])


@pytest.mark.parametrize(
    "choice",
    [
        0,
        -1,
        10_000,
        True,
        2.0,
        "0",
        "Thought 0",
        "Thought",
        "3a",
        "12345",
        "Thought 3" + " " * 12,
        None,
        "Thought \u0663",
        "Thought\u00a03",
    ],
)
def test_a_flagged_choice_naming_no_thought_is_a_problem(choice: Any) -> None:
    fields, problems = read_answers(flagged_thoughts=["1", choice])

    assert fields["flagged_thoughts"] == [1]
    assert problems == [f"here: flagged thought {choice!r} is not a thought number"]


def test_more_flagged_thoughts_than_there_are_thought_numbers_are_refused_unread() -> None:
    """A CoT never refined may have far more thoughts than the 12 a refined one keeps: whether
    it has each one flagged is checked against it when the review is stored."""
    every = [str(n) for n in range(1, MAX_THOUGHT_NUMBER + 1)]
    read, at_most = read_answers(flagged_thoughts=every)
    fields, too_many = read_answers(flagged_thoughts=["1"] * (MAX_THOUGHT_NUMBER + 1))

    assert (read["flagged_thoughts"], at_most) == (list(range(1, MAX_THOUGHT_NUMBER + 1)), [])
    assert fields["flagged_thoughts"] == []
    assert too_many == [
        f"here: {MAX_THOUGHT_NUMBER + 1} flagged thoughts, more than the 9999 thought numbers"
    ]


@pytest.mark.parametrize("verdict", ["accept", " Accept ", "REJECT"])
def test_a_verdict_is_read_in_any_case(verdict: str) -> None:
    fields, problems = read_answers(verdict=verdict)

    assert (fields["verdict"], problems) == (verdict.strip().lower(), [])


@pytest.mark.parametrize("rating", RATINGS)
def test_each_rating_of_the_scale_is_read(rating: int) -> None:
    fields, problems = read_answers(policy_faithfulness=rating)

    assert (fields["policy_faithfulness"], problems) == (rating, [])


def test_an_answer_that_is_not_text_is_a_problem_and_blank_text_is_none() -> None:
    fields, problems = read_answers(edited_response=["a", 1], comment={"text": "x"})
    blank, none = read_answers(edited_response=[" ", ""], comment="\n")

    assert (fields["response"], fields["comment"]) == (None, None)
    assert problems == [
        "here: edited_response ['a', 1] is not text",
        "here: comment {'text': 'x'} is not text",
    ]
    assert (blank["response"], blank["comment"], none) == (None, None, [])


def test_a_long_answer_is_quoted_cut_short_in_the_problem() -> None:
    _, problems = read_answers(verdict="x" * 100, flagged_thoughts="y" * 58)

    assert problems == [
        f"here: verdict '{'x' * 56}... is not one of accept, reject",
        f"here: flagged thoughts {'y' * 58!r} are not a list of choices",  # 60 characters: whole
    ]


def test_a_review_edits_the_response_only_if_it_differs_from_the_models() -> None:
    fields, _ = read_answers(edited_response=" Keep it dry. ")
    review = Review(ITEM, "argilla", "r", "u", datetime.now(UTC), **fields, raw={})

    assert review.edited_response("Keep it dry.") is None
    assert review.edited_response("Keep it cool and dry.") == " Keep it dry. "
    assert (
        Review(ITEM, "argilla", "r", "u", datetime.now(UTC), **read_answers()[0], raw={}).edited_response("x")
        is None
    )


def test_problems_refuse_the_whole_request_naming_the_first() -> None:
    problems = [f"annotation {n}: bad" for n in range(MAX_LISTED_PROBLEMS + 1)]

    with pytest.raises(InvalidAnnotations) as refused:
        Parsed(problems=problems).checked()
    fine = Parsed(skipped=[])

    assert refused.value.message == (
        f"{MAX_LISTED_PROBLEMS + 1} annotation(s) cannot be read, nothing was imported: annotation 0: bad"
    )
    assert refused.value.details == problems[:MAX_LISTED_PROBLEMS]
    assert (refused.value.status, refused.value.code) == (422, "invalid_annotation")
    assert fine.checked() is fine


@pytest.mark.parametrize(
    ("sent", "read"),
    [
        ("2026-11-22T09:00:00", datetime(2026, 11, 22, 9, tzinfo=UTC)),  # Argilla: no zone, UTC
        ("2026-11-22T11:00:00+02:00", datetime(2026, 11, 22, 9, tzinfo=UTC)),
    ],
)
def test_a_tools_time_is_read_in_utc(sent: str, read: datetime) -> None:
    [review] = read_export(annotation(VERDICT, created_at=sent)).reviews

    assert review.annotated_at == read and review.annotated_at.utcoffset() is not None
    assert review.annotated_at.tzinfo == UTC


@pytest.mark.parametrize(
    "moment",
    # outside the calendar in UTC; its first and last microsecond (asyncpg stores them as
    # -infinity and infinity, after which no edit or withdrawal could come)
    ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"],
)
def test_a_time_outside_the_calendar_in_utc_is_a_validation_error(moment: str) -> None:
    with pytest.raises(ValidationError, match=re.escape("within years 1 to 9999 in UTC")):
        read_export(annotation(VERDICT, created_at=moment))


@pytest.mark.parametrize(
    ("model", "field", "limit"),
    [
        (argilla.RecordIn, "id", 200),
        (argilla.RecordIn, "external_id", 200),
        (argilla.ResponseIn, "id", 200),
        (argilla.ResponseIn, "user_id", 200),
        (label_studio.AnnotationIn, "id", 200),
        (label_studio.WebhookIn, "action", 100),
    ],
)
def test_a_tools_id_is_read_up_to_its_length_limit(model: Any, field: str, limit: int) -> None:
    """Ids are stored in columns of that size: a longer one is refused when read, not at insert."""
    body = {"action": "X", "id": "r", "status": "submitted", "updated_at": WHEN, "created_at": WHEN}

    assert getattr(model.model_validate({**body, field: "x" * limit}), field) == "x" * limit
    with pytest.raises(ValidationError):
        model.model_validate({**body, field: "x" * (limit + 1)})


def test_an_export_without_task_ids_or_annotators_is_still_read() -> None:
    tasks = TypeAdapter(list[label_studio.TaskIn]).validate_python(
        [{"data": DATA, "annotations": [{"id": 1, "result": [VERDICT], "created_at": WHEN}]}]
    )

    [review] = label_studio.read_export(tasks).reviews

    assert (review.annotator, review.verdict) == ("unknown", "accept")
