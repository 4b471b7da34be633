"""Batch delivery, the worker's side: every worker runs `waves_forever`, which forms the
waves of batch jobs, sends each wave's batches to the providers' batch APIs, polls them,
collects their answers and queues the parked items again. What a wave is, and why it is
crash-safe, is app/store/batches.py.

One round: form the waves that are ready (a job none of whose items is queued or running);
take the batches that are due, each under a lease, and move each as far as it can go now
(preparing -> upload -> uploaded -> create -> submitted -> poll ... -> collected); then
queue the items whose requests were answered. The rows are shared by leases and SKIP LOCKED,
so every worker can run it at once and none does a batch's step twice while its lease holds.

A lease outlasts every call made under it: the holder renews it just before each call to the
provider, and a call is given up after half a lease (Settings.batch_call_timeout_s). So no
worker takes a batch over while its holder's call may still be on its way; were it taken
over while the holder's create was in flight, both could create a provider batch of the
same requests, and the provider would run and bill them twice. A holder that finds its
lease taken over anyway (it stalled between calls) stops: LeaseLost, nothing written. And a
provider batch is created tagged with our batch's id, looked for before a create whenever
one may have been sent before, so one created by a worker that died (or lost its lease)
before storing its id is taken, not made again.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Any

from arq.connections import ArqRedis

from app.config import Settings
from app.llm.batch_api import (
    TERMINAL,
    BatchAPI,
    BatchFault,
    BatchListIncomplete,
    BatchRefused,
    BatchUnavailable,
    OutputLine,
    input_file,
    output_lines,
)
from app.metrics import BATCH_REQUESTS_RESENT, BATCHES_CREATED, BATCHES_ENDED
from app.queue import enqueue_shares
from app.store import batches
from app.store.batches import Held, LeaseLost, Outcome
from app.store.db import Sessions
from app.store.models import BatchStatus
from app.threads import in_thread

log = logging.getLogger("aidsafe.waves")

# A provider's per-line status that asking again may fix (as the online client retries them).
_TRANSIENT = {408, 409, 425, 429}


async def run_round(settings: Settings, sessions: Sessions, redis: ArqRedis, api: BatchAPI) -> None:
    """One round of the loop (see the module's docstring)."""
    if made := await batches.form_waves(sessions, settings.endpoints()):
        log.info("formed %d batches", made)
    # Not before a call given up on could have landed (a create the provider was still
    # carrying out): the next holder's search must find it, not create a second.
    after_a_call_s = max(settings.batch_poll_interval_s, settings.batch_call_timeout_s)
    taken = await batches.take_due(sessions, settings.batch_lease_s)
    for position, held in enumerate(taken):
        retry_in_s = None
        try:
            await _lead(settings, sessions, api, held)
        except LeaseLost:
            log.info("batch %s: taken over by another worker", held.id)
        except asyncio.CancelledError:  # the worker stops, maybe mid-call: as a call given up on
            retry_in_s = after_a_call_s
            for not_reached in taken[position + 1 :]:  # due still: any worker may take them now
                await batches.release(sessions, not_reached)
            raise
        except Exception as fault:
            # The provider away, or a fault of this batch alone (a poll refused, say): the next
            # poll tries again. Raised on, it ended every round, the batch first in line for
            # never being advanced: no other batch moved and no answered item was queued again.
            log.warning("batch %s: %s", held.id, fault, exc_info=not isinstance(fault, BatchUnavailable))
            retry_in_s = after_a_call_s
        finally:
            await batches.release(sessions, held, retry_in_s)
    await enqueue_shares(redis, settings.queue_name, await batches.requeue_answered(sessions))


async def waves_forever(settings: Settings, sessions: Sessions, redis: ArqRedis, api: BatchAPI) -> None:
    while True:
        try:
            await run_round(settings, sessions, redis, api)
        except Exception:  # Postgres or Redis away: try again next round
            log.warning("batch round failed", exc_info=True)
        await asyncio.sleep(settings.batch_interval_s)


async def _lead(settings: Settings, sessions: Sessions, api: BatchAPI, held: Held) -> None:
    """Move the batch as far as it goes now; LeaseLost once another worker took it over."""
    if held.job_cancelled:
        await _cancel(settings, sessions, api, held)
        return
    if held.status is BatchStatus.PREPARING:
        requests = await batches.input_requests(sessions, held.id)
        content = await in_thread(input_file, requests)
        await batches.renew(sessions, held)
        try:
            file_id = await api.upload(held.endpoint, content, f"aidsafe-{held.id}.jsonl")
        except BatchRefused as refused:
            await _refuse(sessions, held, str(refused))
            return
        held = await batches.uploaded(sessions, held, file_id)
    if held.status is BatchStatus.UPLOADED:
        await _submit(settings, sessions, api, held)
    elif held.status is BatchStatus.SUBMITTED:
        await _poll(settings, sessions, api, held)


async def _submit(settings: Settings, sessions: Sessions, api: BatchAPI, held: Held) -> None:
    """Create the provider batch of the uploaded input file, once: one tagged with our batch
    (its creator died, or lost its lease, before storing its id) is taken instead. Only a
    batch whose create may have been sent before is looked for: searched for before every
    create, a provider whose batch list kept failing held every batch's creation."""
    assert held.input_file_id is not None
    created = None
    if not held.create_unsent:
        await batches.renew(sessions, held)
        try:
            created = await _find(settings, sessions, api, held)
        except _Unseen as unseen:
            if unseen.lasted:
                await batches.abandon(sessions, held, str(unseen))
                _ended(held, BatchStatus.LOST)
                log.warning("batch %s lost, its requests failed, not bought twice: %s", held.id, unseen)
            return
    try:
        if created is None:
            await batches.creating(sessions, held)  # renews: the search may have taken most of the lease
            created = await api.create(held.endpoint, held.input_file_id, str(held.id))
            BATCHES_CREATED.labels(held.endpoint).inc()
    except BatchRefused as refused:
        await _refuse(sessions, held, str(refused))
        return
    await batches.advance(
        sessions,
        held,
        settings.batch_poll_interval_s,  # polled when due
        status=BatchStatus.SUBMITTED,
        provider_batch_id=str(created["id"]),
        provider_status=created.get("status"),
    )


class _Unseen(Exception):
    """The search for the provider batch was refused partway (BatchListIncomplete): one may
    exist on the pages not seen. `lasted`: refused long enough to be believed (see _gone)."""

    def __init__(self, detail: str, lasted: bool) -> None:
        super().__init__(detail)
        self.lasted = lasted


async def _find(settings: Settings, sessions: Sessions, api: BatchAPI, held: Held) -> dict[str, Any] | None:
    """The provider batch created for the uploaded batch, if any (see BatchAPI.find). A
    list that answers its first page and refuses a later one, or fails (a 5xx), may have
    the batch unseen: taken for none found, a second was created and bought. That is
    counted as a refused poll is, and raised as _Unseen (lasted: the caller gives up on
    the batch). A list refused at its first page is counted alike, as a proxy's passing
    refusal would have made a second batch too; once the refusal has lasted it is taken
    for a provider without a batch list, which has none to find (taken for a refused
    batch instead, the batch was split until every request failed)."""
    assert held.input_file_id is not None
    try:
        return await api.find(held.endpoint, str(held.id), held.input_file_id, _since(held))
    except BatchRefused as refused:
        detail = f"the provider refused its batch list: {refused}"
        if not await _gone(settings, sessions, held, detail):
            raise _Unseen(detail, lasted=False) from refused
        log.warning("batch %s: taken for a provider without a batch list: %s", held.id, refused)
        return None
    except BatchListIncomplete as incomplete:
        detail = f"a provider batch of it may exist unseen: {incomplete}"
        raise _Unseen(detail, await _gone(settings, sessions, held, detail)) from incomplete


def _since(held: Held) -> float:
    """When, on the provider's clock, a provider batch of ours was created at the earliest:
    our batch row is older than any; the hour is for the provider's clock and Postgres's to
    differ by."""
    return held.created_at.timestamp() - 3600


async def _poll(settings: Settings, sessions: Sessions, api: BatchAPI, held: Held) -> None:
    assert held.provider_batch_id is not None
    await batches.renew(sessions, held)
    try:
        seen = await api.retrieve(held.endpoint, held.provider_batch_id)
    except BatchRefused as refusal:
        # A 404, or another 4xx (a 400 or 422 for an id the provider will not take): as
        # anything but a 404 it was a fault, asked about again at every poll for ever.
        if await _gone(settings, sessions, held, str(refusal)):
            await _lost(settings, sessions, api, held, str(refusal))
        return
    status, counts = seen.get("status"), seen.get("request_counts")
    if status not in TERMINAL:
        await batches.advance(
            sessions, held, settings.batch_poll_interval_s, provider_status=status, request_counts=counts
        )
        return
    if status == "failed" and not seen.get("output_file_id"):
        # Failed in validation, nothing run: split as a file refused at upload is (a line the
        # provider will not take, more tokens than its queue holds). Sent again whole, every
        # request in it failed its item after batch_max_submissions waves.
        await _refuse(sessions, held, f"failed validation: {str(seen.get('errors'))[:500]}")
        return
    outcome = Outcome({}, {})
    read, refused = await _read_files(sessions, api, held, seen, outcome)
    if refused and not await _gone(settings, sessions, held, refused):
        if read:  # kept, so that the next polls ask for the refused file alone
            await batches.keep_read(sessions, held, outcome, read)
        return
    gone = refused and f"gone, their requests sent again: {refused}"
    await _collect(
        settings,
        sessions,
        held,
        BatchStatus.COLLECTED,
        outcome,
        provider_status=status,
        request_counts=counts,
        output_file_id=seen.get("output_file_id"),
        error_file_id=seen.get("error_file_id"),
        **({"error": gone} if gone else batches.ANSWERED),
    )
    log.info(
        "batch %s %s: %d answers, %d refused", held.id, status, len(outcome.answers), len(outcome.rejected)
    )
    if gone:
        log.warning("batch %s: %s", held.id, gone)


async def _read_files(
    sessions: Sessions, api: BatchAPI, held: Held, seen: dict[str, Any], outcome: Outcome
) -> tuple[dict[str, str], str | None]:
    """Read the ended batch's output and error files into `outcome`, but those read at an
    earlier poll (their lines are stored: batches.keep_read). A file the provider refuses (a
    404: deleted, or kept no longer; or another 4xx) is skipped: once it is taken for gone
    (see _gone), its lines' requests, left unanswered, go back as an expired batch's do, and
    the other file's lines count. Asked for again after every refusal, a file that answered
    404 for ever held the batch's items as long. A 401 or 403 (BatchForbidden) is no refusal
    but a fault, raised: the key may not have the file, and bought again, the next batch's
    would be refused too. The files read now (column: id), and which were refused and why,
    or None."""
    read, refused = {}, []
    for column in ("output_file_id", "error_file_id"):
        file_id = seen.get(column)
        if not file_id or file_id in held.read_file_ids:
            continue
        await batches.renew(sessions, held)
        try:
            content = await api.content(held.endpoint, file_id)
        except BatchRefused as refusal:
            refused.append(f"file {file_id}: {refusal}")
            continue
        _read(await in_thread(output_lines, content), outcome)
        read[column] = str(file_id)
    return read, "; ".join(refused) or None


async def _gone(settings: Settings, sessions: Sessions, held: Held, detail: str) -> bool:
    """Whether the batch, or a file of it, that the provider refused again (`detail`) is to be
    taken for gone: refused at enough polls over long enough (batches.refused). If not yet,
    it is asked about again at its next poll."""
    if await batches.refused(sessions, held, settings.batch_poll_interval_s, settings.batch_gone_after_s):
        return True
    log.warning("batch %s: refused by the provider, asked again at its next poll: %s", held.id, detail)
    return False


async def _lost(settings: Settings, sessions: Sessions, api: BatchAPI, held: Held, detail: str) -> None:
    """The provider no longer knows the batch (deleted, or kept no longer; see _gone): it
    ends as lost and its requests go back as an expired batch's unanswered ones do. Polled
    on, it was asked about for ever, and its items waited as long."""
    assert held.provider_batch_id is not None
    seen = held.cancel_seen
    if seen is None or (seen and seen.get("status") not in TERMINAL):
        # First cancelled, as far as the provider lets: one a proxy hides (a 400 or 422 on each
        # retrieve) may still run, and be paid for beside its requests sent again. A batch that
        # is gone refuses the cancel, which changes nothing. One that answers it `cancelling`
        # (OpenAI's answer) names its files only once cancelled: looked at again (_looked) until
        # it has ended, for up to batch_gone_after_s, else the answers made before the cancel
        # were bought again.
        await batches.renew(sessions, held)
        seen = await _looked(api, held) or seen or {}
        waited = await batches.cancel_sent(
            sessions, held, seen, settings.batch_poll_interval_s, settings.batch_gone_after_s
        )
        if seen and seen.get("status") not in TERMINAL and not waited:
            log.info("batch %s: %s after its cancel, looked at again", held.id, seen.get("status"))
            return
    # One that answered the cancel was there after all: the answers its files hold (a batch
    # cancelled midway, or ended already) are read as a completed batch's, not bought again.
    # A download that fails is tried again at the next look, from the stored answer.
    outcome = Outcome({}, {})
    read, refused = await _read_files(sessions, api, held, seen, outcome)
    status = seen.get("status")
    unended = f"still {status} after its cancel" if status and status not in TERMINAL else None
    error = "; ".join(part for part in (detail, unended, refused) if part)
    await _collect(
        settings,
        sessions,
        held,
        BatchStatus.LOST,
        outcome,
        error=error,
        **({"provider_status": status} if status else {}),
        **read,
    )
    log.warning(
        "batch %s lost, %d answers kept, its other requests sent again: %s",
        held.id,
        len(outcome.answers),
        error,
    )


async def _looked(api: BatchAPI, held: Held) -> dict[str, Any] | None:
    """The lost batch's status and files, as its cancel answers them (its retrieve is what
    the provider refuses); if a cancel sent before is refused now (some gateways refuse to
    cancel a batch cancelling or ended), as the batch list shows it; None if neither does."""
    assert held.provider_batch_id is not None and held.input_file_id is not None
    with suppress(BatchFault):
        return _shown(await api.cancel(held.endpoint, held.provider_batch_id))
    if held.cancel_seen is None:  # its first cancel refused: gone, nothing to look for
        return None
    with suppress(BatchFault):
        found = await api.find(held.endpoint, str(held.id), held.input_file_id, _since(held))
        if found is not None and found.get("id") == held.provider_batch_id:
            return _shown(found)
    return None


def _shown(batch: dict[str, Any]) -> dict[str, Any]:
    """What a look at a lost batch shows: its status and files."""
    return {key: batch.get(key) for key in ("status", "output_file_id", "error_file_id")}


async def _collect(
    settings: Settings, sessions: Sessions, held: Held, final: BatchStatus, outcome: Outcome, **values: Any
) -> None:
    """End the batch (batches.collect), counted in the metrics."""
    resent = await batches.collect(sessions, held, final, outcome, settings.batch_max_submissions, **values)
    _ended(held, final)
    via = "online" if held.unanswered == "online" else "next_wave"
    BATCH_REQUESTS_RESENT.labels(held.endpoint, via).inc(resent)


def _ended(held: Held, status: BatchStatus) -> None:
    BATCHES_ENDED.labels(held.endpoint, status.value).inc()


def _read(lines: list[OutputLine], outcome: Outcome) -> None:
    """Sort the lines into answers and refusals; the others (server errors, lines never
    executed, unreadable answers) leave their requests unanswered."""
    for line in lines:
        if not line.custom_id.isdigit() or line.status_code is None:
            continue
        request_id, code = int(line.custom_id), line.status_code
        if 200 <= code < 300 and batches.readable(line.body):
            outcome.answers[request_id] = line.body
        elif 400 <= code < 500 and code not in _TRANSIENT:
            outcome.rejected[request_id] = f"HTTP {code}: {str(line.body)[:500]}"


async def _refuse(sessions: Sessions, held: Held, detail: str) -> None:
    """The provider will not take the batch (its file too large or invalid): its requests go
    in two smaller batches, until a lone request it refuses fails its item."""
    made = await batches.split_refused(sessions, held, detail)
    _ended(held, BatchStatus.REFUSED)
    log.warning(
        "batch %s refused (%s): %s", held.id, f"split in {made}" if made else "its request fails", detail
    )


async def _cancel(settings: Settings, sessions: Sessions, api: BatchAPI, held: Held) -> None:
    """The job was cancelled: so is its provider batch, even one whose id was never stored."""
    provider_batch_id, seen, unseen_error = held.provider_batch_id, None, None
    if provider_batch_id is None and held.input_file_id is not None and not held.create_unsent:
        # A worker may have created it and died before storing its id: uncancelled, it would
        # run, billed, for a job that wants none of it.
        await batches.renew(sessions, held)
        try:
            found = await _find(settings, sessions, api, held)
        except _Unseen as unseen:
            if not unseen.lasted:
                return
            found, unseen_error = None, str(unseen)  # nothing more can be done: it may run on
        provider_batch_id = None if found is None else str(found["id"])
    if provider_batch_id is not None:
        await batches.renew(sessions, held)
        try:
            seen = await api.cancel(held.endpoint, provider_batch_id)
        except BatchRefused as refused:
            # It ended already, or the provider has none: nothing runs to cancel. Left open,
            # the batch was asked again every poll for ever, and kept its job from deletion.
            log.warning("batch %s: the provider refused its cancel: %s", held.id, refused)
    await _collect(
        settings,
        sessions,
        held,
        BatchStatus.CANCELLED,
        Outcome({}, {}),
        provider_batch_id=provider_batch_id,
        provider_status=None if seen is None else seen.get("status"),
        error=unseen_error,
    )
