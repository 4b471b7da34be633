"""A human review of one CoT as read from a labeling tool, before it is stored: the questions
both tools ask (one name per question in either tool), and the checks on the answers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

from pydantic import AfterValidator

from app.errors import MAX_LISTED_PROBLEMS, ServiceError

VERDICTS = ("accept", "reject")
RATINGS = (1, 2, 3, 4, 5)
# A choice naming a thought: "3" (an alias, Argilla's value) or "Thought 3" (Label Studio's
# value without alias). Longer text is refused unread, and fullmatch on it is linear.
_THOUGHT_CHOICE = re.compile(r"(?:thought\s*)?(\d{1,4})", re.ASCII)  # matched lowercased
_MAX_THOUGHT_CHOICE_CHARS = 20
MAX_THOUGHT_NUMBER = 9_999  # the most four digits name, as _THOUGHT_CHOICE reads them


class Question(StrEnum):
    """A reviewer's questions: Label Studio control names and Argilla question names alike."""

    VERDICT = "verdict"  # accept | reject: may the sample go into training data
    POLICY_FAITHFULNESS = "policy_faithfulness"  # 1-5
    EDITED_RESPONSE = "edited_response"  # the response, prefilled with the model's
    FLAGGED_THOUGHTS = "flagged_thoughts"  # the CoT's thought numbers, 1-based
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
        """Itself, or InvalidAnnotations listing the problems: nothing of a request with a
        problem is stored."""
        if self.problems:
            raise InvalidAnnotations(
                f"{len(self.problems)} annotation(s) cannot be read, "
                f"nothing was imported: {self.problems[0]}",
                self.problems[:MAX_LISTED_PROBLEMS],
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
            problems.append(f"{where}: verdict {_shown(self.verdict)} is not one of {', '.join(VERDICTS)}")
        rating = self.policy_faithfulness
        if rating is not None and (type(rating) is not int or rating not in RATINGS):
            problems.append(f"{where}: policy_faithfulness {_shown(rating)} is not a whole number 1-5")
        return {
            "verdict": verdict,
            "response": _text(Question.EDITED_RESPONSE, self.edited_response, where, problems),
            "policy_faithfulness": rating,
            "flagged_thoughts": self._flagged(where, problems),
            "comment": _text(Question.COMMENT, self.comment, where, problems),
        }

    def reviewed(self, prefilled_response: Any) -> bool:
        """Whether a reviewer answered anything the prefill did not: a verdict, a flagged
        thought, a comment or a changed response. An annotation made from the prediction
        alone (Label Studio's "Create Annotations From Predictions": the response and the
        grader's rating, unchanged) is no review; a rating alone is none either, since both
        tools require a reviewer's verdict."""
        response = _joined(self.edited_response)
        prefill = prefilled_response.strip() if isinstance(prefilled_response, str) else ""
        unchanged = response is None or (isinstance(response, str) and response.strip() in ("", prefill))
        others = (self.verdict, self.flagged_thoughts, _joined(self.comment))
        return not unchanged or not all(_blank(value) for value in others)

    def _flagged(self, where: str, problems: list[str]) -> list[int]:
        choices = self.flagged_thoughts
        if choices is None:
            return []
        if not isinstance(choices, list):
            problems.append(f"{where}: flagged thoughts {_shown(choices)} are not a list of choices")
            return []
        # Refused unread: a tool lists a thought once, and no choice names one past
        # MAX_THOUGHT_NUMBER. Whether the CoT has each thought is checked against the CoT
        # (imports.record_reviews): a job never refined may have far more than `kept_thoughts`.
        if len(choices) > MAX_THOUGHT_NUMBER:
            problems.append(
                f"{where}: {len(choices)} flagged thoughts, "
                f"more than the {MAX_THOUGHT_NUMBER} thought numbers"
            )
            return []
        flagged = set()
        for choice in choices:
            number = _thought_number(choice)
            if number is None:
                problems.append(f"{where}: flagged thought {_shown(choice)} is not a thought number")
            else:
                flagged.add(number)
        return sorted(flagged)


def _thought_number(choice: Any) -> int | None:
    """The 1-based thought number a choice names, or None: 3, "3" or "Thought 3"."""
    if type(choice) is int:
        return choice if 1 <= choice <= MAX_THOUGHT_NUMBER else None
    if not isinstance(choice, str) or len(choice) > _MAX_THOUGHT_CHOICE_CHARS:
        return None
    match = _THOUGHT_CHOICE.fullmatch(choice.strip().lower())
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


_STORABLE = "the time must lie within years 1 to 9999 in UTC, their first and last microsecond excluded"


def _utc(moment: datetime) -> datetime:
    """A tool's time in UTC; one without a zone (Argilla's server sends them so) is UTC.
    The calendar's two end moments are refused: asyncpg stores them as -infinity and
    infinity, and no later version (an edit, a withdrawal) could follow an infinite one."""
    try:
        utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is a time of year 0 in UTC
        raise ValueError(_STORABLE) from None
    if utc in (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)):
        raise ValueError(_STORABLE)
    return utc


ToolTime = Annotated[datetime, AfterValidator(_utc)]


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _text(question: str, value: Any, where: str, problems: list[str]) -> str | None:
    """A text answer: a string, or its lines (Label Studio's TextArea); blank is none."""
    value = _joined(value)
    if value is not None and not isinstance(value, str):
        problems.append(f"{where}: {question} {_shown(value)} is not text")
        return None
    return None if _blank(value) else value


def _joined(value: Any) -> Any:
    """Text given as a list of lines (Label Studio's TextArea) as one string; else as is."""
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(value)
    return value


def _blank(value: Any) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _shown(value: Any) -> str:
    """A value as a problem quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
