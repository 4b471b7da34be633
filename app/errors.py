"""Domain errors: each carries an HTTP status and a stable code. The API maps them to the
one JSON error shape in a single handler; business code never raises HTTPException."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_LISTED_PROBLEMS = 100  # a refusal's details name the first problems; its message counts them all
MAX_SHOWN_NAME_CHARS = 100  # of a name from the request (a field, a key, a column) a refusal quotes


def shown_name(name: str) -> str:
    """A name from the request as a refusal quotes it, cut short: a body may hold a key of
    megabytes, and quoted whole, in the message and the details, it made a refusal twice the
    body's size."""
    return name if len(name) <= MAX_SHOWN_NAME_CHARS else name[:MAX_SHOWN_NAME_CHARS] + "…"


class ServiceError(Exception):
    status = 400
    code = "bad_request"
    retry_after_s: int | None = None  # sent as the answer's Retry-After header

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class MalformedBody(ServiceError):
    """Not UTF-8 JSON text (the status and code of ServiceError: 400 bad_request)."""


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class PayloadTooLarge(ServiceError):
    """Over a size cap: a body's bytes or JSON values, or what a file decodes to."""

    status = 413
    code = "payload_too_large"

    @classmethod
    def body_over(cls, max_bytes: int) -> PayloadTooLarge:
        """A request body over the `max_bytes` it may have."""
        return cls(f"the request body is over the limit of {max_bytes} bytes")


class BodyStalled(ServiceError):
    """A request body of which nothing came for a while (Settings.body_stall_s)."""

    status = 408
    code = "request_timeout"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class WrongSecret(Unauthorized):
    """A webhook delivery without the webhook's secret (answered as any other 401)."""


class TooManyFailures(ServiceError):
    """A client address had too many failures of a kind lately (app/api/failures.py): its
    further ones are refused until its window ends (Retry-After)."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyWrongSecrets(TooManyFailures):
    """A client address sent a webhook too many wrong secrets lately: its deliveries to it
    with a wrong one are refused, unstored (never one with the right secret)."""

    code = "too_many_wrong_secrets"


class TooManyWrongKeys(TooManyFailures):
    """A client address sent too many unknown or revoked API keys, or deliveries to unknown
    webhooks, lately: its further ones are refused without a lookup (never a known key, nor a
    delivery to a webhook that exists)."""

    code = "too_many_wrong_keys"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class JobDeleted(NotFound):
    """The job was deleted while an export was reading it a batch at a time (what was sent of
    it is incomplete, and the export ends with an error rather than looking complete), or while
    its progress was followed (the stream ends)."""


class TooManyStreams(ServiceError):
    """An API key, or the API process, already has as many progress streams, or exports, open as it may."""

    status = 429
    code = "too_many_streams"
    retry_after_s = 5  # a seat frees only as one of the key's streams ends; polling meanwhile is fine


class TooManyWaiting(ServiceError):
    """An API key has as many requests waiting for their turn in this API process as it may."""

    status = 429
    code = "too_many_waiting"
    retry_after_s = 1  # a turn frees as soon as one of the key's requests is done


class LimitReached(ServiceError):
    """The API key already has as many of something as the server allows one key (details:
    `limit`, `setting`, `max`). Not worth retrying as it is: room frees only as the key's
    jobs end, or as it revokes or deletes what it has."""

    status = 409
    code = "limit_reached"


class IdempotencyConflict(ServiceError):
    status = 409
    code = "idempotency_conflict"


class InvalidConfig(ServiceError):
    status = 422
    code = "invalid_config"


class UnknownPolicySet(ServiceError):
    status = 422
    code = "unknown_policy_set"


class UnknownPromptSet(ServiceError):
    status = 422
    code = "unknown_prompt_set"


class InvalidPromptSet(ServiceError):
    """Templates the stages cannot use (details list every problem, each naming its
    template, stage and placeholder), or that cannot fit any endpoint's context."""

    status = 422
    code = "invalid_prompt_set"


class UnknownPreset(ServiceError):
    """The job names a preset this server does not ship (details list those it does)."""

    status = 422
    code = "unknown_preset"


class PresetVersionMismatch(ServiceError):
    """The job pins a version of a preset other than the one this server ships."""

    status = 422
    code = "preset_version_mismatch"


class RequestTooLarge(ServiceError):
    """A job could send an LLM endpoint more than it takes: its context, or the policy cap."""

    status = 422
    code = "request_too_large"


class InvalidCursor(ServiceError):
    status = 400
    code = "invalid_cursor"


class NoCommonPrompts(ServiceError):
    status = 422
    code = "no_common_prompts"


class ComparisonMismatch(ServiceError):
    """The two jobs differ in what a comparison rests on (policy set, grader) and the caller
    did not allow it (details name what differs, on each side)."""

    status = 422
    code = "comparison_mismatch"


class CrossSiteRequest(ServiceError):
    status = 403
    code = "cross_site_request"


class MissingScope(ServiceError):
    status = 403
    code = "missing_scope"


class InvalidFilter(ServiceError):
    status = 422
    code = "invalid_filter"


class JobRunning(ServiceError):
    """The job still has queued or running items: cancel it, and let it end, first."""

    status = 409
    code = "job_running"


class WebhookNotRevoked(ServiceError):
    """Only a revoked webhook may be deleted: revoke it first."""

    status = 409
    code = "webhook_not_revoked"


class JobInComparison(ServiceError):
    """Comparisons judge this job's samples: delete them first (details name them)."""

    status = 409
    code = "job_in_comparison"


class CallbackRefused(ServiceError):
    """A job's callback URL the server will not call; the code says why."""

    status = 422
    code = "callback_not_allowed"


class CallbacksDisabled(CallbackRefused):
    code = "callbacks_disabled"


class InvalidCallbackUrl(CallbackRefused):
    code = "invalid_callback_url"


class CallbackHostNotAllowed(CallbackRefused):
    code = "callback_host_not_allowed"


class BudgetTooSmall(ServiceError):
    """A job budget below what one of its calls may cost: the job could not start a call."""

    status = 422
    code = "budget_too_small"


class UnpricedEndpoint(ServiceError):
    """A money budget for a job that uses an endpoint without prices."""

    status = 422
    code = "unpriced_endpoint"


class BatchUnsupported(ServiceError):
    """`delivery: batch` for a job that uses an endpoint without a batch API."""

    status = 422
    code = "batch_unsupported"


class SampleFileError(ServiceError):
    """An imported sample file (or inline sample list) the service will not take: nothing of
    it is stored. `details` name the row (1-based, the header not counted) and the column."""

    status = 422
    code = "invalid_sample_file"

    def __init__(self, message: str, *, row: int | None = None, column: str | None = None) -> None:
        super().__init__(message, {"row": row, "column": column})


class InvalidEncoding(SampleFileError):
    """Text that is not UTF-8 (or mixes encodings)."""

    code = "invalid_encoding"


class MissingColumn(SampleFileError):
    """A column the mapping names is not in the file."""

    code = "missing_column"


class EmptyRow(SampleFileError):
    """A blank row, or a row whose prompt or response is empty."""

    code = "empty_row"


class TooManySamples(SampleFileError):
    code = "too_many_samples"


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(shown_name(str(part)) for part in loc if part != "body") or "body"


class InvalidRequest(ServiceError):
    """A request that does not validate, as pydantic reports it: details list each field
    and its problem (the first MAX_LISTED_PROBLEMS of them)."""

    status = 422
    code = "validation_error"

    @classmethod
    def of(cls, errors: Sequence[Any]) -> InvalidRequest:
        problems = [{"field": _where(tuple(e.get("loc", ()))), "problem": e.get("msg", "")} for e in errors]
        first = problems[0] if problems else {"field": "body", "problem": "invalid"}
        message = f"{first['field']}: {first['problem']}"
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        return cls(message, problems[:MAX_LISTED_PROBLEMS])
