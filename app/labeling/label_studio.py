"""Label Studio: the labeling config, tasks in its JSON import format (the service's output
as predictions), and its annotations read back, from a JSON export file or a webhook event.

Tasks carry the item id in `data.item_id`; that is how an annotation finds its CoT again."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from app.deliberation.parsing import explicit_labels, labelled_intents
from app.deliberation.results import POLICY_METRICS
from app.deliberation.schemas import POSSIBLY_HARMFUL
from app.labeling.reviews import Answers, Parsed, Question, Retraction, Review, Skipped, ToolTime
from app.store.export_rows import CotRow

SOURCE = "label_studio"
Record = dict[str, Any]

# One config for every job: the task data fills it. Thoughts are Paragraphs (one per refined
# thought, named by its number) and the thought checkboxes are dynamic Choices loaded from
# `data.thought_choices`, since the number of thoughts differs per CoT.
CONFIG = f"""<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Intents"/>
  <Text name="intents" value="$intents"/>
  <Header value="Refined chain of thought"/>
  <Paragraphs name="thoughts" value="$thoughts" nameKey="number" textKey="text"/>
  <Header value="Response"/>
  <Text name="response" value="$response"/>
  <Header value="May this sample go into training data?"/>
  <Choices name="{Question.VERDICT}" toName="response" choice="single-radio" required="true"
           showInline="true">
    <Choice value="Accept" alias="accept"/>
    <Choice value="Reject" alias="reject"/>
  </Choices>
  <Header value="How faithfully do the thoughts and the response follow the policies? (1-5)"/>
  <Rating name="{Question.POLICY_FAITHFULNESS}" toName="response" maxRating="5"/>
  <Header value="Flag thoughts that are wrong, redundant or against a policy"/>
  <Choices name="{Question.FLAGGED_THOUGHTS}" toName="thoughts" choice="multiple" showInline="true"
           value="$thought_choices"/>
  <Header value="Response as it should be (edit if needed)"/>
  <TextArea name="{Question.EDITED_RESPONSE}" toName="response" editable="true" maxSubmissions="1" rows="6"/>
  <TextArea name="{Question.COMMENT}" toName="prompt" maxSubmissions="1" rows="2"
            placeholder="Comment (optional)"/>
</View>
"""


# --- export ---------------------------------------------------------------------------------


def task(row: CotRow, _options: object) -> Record:
    """One task of Label Studio's JSON import format (an export's record function; a task
    takes none of the export's options). Only the chosen CoT: never rejected or whispered
    text. The prediction prefills the response and, when graded, the rating."""
    thoughts = [thought["text"] for thought in row.refined_thoughts]
    return {
        "data": {
            "item_id": str(row.item_id),
            "position": row.position,
            "prompt": row.prompt,
            "intents": intents_text(row.intents),
            "thoughts": [{"number": str(n), "text": text} for n, text in enumerate(thoughts, 1)],
            "thought_choices": [
                {"value": f"Thought {n}", "alias": str(n)} for n in range(1, len(thoughts) + 1)
            ],
            "response": row.response,
            "policy_set": f"{row.policy_set_name}@{row.policy_set_version}",
            "possibly_harmful_intents": possibly_harmful(row.intents),
        },
        "predictions": [_prediction(row)],
    }


def intents_text(intents: dict[str, Any]) -> str:
    """The intent stage's output (both lists always there, empty in zero-shot mode) as text,
    each explicit intent with its label, as the agents read them."""
    lines = ["Explicit:", *(f"- {i}" for i in labelled_intents(intents))]
    implicit = intents["implicit_intents"]
    if implicit:
        lines += ["Implicit:", *(f"- {i}" for i in implicit)]
    return "\n".join(lines)


def possibly_harmful(intents: dict[str, Any]) -> int:
    """How many explicit intents the intent stage labelled possibly harmful: reviewers filter
    and sort on it (a Label Studio data column, Argilla metadata)."""
    return explicit_labels(intents).count(POSSIBLY_HARMFUL)


def policy_faithfulness(scores: dict[str, Any] | None) -> float | None:
    """The grader's mean of the two policy metrics (the scale the pair gap uses), if graded."""
    if scores is None:
        return None
    total: float = sum(scores[m]["score"] for m in POLICY_METRICS)
    return total / len(POLICY_METRICS)


def as_rating(score: float) -> int:
    return math.floor(score + 0.5)  # half up: 3.5 is 4, not Python's banker's 4/2


def _prediction(row: CotRow) -> Record:
    result: list[Record] = [
        _result(Question.EDITED_RESPONSE, "response", "textarea", {"text": [row.response]})
    ]
    prediction: Record = {"model_version": f"aidsafe {row.policy_set_name}@{row.policy_set_version}"}
    graded = policy_faithfulness(row.scores)
    if graded is not None:
        result.append(
            _result(Question.POLICY_FAITHFULNESS, "response", "rating", {"rating": as_rating(graded)})
        )
        prediction["score"] = graded / 5  # sorts tasks in Label Studio, weakest first
    return {**prediction, "result": result}


def _result(from_name: str, to_name: str, type_: str, value: Record) -> Record:
    return {"from_name": from_name, "to_name": to_name, "type": type_, "value": value}


class JsonArray:
    """One JSON array written a batch at a time (Label Studio imports a file of tasks)."""

    def __init__(self) -> None:
        self.written = False

    def start(self) -> bytes:
        return b"["

    def encode(self, records: list[Record]) -> bytes:
        if not records:
            return b""
        text = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
        separator = ",\n" if self.written else "\n"
        self.written = True
        return (separator + text).encode()

    def finish(self) -> bytes:
        return b"\n]\n"


# --- import ---------------------------------------------------------------------------------


class _Loose(BaseModel):
    """Label Studio sends more than we read; the rest is kept in `raw` for audit."""

    model_config = ConfigDict(extra="allow")


class ResultIn(_Loose):
    from_name: str
    to_name: str | None = None
    type: str
    value: dict[str, Any]


# Label Studio's ids are its database's 64-bit keys; a longer number is no id of its, and as
# text (the annotation ids stored, up to 200 characters) it would be cut and clash with another.
ToolId = Annotated[int, Field(ge=0, lt=2**63)]
AnnotationId = ToolId | Annotated[str, Field(max_length=200)]


class TaskRef(_Loose):
    id: ToolId


class AnnotationIn(_Loose):
    id: AnnotationId
    completed_by: int | str | dict[str, Any] | None = None
    result: list[ResultIn] = Field(default_factory=list)
    was_cancelled: bool = False
    created_at: ToolTime
    updated_at: ToolTime | None = None
    task: ToolId | TaskRef | None = Field(default=None, description="The task, or its id (webhooks).")


class TaskIn(_Loose):
    """A task of Label Studio's JSON export, with its annotations."""

    id: ToolId | None = None
    data: dict[str, Any]
    annotations: list[AnnotationIn] = Field(default_factory=list)


class DeletedIn(_Loose):
    """A deleted annotation: Label Studio sends only its id."""

    id: AnnotationId


class WebhookIn(_Loose):
    """A Label Studio webhook event. ANNOTATION_CREATED and ANNOTATION_UPDATED carry one
    annotation and its task; ANNOTATIONS_CREATED lists of both (matched by task id);
    ANNOTATIONS_DELETED lists the deleted annotations' ids under `annotations`."""

    action: str = Field(max_length=100)
    annotation: AnnotationIn | list[AnnotationIn] | None = None
    task: TaskIn | list[TaskIn] | None = None
    annotations: list[DeletedIn] | None = None


ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETION_EVENT = "ANNOTATIONS_DELETED"


def read_export(tasks: list[TaskIn]) -> Parsed:
    """Every annotation of an export file; cancelled (skipped) ones are left out."""
    parsed = Parsed()
    for task_in in tasks:
        for annotation in task_in.annotations:
            _read(task_in, annotation, parsed)
    return parsed


def read_webhook(event: WebhookIn) -> Parsed:
    """The annotation(s) of an annotation event, or the retractions of a deletion; any other
    event is skipped as a whole."""
    parsed = Parsed()
    if event.action == DELETION_EVENT:
        for deleted in event.annotations or []:
            raw = {"action": event.action, "annotation": deleted.model_dump()}  # JSON types only
            parsed.retractions.append(Retraction(SOURCE, str(deleted.id), raw))
        if not event.annotations:
            parsed.problems.append(f"{event.action} without the deleted annotations")
        return parsed
    if event.action not in ANNOTATION_EVENTS:
        parsed.skipped.append(Skipped(None, f"{event.action} is not an annotation event"))
        return parsed
    if event.annotation is None:
        parsed.problems.append(f"{event.action} without an annotation")
        return parsed
    annotations = event.annotation if isinstance(event.annotation, list) else [event.annotation]
    tasks = event.task if isinstance(event.task, list) else [event.task]
    by_id = {t.id: t for t in tasks if t is not None}
    for annotation in annotations:
        task_id = annotation.task.id if isinstance(annotation.task, TaskRef) else annotation.task
        task_in = by_id.get(task_id) or (next(iter(by_id.values())) if len(by_id) == 1 else None)
        if task_in is None:
            parsed.problems.append(f"annotation {annotation.id}: the event has no task {task_id}")
            continue
        _read(task_in, annotation, parsed)
    return parsed


def _read(task_in: TaskIn, annotation: AnnotationIn, parsed: Parsed) -> None:
    where = f"task {task_in.id} annotation {annotation.id}"
    if annotation.was_cancelled:
        parsed.skipped.append(Skipped(str(annotation.id), "cancelled: the reviewer skipped the task"))
        return
    item_id = _item_id(task_in.data)
    if item_id is None:
        parsed.problems.append(f"{where}: the task's data has no item_id of this service")
        return
    answers = _answers(annotation.result)
    if not answers.reviewed(task_in.data.get("response")):
        parsed.skipped.append(
            Skipped(str(annotation.id), "no reviewer's answer: only the prefilled prediction")
        )
        return
    parsed.reviews.append(
        Review(
            item_id=item_id,
            source=SOURCE,
            external_id=str(annotation.id),
            annotator=_annotator(annotation.completed_by),
            annotated_at=annotation.updated_at or annotation.created_at,
            raw=annotation.model_dump(mode="json"),
            **answers.read(where, parsed.problems),
        )
    )


def _answers(results: list[ResultIn]) -> Answers:
    """Results of our controls; a control the project added is ignored (it stays in raw)."""
    answers = Answers()
    for result in results:
        match result.from_name:
            case Question.VERDICT:
                answers.verdict = _one_choice(result.value.get("choices"))
            case Question.POLICY_FAITHFULNESS:
                answers.policy_faithfulness = result.value.get("rating")
            case Question.FLAGGED_THOUGHTS:
                answers.flagged_thoughts = result.value.get("choices")
            case Question.EDITED_RESPONSE:
                answers.edited_response = result.value.get("text")
            case Question.COMMENT:
                answers.comment = result.value.get("text")
    return answers


def _one_choice(choices: Any) -> Any:
    """A single-choice answer: its one choice, none, or what came if not a list of one."""
    if isinstance(choices, list) and len(choices) <= 1:
        return choices[0] if choices else None
    return choices


def _item_id(data: dict[str, Any]) -> UUID | None:
    try:
        return UUID(str(data.get("item_id")))
    except ValueError:
        return None


def _annotator(completed_by: int | str | dict[str, Any] | None) -> str:
    """Label Studio sends the user id; older exports a user object (its email is clearer)."""
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id") or "unknown")[:200]
    return "unknown" if completed_by is None else str(completed_by)[:200]
