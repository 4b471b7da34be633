"""arq's worker, starting the jobs it read at the queue's head in one Redis call, and the
filter that keeps arq's two log lines per job out of the log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from signal import SIGUSR1, Signals
from typing import Any, TypeVar
from uuid import UUID, uuid4

from arq import Worker as ArqWorker
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.utils import timestamp_ms, to_ms
from redis.exceptions import RedisError

from app import events
from app.config import Settings
from app.queue import FRONT_OF_LINE, line_key
from workers import liveness

WORKER_ID = "worker_id"  # in arq's ctx from the start: the worker records the jobs it takes under it
# In arq's ctx: arq job id -> (the item's job id, its progress event), put there by the job's
# function as the item ends, sent by finish_job with the arq job's end.
ITEM_ENDINGS = "item_endings"
_FINISH_RETRY_MAX_S = 30.0  # the longest wait between two tries of a job's bookkeeping in Redis
_POLL_RETRY_S = 1.0  # the wait after a poll Redis refused

log = logging.getLogger("aidsafe.worker")
T = TypeVar("T")


# KEYS: the queue, the taken jobs' record (workers/liveness.py), this call's answer. ARGV:
# arq's in-progress key prefix, the TTL arq gives that key in ms, now in ms, how many jobs to
# start, the worker's id, how far past the queue's head to look. The script reads the head
# itself, a chunk at a time, and stops once it marked enough: the ids no longer cross the
# wire twice (arq's read, then the call's arguments), which cost a worker 1.6 ms of CPU a
# poll at 2,500 ids, a fifth of its CPU at cap 256 (bench/RESULTS.md). What arq checks before
# it starts a job (not in progress, due) and its in-progress mark, with the record of the
# worker that took it, for up to that many jobs: each id marked, with its score. A job marked
# is scored for when its mark runs out, out of the due range (arq left it at the head while
# it ran: every poll read past all running jobs, and past `scan_limit` of them, those of many
# workers, the jobs due behind went unseen); its end puts its score back (`finish_job`). An
# answer that marked jobs is kept under the call's own key as long as its marks: a call sent
# again (the pool retries a command whose connection broke or whose reply timed out, maybe
# after Redis ran it, and QueueWorker after that) gets the same jobs, not none, which no one
# else could start until their marks ran out, a day later.
#
# KEYS[4] is the line's record (app/queue.py): jobs due by their time (a Retry's backoff over, a
# dead worker's mark run out, queued by an older release) first take places in line, up to 256
# a call, as one share of their own, from the front of the line on. At their time they would
# wait behind every place in line, given since too; ahead of every place, a key's items on an
# endpoint that is down, due again after each backoff, would take every free slot for as long
# as the outage lasts, and no other key's item would start.
START_SCRIPT = (
    FRONT_OF_LINE
    + """
local answered = redis.call('GET', KEYS[3])
if answered then return cjson.decode(answered) end
local prefix, ttl, now, wanted, worker = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local scan_limit = tonumber(ARGV[6])
local woke = redis.call('ZRANGEBYSCORE', KEYS[1], LINE_END, now, 'LIMIT', 0, 256)
if #woke > 0 then
  local first = take_places(KEYS[4], 'due by time', front_of_line(KEYS[1], KEYS[4]) - 1, #woke)
  for i = 1, #woke do redis.call('ZADD', KEYS[1], 'XX', first + i, woke[i]) end
end
local marked = {}
local offset = 0
while #marked < wanted * 2 and offset < scan_limit do
  local chunk = math.min(256, scan_limit - offset)
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', offset, chunk)
  local moved = 0
  for i = 1, #due, 2 do
    if #marked >= wanted * 2 then break end
    if redis.call('EXISTS', prefix .. due[i]) == 0 then
      redis.call('SET', prefix .. due[i], '1', 'PX', ttl)
      redis.call('HSET', KEYS[2], due[i], worker)
      redis.call('ZADD', KEYS[1], 'XX', tonumber(now) + tonumber(ttl), due[i])
      marked[#marked + 1] = due[i]
      marked[#marked + 1] = due[i + 1]
      moved = moved + 1
    end
  end
  if #due < chunk * 2 then break end
  offset = offset + chunk - moved  -- those marked left the due range: the rest moved up
end
if #marked > 0 then redis.call('SET', KEYS[3], cjson.encode(marked), 'PX', ttl) end
return marked
"""
)


@dataclass(frozen=True, eq=False)
class JobStart:
    """A run of an arq job on this worker: its score in the queue when it started."""

    score: int


class QueueWorker(ArqWorker):
    """arq's worker, starting the jobs it read at the queue's head in one round trip.

    arq checks each of those jobs and marks it in progress in a transaction of its own (WATCH,
    EXISTS, ZSCORE, then MULTI/PSETEX/EXEC), and an arq job stays at the queue's head while it
    runs: with hundreds of items running, every poll with a free slot went through them all,
    this worker's own included, and two workers raced for each new job. Here one script does
    arq's check and mark for as many jobs as there are free slots, atomically, so a job another
    worker marked first is simply not returned, and scores each for when its mark runs out, so
    a running job is no longer due; it records each job as this worker's too (for
    the sweeper, until the job ends), so no kill can fall between the mark and the record. The
    job runs in arq's `run_job` under its semaphore and counter, as `Worker.start_jobs` would
    run it (arq is pinned), and ends in `finish_job` (arq's, with the record's drop and the
    item's progress event in the same transaction) or arq's `finish_failed_job` (then the
    record's drop)."""

    def __init__(self, *args: Any, queue_scan_limit: int, stop_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Jobs running stay at the queue's head: the start script looks this far past it.
        self.scan_limit = queue_scan_limit
        self.starts: dict[str, JobStart] = {}  # each running job's start
        self.item_endings: dict[str, tuple[UUID, events.ItemFinished]] = {}
        self.stopping = False  # a signal came: Redis's refusals are no longer waited out
        self.stop_s = stop_s  # from the signal to the end of `close`, at most
        self.stop_by: float | None = None  # the event loop's time the stop ends by, once it began
        self.ctx[ITEM_ENDINGS] = self.item_endings

    async def _poll_iteration(self) -> None:
        """arq's poll (arq is pinned), which a Redis error no longer ends: arq lets it end the
        worker's main loop, so a failover's READONLY or an OOM, which the pool does not retry,
        stopped the worker for good. The next poll tries again, a moment later."""
        try:
            await super()._poll_iteration()
        except RedisError:
            log.warning("could not poll the queue; trying again in %.1f s", _POLL_RETRY_S, exc_info=True)
            await asyncio.sleep(_POLL_RETRY_S)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start up to as many due jobs as there are free slots. arq's poll reads one id
        (`queue_read_limit` 1): `job_ids` says only whether any job is due, as the script reads
        the queue's head itself, up to `scan_limit` ids."""
        free = self.max_jobs - self.job_counter
        if not job_ids or free <= 0:
            return
        ttl_ms = int(self.in_progress_timeout_s * 1000)
        settings: Settings = self.ctx["settings"]
        answer = f"{settings.redis_key_prefix}:starts:{uuid4()}"
        start = partial(
            self.pool.register_script(START_SCRIPT),
            keys=[self.queue_name, liveness.taken_key(settings), answer, line_key(self.queue_name)],
            args=[
                in_progress_key_prefix,
                ttl_ms,
                timestamp_ms(),
                free,
                str(self.ctx[WORKER_ID]),
                self.scan_limit,
            ],
        )
        marked = await self._until_redis_answers(start) or []
        for job_id_b, score in zip(marked[::2], marked[1::2], strict=True):
            await self.sem.acquire()  # never waits: it counts the running jobs, as job_counter does
            self.job_counter += 1
            job_id = job_id_b.decode()
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def run_job(self, job_id: str, score: int) -> None:
        start = self.starts[job_id] = JobStart(score)
        try:
            await super().run_job(job_id, score)
        except RedisError:
            # arq could not read the job, count its try or end it as failed (its normal end
            # retries on its own): the item did not run here. Raised, the error would end the
            # worker's poll loop (arq re-raises a job's error there); left, the job's mark and
            # record would keep it from everyone for as long as this worker lives. Handed
            # back, the next poll starts it again.
            log.warning("arq job %s could not start; handing it back", job_id, exc_info=True)
            await self._until_redis_answers(partial(self._unmark, job_id))
        finally:
            # A job due again at once (a Retry without delay) may have started anew meanwhile:
            # that start is not this run's to drop.
            if self.starts.get(job_id) is start:
                del self.starts[job_id]

    async def _unmark(self, job_id: str) -> None:
        """Drop arq's in-progress mark of the job and this worker's record of it: the job is
        anyone's to start again (its item was not claimed here)."""
        async with self.pool.pipeline(transaction=True) as tr:
            tr.delete(in_progress_key_prefix + job_id)
            tr.hdel(liveness.taken_key(self.ctx["settings"]), job_id)
            tr.zadd(self.queue_name, {job_id: self.starts[job_id].score}, xx=True)  # due again
            await tr.execute()

    async def _until_redis_answers(self, step: Callable[[], Awaitable[T]]) -> T | None:
        """Run `step` until Redis takes it (an OOM, an outage longer than the pool's retries),
        waiting longer between tries; every step given is safe to send again. None: the
        worker began to stop first. Its records then stay until the sweeper finds it gone
        and hands its items back: trying on would hold its shutdown for as long as Redis is
        away, and a SIGKILL after it."""
        delay_s = 0.5
        while True:
            try:
                return await step()
            except RedisError:
                if self.stopping:
                    log.warning("Redis refused a job's bookkeeping; stopping, the sweeper takes over")
                    return None
                log.warning("Redis refused a job's bookkeeping; again in %.1f s", delay_s, exc_info=True)
                await asyncio.sleep(delay_s)
                delay_s = min(_FINISH_RETRY_MAX_S, 2 * delay_s)

    def handle_sig(self, signum: Signals) -> None:
        self._begin_stop()
        super().handle_sig(signum)

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self._begin_stop()
        super().handle_sig_wait_for_completion(signum)

    def _begin_stop(self) -> None:
        self.stopping = True
        if self.stop_by is None:  # a second signal does not put the deadline off
            self.stop_by = self.loop.time() + self.stop_s

    async def close(self) -> None:
        """arq's close (arq is pinned): the jobs' ends (their items handed back, their arq jobs
        ended in Redis), on_shutdown, the pool's close; all by the stop's deadline, `stop_s`
        after the signal. Each step waited on its store: measured, a Postgres gone silent held
        an item's hand-back for the database timeout (the stop took 66 s, past the 30 s compose
        gives before it kills), and a Redis that hung failed the drop of arq's health key, which
        skipped on_shutdown (the batch loop's release) and ended the process in a traceback.
        What the worker has not let go of by the deadline is left as a killed worker leaves
        it, and recovered the same way: its items by the sweeper once its heartbeat or their
        leases run out, its arq jobs' records by the sweeper, its batch at its lease's end."""
        if not self._handle_signals:  # as arq's: in-process workers (tests) stop here
            self.handle_sig(SIGUSR1)
        if not self._pool:
            return
        try:
            async with asyncio.timeout_at(self.stop_by) as stop:
                # Shielded: a gather cancelled at the deadline waits for its jobs' own cleanup
                # (arq ends a cancelled job in Redis), 3 s past it when Redis hung.
                await asyncio.shield(asyncio.gather(*self.tasks.values()))
                await self._drop_health_key()
                if self.on_shutdown:
                    await self.on_shutdown(self.ctx)
        except TimeoutError:
            if not stop.expired():
                raise
            log.warning(
                "stopping at the deadline, %.0f s after the signal (AIDSAFE_WORKER_STOP_S), with Redis or "
                "Postgres not answering: what this worker still holds is taken back as a dead worker's",
                self.stop_s,
            )
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None

    async def _drop_health_key(self) -> None:
        try:
            await self.pool.delete(self.health_check_key)
        except RedisError:  # it expires by itself; on_shutdown still runs
            log.warning("could not drop arq's health check key", exc_info=True)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's end of a job (arq is pinned), with three changes. In the same transaction, the
        worker's record of the job goes: left under a live worker, it would keep the sweeper
        from the item for as long as that worker lives. So does the item's progress event, if
        the item ended: one round trip where there were three. And a job to run again (a Retry,
        a cancel) gets its score set, not added to: its start moved it past its mark's end, and
        arq's ZINCRBY, sent again by the pool after a reply that timed out, would push the job
        back by the whole time it had waited in the queue a second time. A transaction Redis
        refuses is sent again until it goes through (the event may then be heard twice; one
        that Redis ran but whose reply was lost can, sent again, drop the mark of a worker that
        started the job meanwhile: a third start, which the item's claim in Postgres makes
        harmless): raised, the error would end the worker's poll loop, and the job would stay
        marked as running. (A killed worker never gets here and keeps its records:
        the sweeper hands its items back as a dead one's. SIGTERM hands them back first, and arq
        ends their jobs here.)"""
        settings: Settings = self.ctx["settings"]
        ending = self.item_endings.pop(job_id, None)

        async def transaction() -> None:
            async with self.pool.pipeline(transaction=True) as tr:
                if keep_in_progress is None:
                    tr.delete(in_progress_key_prefix + job_id)
                else:
                    tr.pexpire(in_progress_key_prefix + job_id, to_ms(keep_in_progress))
                if finish:
                    if result_data:
                        expire = None if keep_result_forever else result_timeout_s
                        tr.set(result_key_prefix + job_id, result_data, px=to_ms(expire))
                    tr.delete(retry_key_prefix + job_id, job_key_prefix + job_id)
                    tr.zrem(abort_jobs_ss, job_id)
                    tr.zrem(self.queue_name, job_id)
                else:  # due again: when it was (its start moved it past its mark), or as a Retry says
                    started_at = self.starts[job_id].score
                    tr.zadd(self.queue_name, {job_id: started_at + (incr_score or 0)}, xx=True)
                tr.hdel(liveness.taken_key(settings), job_id)
                if ending is not None:
                    events.announce_item_finished(tr, settings, *ending)
                await tr.execute()

        await self._until_redis_answers(transaction)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """arq's, for a job it could not run (its key expired, its tries ran out), then the
        worker's record of the job goes too."""
        await super().finish_failed_job(job_id, result_data)
        await liveness.job_ended(self.pool, self.ctx["settings"], job_id)


# arq logs two lines at INFO for every job, so for every item: most of a worker's log and ~2 %
# of its CPU at hundreds of items a second, saying what the items' rows and metrics say.
# Its other lines (retries, failures, start, shutdown) stay.
_EVERY_JOB = frozenset({"%6.2fs → %s(%s)%s", "%6.2fs ← %s ● %s"})  # arq 0.28's (pinned) formats


def every_job_started_and_done(record: logging.LogRecord) -> bool:
    return record.msg not in _EVERY_JOB
