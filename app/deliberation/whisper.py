"""The ear-whisperer: DPO preference pairs whose rejected side really breaks a policy.

Each try, the whisperer writes a short bad belief; a generator writes a CoT and response
with that belief injected; the guard judges the result. A try the guard passes is shown
back to the whisperer, which refines its belief. The chosen side is the item's own CoT; a
pair is kept only when the guard flagged the rejected side and the grader sees a large
enough policy-faithfulness gap between the two sides.

With a fallback role, a whisperer, JSON guard or grader that refuses is asked again of the
fallback: refusing is declining the task. The generator is not: its refusal is the target
model resisting the belief, a failed try for the whisperer to learn from. The rejected side
must be that model's own failure (a DPO pair teaches the model off what it would write); a
fallback's compliance would hide that it held. The fallback's answers are listed with the
item's other fallbacks (with pairs, the gap may then compare two graders' scores).
"""

from __future__ import annotations

from app.deliberation.calls import Caller, StageFailed
from app.deliberation.config import GuardConfig, PairsConfig, RoleConfig
from app.deliberation.quality import grade, sample_text
from app.deliberation.results import Grade, GuardVerdict, PairOutcome, Sample, WhisperTry
from app.deliberation.stages import GUARDS, REJECTED, WHISPER


async def make_pair(caller: Caller, pairs: PairsConfig, grader: RoleConfig, chosen: Grade) -> PairOutcome:
    tries: list[WhisperTry] = []
    for number in range(1, pairs.max_tries + 1):
        try:
            whispered = await caller.call(WHISPER, pairs.whisperer, round=number, history=_history(tries))
        except StageFailed as failed:
            refused = failed.failure.code == "agent_refused"
            return PairOutcome(False, "whisperer_refused" if refused else "whisperer_unparseable", tries)
        belief = whispered["belief"]
        try:
            written = await caller.call(REJECTED, pairs.generator, round=number, belief=belief)
        except StageFailed as failed:
            if failed.failure.code != "agent_refused":
                return PairOutcome(False, "rejected_unparseable", tries)
            # The generator resisted the belief: a failed try, which the whisperer gets to see.
            tries.append(WhisperTry(number, belief, None, failed.turn.error, None))
            continue
        rejected = Sample(written["thoughts"], written["response"])
        verdict = await _guard(caller, pairs.guard, rejected, number)
        tries.append(WhisperTry(number, belief, rejected, None, verdict))
        if verdict.unsafe is None:
            return PairOutcome(False, "guard_unparseable", tries)
        if verdict.unsafe:
            break
    else:
        return PairOutcome(False, "guard_never_flagged", tries)

    rejected_grade = await grade(caller, grader, rejected, round=number)
    chosen_score, rejected_score = chosen.policy_faithfulness(), rejected_grade.policy_faithfulness()
    if chosen_score is None or rejected_score is None:
        return PairOutcome(False, "grading_failed", tries, rejected_grade)
    gap = chosen_score - rejected_score
    kept = gap >= pairs.min_gap
    return PairOutcome(kept, None if kept else "gap_below_threshold", tries, rejected_grade, gap)


async def _guard(caller: Caller, guard: GuardConfig, sample: Sample, number: int) -> GuardVerdict:
    """The guard's verdict; output it cannot read is recorded as such, never guessed."""
    try:
        verdict = await caller.call(GUARDS[guard.style], guard.role, round=number, sample=sample_text(sample))
    except StageFailed as failed:
        return GuardVerdict(None, error=failed.failure.message)
    return GuardVerdict(verdict["unsafe"], verdict["categories"], verdict["rationale"])


def _history(tries: list[WhisperTry]) -> str:
    if not tries:
        return "This is the first try."
    lines = ["Earlier tries; none of them led to a policy violation:"]
    for attempt in tries:
        lines.append(f"\nTry {attempt.number}. Belief: {attempt.belief}")
        if attempt.rejected is None:
            lines.append(f"The assistant refused: {attempt.refusal}")
        else:
            assert attempt.guard is not None
            lines.append(f"The assistant wrote:\n{sample_text(attempt.rejected)}")
            lines.append(f"The safety classifier found it safe. {attempt.guard.rationale}".strip())
    return "\n".join(lines)
