"""The auto-grader, the quality gate, the guard and the pairwise judge: LLM judgements about
samples."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from app.deliberation.calls import Caller, StageFailed
from app.deliberation.config import GuardConfig, RoleConfig
from app.deliberation.results import METRICS, Choice, Gate, Grade, GuardVerdict, Judged, Order, Sample, Vote
from app.deliberation.stages import GRADE, GUARDS, JUDGE


def sample_text(sample: Sample) -> str:
    steps = "\n".join(f"{n}. {text}" for n, text in enumerate(sample.thoughts, 1)) or "(none)"
    return f"Reasoning:\n{steps}\n\nResponse:\n<<<\n{sample.response}\n>>>"


def sample_text_bytes(thoughts: int, text_bytes: int) -> int:
    """The UTF-8 size of `sample_text` of a sample of `thoughts` thoughts whose thoughts and
    response hold `text_bytes` together, for a sample whose sizes alone are read."""
    return _framing_bytes(thoughts) + text_bytes


@lru_cache(maxsize=1_024)  # thousands of samples sized at once have a few counts of thoughts
def _framing_bytes(thoughts: int) -> int:
    """What sample_text adds around `thoughts` thoughts and a response: labels, numbers, line ends."""
    return len(sample_text(Sample([""] * thoughts, "")).encode())


async def grade(caller: Caller, grader: RoleConfig, sample: Sample, round: int = 0, agent: int = 0) -> Grade:
    """Scores on the six metrics. A grader that gives no usable output leaves the sample
    ungraded, with the reason; scores are never guessed."""
    try:
        scores = await caller.call(GRADE, grader, round=round, agent=agent, sample=sample_text(sample))
    except StageFailed as failed:
        return Grade(None, failed.failure.message)
    return Grade(scores)


async def guard(
    caller: Caller, config: GuardConfig, sample: Sample, round: int = 0, agent: int = 0
) -> GuardVerdict:
    """The guard's verdict; output it cannot read is recorded as such, never guessed."""
    spec = GUARDS[config.style]
    threshold = {"threshold": config.threshold} if spec.logprobs else None
    try:
        verdict = await caller.call(
            spec, config.role, round=round, agent=agent, normalize_with=threshold, sample=sample_text(sample)
        )
    except StageFailed as failed:
        return GuardVerdict(None, error=failed.failure.message)
    # Verdicts stored before classifiers read logprobs were all read from the text.
    return GuardVerdict(
        verdict["unsafe"],
        verdict["categories"],
        verdict["rationale"],
        unsafe_probability=verdict.get("unsafe_probability"),
        decided_by=verdict.get("decided_by", "text"),
        logprobs_missing=verdict.get("logprobs_missing"),
    )


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


async def compare_samples(caller: Caller, judge: RoleConfig, a: Sample, b: Sample, agent: int = 0) -> Judged:
    """Ask in both orders; a sample wins only if both orders prefer it, else it is a tie.
    If either order gives no usable answer there is no winner (None). `agent` numbers the
    judge among several (its turns' agent)."""
    votes = []
    orders: tuple[tuple[Order, Sample, Sample], ...] = (("ab", a, b), ("ba", b, a))
    for round, (order, first, second) in enumerate(orders, start=1):
        try:
            answer = await caller.call(
                JUDGE, judge, round=round, agent=agent, first=sample_text(first), second=sample_text(second)
            )
        except StageFailed as failed:
            votes.append(Vote(order, None, failed.failure.message))
            continue
        votes.append(Vote(order, _CHOICE_BY_POSITION[order][answer["winner"]], answer["rationale"]))
    in_order, in_reverse = (vote.choice for vote in votes)
    if in_order is None or in_reverse is None:  # one order alone would let position bias decide
        return Judged(None, votes)
    return Judged(in_order if in_order == in_reverse else "tie", votes)
