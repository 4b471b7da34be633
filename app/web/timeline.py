"""One item's deliberation as a timeline: who added which thought, who changed the response
and how, and what the refiner kept, dropped or left out. Pure: built from the same shapes
the API sends (so the same redaction applies), rendered by the viewer's templates."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.api.schemas import CotOut, ThoughtOut, TurnOut

_WORDS = re.compile(r"\S+\s*|\s+")  # a word and the spaces after it, so changes read as phrases


@dataclass(frozen=True)
class DiffPart:
    kind: str  # same | added | removed
    text: str


@dataclass(frozen=True)
class DeliberationStep:
    round: int
    agent: int
    agreed: bool
    critique: str
    new_thoughts: list[ThoughtOut]
    response_diff: list[DiffPart] | None  # None: the response was left as it was


@dataclass(frozen=True)
class Intent:
    text: str
    label: str | None  # "benign", "possibly_harmful", "unlabelled"; None: stored before labels


@dataclass(frozen=True)
class Timeline:
    explicit_intents: list[Intent]
    implicit_intents: list[str]
    seed_thoughts: list[ThoughtOut]
    seed_response: str | None  # None when the seed turn is not stored (or not readable)
    steps: list[DeliberationStep]
    unaccounted: list[ThoughtOut]  # thoughts the refiner neither kept nor dropped with a reason
    thought_text: dict[int, str]  # every thought by id, for the refiner's sources


# Word-level matching takes Python steps up to the product of the two lengths in words, and
# the model's words are the tenant's to steer: 10,000 drawn from 120 (none common enough to be
# autojunk) took 0.6-2 s a diff, of up to 160 on an item's page. Past this product the changed
# middle is shown replaced whole (some 10 ms at the most below it).
MAX_DIFFED_WORD_PAIRS = 250_000
# And an item's page matches at most this many in all (some 100 ms): else 160 revisions of the
# worst words took 1.6 s of one of the API's few worker threads, which every request shares.
MAX_PAGE_WORD_PAIRS = 10 * MAX_DIFFED_WORD_PAIRS


class MatchBudget:
    """The word pairs the diffs of one page may still match, together."""

    def __init__(self, pairs: int = MAX_PAGE_WORD_PAIRS) -> None:
        self.pairs = pairs

    def spend(self, pairs: int) -> bool:
        """Whether a diff of `pairs` word pairs is matched (and counted) or shown replaced whole."""
        if pairs > min(self.pairs, MAX_DIFFED_WORD_PAIRS):
            return False
        self.pairs -= pairs
        return True


def response_diff(before: str, after: str, budget: MatchBudget | None = None) -> list[DiffPart]:
    """Word-level changes from `before` to `after`, whitespace kept; the changed middle replaced
    whole past the diff's own bound, or past the page's `budget`."""
    old, new = _WORDS.findall(before), _WORDS.findall(after)
    # The unchanged ends are cut off first (a revision mostly keeps them): only the middle,
    # often short, is matched.
    head = _common_head(old, new)
    tail = _common_head(old[head:][::-1], new[head:][::-1])
    old_middle, new_middle = old[head : len(old) - tail], new[head : len(new) - tail]
    parts = [DiffPart("same", "".join(old[:head]))] if head else []
    # With autojunk (on responses of 200 words or more, a word in over 1 % of them is matched
    # only beside others): without it, a response repeating its words (the model's, so the
    # tenant's to steer) took seconds to diff at 2,000 words, and minutes at 10,000.
    if not (budget or MatchBudget()).spend(len(old_middle) * len(new_middle)):
        opcodes: Sequence[tuple[str, int, int, int, int]] = [
            ("replace", 0, len(old_middle), 0, len(new_middle))
        ]
    else:
        opcodes = difflib.SequenceMatcher(a=old_middle, b=new_middle).get_opcodes()
    for op, a1, a2, b1, b2 in opcodes:
        if op == "equal":
            parts.append(DiffPart("same", "".join(old_middle[a1:a2])))
            continue
        if a2 > a1:
            parts.append(DiffPart("removed", "".join(old_middle[a1:a2])))
        if b2 > b1:
            parts.append(DiffPart("added", "".join(new_middle[b1:b2])))
    if tail:
        parts.append(DiffPart("same", "".join(old[len(old) - tail :])))
    return parts


def _common_head(a: list[str], b: list[str]) -> int:
    """How many words `a` and `b` begin with alike."""
    same = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        same += 1
    return same


def _answers(turns: list[TurnOut], stage: str) -> dict[tuple[int, int], dict[str, Any]]:
    """The parsed answer of each (round, agent) of a stage: its last attempt that parsed."""
    answers: dict[tuple[int, int], dict[str, Any]] = {}
    for turn in turns:
        if turn.stage == stage and turn.outcome == "ok" and turn.parsed is not None:
            answers[(turn.round, turn.agent)] = turn.parsed
    return answers


def build(cot: CotOut, turns: list[TurnOut]) -> Timeline:
    """The timeline of an item that has a CoT. Thoughts come from the CoT (with their authors);
    critiques and responses from the stored deliberation turns."""
    seed = next(iter(_answers(turns, "seed").values()), None) or next(
        iter(_answers(turns, "zero_shot").values()), None
    )
    response = seed.get("response") if seed else None
    steps, budget = [], MatchBudget()
    for (round_no, agent), answer in sorted(_answers(turns, "deliberation").items()):
        agreed = bool(answer.get("agree"))
        new_response = answer.get("response")
        diff = None
        if (
            not agreed
            and isinstance(new_response, str)
            and isinstance(response, str)
            and new_response != response
        ):
            diff = response_diff(response, new_response, budget)
            response = new_response
        steps.append(
            DeliberationStep(
                round=round_no,
                agent=agent,
                agreed=agreed,
                critique=str(answer.get("critique") or ""),
                new_thoughts=[
                    t
                    for t in cot.thoughts
                    if t.stage == "deliberation" and (t.round, t.agent) == (round_no, agent)
                ],
                response_diff=diff,
            )
        )
    unaccounted = set(cot.unaccounted_thought_ids)
    return Timeline(
        explicit_intents=_explicit_intents(cot.intents),
        implicit_intents=cot.intents.get("implicit_intents", []),
        seed_thoughts=[t for t in cot.thoughts if t.stage in ("seed", "zero_shot")],
        seed_response=seed.get("response") if seed else None,
        steps=steps,
        unaccounted=[t for t in cot.thoughts if t.id in unaccounted],
        thought_text={t.id: t.text for t in cot.thoughts},
    )


def _explicit_intents(intents: dict[str, Any]) -> list[Intent]:
    texts = intents.get("explicit_intents", [])
    labels = intents.get("explicit_labels") or [None] * len(texts)
    return [Intent(text, label) for text, label in zip(texts, labels, strict=True)]
