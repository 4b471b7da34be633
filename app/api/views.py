"""Rows to response bodies: the one place that shapes stored data for HTTP."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Literal

from app.api.schemas import (
    ChosenOut,
    ComparisonListed,
    ComparisonOut,
    CotOut,
    GateOut,
    GradeReport,
    GuardOut,
    GuardRate,
    GuardReport,
    IntervalOut,
    ItemOut,
    JobListed,
    JudgementOut,
    JudgeResults,
    MetricReport,
    ModelEvaluationOut,
    ModelReportRow,
    PairTryOut,
    PairwiseReport,
    PolicySetBrief,
    PolicySetDetailOut,
    PolicySetOut,
    PreferencePairOut,
    PromptSetBrief,
    PromptSetDetailOut,
    PromptSetOut,
    RegisteredPromptSetOut,
    RejectedOut,
    ReportOut,
    SampleEvaluationOut,
    SampleOut,
    SampleResultOut,
    ScoreOut,
    StatusCounts,
    TargetCountsOut,
    TurnOut,
    Usage,
    VoteOut,
)
from app.costs import job_cost
from app.deliberation.ports import guard_flags, is_hazardous
from app.deliberation.results import SCORE_SCALE
from app.plan import ComparisonPlan, ModelEvaluationPlan, SampleEvaluationPlan
from app.stats import counted_mean, proportion
from app.store import quality
from app.store.job_listing import ListedJob
from app.store.models import (
    Cot,
    ImportedSample,
    Item,
    Job,
    PolicySetRow,
    PreferencePair,
    PromptSetRow,
    SampleEvaluation,
    TurnRow,
)


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


def item_usage(turns: list[TurnRow]) -> Usage:
    """An item's turns summed; the cost null unless every turn has one (a call to an unpriced
    endpoint costs an unknown amount), as exports count it (app/store/exports.py)."""
    costs = [t.cost_usd for t in turns if t.cost_usd is not None]
    return Usage(
        llm_calls=len(turns),
        prompt_tokens=sum(t.prompt_tokens for t in turns),
        cached_prompt_tokens=sum(t.cached_prompt_tokens for t in turns),
        completion_tokens=sum(t.completion_tokens for t in turns),
        cost_usd=sum(costs) if len(costs) == len(turns) else None,
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
        prompt_set=_prompt_set_of(cot),
        scores=scores_out(cot.scores, with_rationale=True),
        grade_error=cot.grade_error,
        quality=GateOut(accepted=cot.accepted, reasons=cot.gate_reasons or []),
        fallbacks=cot.fallbacks,
        created_at=cot.created_at,
    )


def _prompt_set_of(cot: Cot) -> PromptSetBrief | None:
    """None for a CoT written before CoTs recorded their prompt set (its three columns null)."""
    if cot.prompt_set_id is None or cot.prompt_set_name is None or cot.prompt_set_version is None:
        return None
    return PromptSetBrief(id=cot.prompt_set_id, name=cot.prompt_set_name, version=cot.prompt_set_version)


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
    """The guard's verdict. Without the hazardous scope only its flags (ports.guard_flags):
    the categories that name a policy of the set (`known`) or a Llama Guard code; any other
    category is the guard's own text about the sample, withheld."""
    if verdict is None:
        return None
    return GuardOut(**(verdict if reads_hazardous else guard_flags(verdict, known)))


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
    job: Job, plan: ComparisonPlan, summary: dict[str, Any], report: dict[str, Any]
) -> ComparisonOut:
    """The comparison with its report (app.reports.comparison_stats' figures: per judge, in the
    plan's order; their agreement; per metric)."""
    return ComparisonOut(
        **_job_fields(job, summary),
        baseline_job_id=plan.baseline_job_id,
        candidate_job_id=plan.candidate_job_id,
        mismatches=list(plan.mismatches),
        prompts=job.item_count,
        metrics=report["metrics"],
        judges=[
            JudgeResults.model_validate({"judge": asdict(judge), **results})
            for judge, results in zip(plan.judges, report["judges"], strict=True)
        ],
        agreement=report["agreement"],
    )


def _job_fields(job: Job, summary: dict[str, Any]) -> dict[str, Any]:
    """The fields a comparison and an evaluation show alike: the job's, and its summary's
    status, counts and usage (jobs.summary)."""
    return {
        "id": job.id,
        "status": summary["status"],
        "created_at": job.created_at,
        "label": job.label,
        "metadata": job.job_metadata,
        "counts": summary["counts"],
        "usage": summary["usage"],
    }


def _registered(row: PolicySetRow | PromptSetRow) -> dict[str, Any]:
    """The fields every registered set shows."""
    return {
        "id": row.id,
        "name": row.name,
        "version": row.version,
        "description": row.description,
        "builtin": row.owner_key_id is None,
        "created_at": row.created_at,
    }


def policy_set_brief(row: PolicySetRow) -> PolicySetBrief:
    return PolicySetBrief(id=row.id, name=row.name, version=row.version)


def prompt_set_brief(row: PromptSetRow) -> PromptSetBrief:
    return PromptSetBrief(id=row.id, name=row.name, version=row.version)


def prompt_set_registered(
    row: PromptSetRow, base: PromptSetRow | None, given: Iterable[str]
) -> RegisteredPromptSetOut:
    """A registration's answer: the stored set, and which templates came from `base`."""
    return RegisteredPromptSetOut(
        **_registered(row),
        templates=row.templates,
        base=prompt_set_brief(base) if base is not None else None,
        inherited=sorted(row.templates.keys() - set(given)),
    )


def model_evaluation_out(
    job: Job,
    plan: ModelEvaluationPlan,
    policy_set: PolicySetRow,
    prompt_set: PromptSetRow | None,
    summary: dict[str, Any],
    by_target: dict[str, dict[str, int]],
    table: list[dict[str, Any]],
) -> ModelEvaluationOut:
    return ModelEvaluationOut(
        **_job_fields(job, summary),
        targets=[target.model_dump() for target in plan.targets],
        safety_judge=plan.safety_judge.model_dump(mode="json"),
        refusal_judge=asdict(plan.refusal_judge),
        policy_set=policy_set_brief(policy_set),
        prompt_set=prompt_set_brief(prompt_set) if prompt_set is not None else None,
        by_target={name: TargetCountsOut.model_validate(counts) for name, counts in by_target.items()},
        table=[ModelReportRow.model_validate(row) for row in table],
    )


def policy_set_out(row: PolicySetRow) -> PolicySetOut:
    return PolicySetOut(**_registered(row))


def policy_set_detail(row: PolicySetRow) -> PolicySetDetailOut:
    return PolicySetDetailOut(**_registered(row), policies=row.policies)


def prompt_set_out(row: PromptSetRow) -> PromptSetOut:
    return PromptSetOut(**_registered(row))


def prompt_set_detail(row: PromptSetRow) -> PromptSetDetailOut:
    return PromptSetDetailOut(**_registered(row), templates=row.templates)


def job_listed(listed: ListedJob) -> JobListed:
    return JobListed(**_listed_fields(listed), kind=listed.plan.mode)


def comparison_listed(listed: ListedJob) -> ComparisonListed:
    plan = listed.plan
    if not isinstance(plan, ComparisonPlan):  # the listing of comparisons keeps no other
        raise TypeError(f"job {listed.job.id} is no comparison")
    return ComparisonListed(
        **_listed_fields(listed),
        baseline_job_id=plan.baseline_job_id,
        candidate_job_id=plan.candidate_job_id,
    )


def _listed_fields(listed: ListedJob) -> dict[str, Any]:
    """The fields a listed job and a listed comparison show alike."""
    job = listed.job
    return {
        "id": job.id,
        "status": listed.status,
        "created_at": job.created_at,
        "cancelled_at": job.cancelled_at,
        "label": job.label,
        "metadata": job.job_metadata,
        "counts": StatusCounts(total=job.item_count, by_status=listed.by_status),
        "cost_usd": job_cost(listed.plan, listed.spent_usd),
    }


def grade_report(grades: dict[str, Any]) -> GradeReport:
    """The grader's figures, each metric's mean with its interval (from its score counts)."""
    metrics = {
        metric: MetricReport(
            mean=IntervalOut.of(
                counted_mean(
                    {int(score): n for score, n in stats["distribution"].items()}, within=SCORE_SCALE
                )
            ),
            distribution=stats["distribution"],
        )
        for metric, stats in grades["metrics"].items()
    }
    return GradeReport(graded=grades["graded"], grade_failed=grades["grade_failed"], metrics=metrics)


def _guard_rate(counts: dict[str, int]) -> GuardRate:
    unsafe, safe = counts["unsafe"], counts["safe"]
    return GuardRate(**counts, unsafe_rate=IntervalOut.of(proportion(unsafe, unsafe + safe)))


def guard_report(by_label: dict[str | None, dict[str, int]]) -> GuardReport:
    totals = {
        verdict: sum(counts[verdict] for counts in by_label.values())
        for verdict in ("unsafe", "safe", "unreadable")
    }
    return GuardReport(
        **_guard_rate(totals).model_dump(),
        by_label={
            label or "(none)": _guard_rate(counts) for label, counts in sorted(by_label.items(), key=str)
        },
    )


def pairwise_report(against_job_id: Any, counts: dict[str, int]) -> PairwiseReport:
    decided = counts["wins"] + counts["ties"] + counts["losses"]
    return PairwiseReport(
        against_job_id=against_job_id,
        **counts,
        win_rate=IntervalOut.of(proportion(counts["wins"], decided)),
        tie_rate=IntervalOut.of(proportion(counts["ties"], decided)),
        loss_rate=IntervalOut.of(proportion(counts["losses"], decided)),
    )


def sample_evaluation_out(
    job: Job,
    plan: SampleEvaluationPlan,
    policy_set: PolicySetRow,
    prompt_set: PromptSetRow | None,
    summary: dict[str, Any],
    report: dict[str, Any],
) -> SampleEvaluationOut:
    """`report`: the figures of the roles the plan asks for (grades, guard, pairwise)."""
    return SampleEvaluationOut(
        **_job_fields(job, summary),
        policy_set=policy_set_brief(policy_set),
        prompt_set=prompt_set_brief(prompt_set) if prompt_set is not None else None,
        config=plan.model_dump(mode="json"),
        samples=job.item_count,
        grades=grade_report(report["grades"]) if "grades" in report else None,
        guard=guard_report(report["guard"]) if "guard" in report else None,
        pairwise=pairwise_report(plan.against_job_id, report["pairwise"]) if "pairwise" in report else None,
    )


# The judge's choices name samples: a is the other set's, b this one's.
_OUTCOME: dict[str | None, Literal["win", "tie", "loss"] | None] = {"b": "win", "tie": "tie", "a": "loss"}


def sample_result_out(
    item: Item,
    sample: ImportedSample,
    result: SampleEvaluation | None,
    reads_hazardous: bool,
    known: frozenset[str],
) -> SampleResultOut:
    """An imported sample with what was said of it; the guard's verdict as guard_out shows it."""
    judgement = None
    if result is not None and result.votes is not None and item.baseline_item_id is not None:
        judgement = JudgementOut(
            against_item_id=item.baseline_item_id,
            outcome=_OUTCOME.get(result.winner),
            votes=[VoteOut(**vote) for vote in result.votes],
        )
    return SampleResultOut(
        item_id=item.id,
        position=item.position,
        prompt=item.prompt,
        thoughts=sample.thoughts,
        response=sample.response,
        label=sample.label,
        metadata=item.item_metadata,
        status=item.status,
        error_code=item.error_code,
        error_message=item.error_message,
        scores=scores_out(result.scores, with_rationale=True) if result else None,
        grade_error=result.grade_error if result else None,
        guard=guard_out(result.guard, reads_hazardous, known) if result else None,
        judgement=judgement,
    )
