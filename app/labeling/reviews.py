"""A human review of one CoT as read from a labeling tool, before it is stored: the questions
both tools ask (one name per question in either tool), and the checks on the answers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from app.errors import ServiceError

VERDICTS = ("accept", "reject")
RATINGS = (1, 2, 3, 4, 5)
_THOUGHT_NUMBER = re.compile(r"(\d+)\s*$")  # "3" or "Thought 3"


class Question(StrEnum):
    """A reviewer's questions: Label Studio control names and Argilla question names alike."""

    VERDICT = "verdict"  # accept | reject: may the sample go into training data
    POLICY_FAITHFULNESS = "policy_faithfulness"  # 1-5
    EDITED_RESPONSE = "edited_response"  # the response, prefilled with the model's
    FLAGGED_THOUGHTS = "flagged_thoughts"  # refined thought numbers, 1-based
    COMMENT = "comment"


class InvalidAnnotations(ServiceError):
    status = 422
    code = "invalid_annotation"


@dataclass(frozen=True)
class Review:
    item_id: UUID
    source: str  # label_studio | argilla
    external_id: str  # the tool's id of the annotation (Label Studio) or response (Argilla)
    annotator: str
    annotated_at: datetime  # the time of this version: an edit in the tool makes a new one
    verdict: str | None
    response: str | None  # the response as the reviewer left it: maybe the unchanged prefill
    policy_faithfulness: int | None
    flagged_thoughts: list[int]
    comment: str | None
    raw: dict[str, Any]  # what the tool sent about this annotation

    def edited_response(self, model_response: str) -> str | None:
        """The reviewer's response if it differs from the model's: submitting the prefilled
        response unchanged is no edit."""
        if self.response is None or self.response.strip() == model_response.strip():
            return None
        return self.response


@dataclass(frozen=True)
class Skipped:
    annotation: str | None  # the tool's id, when there is one
    reason: str


@dataclass(frozen=True)
class Retraction:
    """An annotation deleted in the tool: its reviews stop counting (nothing is deleted here)."""

    source: str
    external_id: str  # the tool's id of the deleted annotation
    raw: dict[str, Any]  # what the tool sent about the deletion


@dataclass
class Parsed:
    """What a tool's file or event holds: reviews to store, annotations deleted in the tool,
    annotations deliberately left out, and problems that refuse the whole request."""

    reviews: list[Review] = field(default_factory=list)
    retractions: list[Retraction] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def checked(self) -> Parsed:
        """Itself, or InvalidAnnotations listing every problem: nothing of a request with a
        problem is stored."""
        if self.problems:
            raise InvalidAnnotations(
                f"{len(self.problems)} annotation(s) cannot be read, "
                f"nothing was imported: {self.problems[0]}",
                self.problems,
            )
        return self


@dataclass
class Answers:
    """One annotation's answers, as the tool gave them; `read` checks and converts them."""

    verdict: Any = None
    policy_faithfulness: Any = None
    edited_response: Any = None
    flagged_thoughts: Any = None
    comment: Any = None

    def read(self, where: str, problems: list[str]) -> dict[str, Any]:
        """Review fields; each answer that is not a valid one adds a problem naming `where`."""
        verdict = _lower(self.verdict)
        if verdict is not None and verdict not in VERDICTS:
            problems.append(f"{where}: verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")
        rating = self.policy_faithfulness
        if rating is not None and (type(rating) is not int or rating not in RATINGS):
            problems.append(f"{where}: policy_faithfulness {rating!r} is not a whole number 1-5")
        choices = self.flagged_thoughts or []
        if not isinstance(choices, list):
            problems.append(f"{where}: flagged thoughts {choices!r} are not a list of choices")
            choices = []
        flagged = []
        for choice in choices:
            number = _THOUGHT_NUMBER.search(str(choice))
            if number is None or int(number.group(1)) < 1:
                problems.append(f"{where}: flagged thought {choice!r} is not a thought number")
            else:
                flagged.append(int(number.group(1)))
        return {
            "verdict": verdict,
            "response": _text(self.edited_response),
            "policy_faithfulness": rating,
            "flagged_thoughts": sorted(set(flagged)),
            "comment": _text(self.comment),
        }

    def empty(self) -> bool:
        return all(
            value in (None, "", [])
            for value in (
                self.verdict,
                self.policy_faithfulness,
                self.edited_response,
                self.flagged_thoughts,
                self.comment,
            )
        )


def utc(moment: datetime) -> datetime:
    """A tool's time; one without a zone (Argilla's server sends them so) is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _text(value: Any) -> str | None:
    """A text answer: a string, or lines as a list (Label Studio's TextArea); blank is none."""
    if isinstance(value, list):
        value = "\n".join(str(line) for line in value)
    if value is None or not str(value).strip():
        return None
    return str(value)
