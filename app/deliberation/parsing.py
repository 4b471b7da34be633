"""Tolerant reading of agent replies: find the JSON, check what each stage needs, and tell a
malformed or truncated reply from an agent that refused to do the reasoning task at all.

Normalizers return plain JSON-able dicts: that is what a turn stores, and what a replay
reads back, so a resumed item sees exactly what the first run saw. A JSON reply's normalizer
takes the job's limits, used or not, as every schema builder does: it keeps the reply's lists
to what the schema allows, which a server without grammars may not have.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

from app.deliberation.config import Limits
from app.deliberation.ports import ChatReply, TokenLogprobs, TurnOutcome
from app.deliberation.results import METRICS
from app.deliberation.schemas import DROP_REASONS, INTENT_LABELS, MAX_INTENTS

_OPENING_FENCE = re.compile(r"```(?:json)?\s*", re.IGNORECASE)
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i cannot|i won'?t|i will not|"
    r"i am (?:not able|unable)|i'?m (?:not able|unable)|as an ai\b|i must decline|"
    r"unfortunately,? i can)",
    re.IGNORECASE,
)


# Small models echo the reply shape shown in the instructions: "..." stands for nothing,
# and "<text>" is their text wrapped like the placeholders they were shown.
_ELLIPSIS = re.compile(r"^(\.\.\.|…)$")
_WRAPPED = re.compile(r"^<([^<>]*)>$")


class MalformedOutput(ValueError):
    """The reply is not usable JSON for the stage; the message says what was wrong."""


# Where a record notes how many entries each of its lists had over the job's limits.
OVER_LIMIT = "over_limit"
_Entry = TypeVar("_Entry")


@dataclass
class _Limiter:
    """Keeps a reply's lists to their limits as a server keeping to the schema's maxItems
    would have (the first n), and counts what each list had over its limit: a server that
    ignores the schema must not give longer CoTs than the request budgets count on."""

    over_limit: dict[str, int] = field(default_factory=dict)

    def first(self, entries: list[_Entry], limit: int, name: str) -> list[_Entry]:
        if len(entries) > limit:
            self.over_limit[name] = len(entries) - limit
        return entries[:limit]

    def noted(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record`, with what was over the limits under OVER_LIMIT if anything was."""
        return {**record, OVER_LIMIT: self.over_limit} if self.over_limit else record


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in `text`, tolerating fences and chatter around it."""
    stripped = unfenced(text)
    start = stripped.find("{")
    if start < 0:
        raise MalformedOutput("no JSON object in the reply")
    try:
        # strict=False: grammar-constrained servers let raw newlines into strings. Decoding
        # from a "{" gives an object or fails.
        value: dict[str, Any] = json.JSONDecoder(strict=False).raw_decode(stripped[start:])[0]
    except json.JSONDecodeError as exc:
        raise MalformedOutput(f"invalid JSON ({exc.msg} at char {exc.pos})") from exc
    # JSON Python will not read (a prompt can ask for it) is malformed, not a crash of the item.
    except RecursionError:
        raise MalformedOutput("invalid JSON (nested too deeply to read)") from None
    except ValueError:
        raise MalformedOutput("invalid JSON (an integer of over 4,300 digits)") from None
    return value


def unfenced(text: str) -> str:
    """`text` stripped, without a Markdown fence at its start or its end. (One regular
    expression for both ends searched every position of the text for the closing fence:
    four fifths of the time a stage took to read a reply.)"""
    text = text.strip()
    opening = _OPENING_FENCE.match(text)
    if opening:
        text = text[opening.end() :]
    return text[:-3].rstrip() if text.endswith("```") else text


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text.strip()))


def refusal_of(reply: ChatReply) -> str | None:
    """Why this reply counts as the agent declining the task, or None."""
    if reply.refusal:
        return reply.refusal
    if reply.finish_reason == "content_filter":
        return "the server's content filter stopped the reply"
    if looks_like_refusal(reply.content) and "{" not in reply.content:
        return reply.content.strip()[:300]
    return None


def _strings(value: Any, field: str, *, required: bool) -> list[str]:
    if value is None and not required:
        return []
    if isinstance(value, str):  # a lone string where a list was asked for
        value = [value]
    if not isinstance(value, list):
        raise MalformedOutput(f"'{field}' is not a list of strings")
    items = [_usable(v) for v in value if isinstance(v, str | int | float)]
    items = [item for item in items if item]
    if required and not items:
        raise MalformedOutput(f"'{field}' is empty")
    return items


def _usable(value: Any) -> str:
    """The text, unwrapped from <...>, or "" for blanks and a bare ellipsis."""
    text = str(value).strip()
    if wrapped := _WRAPPED.match(text):
        text = wrapped.group(1).strip()
    return "" if _ELLIPSIS.match(text) else text


def _text(value: Any, field: str) -> str:
    text = _usable(value) if isinstance(value, str) else ""
    if not text:
        raise MalformedOutput(f"'{field}' is missing, empty or a placeholder")
    return text


def _all_refusals(thoughts: list[str]) -> bool:
    return bool(thoughts) and all(looks_like_refusal(t) for t in thoughts)


# An explicit intent given as bare text, or with a label outside INTENT_LABELS.
UNLABELLED = "unlabelled"


def explicit_labels(intents: Mapping[str, Any]) -> list[str]:
    """The label of each of the stored intents' explicit ones, in order (intents stored
    before labels existed are unlabelled)."""
    return list(intents.get("explicit_labels", [UNLABELLED] * len(intents["explicit_intents"])))


def labelled_intents(intents: Mapping[str, Any]) -> list[str]:
    """The explicit intents as agents and reviewers read them: "<text> [possibly harmful]"."""
    labels = explicit_labels(intents)  # one per intent
    return [f"{text} [{labels[n].replace('_', ' ')}]" for n, text in enumerate(intents["explicit_intents"])]


def normalize_intent(data: dict[str, Any], *, limits: Limits) -> dict[str, Any]:
    """Explicit intents with their labels (a parallel list), and the implicit ones: the
    plausible benign readings, so unlabelled. At most MAX_INTENTS of each."""
    explicit = data.get("explicit_intents")
    if isinstance(explicit, str | dict):  # a lone intent where a list was asked for
        explicit = [explicit]
    if not isinstance(explicit, list):
        raise MalformedOutput("'explicit_intents' is not a list")
    labelled = [_labelled_intent(entry) for entry in explicit]
    labelled = [(text, label) for text, label in labelled if text]
    if not labelled:
        raise MalformedOutput("'explicit_intents' is empty")
    limiter = _Limiter()
    labelled = limiter.first(labelled, MAX_INTENTS, "explicit_intents")
    implicit = _strings(data.get("implicit_intents"), "implicit_intents", required=False)
    return limiter.noted(
        {
            "explicit_intents": [text for text, _ in labelled],
            "explicit_labels": [label for _, label in labelled],
            "implicit_intents": limiter.first(implicit, MAX_INTENTS, "implicit_intents"),
        }
    )


def _labelled_intent(entry: Any) -> tuple[str, str]:
    """(text, label) of one explicit intent; text "" for what holds none."""
    if not isinstance(entry, dict):
        return (_usable(entry) if isinstance(entry, str | int | float) else ""), UNLABELLED
    text, label = entry.get("intent"), entry.get("label")
    label = label.strip().lower() if isinstance(label, str) else ""
    return (
        _usable(text) if isinstance(text, str | int | float) else "",
        label if label in INTENT_LABELS else UNLABELLED,
    )


def normalize_seed(data: dict[str, Any], *, limits: Limits) -> dict[str, Any]:
    """The thoughts (at most limits.thoughts_per_turn) and the response."""
    limiter = _Limiter()
    thoughts = _strings(data.get("thoughts"), "thoughts", required=True)
    return limiter.noted(
        {
            "thoughts": limiter.first(thoughts, limits.thoughts_per_turn, "thoughts"),
            "response": _text(data.get("response"), "response"),
        }
    )


def normalize_deliberation(data: dict[str, Any], *, limits: Limits) -> dict[str, Any]:
    """Agreement, critique, the new thoughts (at most limits.thoughts_per_turn) and the
    revised response."""
    agree = data.get("agree")
    if isinstance(agree, str) and agree.lower() in ("true", "false"):
        agree = agree.lower() == "true"
    if not isinstance(agree, bool):
        raise MalformedOutput("'agree' is not a boolean")
    limiter = _Limiter()
    new_thoughts = _strings(data.get("new_thoughts"), "new_thoughts", required=False)
    return limiter.noted(
        {
            "agree": agree,
            "critique": str(data.get("critique") or "").strip(),
            "new_thoughts": limiter.first(new_thoughts, limits.thoughts_per_turn, "new_thoughts"),
            "response": _text(data.get("response"), "response"),
        }
    )


def _is_thought_id(value: Any, thought_count: int) -> TypeGuard[int]:
    # JSON true is not thought 1, though a bool is an int in Python.
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= thought_count


def normalize_refined(data: dict[str, Any], thought_count: int, *, limits: Limits) -> dict[str, Any]:
    """Keep what is well-formed; ids outside 1..thought_count are ignored, not guessed. At
    most limits.kept_thoughts thoughts and limits.max_drops dropped ones, the first given:
    a thought the cut leaves neither kept nor dropped is the CoT's unaccounted one."""
    raw_thoughts = data.get("thoughts")
    if not isinstance(raw_thoughts, list):
        raise MalformedOutput("'thoughts' is not a list")
    thoughts = []
    for entry in raw_thoughts:
        if isinstance(entry, str) and _usable(entry):
            thoughts.append({"text": _usable(entry), "sources": []})
        elif isinstance(entry, dict) and isinstance(entry.get("text"), str) and _usable(entry["text"]):
            sources = entry.get("sources") or []
            sources = sorted({s for s in sources if _is_thought_id(s, thought_count)})
            thoughts.append({"text": _usable(entry["text"]), "sources": sources})
    if not thoughts:
        raise MalformedOutput("'thoughts' has no usable thought")
    dropped: dict[int, dict[str, Any]] = {}
    for entry in data.get("dropped") or []:
        if not isinstance(entry, dict):
            continue
        thought_id, reason = entry.get("id"), entry.get("reason")
        if _is_thought_id(thought_id, thought_count) and reason in DROP_REASONS:
            explanation = str(entry.get("explanation") or "").strip()
            dropped.setdefault(thought_id, {"id": thought_id, "reason": reason, "explanation": explanation})
    limiter = _Limiter()
    return limiter.noted(
        {
            "thoughts": limiter.first(thoughts, limits.kept_thoughts, "thoughts"),
            "dropped": sorted(
                limiter.first(list(dropped.values()), limits.max_drops, "dropped"), key=lambda d: d["id"]
            ),
            "response": _text(data.get("response"), "response"),
        }
    )


def normalize_scores(data: dict[str, Any], *, limits: Limits) -> dict[str, Any]:
    """Every metric with an integer score 1-5; an out-of-range or missing score is malformed,
    never clamped or defaulted."""
    scores = {}
    for metric in METRICS:
        entry = data.get(metric)
        if not isinstance(entry, dict):
            raise MalformedOutput(f"'{metric}' is missing or not an object with score and rationale")
        score = entry.get("score")
        if isinstance(score, str) and score.strip().isdigit():
            score = int(score)
        if isinstance(score, float) and score.is_integer():
            score = int(score)
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
            raise MalformedOutput(f"'{metric}.score' is not an integer from 1 to 5")
        scores[metric] = {"score": score, "rationale": str(entry.get("rationale") or "").strip()}
    return scores


def normalize_belief(data: dict[str, Any], *, limits: Limits) -> dict[str, Any]:
    return {"belief": _text(data.get("belief"), "belief")}


def normalize_guard_json(data: dict[str, Any], *, limits: Limits) -> dict[str, Any]:
    verdict = str(data.get("verdict") or "").strip().lower()
    if verdict not in ("safe", "unsafe"):
        raise MalformedOutput('\'verdict\' is neither "safe" nor "unsafe"')
    return {
        "unsafe": verdict == "unsafe",
        "categories": _strings(data.get("violated_policies"), "violated_policies", required=False),
        "rationale": str(data.get("rationale") or "").strip(),
    }


# Classifier styles get the reply's logprobs (None: the endpoint sent none) and the job's
# threshold on the probability of the violating answer.


def normalize_llama_guard(
    text: str, *, logprobs: Sequence[TokenLogprobs] | None, threshold: float
) -> dict[str, Any]:
    """Llama Guard's plain-text verdict: "safe", or "unsafe" then a line of category codes.
    With logprobs, "unsafe" at `threshold` or more probable than "safe" flags the sample."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    said = lines[0].lower() if lines else ""
    categories = [c.strip() for c in lines[1].split(",") if c.strip()] if len(lines) > 1 else []
    verdict = _classified(said, logprobs, threshold, violating="unsafe", safe="safe")
    return {**verdict, "categories": categories, "rationale": ""}


def normalize_shieldgemma(
    text: str, *, logprobs: Sequence[TokenLogprobs] | None, threshold: float
) -> dict[str, Any]:
    """ShieldGemma's answer: "Yes" (the response violates the policies) or "No" first, then
    maybe its reasons. With logprobs, "Yes" at `threshold` or more probable than "No" flags it."""
    first_word = re.match(r"\W*(\w*)(.*)", text.strip(), re.DOTALL)
    assert first_word is not None  # the pattern matches any text
    said = {"yes": "unsafe", "no": "safe"}.get(first_word.group(1).lower(), "")
    verdict = _classified(said, logprobs, threshold, violating="yes", safe="no")
    return {**verdict, "categories": [], "rationale": first_word.group(2).strip(" \t\n.,:;-")}


def _classified(
    said: str, logprobs: Sequence[TokenLogprobs] | None, threshold: float, *, violating: str, safe: str
) -> dict[str, Any]:
    """A classifier's verdict: from the probability of its violating answer when the logprobs
    give one, else from what it `said` ("safe" or "unsafe"; anything else is malformed), with
    why the probabilities could not decide it."""
    if logprobs:
        probability = answer_probability(logprobs, violating, safe)
        if probability is not None:
            return {
                "unsafe": probability >= threshold,
                "unsafe_probability": probability,
                "decided_by": "logprobs",
                "logprobs_missing": None,
            }
        missing = f"neither '{violating}' nor '{safe}' among the answer's likeliest first tokens"
    else:
        missing = "the endpoint sent no logprobs"
    if said not in ("safe", "unsafe"):
        raise MalformedOutput(f"the answer starts with neither '{safe}' nor '{violating}'")
    return {
        "unsafe": said == "unsafe",
        "unsafe_probability": None,
        "decided_by": "text",
        "logprobs_missing": missing,
    }


def answer_probability(logprobs: Sequence[TokenLogprobs], violating: str, safe: str) -> float | None:
    """The probability of the `violating` answer against the `safe` one, from the first
    token of the reply that is not blank: the probabilities of its alternatives that begin
    either word (tokenizers may split "unsafe" into "un" + "safe"), normalized over the two
    answers. None when no alternative begins either word."""
    answer = next((position for position in logprobs if position.token.strip()), None)
    if answer is None:
        return None
    mass = {violating: 0.0, safe: 0.0}
    for token, logprob in answer.top:
        word = token.strip(string.whitespace + string.punctuation).lower()
        begun = next((answer_word for answer_word in mass if word and answer_word.startswith(word)), None)
        if begun is not None:
            mass[begun] += math.exp(logprob)
    total = mass[violating] + mass[safe]
    return None if total == 0 else mass[violating] / total


def normalize_refusal(data: dict[str, Any], *, limits: Limits) -> dict[str, Any]:
    refused = data.get("refused")
    if isinstance(refused, str) and refused.strip().lower() in ("true", "false"):
        refused = refused.strip().lower() == "true"
    if not isinstance(refused, bool):
        raise MalformedOutput("'refused' is not a boolean")
    return {"refused": refused, "reason": str(data.get("reason") or "").strip()}


def normalize_answer(reply: ChatReply) -> dict[str, Any]:
    """What a model under test answered, whatever it is: a server's refusal field stands for
    its text, and finish_reason tells a truncated or filtered answer."""
    return {"response": reply.content or reply.refusal or "", "finish_reason": reply.finish_reason}


def normalize_judgement(data: dict[str, Any], *, limits: Limits) -> dict[str, Any]:
    winner = str(data.get("winner") or "").strip()
    choice = {"a": "A", "b": "B", "tie": "tie"}.get(winner.lower())
    if choice is None:
        raise MalformedOutput('\'winner\' is not "A", "B" or "tie"')
    return {"winner": choice, "rationale": str(data.get("rationale") or "").strip()}


def judge_reply(
    reply: ChatReply, normalize: Any, *, plain_text: bool = False, under_test: bool = False
) -> tuple[TurnOutcome, dict[str, Any] | None, str | None]:
    """Classify a reply: (outcome, normalized output when OK, error message otherwise).
    With plain_text the reply is not JSON: `normalize` reads the text itself. With
    under_test it is a model under test's answer, always OK: declining the user is what is
    measured, not a failure, so `normalize` reads the whole reply."""
    if under_test:
        return TurnOutcome.OK, normalize(reply), None
    refusal = refusal_of(reply)
    if refusal is not None:
        return TurnOutcome.REFUSED, None, refusal
    try:
        parsed = normalize(reply.content if plain_text else extract_json(reply.content))
    except MalformedOutput as exc:
        outcome = TurnOutcome.TRUNCATED if reply.finish_reason == "length" else TurnOutcome.MALFORMED
        return outcome, None, str(exc)
    thoughts = parsed.get("thoughts") if "agree" not in parsed else parsed.get("new_thoughts")
    if isinstance(thoughts, list) and thoughts and isinstance(thoughts[0], str) and _all_refusals(thoughts):
        return TurnOutcome.REFUSED, None, "every thought is a refusal to reason: " + thoughts[0][:200]
    return TurnOutcome.OK, parsed, None
