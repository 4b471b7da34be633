"""Rows to response bodies: the one place that shapes stored data for HTTP."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from app.api.schemas import (
    ChosenOut,
    ComparisonListed,
    ComparisonOut,
    CotOut,
    GateOut,
    GuardOut,
    ItemOut,
    JobListed,
    PairTryOut,
    PolicySetBrief,
    PolicySetDetailOut,
    PolicySetOut,
    PreferencePairOut,
    RejectedOut,
    ReportOut,
    SampleOut,
    ScoreOut,
    StatusCounts,
    TurnOut,
    Usage,
)
from app.costs import job_cost, priced
from app.deliberation.ports import is_hazardous, is_known_category
from app.plan import ComparisonPlan, JobPlan
from app.store import quality
from app.store.job_listing import ListedJob
from app.store.models import Cot, Item, Job, PolicySetRow, PreferencePair, TurnRow


def item_out(item: Item) -> ItemOut:
    return ItemOut(
        id=item.id,
        job_id=item.job_id,
        position=item.position,
        prompt=item.prompt,
        metadata=_metadata(item),
        status=item.status,
        stage=item.stage,
        attempts=item.attempts,
        error_code=item.error_code,
        error_message=item.error_message,
        created_at=item.created_at,
        finished_at=item.finished_at,
    )


def _metadata(item: Item) -> dict[str, Any]:
    """The item's metadata as the API has always shown it: a comparison item's, which the
    user gives none of, names its two samples (stored as the item's links)."""
    if item.baseline_item_id is None or item.candidate_item_id is None:
        return item.item_metadata
    return {"a_item_id": str(item.baseline_item_id), "b_item_id": str(item.candidate_item_id)}


def turn_out(turn: TurnRow, reads_hazardous: bool) -> TurnOut:
    out = TurnOut.model_validate(turn, from_attributes=True)
    if reads_hazardous or not is_hazardous(turn.stage, turn.round):
        return out
    return out.model_copy(update={"raw_output": "", "parsed": None, "error": None, "redacted": True})


def item_usage(turns: list[TurnRow], plan: JobPlan) -> Usage:
    """An item's turns summed; the cost as its job's (null unless every endpoint is priced)."""
    return Usage(
        llm_calls=len(turns),
        prompt_tokens=sum(t.prompt_tokens for t in turns),
        cached_prompt_tokens=sum(t.cached_prompt_tokens for t in turns),
        completion_tokens=sum(t.completion_tokens for t in turns),
        cost_usd=sum(t.cost_usd or 0.0 for t in turns) if priced(plan) else None,
    )


def cot_out(cot: Cot, item: Item) -> CotOut:
    return CotOut(
        item_id=cot.item_id,
        position=cot.position,
        prompt=item.prompt,
        intents=cot.intents,
        refined_thoughts=cot.refined_thoughts,
        response=cot.response,
        dropped_thoughts=cot.dropped_thoughts,
        unaccounted_thought_ids=cot.unaccounted_thought_ids,
        thoughts=cot.thoughts,
        rounds_used=cot.rounds_used,
        agreed=cot.agreed,
        agreed_by=cot.agreed_by,
        policy_set=PolicySetBrief(
            id=cot.policy_set_id, name=cot.policy_set_name, version=cot.policy_set_version
        ),
        scores=scores_out(cot.scores, with_rationale=True),
        grade_error=cot.grade_error,
        quality=GateOut(accepted=cot.accepted, reasons=cot.gate_reasons or []),
        fallbacks=cot.fallbacks,
        created_at=cot.created_at,
    )


def scores_out(scores: dict[str, Any] | None, *, with_rationale: bool) -> dict[str, ScoreOut] | None:
    if scores is None:
        return None
    return {
        metric: ScoreOut(score=s["score"], rationale=s["rationale"] if with_rationale else None)
        for metric, s in scores.items()
    }


def policy_ids(policy_set: PolicySetRow) -> frozenset[str]:
    """The ids of a policy set's policies: the guard categories any reader may see."""
    return frozenset(policy["id"] for policy in policy_set.policies)


def guard_out(
    verdict: dict[str, Any] | None, reads_hazardous: bool, known: frozenset[str]
) -> GuardOut | None:
    """The guard's verdict. Without the hazardous scope only its flags: whether it found the
    text unsafe, and the categories that name a policy of the set (`known`) or a Llama
    Guard code; any other category is the guard's own text about the sample, withheld."""
    if verdict is None:
        return None
    if reads_hazardous:
        return GuardOut(**verdict)
    categories = [c for c in verdict["categories"] if is_known_category(c, known)]
    return GuardOut(unsafe=verdict["unsafe"], categories=categories, rationale=None, error=None)


def _rejected_out(pair: PreferencePair, reads_hazardous: bool, known: frozenset[str]) -> RejectedOut:
    guard = guard_out(pair.guard, reads_hazardous, known)
    if not reads_hazardous:
        scores = scores_out(pair.rejected_scores, with_rationale=False)
        return RejectedOut(
            belief=None, thoughts=None, response=None, scores=scores, grade_error=None, guard=guard
        )
    return RejectedOut(
        belief=pair.belief,
        thoughts=pair.rejected_thoughts,
        response=pair.rejected_response,
        scores=scores_out(pair.rejected_scores, with_rationale=True),
        grade_error=pair.rejected_grade_error,  # the grader's failure may quote the rejected CoT
        guard=guard,
    )


def _try_out(pair_try: dict[str, Any], reads_hazardous: bool, known: frozenset[str]) -> PairTryOut:
    number, rejected = pair_try["number"], pair_try["rejected"]
    refused = pair_try.get("refused", rejected is None)  # a purged try says so: no text is left
    # Tries stored before standard sampling and per-try gaps were whisper tries without a gap.
    flags = {
        "number": number,
        "method": pair_try.get("method", "whisper"),
        "refused": refused,
        "guard": guard_out(pair_try["guard"], reads_hazardous, known),
        "gap": pair_try.get("gap"),
    }
    if not reads_hazardous:
        return PairTryOut(**flags, belief=None, rejected=None, refusal=None)
    return PairTryOut(
        **flags,
        belief=pair_try["belief"],
        rejected=SampleOut(**rejected) if rejected else None,
        refusal=pair_try["refusal"],
    )


def pair_out(
    pair: PreferencePair, item: Item, cot: Cot, kept: bool, reads_hazardous: bool, known: frozenset[str]
) -> PreferencePairOut:
    """A pair attempt, `kept` or not at the reader's min_gap. Every text written under a
    whispered belief or sampled as a rejected side, and everything the generator, guard and
    grader said about it, is hazardous: without the scope a reader gets only the flags each
    branch above names (kept, reason, gaps, scores without rationales, the guard's verdict
    and known categories). `known`: see guard_out."""
    return PreferencePairOut(
        item_id=pair.item_id,
        position=pair.position,
        prompt=item.prompt,
        kept=kept,
        reason=pair.reason or (None if kept else quality.GAP_BELOW_THRESHOLD),
        gap=pair.gap,
        chosen=ChosenOut(
            thoughts=[t["text"] for t in cot.refined_thoughts],
            response=cot.response,
            scores=scores_out(pair.chosen_scores, with_rationale=True),
        ),
        rejected=_rejected_out(pair, reads_hazardous, known),
        tries=[_try_out(t, reads_hazardous, known) for t in pair.tries],
        redacted=not reads_hazardous,
    )


def report_out(job: Job, report: dict[str, Any]) -> ReportOut:
    return ReportOut(job_id=job.id, **report)


def comparison_out(
    job: Job, plan: ComparisonPlan, summary: dict[str, Any], metrics: dict[str, Any], pairwise: dict[str, int]
) -> ComparisonOut:
    return ComparisonOut(
        id=job.id,
        status=summary["status"],
        created_at=job.created_at,
        label=job.label,
        metadata=job.job_metadata,
        baseline_job_id=plan.baseline_job_id,
        candidate_job_id=plan.candidate_job_id,
        judge=asdict(plan.judge),
        prompts=job.item_count,
        counts=summary["counts"],
        metrics=metrics,
        pairwise=pairwise,
        usage=summary["usage"],
    )


def policy_set_out(row: PolicySetRow) -> PolicySetOut:
    return PolicySetOut(
        id=row.id,
        name=row.name,
        version=row.version,
        description=row.description,
        builtin=row.owner_key_id is None,
        created_at=row.created_at,
    )


def policy_set_detail(row: PolicySetRow) -> PolicySetDetailOut:
    return PolicySetDetailOut(**policy_set_out(row).model_dump(), policies=row.policies)


def job_listed(listed: ListedJob) -> JobListed:
    job = listed.job
    return JobListed(
        id=job.id,
        kind=job.plan.mode,
        status=listed.status,
        created_at=job.created_at,
        cancelled_at=job.cancelled_at,
        label=job.label,
        metadata=job.job_metadata,
        counts=StatusCounts(total=job.item_count, by_status=listed.by_status),
        cost_usd=job_cost(job.plan, listed.spent_usd),
    )


def comparison_listed(listed: ListedJob, plan: ComparisonPlan) -> ComparisonListed:
    job = listed.job
    return ComparisonListed(
        id=job.id,
        status=listed.status,
        created_at=job.created_at,
        cancelled_at=job.cancelled_at,
        label=job.label,
        metadata=job.job_metadata,
        baseline_job_id=plan.baseline_job_id,
        candidate_job_id=plan.candidate_job_id,
        counts=StatusCounts(total=job.item_count, by_status=listed.by_status),
        cost_usd=job_cost(job.plan, listed.spent_usd),
    )
