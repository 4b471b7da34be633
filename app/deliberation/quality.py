"""The auto-grader, the quality gate and the pairwise judge: LLM judgements about samples."""

from __future__ import annotations

from collections.abc import Mapping

from app.deliberation.calls import Caller, StageFailed
from app.deliberation.config import RoleConfig
from app.deliberation.results import METRICS, Choice, Gate, Grade, Judged, Order, Sample, Vote
from app.deliberation.stages import GRADE, JUDGE


def sample_text(sample: Sample) -> str:
    steps = "\n".join(f"{n}. {text}" for n, text in enumerate(sample.thoughts, 1)) or "(none)"
    return f"Reasoning:\n{steps}\n\nResponse:\n<<<\n{sample.response}\n>>>"


async def grade(caller: Caller, grader: RoleConfig, sample: Sample, round: int = 0, agent: int = 0) -> Grade:
    """Scores on the six metrics. A grader that gives no usable output leaves the sample
    ungraded, with the reason; scores are never guessed."""
    try:
        scores = await caller.call(GRADE, grader, round=round, agent=agent, sample=sample_text(sample))
    except StageFailed as failed:
        return Grade(None, failed.failure.message)
    return Grade(scores)


def gate(grade: Grade, thresholds: Mapping[str, float]) -> Gate:
    """Accepted when graded and no gated metric is below its threshold."""
    if grade.scores is None:
        return Gate(False, [f"not graded: {grade.error}"])
    missed = [
        f"{metric} {grade.scores[metric]['score']} < {thresholds[metric]:g}"
        for metric in METRICS
        if metric in thresholds and grade.scores[metric]["score"] < thresholds[metric]
    ]
    return Gate(not missed, missed)


# The judge answers by position (A is shown first); a vote names the sample.
_CHOICE_BY_POSITION: dict[Order, dict[str, Choice]] = {
    "ab": {"A": "a", "B": "b", "tie": "tie"},
    "ba": {"A": "b", "B": "a", "tie": "tie"},
}


async def compare_samples(caller: Caller, judge: RoleConfig, a: Sample, b: Sample) -> Judged:
    """Ask in both orders; a sample wins only if both orders prefer it, else it is a tie.
    If either order gives no usable answer there is no winner (None)."""
    votes = []
    orders: tuple[tuple[Order, Sample, Sample], ...] = (("ab", a, b), ("ba", b, a))
    for round, (order, first, second) in enumerate(orders, start=1):
        try:
            answer = await caller.call(
                JUDGE, judge, round=round, first=sample_text(first), second=sample_text(second)
            )
        except StageFailed as failed:
            votes.append(Vote(order, None, failed.failure.message))
            continue
        votes.append(Vote(order, _CHOICE_BY_POSITION[order][answer["winner"]], answer["rationale"]))
    in_order, in_reverse = (vote.choice for vote in votes)
    if in_order is None or in_reverse is None:  # one order alone would let position bias decide
        return Judged(None, votes)
    return Judged(in_order if in_order == in_reverse else "tie", votes)
