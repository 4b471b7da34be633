"""arq worker: glue between the queue, the store and the engine. No business rules here.

Run with `aidsafe-worker` (`run` below).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import uvloop
from arq import Retry
from arq.connections import ArqRedis
from prometheus_client import start_http_server
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app import events, logs, preflight
from app.callbacks import BATCH as CALLBACK_BATCH
from app.callbacks import Sender
from app.config import Settings, settings_or_exit
from app.costs import BudgetExhausted
from app.deliberation.engine import deliberate, evaluate_answer, evaluate_sample, judge_pair
from app.deliberation.ports import LLMRequestRejected, LLMUnavailable
from app.deliberation.results import Completed, Evaluated, Failed, Judged, JudgedAnswer
from app.labeling import deliveries
from app.llm.batch_api import BatchAPI
from app.llm.breaker import EndpointBreaker
from app.llm.client import OpenAICompatibleClient
from app.llm.hedging import HedgePolicy
from app.llm.rates import EndpointRates
from app.metrics import ITEMS_FINISHED
from app.plan import ComparisonPlan, GenerationPlan, ModelEvaluationPlan, SampleEvaluationPlan
from app.preflight import Verdict
from app.queue import WORKER_RETRIES, bound_calls, redis_settings
from app.store import (
    batches,
    budgets,
    deletions,
    items,
    model_evaluations,
    policy_sets,
    prompt_sets,
    web_sessions,
    webhooks,
)
from app.store.batches import AwaitingBatch, BatchedLLM
from app.store.db import Sessions, deadline, dispose, in_batches, make_engine, make_sessions
from app.store.endings import CANCELLED, Ending, failed, handed_back
from app.store.turn_log import PostgresTurnLog
from app.store.turn_writer import TurnWriter
from workers import liveness, waves
from workers.llm_limits import llm_limiter, llm_redis
from workers.queue_worker import ITEM_ENDINGS, WORKER_ID, QueueWorker, every_job_started_and_done
from workers.sweeper import sweep

log = logging.getLogger("aidsafe.worker")
# The longest back-off of an item the LLM stayed unavailable to (AIDSAFE_ITEM_RETRY_BASE_S doubles up to it).
MAX_BACKOFF_S = 300.0


@dataclass
class Worker:
    """What every task of a worker process shares, made once by on_startup and kept in arq's
    ctx under WORKER (arq hands its tasks that dict, with the settings and the worker's id put
    in it and its own Redis pool)."""

    settings: Settings
    redis: ArqRedis
    llm_redis: Redis  # the LLM limiter's, rate budgets' and spending's (llm_redis)
    db: AsyncEngine
    sessions: Sessions
    llm: OpenAICompatibleClient
    callbacks: Sender
    worker_id: UUID  # this process's claims carry it
    heartbeat: liveness.Heartbeat  # keeps them alive
    spending: budgets.Spending  # what jobs with a budget have spent
    turns: TurnWriter  # every item's turns, those recorded together in one statement
    sweeper: asyncio.Task[None] | None = None  # this process's sweeper loop, if it runs one
    purger: asyncio.Task[None] | None = None  # its hazardous-text purge loop, if it runs one
    expirer: asyncio.Task[None] | None = None  # its loop deleting rows kept only for a while
    deliverer: asyncio.Task[None] | None = None  # its callback sender loop, beside the sweeper
    replayer: asyncio.Task[None] | None = None  # its loop recording spooled webhook deliveries
    batch_api: BatchAPI | None = None  # the providers' batch APIs, for batch jobs' waves
    waves: asyncio.Task[None] | None = None  # its batch loop (workers/waves.py)


WORKER = "worker"


def _worker(ctx: dict[str, Any]) -> Worker:
    worker: Worker = ctx[WORKER]
    return worker


async def startup(ctx: dict[str, Any]) -> None:
    await connect(ctx)
    # What exists now (modules, settings, pools) lives as long as the worker: keep it out of
    # the collector's full passes, which otherwise stall every running item for tens of ms.
    gc.freeze()
    # Each LLM call allocates thousands of short-lived containers, and at Python's 700 a young
    # collection ran every few calls, traversing what had not died yet: 3.5 % of a worker's
    # samples. Most are gone by 20,000, and the workers spent 5 % less CPU per call. The older
    # generations keep Python's thresholds: cyclic garbage (failed calls' tracebacks) goes as soon.
    gc.set_threshold(20_000, 10, 10)
    worker = _worker(ctx)
    worker.sweeper = asyncio.create_task(_sweep_forever(worker))
    if (days := worker.settings.purge_hazardous_after_days) is not None:
        worker.purger = asyncio.create_task(_purge_forever(worker, timedelta(days=days)))
    worker.expirer = asyncio.create_task(_expire_forever(worker))
    worker.deliverer = asyncio.create_task(_deliver_forever(worker))
    worker.replayer = asyncio.create_task(_replay_forever(worker))
    worker.batch_api = BatchAPI(worker.settings.endpoints(), worker.settings.batch_call_timeout_s)
    worker.waves = asyncio.create_task(
        waves.waves_forever(worker.settings, worker.sessions, worker.redis, worker.batch_api)
    )


async def connect(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    redis: ArqRedis = ctx["redis"]
    await bound_calls(redis, settings.redis_timeout_s)
    logs.configure(settings.log_level, settings.log_json)
    logging.getLogger("arq.worker").addFilter(every_job_started_and_done)  # once: the same filter
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port)
    # An item holds a connection only for a statement; the worker's own tasks (leases, sweeps,
    # the turn writer) and bursts get the rest.
    connections = min(settings.worker_max_jobs + 12, settings.worker_db_connections)
    db = make_engine(settings.database_url, settings.database_timeout_s, connections)
    worker_id: UUID = ctx[WORKER_ID]
    limits = llm_redis(settings)
    llm = OpenAICompatibleClient(
        settings.endpoints(),
        llm_limiter(limits, settings, owner=worker_id, keep_s=settings.llm_slot_keep_s),
        rates=EndpointRates(limits, key_prefix=f"{settings.redis_key_prefix}:rates"),
        timeout_s=settings.llm_timeout_s,
        max_retries=settings.llm_max_retries,
        backoff_base_s=settings.llm_backoff_base_s,
        backoff_max_s=settings.llm_backoff_max_s,
        hedging=_hedge_policy(settings),
        breaker=_breaker(settings),
        max_request_tokens=settings.llm_max_request_tokens,
    )
    sessions = make_sessions(db)
    heartbeat = await liveness.Heartbeat.start(settings, worker_id)
    spending = budgets.Spending(limits, sessions, settings.redis_key_prefix)  # on every LLM call too
    callbacks = Sender(settings, sessions)
    ctx[WORKER] = Worker(
        settings,
        redis,
        limits,
        db,
        sessions,
        llm,
        callbacks,
        worker_id,
        heartbeat,
        spending,
        TurnWriter(sessions),
    )
    log.info("worker %s started (%s)", worker_id, liveness.process())


def _breaker(settings: Settings) -> EndpointBreaker | None:
    """An open breaker refuses attempts for the longest back-off: with none, it is off."""
    return EndpointBreaker(open_s=settings.llm_backoff_max_s) if settings.llm_backoff_max_s > 0 else None


def _hedge_policy(settings: Settings) -> HedgePolicy | None:
    """None when hedging is off, so the client awaits each attempt directly rather than in a
    task of its own, kept for a copy it would never send."""
    if settings.llm_hedge_factor <= 0:
        return None
    return HedgePolicy(settings.llm_hedge_factor, settings.llm_hedge_min_s, settings.llm_hedge_budget)


# How long a stopping worker waits for its loops' cleanup, each a statement or two, so that a
# loop stuck on a silent store leaves the heartbeat's drop and the pools' close their turn
# before the stop's deadline (AIDSAFE_WORKER_STOP_S, QueueWorker.close), which bounds it all.
LOOPS_STOP_WAIT_S = 5


async def shutdown(ctx: dict[str, Any]) -> None:
    worker = _worker(ctx)
    await _stop_loops(worker)
    if worker.batch_api is not None:
        await worker.batch_api.aclose()
    await worker.heartbeat.stop()
    await worker.llm.aclose()  # gives its kept LLM slots back through llm_redis: close that after
    await worker.llm_redis.aclose()
    await worker.callbacks.aclose()
    await dispose(worker.db)


async def _stop_loops(worker: Worker) -> None:
    """Cancel the worker's loops and wait, up to LOOPS_STOP_WAIT_S, for their cleanup (the batch
    loop releases its batch's lease, the replayer its Redis lease, a sweep rolls back) before
    what they use is closed. Unawaited, it raced the pools' close and the end of the event
    loop: a batch was left to the next worker only once its lease ran out. A loop stuck longer
    is logged and left, its hold left to its lease."""
    loops = {
        "sweeper": worker.sweeper,
        "purger": worker.purger,
        "expirer": worker.expirer,
        "deliverer": worker.deliverer,
        "replayer": worker.replayer,
        "batch loop": worker.waves,
    }
    running = {name: loop for name, loop in loops.items() if loop is not None}
    for loop in running.values():
        loop.cancel()
    if not running:
        return
    _, pending = await asyncio.wait(running.values(), timeout=LOOPS_STOP_WAIT_S)
    if stuck := [name for name, loop in running.items() if loop in pending]:
        log.warning("stopping without waiting longer for the %s to clean up", ", ".join(stuck))


LEASE_LOST = "lease lost"  # how a run ends that finds another worker holding its item


async def run_item(ctx: dict[str, Any], item_id: str) -> str:
    """Claim the item, run or resume its deliberation (or judgement), and record how it ended.
    Its followers hear of the end with the end of its arq job (QueueWorker.finish_job)."""
    with logs.ids(item_id=item_id):
        worker = _worker(ctx)
        # Until the claim, only the record QueueWorker made when it took the job tells the
        # sweeper whose the job arq marked in progress.
        claim = await items.claim(worker.sessions, UUID(item_id), _limits(worker.settings), worker.worker_id)
        if claim is None:
            return "nothing to do"
        with logs.ids(job_id=str(claim.job_id)):
            ending = await _process_claimed(worker, claim)
        outcome = LEASE_LOST if ending is None else ending.status.value
        ITEMS_FINISHED.labels(outcome).inc()
        if ending is not None:
            status, code = ending.status.value, ending.error_code
            event = events.ItemFinished(str(claim.item_id), claim.position, status, code)
            ctx[ITEM_ENDINGS][ctx["job_id"]] = (claim.job_id, event)
        return outcome


Result = Completed | list[Judged] | Evaluated | JudgedAnswer | Failed


async def _run_engine(worker: Worker, claim: items.Claim) -> Result:
    """The engine's work for the item's job: judge two samples (each judge), evaluate an
    imported one, have a model under test answer and judge the answer, or write a CoT."""
    sessions = worker.sessions
    batched = isinstance(claim.plan, GenerationPlan) and claim.plan.delivery == "batch"
    settings = worker.settings
    client = (
        BatchedLLM(sessions, claim, settings.endpoints(), worker.llm, settings.llm_max_request_tokens)
        if batched
        else worker.llm
    )
    llm = budgets.Meter(client, worker.spending, claim.job_id, claim.budget)
    policies, prompts = policy_sets.for_engine(claim.policy_set), prompt_sets.for_engine(claim.prompt_set)
    sent_online = client.sent_online if isinstance(client, BatchedLLM) else frozenset()
    turn_log = PostgresTurnLog(worker.turns, claim, llm, sent_online)
    match claim.plan:
        case ComparisonPlan() as plan:
            baseline, candidate = await items.compared_samples(sessions, claim)
            return await judge_pair(
                claim.item_id,
                claim.prompt,
                baseline,
                candidate,
                plan.judges,
                policies,
                prompts,
                llm,
                turn_log,
                max_tokens=plan.max_tokens,
                max_reasks=plan.max_reasks,
            )
        case SampleEvaluationPlan() as plan:
            sample, other = await items.evaluated_samples(sessions, claim)
            return await evaluate_sample(
                claim.item_id,
                claim.prompt,
                sample,
                other,
                plan.evaluators(),
                policies,
                prompts,
                llm,
                turn_log,
            )
        case ModelEvaluationPlan() as plan:
            target = await model_evaluations.target_of(sessions, claim)
            return await evaluate_answer(
                claim.item_id, claim.prompt, plan.evaluation(target), policies, prompts, llm, turn_log
            )
        case GenerationPlan() as plan:
            return await deliberate(
                claim.item_id, claim.prompt, plan.pipeline(), policies, prompts, llm, turn_log
            )


async def _record(sessions: Sessions, claim: items.Claim, result: Result) -> Ending | None:
    """How the item ended, as stored; None if another worker holds it now."""
    if isinstance(result, Failed):
        return await items.end(sessions, claim, failed(result.code, result.message))
    if isinstance(result, list):
        return await items.complete_judged(sessions, claim, result)
    if isinstance(result, Evaluated):
        return await items.complete_evaluated(sessions, claim, result)
    if isinstance(result, JudgedAnswer):
        return await model_evaluations.complete(sessions, claim, result)
    return await items.complete(sessions, claim, result)


async def _process_claimed(worker: Worker, claim: items.Claim) -> Ending | None:
    """Run the item to its end: a finished ending, or None if another worker holds it now.
    An ending that hands the item back raises (arq's Retry, or the cancellation)."""
    settings, sessions = worker.settings, worker.sessions
    work = asyncio.create_task(_run_engine(worker, claim))
    watch = asyncio.create_task(_keep_lease(sessions, claim, settings.lease_seconds, work))
    try:
        result = await work
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling() == 0:  # the lease watch stopped it
            return await _on_claim_lost(sessions, claim, watch)
        # The worker is shutting down: give the item back now instead of at lease expiry.
        await asyncio.shield(_hand_back_on_stop(sessions, claim))
        raise
    except items.ClaimLost:  # another worker holds the item now; it carries on from the log
        return None
    except BudgetExhausted:  # no new call starts: the item waits for a raised budget
        return await _park(worker, claim)
    except AwaitingBatch:  # its next call is filed for a wave: workers/waves.py queues it again
        return await _end(settings, sessions, claim, batches.AWAITING)
    # Tenants read only our classification of a failure; its detail (an upstream's answer,
    # which may echo hazardous text or the server's LLM key, or an exception) goes to the
    # log and to the item's operator-only column.
    except LLMUnavailable as exc:  # an outage delays the item, up to item_max_outage_s
        ending = await _end_in_outage(settings, sessions, claim, exc)
        if ending is not None and ending.finished:
            return ending
        raise Retry(defer=max(_backoff_s(settings, claim.attempt), exc.retry_in_s)) from exc
    except LLMRequestRejected as exc:
        log.warning("the LLM endpoint rejected a request of item %s: %s", claim.item_id, exc)
        return await _end(settings, sessions, claim, failed(exc.code, exc.summary, str(exc)))
    except Exception as exc:  # Postgres or Redis blip, or a bug: retry a bounded number of times
        raise await _hand_back(settings, sessions, claim, exc) from exc
    finally:
        watch.cancel()
    try:
        return await _record(sessions, claim, result)
    except Exception as exc:  # the result runs again from the turn log: no call is bought twice
        raise await _hand_back(settings, sessions, claim, exc) from exc


# How long a stopping worker waits for an item's hand-back, one statement, before it tries
# once more: over a connection gone silent it waited out the database timeout (a minute),
# past the stop's deadline, and the item was left to its heartbeat though new connections
# would have answered (a failover).
HAND_BACK_WAIT_S = 4


async def _hand_back_on_stop(sessions: Sessions, claim: items.Claim) -> None:
    """Hand the item back as the worker stops. The second try goes over a new connection
    (deadline replaces those made before a statement it gave up on); should it fail too, the
    error is raised and the item left to the worker's heartbeat, as a killed worker's."""
    ending = handed_back("worker shut down", counts_as_failure=False)
    try:
        async with deadline(sessions, HAND_BACK_WAIT_S):
            await items.end(sessions, claim, ending)
    except TimeoutError:  # ended under this claim or not: the next try finds out
        log.warning("item %s not handed back within %d s; trying once more", claim.item_id, HAND_BACK_WAIT_S)
        async with deadline(sessions, HAND_BACK_WAIT_S):
            await items.end(sessions, claim, ending)


async def _end(settings: Settings, sessions: Sessions, claim: items.Claim, ending: Ending) -> Ending | None:
    """items.end; should that fail (a Postgres blip), the item is handed back now, as after
    any unexpected error, rather than left running under a live worker until its lease ends."""
    try:
        return await items.end(sessions, claim, ending)
    except Exception as exc:
        raise await _hand_back(settings, sessions, claim, exc) from exc


async def _end_in_outage(
    settings: Settings, sessions: Sessions, claim: items.Claim, exc: LLMUnavailable
) -> Ending | None:
    """items.end_in_outage: the item back in the queue, or failed if the LLM has been
    unavailable to it too long. Should that fail, handed back as after any unexpected error."""
    max_outage = timedelta(seconds=settings.item_max_outage_s)
    try:
        ending = await items.end_in_outage(
            sessions, claim, exc.summary, str(exc), max_outage, _max_counted_wait(settings)
        )
    except Exception as error:
        raise await _hand_back(settings, sessions, claim, error) from error
    if ending is None:  # nothing written: the item is another claim's now
        log.warning(
            "item %s not put back, its claim was lost; the LLM was unavailable: %s", claim.item_id, exc
        )
    elif ending.error_code == "llm_unavailable":
        log.warning("item %s failed, the LLM stayed unavailable too long: %s", claim.item_id, exc)
    elif ending.finished:  # its job was cancelled meanwhile
        log.warning("item %s cancelled with its job, the LLM stayed unavailable: %s", claim.item_id, exc)
    else:
        log.warning("item %s put back, the LLM stayed unavailable: %s", claim.item_id, exc)
    return ending


async def _park(worker: Worker, claim: items.Claim) -> Ending | None:
    """Park the item until its job's budget is raised. A park that fails (a Postgres blip)
    wrote nothing: the item is handed back and runs again, as after any unexpected error,
    rather than wait for a raise that may already have come."""
    settings, sessions = worker.settings, worker.sessions
    try:
        return await budgets.park(sessions, worker.spending, worker.redis, settings.queue_name, claim)
    except Exception as exc:
        raise await _hand_back(settings, sessions, claim, exc) from exc


async def _hand_back(settings: Settings, sessions: Sessions, claim: items.Claim, exc: Exception) -> Retry:
    """After an unexpected error: the item back in the queue, the try counted as a failure;
    the Retry to raise. If the hand-back fails too, the lease's expiry recovers the item."""
    log.error("item %s attempt %d hit an unexpected error", claim.item_id, claim.attempt, exc_info=exc)
    reason, detail = f"unexpected {type(exc).__name__} in the worker", f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(Exception):
        await items.end(sessions, claim, handed_back(reason, counts_as_failure=True, detail=detail))
    return Retry(defer=_backoff_s(settings, claim.attempt))


def _limits(settings: Settings) -> items.Limits:
    return items.Limits(settings.lease_seconds, settings.item_max_attempts, settings.item_max_failures)


async def _keep_lease(sessions: Sessions, claim: items.Claim, lease_s: int, work: asyncio.Task[Any]) -> None:
    """Renew the lease while the item runs; stop the work if the claim is lost. A renewal
    gives up after a quarter of the lease and is tried again soon after: one left to wait out
    the database timeout on a silent connection would let the lease lapse, and the sweeper
    take a live worker's item."""
    pause = lease_s / 3
    while True:
        await asyncio.sleep(pause)
        try:
            async with deadline(sessions, lease_s / 4):
                await items.renew(sessions, claim, lease_s)
            pause = lease_s / 3
        except items.ClaimLost:
            work.cancel()
            raise
        except Exception:  # a database blip: a renewal over another connection may succeed
            log.warning("lease renewal failed for item %s", claim.item_id, exc_info=True)
            pause = lease_s / 12


async def _on_claim_lost(sessions: Sessions, claim: items.Claim, watch: asyncio.Task[None]) -> Ending | None:
    reason = watch.exception() if watch.done() and not watch.cancelled() else None
    if isinstance(reason, items.JobCancelled):
        return await items.end(sessions, claim, CANCELLED)
    return None


def _backoff_s(settings: Settings, attempt: int) -> float:
    # The doubling stops long after any base reaches the cap: an item an outage puts back for
    # days passes a thousand claims, and 2 ** 1024 is too large for a float.
    doublings = min(attempt - 1, 64)
    return min(MAX_BACKOFF_S, settings.item_retry_base_s * 2.0**doublings) * random.uniform(0.5, 1.0)


def _max_counted_wait(settings: Settings) -> timedelta:
    """The longest wait in the queue between two claims of an outage that counts toward
    item_max_outage_s: twice the longest an outage defers an item (its back-off's cap, or the
    breaker's pause if longer), which leaves a due item room to find a worker. An item that
    waited longer waited out a backlog, not the LLM."""
    return timedelta(seconds=2 * max(MAX_BACKOFF_S, settings.llm_backoff_max_s))


async def _sweep_forever(worker: Worker) -> None:
    """Every worker runs this loop; a Redis lock lets one of them sweep per interval. It runs
    beside the queue, not in it, so a long backlog cannot delay recovery."""
    settings = worker.settings
    await _one_per_interval(
        worker, "sweeper", settings.sweep_interval_s, lambda: sweep(settings, worker.sessions, worker.redis)
    )


async def _purge_forever(worker: Worker, older_than: timedelta) -> None:
    """Blank old hazardous text (setting purge_hazardous_after_days), in one worker per interval."""

    async def purge() -> None:
        # Until none is left: a purge of 20 jobs an interval (an hour) fell behind for ever
        # once more than 480 jobs a day came of age, keeping their hazardous text past N days.
        while purged := await deletions.purge_hazardous(worker.sessions, older_than):
            log.info("purged the hazardous text of %d jobs", purged)

    await _one_per_interval(worker, "purger", worker.settings.purge_interval_s, purge)


EXPIRED_PER_TRANSACTION = 1000  # rows: a backlog of them goes in short transactions, not one


async def _expire_forever(worker: Worker) -> None:
    """Delete the rows kept only for a while (dead viewer sessions, webhook rejections older
    than webhook_rejections_kept_days), in one worker per purge interval."""
    kept = timedelta(days=worker.settings.webhook_rejections_kept_days)

    async def expire() -> None:
        sessions = worker.sessions
        dead = await in_batches(sessions, web_sessions.purge_dead, EXPIRED_PER_TRANSACTION)
        old = await in_batches(
            sessions,
            lambda session, limit: webhooks.purge_old_rejections(session, kept, limit),
            EXPIRED_PER_TRANSACTION,
        )
        if dead or old:
            log.info("deleted %d dead viewer sessions and %d old webhook rejections", dead, old)

    await _one_per_interval(worker, "expirer", worker.settings.purge_interval_s, expire)


async def _one_per_interval(
    worker: Worker, name: str, interval_s: float, work: Callable[[], Awaitable[Any]]
) -> None:
    """Every worker runs this loop; a Redis lock lets one of them do `work` per interval."""
    lock = f"{worker.settings.redis_key_prefix}:{name}"
    while True:
        try:
            if await worker.redis.set(lock, "1", nx=True, px=int(interval_s * 1000)):
                await work()
        except Exception:  # Redis or Postgres away: try again next interval
            log.warning("%s failed", name, exc_info=True)
        await asyncio.sleep(interval_s)


async def _deliver_forever(worker: Worker) -> None:
    """Send due callback deliveries, in every worker: they are rows, claimed with SKIP LOCKED,
    so workers share them without a lock and none is sent twice by two workers at once. A
    full batch means more may be due: look again at once."""
    while True:
        try:
            claimed = await worker.callbacks.send_due()
        except Exception:  # Postgres away: try again next interval
            log.warning("callback delivery failed", exc_info=True)
            claimed = 0
        if claimed < CALLBACK_BATCH:
            await asyncio.sleep(worker.settings.callback_poll_interval_s)


async def _replay_forever(worker: Worker) -> None:
    """Record the Label Studio deliveries the API spooled while Postgres was away, each sweep
    interval, in one worker at a time (app/labeling/deliveries.py: a lease, not the interval's
    lock, which a pass may outlast)."""
    while True:
        try:
            await deliveries.replay_spooled(worker.sessions, worker.redis, worker.settings.redis_key_prefix)
        except Exception:  # Redis away, or a bug (its entry waits at the back): next interval
            log.warning("replaying spooled webhook deliveries failed", exc_info=True)
        await asyncio.sleep(worker.settings.sweep_interval_s)


_JOB_TIMEOUT_S = 24 * 3600
SHUTDOWN_WAIT_S = 5  # on SIGTERM, then the items still running are handed back


def _queue_scan_limit(settings: Settings) -> int:
    return max(1000, settings.worker_max_jobs * 10)


def worker_settings(settings: Settings, *, sweeper: bool = True) -> dict[str, Any]:
    """Everything a worker runs, in one place: QueueWorker's arguments."""
    return {
        "functions": [run_item],  # enqueued by name: app.queue.RUN_ITEM
        "on_startup": startup if sweeper else connect,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings, WORKER_ID: uuid4()},
        "redis_settings": redis_settings(settings.redis_url, WORKER_RETRIES),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        # arq's poll only asks whether a job is due; QueueWorker's start script reads the queue.
        "queue_read_limit": 1,
        "queue_scan_limit": _queue_scan_limit(settings),
        # A slot an item frees stays empty until the next poll, and items started together end
        # together: at 0.2 s the LLM cap went short by a tenth after each such wave. A poll
        # with free slots costs one script call (QueueWorker), so poll often.
        "poll_delay": 0.05,
        # Items end by themselves; the lease, not arq's timeout, detects dead workers.
        "job_timeout": _JOB_TIMEOUT_S,
        "max_tries": 1_000_000,  # retries are bounded per item in Postgres
        # Nothing reads a job's result (the item's row is its outcome): writing one cost a
        # pickle and a SET per item, and 60 s of a key per item in Redis.
        "keep_result": 0,
        "job_completion_wait": SHUTDOWN_WAIT_S,
        "stop_s": settings.worker_stop_s,
    }


def run(argv: Sequence[str] | None = None) -> None:
    """`aidsafe-worker`: one worker process, until SIGINT or SIGTERM (then it hands back what
    it still runs after SHUTDOWN_WAIT_S). `--check`: check the deployment and exit."""
    parser = argparse.ArgumentParser(
        prog="aidsafe-worker",
        description=f"Run one worker process, configured by the AIDSAFE_* environment variables, until "
        f"SIGINT or SIGTERM; its running items then have {SHUTDOWN_WAIT_S} s to finish before the "
        "rest go back to the queue, their turns kept, and it is gone within AIDSAFE_WORKER_STOP_S.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check Postgres (reachable, 15 or later, schema current), Redis (reachable, 6.2 or "
        "later, never evicting) and each LLM endpoint (answering, listing its model), print what was "
        "found, exit 1 on a failure",
    )
    check = parser.parse_args(argv).check
    settings = settings_or_exit(parser.prog)
    logs.configure(settings.log_level, settings.log_json)
    # uvloop: the workers spend markedly less CPU per LLM call on it than on asyncio's loop.
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    if check:
        found = loop.run_until_complete(preflight.deployment(settings))
        for finding in found:
            print(f"{finding.verdict:<8} {finding.check:<16} {finding.detail}")
        sys.exit(1 if any(finding.verdict is Verdict.FAILED for finding in found) else 0)
    loop.run_until_complete(preflight.log_problems(settings, log))
    QueueWorker(**worker_settings(settings)).run()
