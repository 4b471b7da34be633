"""How a claim on an item ends: one vocabulary, and one place that says what each ending
writes on the item row.

A finished ending (completed, failed, cancelled) is the item's last. A handed-back one puts
the item back in the queue for another claim, its turns kept: an LLM outage, a shutdown, an
unexpected error, or a dead worker (its heartbeat stopped, or its lease expired). An LLM
outage's is bounded by time, not by claims: see `after_outage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func

from app.store.models import FINISHED, Item, ItemStatus


@dataclass(frozen=True)
class Ending:
    status: ItemStatus
    error_code: str | None = None
    message: str | None = None  # error_message: for the tenant, in our words only
    # operator_error: the detail behind `message` (an upstream's answer, an exception), which
    # may quote hazardous text or the server's LLM key: for operators only.
    detail: str | None = None
    counts_as_failure: bool = False  # a hand-back that uses up one of the item's max_failures
    llm_outage: bool = False  # a hand-back because the LLM stayed unavailable: not a counted claim

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


COMPLETED = Ending(ItemStatus.COMPLETED)
CANCELLED = Ending(ItemStatus.CANCELLED)


def failed(code: str, message: str, detail: str | None = None) -> Ending:
    return Ending(ItemStatus.FAILED, code, message, detail)


def handed_back(reason: str, *, counts_as_failure: bool, detail: str | None = None) -> Ending:
    """Back to the queue. An unexpected error or a dead worker counts as a failure; a
    shutdown does not."""
    return Ending(ItemStatus.QUEUED, None, reason, detail, counts_as_failure)


def after_outage(summary: str, detail: str, unavailable_for: timedelta, max_outage: timedelta) -> Ending:
    """The LLM stayed unavailable to the claim (`summary`: the fault's, for the tenant), and
    has been to the item for `unavailable_for`. Back to the queue, neither a failure nor a
    counted claim: an outage delays work, it does not lose it. But failed once that is over
    `max_outage`, so that an endpoint that will never answer (a wrong URL) does not keep the
    item for ever."""
    if unavailable_for > max_outage:
        message = f"the LLM was unavailable for more than {max_outage.total_seconds():g} s; last: {summary}"
        return failed("llm_unavailable", message, detail)
    return Ending(ItemStatus.QUEUED, None, f"llm_unavailable: {summary}", detail, llm_outage=True)


WORKER_LOST = handed_back("worker lost (lease expired)", counts_as_failure=True)
WORKER_SILENT = handed_back("worker lost (heartbeat stopped)", counts_as_failure=True)


def ending_values(ending: Ending) -> dict[str, Any]:
    """What the ending writes on the item row (an UPDATE's SET), in every statement that
    ends a claim."""
    values: dict[str, Any] = {
        "status": ending.status,
        "lease_until": None,
        # Nobody holds it now; and a claim by a worker that does not set it (an older release,
        # mid-deploy) must not carry a dead worker's id, which would have it taken back.
        "claimed_by": None,
        "error_code": ending.error_code,
        "error_message": ending.message,
        "operator_error": ending.detail,
        "updated_at": func.now(),
    }
    if ending.counts_as_failure:
        values["failures"] = Item.failures + 1
    if ending.llm_outage:
        values["outage_claims"] = Item.outage_claims + 1
    elif not ending.finished:
        # Back in the queue for another reason (parked for its budget, waiting for a batch, a
        # shutdown, an error): the LLM was not what held it, and a later outage starts anew.
        values["llm_unavailable_since"] = None
    if ending.finished:
        # The clock, not the transaction's start (now()): a progress stream reads the ends
        # since its last check less a margin (app/events.py), and a transaction that waited
        # for a lock longer than that would commit ends already behind the window.
        values["finished_at"] = func.clock_timestamp()
    if ending.status == ItemStatus.COMPLETED:
        values["stage"] = "done"
    return values
