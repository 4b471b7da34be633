"""The ear-whisperer: DPO preference pairs whose rejected side really breaks a policy.

Each try, the whisperer writes a short bad belief; a generator writes a CoT and response
with that belief injected; the guard judges the result and the grader scores it, for its
policy-faithfulness gap to the chosen side (the item's own CoT). A try the guard passes is
shown back to the whisperer, which refines its belief; the first try it flags is the pair's
rejected side. Which pairs are kept is decided by their readers, on the recorded gap.

With `baseline`, standard sampling (the generator without the whisperer) gets as many
tries, judged and graded the same way, so the two gap distributions can be compared.

With a fallback role, a whisperer, JSON guard or grader that refuses is asked again of the
fallback: refusing is declining the task. The generator is not: its refusal is the target
model resisting the belief, a failed try for the whisperer to learn from. The rejected side
must be that model's own failure (a DPO pair teaches the model off what it would write); a
fallback's compliance would hide that it held. The fallback's answers are listed with the
item's other fallbacks (with pairs, the gap may then compare two graders' scores).
"""

from __future__ import annotations

from app.deliberation.calls import Caller, StageFailed
from app.deliberation.config import PairsConfig, RoleConfig
from app.deliberation.quality import grade, guard, sample_text
from app.deliberation.results import Grade, GuardVerdict, PairOutcome, PairReason, PairTry, Sample
from app.deliberation.stages import REJECTED, STANDARD, STANDARD_AGENT, WHISPER, WHISPER_AIMS


async def make_pair(caller: Caller, pairs: PairsConfig, grader: RoleConfig, chosen: Grade) -> PairOutcome:
    tries, reason = await _whisper(caller, pairs, grader, chosen)
    baseline = await _standard(caller, pairs, grader, chosen) if pairs.baseline else []
    return PairOutcome(reason, tries, baseline)


async def _whisper(
    caller: Caller, pairs: PairsConfig, grader: RoleConfig, chosen: Grade
) -> tuple[list[PairTry], PairReason | None]:
    """The whisperer's tries, and why they made no pair (None: they made one)."""
    tries: list[PairTry] = []
    for number in range(1, pairs.max_tries + 1):
        try:
            whispered = await caller.call(
                WHISPER,
                pairs.whisperer,
                round=number,
                history=_history(tries),
                violations=WHISPER_AIMS[pairs.guard.style],
            )
        except StageFailed as failed:
            refused = failed.failure.code == "agent_refused"
            return tries, "whisperer_refused" if refused else "whisperer_unparseable"
        belief = whispered["belief"]
        try:
            written = await caller.call(REJECTED, pairs.generator, round=number, belief=belief)
        except StageFailed as failed:
            if failed.failure.code != "agent_refused":
                return tries, "rejected_unparseable"
            # The generator resisted the belief: a failed try, which the whisperer gets to see.
            tries.append(PairTry(number, belief, None, failed.turn.error, None))
            continue
        rejected = Sample(written["thoughts"], written["response"])
        verdict, graded, gap = await _judge(caller, pairs, grader, chosen, rejected, number, agent=0)
        tries.append(PairTry(number, belief, rejected, None, verdict, graded, gap))
        if verdict.unsafe is None:
            return tries, "guard_unparseable"
        if verdict.unsafe:
            return tries, None if gap is not None else "grading_failed"
    return tries, "guard_never_flagged"


async def _standard(caller: Caller, pairs: PairsConfig, grader: RoleConfig, chosen: Grade) -> list[PairTry]:
    """Standard sampling's tries, stopped where the whisperer's would stop: at a flagged
    sample, a verdict the guard gave unreadably or output the generator gave unreadably. A
    refusal is a try, as it is for the whisperer."""
    tries: list[PairTry] = []
    for number in range(1, pairs.max_tries + 1):
        try:
            written = await caller.call(STANDARD, pairs.generator, round=number, agent=STANDARD_AGENT)
        except StageFailed as failed:
            if failed.failure.code != "agent_refused":
                break
            tries.append(PairTry(number, None, None, failed.turn.error, None, method="standard"))
            continue
        sample = Sample(written["thoughts"], written["response"])
        verdict, graded, gap = await _judge(caller, pairs, grader, chosen, sample, number, STANDARD_AGENT)
        tries.append(PairTry(number, None, sample, None, verdict, graded, gap, "standard"))
        if verdict.unsafe is not False:
            break
    return tries


async def _judge(
    caller: Caller,
    pairs: PairsConfig,
    grader: RoleConfig,
    chosen: Grade,
    rejected: Sample,
    number: int,
    agent: int,
) -> tuple[GuardVerdict, Grade | None, float | None]:
    """The guard's verdict on a rejected side and, when it gave one, the grade and the gap."""
    verdict = await guard(caller, pairs.guard, rejected, round=number, agent=agent)
    if verdict.unsafe is None:
        return verdict, None, None
    graded = await grade(caller, grader, rejected, round=number, agent=agent)
    chosen_score, rejected_score = chosen.policy_faithfulness(), graded.policy_faithfulness()
    if chosen_score is None or rejected_score is None:
        return verdict, graded, None
    return verdict, graded, chosen_score - rejected_score


def _history(tries: list[PairTry]) -> str:
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
