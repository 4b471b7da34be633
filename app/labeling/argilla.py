"""Argilla (v2): the dataset settings, records with the service's scores as suggestions, and
reviewers' responses read back from the records as Argilla's API returns them.

A record's `id` is the item id (Argilla keeps it as the record's `external_id`), and its
metadata repeats it; either finds the CoT again."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from app.deliberation.config import LIMIT_CAPS
from app.labeling.label_studio import as_rating, intents_text, policy_faithfulness, possibly_harmful
from app.labeling.reviews import VERDICTS, Answers, Parsed, Question, Review, Skipped, ToolTime
from app.store.export_rows import CotRow

SOURCE = "argilla"
Record = dict[str, Any]
GRADER = "aidsafe-grader"
GATE = "aidsafe-quality-gate"
GENERATOR = "aidsafe"


def _text_field(name: str, title: str) -> Record:
    return {
        "name": name,
        "title": title,
        "required": True,
        "settings": {"type": "text", "use_markdown": False},
    }


def _question(name: str, title: str, required: bool, settings: Record) -> Record:
    return {"name": name, "title": title, "required": required, "settings": settings}


def _options(labels: dict[str, str]) -> list[Record]:
    return [{"value": value, "text": text} for value, text in labels.items()]


def settings(cot_thoughts: int) -> Record:
    """The dataset settings for a job whose CoTs hold at most `cot_thoughts` thoughts, in the
    form `rg.Settings.serialize()` writes and `rg.Settings.from_json()` reads. A thought can
    be flagged only if it has an option; every job gets at least the options a refined CoT
    may need (the settings of jobs served before stay what their datasets were made with)."""
    options = max(cot_thoughts, LIMIT_CAPS.kept_thoughts)
    thoughts = {str(n): f"Thought {n}" for n in range(1, options + 1)}
    return {
        "guidelines": (
            "Review one chain of thought written under a safety policy. Accept it only if the "
            "thoughts and the response follow the policies and the response helps where it may. "
            "Flag the thoughts that are wrong, redundant or against a policy; edit the response if "
            "it should read differently."
        ),
        "fields": [
            _text_field("prompt", "Prompt"),
            _text_field("intents", "Intents"),
            _text_field("thoughts", "Refined chain of thought"),
            _text_field("response", "Response"),
        ],
        "questions": [
            _question(
                Question.VERDICT,
                "May this sample go into training data?",
                True,
                {"type": "label_selection", "options": _options({v: v.capitalize() for v in VERDICTS})},
            ),
            _question(
                Question.POLICY_FAITHFULNESS,
                "How faithfully do the thoughts and the response follow the policies?",
                False,
                {"type": "rating", "options": [{"value": n} for n in range(1, 6)]},
            ),
            _question(
                Question.FLAGGED_THOUGHTS,
                "Thoughts that are wrong, redundant or against a policy",
                False,
                {"type": "multi_label_selection", "options": _options(thoughts), "options_order": "natural"},
            ),
            _question(
                Question.EDITED_RESPONSE,
                "Response as it should be",
                False,
                {"type": "text", "use_markdown": False},
            ),
            _question(Question.COMMENT, "Comment", False, {"type": "text", "use_markdown": False}),
        ],
        "metadata": [
            {"name": "position", "title": "Position", "settings": {"type": "integer"}},
            {"name": "gate", "title": "Quality gate", "settings": {"type": "terms"}},
            {"name": "policy_set", "title": "Policy set", "settings": {"type": "terms"}},
            {
                "name": "possibly_harmful_intents",
                "title": "Possibly harmful intents",
                "settings": {"type": "integer"},
            },
        ],
        "vectors": [],
        "allow_extra_metadata": True,  # item_id rides along, unsearchable
        "distribution": {"strategy": "overlap", "min_submitted": 1},
    }


def record(row: CotRow, _options: object) -> Record:
    """A record in the form `rg.Record.to_dict()` writes and `rg.Record.from_dict()` reads
    (an export's record function; a record takes none of the export's options). Only the
    chosen CoT: never rejected or whispered text."""
    thoughts = [thought["text"] for thought in row.refined_thoughts]
    suggestions: Record = {Question.EDITED_RESPONSE: _suggestion(row.response, GENERATOR)}
    graded = policy_faithfulness(row.scores)
    if graded is not None:
        suggestions[Question.POLICY_FAITHFULNESS] = _suggestion(as_rating(graded), GRADER)
    if row.accepted is not None:
        suggestions[Question.VERDICT] = _suggestion("accept" if row.accepted else "reject", GATE)
    return {
        "id": str(row.item_id),
        "fields": {
            "prompt": row.prompt,
            "intents": intents_text(row.intents),
            "thoughts": "\n".join(f"{n}. {text}" for n, text in enumerate(thoughts, 1)),
            "response": row.response,
        },
        "metadata": {
            "item_id": str(row.item_id),
            "position": row.position,
            "gate": {True: "accepted", False: "rejected", None: "ungraded"}[row.accepted],
            "policy_set": f"{row.policy_set_name}@{row.policy_set_version}",
            "possibly_harmful_intents": possibly_harmful(row.intents),
        },
        "suggestions": {str(name): value for name, value in suggestions.items()},
    }


def _suggestion(value: Any, agent: str) -> Record:
    return {"value": value, "score": None, "agent": agent}


# --- import ---------------------------------------------------------------------------------


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ResponseIn(_Loose):
    """A user's response as Argilla's API returns it with a record."""

    id: str = Field(max_length=200)
    values: dict[str, dict[str, Any]] | None = None  # question name -> {"value": ...}
    status: Literal["submitted", "discarded", "draft"]
    user_id: str | None = Field(default=None, max_length=200)  # None once the user was deleted
    updated_at: ToolTime


class RecordIn(_Loose):
    id: str | None = Field(default=None, max_length=200)
    external_id: str | None = Field(
        default=None, max_length=200, description="The item id the record was exported with."
    )
    metadata: dict[str, Any] | None = None
    responses: list[ResponseIn] = Field(default_factory=list)


class RecordPageIn(_Loose):
    """A page of records as `GET /api/v1/datasets/{id}/records?include=responses` answers."""

    items: list[RecordIn]


def _shape(body: Any) -> str:
    return "records" if isinstance(body, list) else "page"


# Records as a list or a page; the shape picks the model, so errors speak of that one only.
RecordsIn = Annotated[
    Annotated[list[RecordIn], Tag("records")] | Annotated[RecordPageIn, Tag("page")],
    Discriminator(_shape),
]


def read_records(records: list[RecordIn]) -> Parsed:
    """Every submitted response; drafts and discarded responses are left out."""
    parsed = Parsed()
    for record_in in records:
        item_id = _item_id(record_in)
        for response in record_in.responses:
            where = f"record {record_in.external_id or record_in.id} response {response.id}"
            if response.status != "submitted":
                parsed.skipped.append(
                    Skipped(response.id, f"{response.status}: only submitted responses count")
                )
                continue
            if item_id is None:
                parsed.problems.append(f"{where}: the record has no item id of this service")
                continue
            values = {name: answer.get("value") for name, answer in (response.values or {}).items()}
            answers = Answers(**{q.value: values.get(q.value) for q in Question})
            parsed.reviews.append(
                Review(
                    item_id=item_id,
                    source=SOURCE,
                    external_id=response.id,
                    annotator=response.user_id or "deleted user",
                    annotated_at=response.updated_at,
                    raw=response.model_dump(mode="json"),
                    **answers.read(where, parsed.problems),
                )
            )
    return parsed


def _item_id(record_in: RecordIn) -> UUID | None:
    for candidate in (record_in.external_id, (record_in.metadata or {}).get("item_id")):
        try:
            return UUID(str(candidate))
        except ValueError:
            continue
    return None
