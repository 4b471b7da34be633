"""Server-wide settings, read once from the environment (prefix AIDSAFE_)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# A database URL's query options the service honours, by libpq's names (hosted Postgres
# providers hand them out so). The engine hands the URL to asyncpg as its DSN (app/store/db.py),
# whose own parser takes these as libpq does: the SSL files are loaded into each connection's
# SSL context as the sslmode asks, the hosts are tried as target_session_attrs asks ...
DSN_OPTIONS = frozenset(
    {
        *("host", "port", "dbname", "user", "password", "passfile", "service"),
        *("sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl", "sslnegotiation"),
        *("ssl_min_protocol_version", "ssl_max_protocol_version"),
        *("target_session_attrs", "krbsrvname", "gsslib"),
    }
)
# ... it sends every other one to the server as a startup parameter, which these two are in
# libpq too (any other libpq option would be a setting the server does not know) ...
STARTUP_PARAMETERS = frozenset({"application_name", "options"})
# ... and libpq's connect_timeout is asyncpg.connect's timeout, which db.py gives it ...
CONNECT_TIMEOUT = "connect_timeout"
# ... and libpq 16's sslrootcert=system, the system's trusted CAs, is asyncpg.connect's
# ssl=True, which verifies as verify-full does (libpq allows no other sslmode with it) and
# reads none of these.
SYSTEM_ROOTS = "system"
_NOT_WITH_SYSTEM_ROOTS = (
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
)
# asyncpg's own name for sslmode, which takes the same modes: taken as sslmode.
_SSL_ALIAS = "ssl"
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# The values asyncpg would refuse only at the first connection.
_OPTION_CHOICES = {
    "sslmode": _SSL_MODES,
    _SSL_ALIAS: _SSL_MODES,
    "sslnegotiation": ("postgres", "direct"),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "target_session_attrs": ("any", "primary", "standby", "prefer-standby", "read-write", "read-only"),
    "gsslib": ("gssapi", "sspi"),
}


def for_asyncpg(url: str) -> str:
    """A Postgres URL as the engine takes it (app/store/db.py): SQLAlchemy's asyncpg driver
    named (the libpq form `postgres://...` that hosted databases hand out names none), asyncpg's
    `ssl` as libpq's `sslmode` (the same modes), and each query option one that the service
    honours. Anything else is refused here, by name: another scheme or driver (the service's
    hot statements and connection settings are asyncpg's, so another driver failed only at the
    first connection), and any other option, which SQLAlchemy's dialect passed to
    asyncpg.connect as a keyword argument, a TypeError at the first connection."""
    try:
        parsed = make_url(url)
    # ValueError: what it reads as the port is no number, say a password's unescaped @ and :
    # leaving the rest of it there (SQLAlchemy's message quotes it).
    except (ArgumentError, ValueError):
        raise ValueError(f"the database URL is not a URL: write {_URL_FORM}") from None
    if parsed.drivername not in _ASYNCPG_SCHEMES:
        raise ValueError(_not_asyncpg(parsed.drivername))
    if "@" in (parsed.host or ""):  # no host has one: the rest of a password, shown with the host
        raise ValueError("the database URL's host has an @ in it: write a password's @ as %40")
    parsed = parsed.set(drivername="postgresql+asyncpg")
    for option, value in parsed.query.items():
        _check_option(option, value)
    if _SSL_ALIAS in parsed.query:
        if "sslmode" in parsed.query:
            raise ValueError(f"give the database URL's {_SSL_ALIAS} or its sslmode, not both")
        ssl = parsed.query[_SSL_ALIAS]
        parsed = parsed.difference_update_query([_SSL_ALIAS]).update_query_dict({"sslmode": ssl})
    if parsed.query.get("sslrootcert") == SYSTEM_ROOTS:
        if parsed.query.get("sslmode", "verify-full") != "verify-full":
            raise ValueError(
                "the database URL's sslrootcert=system asks for sslmode verify-full, as libpq does"
            )
        if beside := [option for option in _NOT_WITH_SYSTEM_ROOTS if option in parsed.query]:
            raise ValueError(
                f"the database URL's sslrootcert=system cannot go with its {', '.join(beside)} "
                "(asyncpg reads none with the system's CAs): give the path of the CA bundle instead"
            )
    return parsed.render_as_string(hide_password=False)


# The schemes the engine connects with: asyncpg's, named or not.
_ASYNCPG_SCHEMES = ("postgres", "postgresql", "postgresql+asyncpg")
_URL_FORM = "postgresql://user:password@host:5432/database"


def _not_asyncpg(scheme: str) -> str:
    """Why a URL of another scheme is refused, and what to write instead: the scheme is named
    (never the rest, which may carry a password)."""
    backend, _, driver = scheme.partition("+")
    if backend in ("postgres", "postgresql") and driver != "asyncpg":
        return (
            f"the database URL names the driver {driver}, but the service connects with asyncpg alone: "
            f"write postgresql:// (or postgresql+asyncpg://) in place of {scheme}://"
        )
    return (
        f"the database URL's scheme {scheme}:// is none the service connects with: write postgresql:// "
        "(or postgres://, postgresql+asyncpg://)"
    )


def _check_option(option: str, value: str | tuple[str, ...]) -> None:
    """Refuse a database URL's option that the service cannot honour: named as given, its value
    never quoted (an sslpassword)."""
    said = f"the database URL's {option}"
    if option not in DSN_OPTIONS | STARTUP_PARAMETERS | {CONNECT_TIMEOUT, _SSL_ALIAS}:
        raise ValueError(
            f"{said} is not an option the service's Postgres driver (asyncpg) honours: remove it"
        )
    if isinstance(value, tuple):
        if option == "host":  # SQLAlchemy's form of several hosts: ?host=a:5432&host=b:5432
            return
        raise ValueError(f"{said} is given more than once")
    if option in _OPTION_CHOICES and value not in _OPTION_CHOICES[option]:
        raise ValueError(f"{said} must be one of {', '.join(_OPTION_CHOICES[option])}")
    if option == CONNECT_TIMEOUT and not (re.fullmatch("[0-9]+", value) and int(value) > 0):
        raise ValueError(f"{said} must be a whole number of seconds above 0")


DatabaseUrl = Annotated[str, AfterValidator(for_asyncpg)]


def callback_host_entries(setting: str) -> frozenset[tuple[str, int | None]]:
    """AIDSAFE_CALLBACK_HOSTS as (host, port) pairs, port None for any port: `host` or
    `host:port` entries, comma-separated (`[::1]:8080` for IPv6). ValueError naming the first
    entry that is neither."""
    return frozenset(_callback_host(entry) for entry in setting.split(",") if entry.strip())


def _callback_host(entry: str) -> tuple[str, int | None]:
    # The setting's name is the refusal's to give (`refusals`): here it was said twice.
    refused = ValueError(f"{entry.strip()!r} is not a host or host:port")
    try:
        parts = urlsplit(f"//{entry.strip()}")
        port = parts.port  # out of range, or not a number: ValueError
    except ValueError:
        raise refused from None
    if not parts.hostname or parts.path or parts.username is not None:
        raise refused
    return parts.hostname, port


def _checked_callback_hosts(setting: str) -> str:
    """The setting, read as the settings load: a bad entry found at the first submission
    naming a callback was a 500, and at each of the workers' sends a delivery claimed again
    and again, never recorded."""
    callback_host_entries(setting)
    return setting


CallbackHosts = Annotated[str, AfterValidator(_checked_callback_hosts)]


# Jobs name endpoints in their config: a name is capped, so an unknown one quoted back in a
# 422 is a line, not as much of the body as its sender chose.
MAX_ENDPOINT_NAME_CHARS = 100
EndpointName = Annotated[str, Field(min_length=1, max_length=MAX_ENDPOINT_NAME_CHARS)]
# The most tokens any one request to any endpoint may take (Settings.llm_max_request_tokens):
# a backstop against runaway prompts, not a model's context (max_context_tokens is that), so
# the longest context offered today (Gemini's and GPT-4.1's: 1M), about 3 MB a request.
DEFAULT_MAX_REQUEST_TOKENS = 1_000_000


class Prices(BaseModel):
    """What an endpoint charges, in USD per million tokens. Pinned in each job's plan at
    submission: a later change prices new jobs only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    input: float = Field(ge=0, description="Prompt tokens.")
    cached_input: float | None = Field(
        default=None, ge=0, description="Prompt tokens the server reports as cached; None: the input price."
    )
    output: float = Field(ge=0, description="Completion tokens.")


class BatchConfig(BaseModel):
    """An endpoint's OpenAI-style batch API (`/files`, `/batches`), which jobs with
    `delivery: batch` use (workers/waves.py): cheaper, answered within the completion window."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    completion_window: str = "24h"
    # The provider's limits per batch (its input file): a wave larger than either is split.
    max_requests: int = Field(default=50_000, ge=1)
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    # What the batch API charges (pinned in batch jobs instead of the online prices); None: unpriced.
    prices: Prices | None = None


class EndpointConfig(BaseModel):
    """An OpenAI-compatible server the workers may call. Jobs name endpoints, never URLs,
    so secrets stay in the server's environment and jobs cannot aim workers anywhere."""

    base_url: str  # up to and including /v1
    api_key: str | None = None
    max_concurrency: int = Field(default=4, ge=1)  # shared by every worker, via Redis
    requests_per_minute: int | None = Field(default=None, ge=1)  # shared too; None: no limit
    tokens_per_minute: int | None = Field(default=None, ge=1)  # prompt + completion tokens
    default_model: str | None = None
    # The models a job may name on this endpoint; None: any (the server decides). Tenants share
    # the endpoint's prices and rate limits: one naming a dearer model than the prices were set
    # for would spend more than its costs and budget count.
    models: list[str] | None = Field(default=None, min_length=1)
    # How to ask for structured output: OpenAI's "json_schema" (OpenAI, vLLM, Ollama,
    # SGLang, llama.cpp's llama-server) or "json_object" + schema (llama-cpp-python).
    response_format: Literal["json_schema", "json_object"] = "json_schema"
    # The model's context in tokens (vLLM's --max-model-len, llama.cpp's n_ctx): jobs whose
    # requests may not fit are refused, and no request estimated over it is sent. None:
    # unknown, only the caps on prompts, policies and max_tokens and llm_max_request_tokens apply.
    max_context_tokens: int | None = Field(default=None, ge=1)
    # The longest wait honoured when the endpoint asks for one (Retry-After; x-ratelimit-reset-*
    # once x-ratelimit-remaining-* is 0): before a request's retry, or by every worker's
    # requests while the endpoint is paused (app/llm/limits.py). Servers rarely ask for more
    # than a minute; a bogus huge value must not park the workers for hours.
    retry_after_max_s: float = Field(default=120.0, ge=0)
    # None: unpriced, and the cost of its calls is unknown (null), never 0.
    prices: Prices | None = None
    # None: no batch API; jobs on this endpoint cannot ask for `delivery: batch`.
    batch: BatchConfig | None = None


# The bounds of a job's own values (app/plan.py) and of the server's defaults for them.
Agents = Annotated[int, Field(ge=1, le=8)]
Rounds = Annotated[int, Field(ge=0, le=20)]
CallTokens = Annotated[int, Field(ge=64, le=16384)]
Temperature = Annotated[float, Field(ge=0, le=2)]


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting is named, never quoted (URLs, endpoint keys and
    # tokens carry secrets, and the message goes to logs).
    model_config = SettingsConfigDict(
        env_prefix="AIDSAFE_", env_nested_delimiter="__", hide_input_in_errors=True
    )

    database_url: DatabaseUrl = "postgresql+asyncpg://postgres@127.0.0.1:5432/aidsafe"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The workers' LLM limiter, rate budgets and budgeted jobs' spending give up on a Redis
    # call after this long (a RedisError, which the LLM client retries as a transient fault)
    # rather than wait forever on a Redis that stopped answering. Above the limiter's longest
    # BLPOP (1 s), with room for the round trip.
    llm_redis_timeout_s: float = Field(default=5.0, ge=2.0)
    # The queue's Redis client (arq's polls and job starts, enqueues, progress events; API and
    # workers) gives up on a call that hears nothing for this long and sends it again on a new
    # connection (app/queue.py): a connection left half-open (a failover, a dropped NAT entry)
    # would otherwise hold a worker's polls forever (the heartbeat has a bound of its own).
    # The API's progress streams have a Redis pool of their own, which adds their waits
    # (events_resync_s, events_snapshot_interval_s).
    redis_timeout_s: float = Field(default=3.0, ge=1.0)
    # Postgres ends every statement of the API and the workers that runs longer than this, and
    # the client gives up on one whose connection stays silent; that connection and the pool's
    # older ones are replaced (app/store/db.py): a connection left half-open by a failover
    # would otherwise hold a request, or an item's turn write, forever while its lease
    # renewals go on over other connections. Well above the longest statement we send (an
    # export's batch, a large job's submission, cancellation or deletion).
    database_timeout_s: float = Field(default=60.0, ge=1.0)
    log_level: str = "INFO"
    log_json: bool = True  # structured logs (one JSON object per line) with job and item ids
    queue_name: str = "aidsafe:queue"
    redis_key_prefix: str = "aidsafe"  # for keys other than arq's (endpoint limits)

    # The endpoint called "default": the embedded llama.cpp server unless pointed elsewhere.
    llm_base_url: str = "http://127.0.0.1:8088/v1"
    llm_api_key: str | None = None
    llm_model: str = "smollm2-135m-instruct"
    llm_max_concurrency: int = Field(default=4, ge=1)
    llm_requests_per_minute: int | None = Field(default=None, ge=1)
    llm_tokens_per_minute: int | None = Field(default=None, ge=1)
    llm_response_format: Literal["json_schema", "json_object"] = "json_schema"
    llm_max_context_tokens: int | None = Field(default=None, ge=1)
    # Every endpoint's ceiling, prompt and max_tokens together, its max_context_tokens known or
    # not: without it, a runaway prompt (a prompt set that echoes its placeholders, a reply
    # written far past max_tokens) sent megabytes to the shared LLM.
    llm_max_request_tokens: int = Field(default=DEFAULT_MAX_REQUEST_TOKENS, ge=1)
    llm_retry_after_max_s: float = Field(default=120.0, ge=0)  # see EndpointConfig.retry_after_max_s
    llm_batch: BatchConfig | None = (
        None  # the default endpoint's batch API, as JSON; see EndpointConfig.batch
    )
    # More endpoints by name, as JSON: {"vllm": {"base_url": "http://gpu:8000/v1"}}
    llm_endpoints: dict[EndpointName, EndpointConfig] = Field(default_factory=dict)
    # Prices by endpoint name, "default" included, as JSON: {"default": {"input": 0.15,
    # "cached_input": 0.075, "output": 0.6}}. An endpoint may carry its own `prices` instead.
    llm_prices: dict[str, Prices] = Field(default_factory=dict)
    llm_timeout_s: float = Field(default=120.0, gt=0)
    llm_max_retries: int = Field(default=4, ge=0)
    # Full-jitter backoff between attempts, from base doubling up to max. The base is the
    # OpenAI and Anthropic SDKs' (0.5 s): faults that come one at a time (a 5xx, a cut-off
    # body) are retried soon, and a longer outage still backs off within a few attempts.
    # The max is also how long an endpoint's circuit breaker, once open, refuses attempts
    # (app/llm/breaker.py): 0 retries at once and turns the breaker off.
    llm_backoff_base_s: float = Field(default=0.5, ge=0)
    llm_backoff_max_s: float = Field(default=30.0, ge=0)
    # Hedging (app/llm/hedging.py): an attempt still unanswered after llm_hedge_factor times
    # its endpoint and role's recent p95 latency (and at least llm_hedge_min_s) is sent again
    # and the first answer wins; at most llm_hedge_budget extra requests per request sent.
    # A factor of 0 turns it off.
    llm_hedge_factor: float = Field(default=3.0, ge=0)
    llm_hedge_min_s: float = Field(default=1.0, ge=0)
    llm_hedge_budget: float = Field(default=0.05, ge=0, le=1)
    # How long a worker keeps an LLM slot it released, unused, for its own next request
    # (app/llm/limits.py): fewer round trips to Redis; 0 gives each back at once.
    llm_slot_keep_s: float = Field(default=0.05, ge=0)

    # The API refuses larger request bodies with 413 (10,000 prompts of ~3,000 characters fit).
    max_request_bytes: int = 32 * 1024 * 1024
    # Request bodies one API key may have in memory at once in each API process, from their
    # reading to their answer (each is held whole, some 100 MB at the peak for one of
    # max_request_bytes); its others wait unread.
    max_bodies_per_key: int = Field(default=4, ge=1)
    # Requests one API key may have waiting for a turn (above, or to lock its row) in each API
    # process; past them, 429: each holds a connection and a task, and a key's burst would
    # otherwise take every connection the process may open.
    max_waiting_per_key: int = Field(default=64, ge=1)
    # Worker threads one API key's requests may hold at once in each API process, of asyncio's
    # few (CPU count + 4, at most 32), for decoding, checking and rendering: the key's other
    # such work waits, never refused, and other keys' requests take the threads left.
    threads_per_key: int = Field(default=2, ge=1)
    # A request body of which no byte came for this long is refused with 408: its client went
    # quiet, and would hold one of its key's body turns (above) for as long as its connection
    # stayed open. Per chunk, not for the whole body: a large upload on a slow link goes on.
    body_stall_s: float = Field(default=30.0, gt=0)
    # A request's head, checked as it is read (app/api/head_limits.py): a longer URL is refused
    # with 414, more header bytes (names and values) or fields with 431. nginx's defaults: a
    # request line in an 8 KiB buffer, 32 KiB of buffers for the head; Apache's: 100 header
    # fields. Our clients send a few short headers; browsers' cookies and proxies' forwarded
    # headers fit with room to spare.
    max_url_bytes: int = Field(default=8 * 1024, ge=1024)
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    max_header_fields: int = Field(default=100, ge=10)
    # ... and must be complete this long after the connection opened, or after the response
    # before it on a kept-alive connection, or it is a 408 (slow-loris). nginx and Node wait
    # 60 s; our clients send their few headers in one write, so half that still leaves a slow
    # link ample time while a trickling client holds a connection half as long.
    head_timeout_s: float = Field(default=30.0, gt=0)
    # A stopping API ends its event streams at once (their clients resume elsewhere) and gives
    # other responses under way this long (an export to a slow reader); then it cuts them.
    # Below the 30 s an orchestrator waits before it kills (Kubernetes; compose is told).
    shutdown_grace_s: float = Field(default=20.0, gt=0)
    # Annotation imports and the Label Studio webhook: a smaller cap, their parsing goes deeper.
    max_import_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # GET /v1/jobs/{id} counts a job's items at most this often (app/api/summaries.py).
    job_summary_max_age_s: float = Field(default=1.0, ge=0)
    # ... or, for a job whose count takes long, for its count's duration divided by this share.
    job_summary_read_share: float = Field(default=0.02, gt=0, le=1)
    # An API process answers for a key it found for this long: revocation takes as long.
    api_key_cache_s: float = Field(default=5.0, ge=0)

    # What one API key may pile up (app/store/key_limits.py); a POST that would pass a cap is
    # refused with 409 limit_reached. Open jobs: jobs of any mode (comparisons and evaluations
    # too) with queued, running or waiting items, each up to 10,000 prompts' worth of LLM
    # calls. Webhooks: those not revoked. Set versions: a key's policy set versions, and apart
    # its prompt set versions, all names together. Far above what a lab's work uses (a
    # few open jobs, a webhook per labeling tool, a version per ablation variant); a runaway
    # script stops at them.
    max_open_jobs_per_key: int = Field(default=100, ge=1)
    max_webhooks_per_key: int = Field(default=100, ge=1)
    max_set_versions_per_key: int = Field(default=1000, ge=1)

    # Job defaults, each overridable per job, within the bounds a job's own value has: a
    # default outside them would make every job that sets none unrunnable.
    default_agents: Agents = 2
    default_max_rounds: Rounds = 4
    default_max_tokens: CallTokens = 768
    default_temperature: Temperature = 0.7
    # Re-asks after malformed or truncated output, per call; below FALLBACK_ATTEMPT, where a
    # fallback's attempts are numbered from.
    max_reasks: int = Field(default=2, ge=0, le=50)
    # The fallback every job gets unless it names its own (or `"fallback": false`): when an
    # agent refuses a stage, the same request goes to this endpoint and model. Unset: none.
    fallback_endpoint: EndpointName | None = None
    fallback_model: str | None = None  # unset: the fallback endpoint's default model
    fallback_temperature: Temperature | None = None  # unset: the job's default
    # Named job configs a job may start from, one YAML file each (see the README's "Presets");
    # the API loads and checks them at startup and will not start if one is invalid.
    presets_dir: Path = Path(__file__).resolve().parents[1] / "presets"

    # Batch delivery (workers/waves.py): how often each worker forms waves and takes due
    # batches, how often it asks a provider about a running
    # batch, how long a worker holds a batch it works on (another takes it over after that;
    # a call to the batch API is given up after half of it, see batch_call_timeout_s),
    # how many times a request is submitted before its item fails, and how long the provider
    # must keep refusing a batch or one of its files (a 404, a file's 4xx) before it is taken
    # for gone and its requests bought again, or a later page of the search for it before
    # its requests fail (see README's Batch delivery).
    batch_interval_s: float = Field(default=2.0, gt=0)
    batch_poll_interval_s: float = Field(default=30.0, ge=0)
    batch_lease_s: float = Field(default=600.0, gt=0)
    batch_max_submissions: int = Field(default=3, ge=1)
    batch_gone_after_s: float = Field(default=900.0, ge=0)

    # Postgres connections of one API process, kept open once made: every request that reads
    # or writes holds one while it does (exports, one a batch; a key's row-locking writes, one
    # per key at a time: app/api/key_turns.py). Together with the workers', under Postgres's
    # max_connections.
    api_db_connections: int = Field(default=20, ge=1)

    # Workers.
    worker_max_jobs: int = 8
    # Most Postgres connections of one worker: an item holds one only for a statement, so a
    # few serve many items (and 2 x 128 items must not open 280 connections).
    worker_db_connections: int = Field(default=30, ge=1)
    worker_metrics_port: int = 0  # >0: each worker serves Prometheus metrics on this port
    # A worker told to stop (SIGTERM) is gone this long after the signal, its items' 5 s to
    # finish included, whatever a silent Redis or Postgres still holds (workers/queue_worker.py):
    # under the 30 s compose and Kubernetes give before they kill it, with room for the exit.
    worker_stop_s: float = Field(default=25.0, ge=10.0)
    # Set: the API's /metrics asks for `Authorization: Bearer <token>` (Prometheus's `authorization`).
    metrics_token: str | None = None
    # An item's lease in Postgres, renewed every third of it: the backstop should heartbeats
    # be lost. A dead worker is found by its heartbeat, well before its leases expire.
    lease_seconds: int = 60
    # Each worker sets a key in Redis this often, which lives this long: the sweeper takes
    # back the items of a worker whose key is gone (workers/liveness.py). A worker whose
    # event loop is blocked for longer than the TTL loses its items (safely: fenced).
    # 1 s and 5 s: a killed worker's items resume about 7 s later (10 s cost 12 s, a third of
    # the time lost to a kill: bench/RESULTS.md); a loop blocked 5 s is already a broken worker.
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_ttl_s: float = Field(default=5.0, gt=0)
    item_max_attempts: int = 100  # claims of one item, LLM outages not included, before it fails
    item_max_failures: int = 5  # claims lost to a dead worker or an unexpected error
    # How long the LLM may stay unavailable to an item (its claims in a row handed back for an
    # outage, no answer in between) before the item fails `llm_unavailable`: an outage delays
    # work, but an endpoint that will never answer (a wrong URL) must not hold items for ever.
    item_max_outage_s: float = Field(default=24 * 3600.0, gt=0)
    item_retry_base_s: float = 5.0  # first back-off after the LLM stayed unavailable; doubles
    sweep_interval_s: int = Field(default=3, ge=1)  # one sweep per interval, across all workers
    # A queued item unclaimed this long, whose arq job no worker took, is enqueued again: it
    # was lost between a commit and its enqueue (the API's or the sweeper's process died).
    enqueue_grace_s: int = 10
    # Workers blank the hazardous text (whispered beliefs, rejected CoTs, guard texts) of
    # finished jobs submitted more than this many days ago and keep the rest; unset: never.
    purge_hazardous_after_days: float | None = Field(default=None, gt=0)
    # How often one of the workers purges: that hazardous text, and (always) dead viewer
    # sessions and old webhook rejections.
    purge_interval_s: int = Field(default=3600, gt=0)
    # Refused webhook deliveries are deleted this long after they arrived: their bodies may
    # quote a job's CoTs after the job was deleted (app/store/webhooks.py says why not with it).
    webhook_rejections_kept_days: float = Field(default=7.0, gt=0)
    # Label Studio deliveries that carried their secret while Postgres was away are spooled to
    # Redis (and recorded by a worker once it is back): at most this many at once, past it 503.
    delivery_spool_max: int = Field(default=10_000, ge=0)
    delivery_spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)  # and their bytes
    # One API key's deliveries may take this share of either: during an outage one key's tool
    # cannot take the others' room.
    delivery_spool_key_share: float = Field(default=0.25, gt=0, le=1)
    # A client address that sends a webhook this many wrong secrets within the window (from the
    # first) has its further wrong ones refused until the window ends; never the right one
    # (app/api/failures.py).
    webhook_wrong_secrets_per_address: int = Field(default=30, ge=1)
    webhook_wrong_secrets_window_s: int = Field(default=60, ge=1)
    # The same for unknown or revoked API keys and deliveries to unknown webhooks, counted
    # together: past them, such requests are refused without a lookup; never a known key
    # (app/api/known_keys.py).
    wrong_keys_per_address: int = Field(default=30, ge=1)
    wrong_keys_window_s: int = Field(default=60, ge=1)

    # Progress events (GET /v1/jobs/{id}/events): one Redis stream per job, trimmed and expiring;
    # Postgres stays the truth: a follower checks the items' ends against it (events_resync_s).
    events_stream_max_len: int = Field(default=20_000, ge=100)  # approximate trimming (XADD MAXLEN ~)
    events_stream_ttl_s: int = Field(default=24 * 3600, ge=60)  # renewed by every event
    events_snapshot_interval_s: float = Field(default=1.0, gt=0)  # at most one snapshot this often
    # A snapshot, and the items that ended checked against those the follower was sent, at
    # least this often, events or not.
    events_resync_s: float = Field(default=10.0, gt=0)
    # Streams one API key may have open at once in each API process: every open stream holds a
    # Redis connection (XREAD BLOCK) and a task for as long as it lasts.
    events_max_streams_per_key: int = Field(default=32, ge=1)
    # And all keys' together: Redis's connections are shared with the workers (maxclients).
    # The last fifth of them (at least one) go only to keys with none open, so that keys at
    # their caps cannot fill the process (app/api/open_streams.py); any values work together.
    events_max_streams: int = Field(default=1024, ge=1)
    # Exports one API key may have under way at once in each API process, and all keys'
    # together: each holds two batches of rows in memory until its client has read it all,
    # however slowly, and one of the API process's Postgres connections (api_db_connections)
    # while it reads a batch, so one key's many exports would take a share of them from every
    # other request. The last fifth of all (at least one) go only to keys with none under way,
    # as for progress streams above: a lone key has its 4 of 10, and two keys' 4 each leave the
    # last two to two other keys; a cap per key past the process's, or of 1 in all, works too.
    max_exports_per_key: int = Field(default=4, ge=1)
    max_exports: int = Field(default=10, ge=1)
    # An export whose client takes none of its bytes for this long is ended: its seat would
    # otherwise be held for as long as the client keeps the connection open.
    export_stall_s: float = Field(default=60.0, gt=0)

    # Web viewer (/view): the session cookie is signed with this secret. Unset, each API process
    # makes its own at start, so viewer logins end on restart and do not carry across processes.
    web_secret: str | None = None
    web_session_hours: float = Field(default=12.0, gt=0)
    # Live viewer sessions one API key may hold (app/store/web_sessions.py): a login past them
    # ends the key's oldest, never refused. Each login makes a row live for web_session_hours,
    # and a key logging in in a loop would otherwise grow the table without bound.
    max_viewer_sessions_per_key: int = Field(default=100, ge=1)

    # Job callbacks (app/callbacks.py): the hosts a job may name, comma-separated, each `host`
    # (any port) or `host:port`; empty: jobs cannot name callbacks. Checked again at each send.
    callback_hosts: CallbackHosts = ""
    callback_timeout_s: float = Field(default=10.0, gt=0)  # per attempt, connecting included
    callback_retry_base_s: float = Field(default=10.0, gt=0)  # first back-off; doubles per attempt
    callback_retry_max_s: float = Field(default=3600.0, gt=0)  # longest back-off
    callback_retry_for_s: float = Field(default=24 * 3600.0, gt=0)  # then a failing delivery gives up
    callback_poll_interval_s: float = Field(default=2.0, gt=0)  # how often each worker looks for due ones

    @model_validator(mode="after")
    def _heartbeats_outlive_their_interval(self) -> Settings:
        # A beat may take up to an interval before it gives up (a silent connection), so the
        # key must outlive two intervals plus that one.
        if self.heartbeat_ttl_s < 3 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must be at least three times heartbeat_interval_s")
        return self

    @model_validator(mode="after")
    def _prices_name_endpoints(self) -> Settings:
        """A price for an endpoint that does not exist is a typo that would leave the real
        one unpriced: refuse to start (as for one priced twice)."""
        named = {"default", *self.llm_endpoints}
        for name in self.llm_prices:
            if name not in named:
                raise PydanticCustomError(
                    "unknown_price_endpoint",
                    "llm_prices names endpoint '{name}', which is not configured (configured: {known})",
                    {"name": name, "known": ", ".join(sorted(named))},
                )
            if name in self.llm_endpoints and self.llm_endpoints[name].prices is not None:
                raise PydanticCustomError(
                    "endpoint_priced_twice",
                    "endpoint '{name}' has prices in both llm_prices and llm_endpoints: give them once",
                    {"name": name},
                )
        return self

    @property
    def batch_call_timeout_s(self) -> float:
        """How long a call to a batch API may take: half a batch's lease. Its holder renews
        the lease before each call, so the call is over before another worker may take the
        batch over and make it again (a second create: the same requests billed twice); the
        other half covers the renewal's own statement. The default lease gives a call 300 s:
        a 200 MB input file uploads in that at 0.7 MB/s."""
        return self.batch_lease_s / 2

    def endpoints(self) -> dict[str, EndpointConfig]:
        default = EndpointConfig(
            base_url=self.llm_base_url,
            api_key=self.llm_api_key,
            max_concurrency=self.llm_max_concurrency,
            requests_per_minute=self.llm_requests_per_minute,
            tokens_per_minute=self.llm_tokens_per_minute,
            default_model=self.llm_model,
            response_format=self.llm_response_format,
            max_context_tokens=self.llm_max_context_tokens,
            retry_after_max_s=self.llm_retry_after_max_s,
            batch=self.llm_batch,
        )
        endpoints = {"default": default, **self.llm_endpoints}
        return {
            name: endpoint.model_copy(update={"prices": self.llm_prices[name]})
            if name in self.llm_prices
            else endpoint
            for name, endpoint in endpoints.items()
        }


@lru_cache
def get_settings() -> Settings:
    return Settings()


# How pydantic-settings names the field whose variable it could not read (its SettingsError).
_UNREAD_FIELD = re.compile(r'for field "(\w+)"')


def refusals(exc: ValidationError | SettingsError) -> list[tuple[str, str]]:
    """Each refusal in `exc` (settings failing to load) as the variable it names and why,
    never its value: a database URL may hold a password."""
    if isinstance(exc, SettingsError):
        # A setting of JSON (llm_endpoints, llm_prices) that is not JSON, read before any is
        # validated: the first such, named only in the message. The parser's error says where,
        # never what.
        field = _UNREAD_FIELD.search(str(exc))
        setting = f"AIDSAFE_{field[1].upper()}" if field else "the AIDSAFE_* settings"
        cause = exc.__cause__
        return [(setting, f"not JSON ({cause})" if isinstance(cause, json.JSONDecodeError) else str(exc))]
    said = []
    for error in exc.errors(include_url=False, include_input=False):
        # No field for a refusal of settings taken together (a model validator's): its reason
        # names them.
        setting = f"AIDSAFE_{str(error['loc'][0]).upper()}" if error["loc"] else "the AIDSAFE_* settings"
        reason = error.get("ctx", {}).get("error")  # a validator's ValueError, without pydantic's prefix
        why = str(reason) if isinstance(reason, ValueError) else error["msg"]
        # Within a setting of JSON, which entry: an endpoint's name and its field.
        inner = ".".join(str(part) for part in error["loc"][1:])
        said.append((setting, f"{inner}: {why}" if inner else why))
    return said


def settings_or_exit(program: str) -> Settings:
    """The settings, for a server's entry point; refused, it exits (status 1) with a line for
    each refused setting, not a traceback of pydantic's internals."""
    try:
        return get_settings()
    except (ValidationError, SettingsError) as exc:
        raise refused_start(program, refusals(exc)) from None


def refused_start(program: str, refused: list[tuple[str, str]]) -> SystemExit:
    """The exit of a server refusing its settings: status 1, and its message a line for each
    refused setting (the variable, and why). Raise it `from None`: a traceback adds nothing."""
    lines = [f"  {setting}: {reason}" for setting, reason in refused]
    return SystemExit("\n".join([f"{program}: cannot start, the settings are refused:", *lines]))
