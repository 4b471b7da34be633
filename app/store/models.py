"""Tables (SQLAlchemy 2 declarative). They are created only by Alembic migrations."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    literal,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import TypeDecorator

from app.plan import JobPlan, read_plan

# Alembic's recipe: every constraint and index gets a name the model determines, so a migration
# can name what it alters (migration 0007 renamed the names PostgreSQL had chosen to these).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The Alembic revision these models are (migrations/versions): a worker checks the database
# against it before taking items (app/preflight.py). A test keeps it at Alembic's head.
SCHEMA_REVISION = "0039_callback_deliveries_owner"


class Base(DeclarativeBase):
    __table__: ClassVar[Table]  # every model here is one table (SQLAlchemy types it as any FROM)
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB, uuid.UUID: UUID(as_uuid=True)}


class ItemStatus(StrEnum):
    """queued -> running -> completed | failed; queued or running -> cancelled. A running item
    handed back (an LLM outage, a shutdown, an error, a dead worker) is queued again. One whose
    job's budget ran out waits as budget_exhausted (its turns kept) until the budget is raised,
    then is queued again, or until the job is cancelled. An item of a batch job waits as
    awaiting_batch while its next call is in a provider's batch (workers/waves.py), then is
    queued again."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_EXHAUSTED = "budget_exhausted"
    AWAITING_BATCH = "awaiting_batch"


# A job's status, derived from its items' (jobs.summary; job_listing's SQL for a listing).
JobStatus = Literal["queued", "running", "budget_exhausted", "completed", "cancelling", "cancelled"]
FINISHED = (ItemStatus.COMPLETED, ItemStatus.FAILED, ItemStatus.CANCELLED)  # nothing changes after these
# Neither finished nor in the queue: they wait, and resume by themselves or with the budget.
WAITING = (ItemStatus.BUDGET_EXHAUSTED, ItemStatus.AWAITING_BATCH)
# A job with items in these has not ended (waiting ones too).
UNFINISHED = (ItemStatus.QUEUED, ItemStatus.RUNNING, *WAITING)
UNFINISHED_SQL = "status IN ({})".format(", ".join(f"'{status}'" for status in UNFINISHED))


# For nullable JSON columns: Python None is SQL NULL, not the JSON value null, so that
# COUNT(column) and IS NULL mean "absent".
NULLABLE_JSONB = JSONB(none_as_null=True)


def sql_constant(value: str) -> BindParameter[str]:
    """`value` written into the statement's SQL instead of sent as a parameter. A query that
    needs one of the partial indexes below (`WHERE status = 'running'`) compares with this:
    Postgres can use a partial index only for a predicate it proves from the query, and after
    five runs of a prepared statement (asyncpg prepares every one) it may switch to a generic
    plan, made for any value of the parameters. The summary's refusal count, on a job of
    10,000 items, went from the partial index to reading every turn of the job: 14 ms a read."""
    return literal(value, String, literal_execute=True)


class PlanJSON(TypeDecorator[JobPlan]):
    """A job's plan, stored as its JSON and read back typed."""

    impl = JSONB
    cache_ok = True

    def process_bind_param(self, value: JobPlan | None, dialect: Dialect) -> dict[str, Any] | None:
        return None if value is None else value.model_dump(mode="json")

    def process_result_value(self, value: Any, dialect: Dialect) -> JobPlan | None:
        return None if value is None else read_plan(value)


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))  # shown to humans to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the secret
    # What the key may read beyond its own jobs' ordinary data (see app.store.keys.SCOPES).
    scopes: Mapped[list[Any]] = mapped_column(JSONB, default=list, server_default=text("'[]'::jsonb"))
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A viewer login (app/web/session.py): live until it expires, its key is revoked, or it
    is ended at logout."""

    __tablename__ = "web_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # Indexed: each login trims its key's sessions (app/store/web_sessions.py).
    key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"), index=True)
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RegisteredSet:
    """The columns of a set registered by content (policy sets, prompt sets). Immutable: new
    content under the same name is a new version (its content hash)."""

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))  # None: built-in
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = _now()


class PolicySetRow(RegisteredSet, Base):
    __tablename__ = "policy_sets"
    __table_args__ = (
        UniqueConstraint("owner_key_id", "name", "version", postgresql_nulls_not_distinct=True),
    )

    policies: Mapped[list[Any]]


class PromptSetRow(RegisteredSet, Base):
    __tablename__ = "prompt_sets"
    __table_args__ = (
        UniqueConstraint("owner_key_id", "name", "version", postgresql_nulls_not_distinct=True),
    )

    templates: Mapped[dict[str, Any]]  # every template by name (app/deliberation/prompt_sets.py)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_key_id", "idempotency_scope", "idempotency_key"),
        # A key's jobs newest first (GET /v1/jobs), and where a cursor resumes that order.
        Index("ix_jobs_owner_created", "owner_key_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))
    policy_set_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("policy_sets.id"))
    # None: submitted before jobs pinned a prompt set; it runs the built-in set.
    prompt_set_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("prompt_sets.id"))
    plan: Mapped[JobPlan] = mapped_column(PlanJSON)  # resolved and frozen at submission
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # The route whose Idempotency-Key namespace holds the key: jobs.IdempotencyScope.
    idempotency_scope: Mapped[str] = mapped_column(String(16), server_default="jobs")
    request_hash: Mapped[str] = mapped_column(String(64))
    # Whether `request_hash` may be app/idempotency.py's legacy hash: true for jobs stored before
    # this column (migration 0038) and for those an older release inserts; false since.
    request_hash_may_be_legacy: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    item_count: Mapped[int] = mapped_column(Integer)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    # When its hazardous text was purged (app/store/deletions.py purge_hazardous); None: not yet.
    hazardous_purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Purges of it that failed, and when the purge may try it again: one job that cannot be
    # purged is put off, not tried first at every purge ahead of the others.
    hazardous_purge_failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    hazardous_purge_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Where the job's end is announced (app/callbacks.py), and the secret that signs it: kept
    # as given, since signing needs it, until its delivery is over (delivered, given up or
    # refused: app/store/callbacks.py erases it then). None: no callback, or that.
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_secret: Mapped[str | None] = mapped_column(String(64))
    # The user's: a short name and free-form JSON, given at submission or set later.
    label: Mapped[str | None] = mapped_column(String(100))
    job_metadata: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    # Duplicate prompts found at submission (app/duplicates.py, DuplicatesOut's JSON); None for
    # comparisons and for jobs older than the report. Read only where asked (undefer), as only
    # the job's own answer shows it: some 20,000 values for 10,000 prompts in pairs, decoded on
    # the event loop by every route naming the job (3-5 ms each), and by workers' general claim
    # of an item. Reading it unasked raises, rather than a lazy load (AsyncSession cannot).
    duplicates: Mapped[dict[str, Any] | None] = mapped_column(JSONB, deferred=True, deferred_raiseload=True)
    # The user's budget (app/costs.py Budget), changed by PATCH; None: no limit.
    budget_max_cost_usd: Mapped[float | None] = mapped_column(Float)
    budget_max_tokens: Mapped[int | None] = mapped_column(BigInteger)


# Jobs whose hazardous text is still held, for the purge to find the old ones.
Index("ix_jobs_hazardous_unpurged", Job.created_at, postgresql_where=text("hazardous_purged_at IS NULL"))


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("job_id", "position"),
        Index("ix_items_job_status", "job_id", "status"),
        # A progress stream's check for the items that ended since its last one (app/events.py).
        Index(
            "ix_items_job_finished", "job_id", "finished_at", postgresql_where=text("finished_at IS NOT NULL")
        ),
        Index(
            "ix_items_running_lease", "lease_until", postgresql_where=text(f"status = '{ItemStatus.RUNNING}'")
        ),
        # Whether a job is open (its key's open jobs are counted at each submission: key_limits),
        # without reading the finished items of the key's ended jobs.
        Index("ix_items_unfinished_job", "job_id", postgresql_where=text(UNFINISHED_SQL)),
        Index(
            "ix_items_queued_since", "updated_at", postgresql_where=text(f"status = '{ItemStatus.QUEUED}'")
        ),
        # The comparison items using an item: deleting a job's items checks them (foreign keys).
        Index(
            "ix_items_baseline_item_id",
            "baseline_item_id",
            postgresql_where=text("baseline_item_id IS NOT NULL"),
        ),
        Index(
            "ix_items_candidate_item_id",
            "candidate_item_id",
            postgresql_where=text("candidate_item_id IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    item_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)  # the user's
    # A comparison item's two samples: the baseline and the candidate job's items of its prompt.
    baseline_item_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("items.id"))
    candidate_item_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("items.id"))
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.QUEUED)  # an ItemStatus
    stage: Mapped[str] = mapped_column(String(16), default="intent")  # last stage with a turn
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far; the claim token
    failures: Mapped[int] = mapped_column(Integer, default=0)  # claims lost to crashes and errors
    # Claims handed back because the LLM stayed unavailable: not counted against the item's
    # max claims, for an outage delays work but must not lose it.
    outage_claims: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # When the LLM became unavailable to the item: the first of its claims in a row handed
    # back for an outage, with no answer recorded since, moved later by the item's waits in
    # the queue too long to be a back-off (items.end_in_outage): now less it is how long the
    # LLM was seen unavailable to the item. None: no outage now. An item fails once that is
    # longer than item_max_outage_s.
    llm_unavailable_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The last of those outage hand-backs: the next one measures the item's wait from it.
    llm_unavailable_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueues: Mapped[int] = mapped_column(Integer, default=1)  # part of the arq job id
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The worker process running the item (None once the claim ended): the sweeper takes the
    # item back as soon as that worker's heartbeat is gone (workers/liveness.py).
    claimed_by: Mapped[uuid.UUID | None] = mapped_column()
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)  # for the tenant: our words only
    # The full detail behind error_message (an upstream's answer, an exception), for operators:
    # it may quote hazardous text or the server's LLM key, so no route ever serves it.
    operator_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TurnRow(Base):
    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("item_id", "stage", "round", "agent", "attempt"),
        # Job totals (GET /v1/jobs/{id}) and each item's (exports) by an index-only scan,
        # without reading raw outputs.
        Index(
            "ix_turns_job_usage",
            "job_id",
            "item_id",
            postgresql_include=["prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost_usd"],
        ),
        # A job's refusals per stage and model (its summary), without reading its other turns.
        Index(
            "ix_turns_job_refusals",
            "job_id",
            "stage",
            "model",
            postgresql_where=text("outcome = 'refused'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    stage: Mapped[str] = mapped_column(String(16))
    round: Mapped[int] = mapped_column(Integer)
    agent: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(32))
    endpoint: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    raw_output: Mapped[str] = mapped_column(Text)
    parsed: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    agreed: Mapped[bool | None] = mapped_column(Boolean)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    # Of prompt_tokens, those the server reported as cached (usage.prompt_tokens_details).
    cached_prompt_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # At the job's pinned prices, when recorded; None: its endpoint is unpriced (unknown, not 0).
    cost_usd: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = _now()


class BatchStatus(StrEnum):
    """Our side of a provider batch (workers/waves.py): preparing (its requests chosen) ->
    uploaded (input file id stored) -> submitted (batch id stored, polled) -> collected
    (answers stored). Or refused (the provider would not take the file or the batch),
    cancelled (its job was) or lost (the provider no longer knew it: its requests went back
    as a batch's unanswered ones do; or its batch list kept refusing the search for it
    partway: its requests were rejected, not bought twice)."""

    PREPARING = "preparing"
    UPLOADED = "uploaded"
    SUBMITTED = "submitted"
    COLLECTED = "collected"
    REFUSED = "refused"
    CANCELLED = "cancelled"
    LOST = "lost"


class Batch(Base):
    """One provider batch of a batch job's wave: every id the provider gave is stored before
    it is used, so any worker can resume it."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_job_wave", "job_id", "wave"),
        Index("ix_batches_open", "next_poll_at", postgresql_where=text("finished_at IS NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    owner_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))  # the job's owner
    wave: Mapped[int] = mapped_column(Integer)  # 1, 2, ...: the job's waves in order
    endpoint: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.PREPARING)  # a BatchStatus
    requests: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)  # its input file's
    input_file_id: Mapped[str | None] = mapped_column(String(200))
    provider_batch_id: Mapped[str | None] = mapped_column(String(200))
    provider_status: Mapped[str | None] = mapped_column(String(32))  # validating, in_progress, ...
    request_counts: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)  # the provider's
    # Named once the batch ended, or, while it is open, once read (its lines stored) while
    # the other file is refused: not downloaded again (see batches.keep_read).
    output_file_id: Mapped[str | None] = mapped_column(String(200))
    error_file_id: Mapped[str | None] = mapped_column(String(200))
    # Why refused or lost, or which of its files could not be read: for operators (may quote
    # the provider).
    error: Mapped[str | None] = mapped_column(Text)
    # The polls in a row at which the provider refused the batch or one of its files (a 404,
    # or another 4xx but 401 and 403), or a later page of the search for it, and when the
    # first was: it is taken for gone only once they are settled (see batches.refused).
    # Cleared when the provider answers again.
    refusals: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    refused_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Uploaded by this release and its create not sent yet: no provider batch of it can
    # exist. False otherwise (and by default, as an older release leaves it): a holder looks
    # for one before it creates (its sender may have died before storing the id).
    create_unsent: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Taken for lost, it was cancelled then, and the provider showed it so since (its status
    # and files): waited for until it has ended, its files read from it, never cancelled again.
    cancel_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_seen: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)
    # A worker working on it holds it until then; another takes it over after.
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The lease's token: its holder's every write names it, so a holder whose lease another
    # worker took over writes nothing more.
    lease_id: Mapped[uuid.UUID | None] = mapped_column()
    next_poll_at: Mapped[datetime] = _now()
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BatchRequestStatus(StrEnum):
    """pending (waits for a wave) -> submitted (in a batch) -> answered | rejected (the
    provider refused it: its item fails) | failed (submitted too often); a submitted request
    its batch did not answer (expired, cancelled, a server error) is pending again, or
    online (its item sends it online) when its job says so."""

    PENDING = "pending"
    SUBMITTED = "submitted"
    ANSWERED = "answered"
    REJECTED = "rejected"
    FAILED = "failed"
    ONLINE = "online"


class BatchRequest(Base):
    """One LLM call of a batch job's item, keyed like its turn: stored when the item reaches
    it, sent in a wave's batch, and answered here for the item to read when it resumes."""

    __tablename__ = "batch_requests"
    __table_args__ = (
        UniqueConstraint("item_id", "stage", "round", "agent", "attempt"),
        Index("ix_batch_requests_job_status", "job_id", "status"),
        Index("ix_batch_requests_batch_id", "batch_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)  # its custom_id
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    stage: Mapped[str] = mapped_column(String(16))
    round: Mapped[int] = mapped_column(Integer)
    agent: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    endpoint: Mapped[str] = mapped_column(String(100))
    # The chat completion request, as the online client sends it; {} once answered (never sent again).
    body: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=BatchRequestStatus.PENDING)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id"))  # the last it was in
    submissions: Mapped[int] = mapped_column(Integer, default=0)
    answer: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)  # the chat completion
    error: Mapped[str | None] = mapped_column(Text)  # the last problem: for operators
    created_at: Mapped[datetime] = _now()
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Cot(Base):
    __tablename__ = "cots"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"), unique=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    position: Mapped[int] = mapped_column(Integer)  # the item's, for ordered pagination
    policy_set_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("policy_sets.id"))
    policy_set_name: Mapped[str] = mapped_column(String(100))
    policy_set_version: Mapped[str] = mapped_column(String(32))
    # None: written before CoTs recorded their prompt set (the wording then is not known).
    prompt_set_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("prompt_sets.id"))
    prompt_set_name: Mapped[str | None] = mapped_column(String(100))
    prompt_set_version: Mapped[str | None] = mapped_column(String(32))
    intents: Mapped[dict[str, Any]]
    thoughts: Mapped[list[Any]]  # every thought, with provenance
    refined_thoughts: Mapped[list[Any]]
    dropped_thoughts: Mapped[list[Any]]
    unaccounted_thought_ids: Mapped[list[Any]]
    response: Mapped[str] = mapped_column(Text)
    rounds_used: Mapped[int] = mapped_column(Integer)
    agreed: Mapped[bool] = mapped_column(Boolean)
    agreed_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # The auto-grader's {metric: {"score", "rationale"}}; None when not graded (or it failed).
    scores: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)
    grade_error: Mapped[str | None] = mapped_column(Text)
    accepted: Mapped[bool | None] = mapped_column(Boolean)  # the quality gate; None: no grading asked
    gate_reasons: Mapped[list[Any] | None] = mapped_column(NULLABLE_JSONB)  # thresholds missed
    # Stages the job's fallback answered after a refusal: {"stage", "round", "agent", "model"}.
    fallbacks: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        Index("ix_cots_job_position", "job_id", "position"),
        # "Accepted only" (or "rejected only") pages of a job, in prompt order.
        Index("ix_cots_job_accepted_position", "job_id", "accepted", "position"),
    )


class PreferencePair(Base):
    """The ear-whisperer attempt of one item: a pair made or not, with every try. The chosen
    side is the item's CoT. Beliefs, rejected CoTs and guard rationales are hazardous text.
    A made pair is kept by whoever reads it at a `min_gap` (app/store/jobs.py kept_at)."""

    __tablename__ = "preference_pairs"
    __table_args__ = (Index("ix_preference_pairs_job_position", "job_id", "position"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"), unique=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    position: Mapped[int] = mapped_column(Integer)  # the item's, for ordered pagination
    paired: Mapped[bool] = mapped_column(Boolean)  # the guard flagged a try and both sides were graded
    reason: Mapped[str | None] = mapped_column(String(32))  # why not paired (PairReason)
    gap: Mapped[float | None] = mapped_column(Float)  # chosen minus rejected policy faithfulness
    chosen_scores: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)
    rejected_scores: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)
    rejected_grade_error: Mapped[str | None] = mapped_column(Text)
    # The try the guard flagged (the rejected side); all None when no try was flagged.
    belief: Mapped[str | None] = mapped_column(Text)
    rejected_thoughts: Mapped[list[Any] | None] = mapped_column(NULLABLE_JSONB)
    rejected_response: Mapped[str | None] = mapped_column(Text)
    guard: Mapped[dict[str, Any] | None] = mapped_column(
        NULLABLE_JSONB
    )  # {unsafe, categories, rationale, error}
    # Every PairTry without its grade, in order: the whisperer's, then standard sampling's.
    tries: Mapped[list[Any]]
    created_at: Mapped[datetime] = _now()


class PairCandidate(Base):
    """A rejected side the guard was asked about, of either sampling method: the figures
    the report's gap distributions are made of (no text, so nothing hazardous). One row per
    (item, method, try), written with the item's completion."""

    __tablename__ = "pair_candidates"
    __table_args__ = (Index("ix_pair_candidates_job_method", "job_id", "method"),)

    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"), primary_key=True)
    method: Mapped[str] = mapped_column(String(16), primary_key=True)  # PairMethod
    number: Mapped[int] = mapped_column(Integer, primary_key=True)  # the try's
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    flagged: Mapped[bool | None] = mapped_column(Boolean)  # None: the guard's verdict was unreadable
    # The grader's {metric: score} of the rejected side (rationales stay in the turns); None: ungraded.
    rejected_scores: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)
    gap: Mapped[float | None] = mapped_column(Float)  # chosen minus rejected policy faithfulness
    created_at: Mapped[datetime] = _now()


class Judgement(Base):
    """One judge's verdict on a comparison item: which of two jobs' samples of one prompt is
    better. A comparison with several judges has a row per judge for each item."""

    __tablename__ = "judgements"
    __table_args__ = (
        UniqueConstraint("item_id", "judge"),
        Index("ix_judgements_job_position", "job_id", "position"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"))
    # Which of the plan's judges, from 0 (rows from before several judges are the first's).
    judge: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    position: Mapped[int] = mapped_column(Integer)
    # The baseline and the candidate job's items (indexed: deleting an item checks them).
    a_item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"), index=True)
    b_item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"), index=True)
    winner: Mapped[str | None] = mapped_column(String(8))  # a | b | tie; None: no readable vote
    votes: Mapped[list[Any]]  # [{order, choice, rationale}]
    created_at: Mapped[datetime] = _now()


class ImportedSample(Base):
    """A sample written elsewhere, imported with its sample-evaluation job: one per item (the
    item holds its prompt and metadata)."""

    __tablename__ = "samples"
    __table_args__ = (Index("ix_samples_job_position", "job_id", "position"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"), unique=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    position: Mapped[int] = mapped_column(Integer)  # the item's, for ordered pagination
    thoughts: Mapped[list[Any]]  # strings, in order; empty when the file gave none
    response: Mapped[str] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(String(200))  # the file's, as text
    created_at: Mapped[datetime] = _now()


class SampleEvaluation(Base):
    """What the grader, guard and judge said of one imported sample: its item's result. A
    field is None when its role was not asked for (or, for the judge, the other set had no
    sample of the prompt)."""

    __tablename__ = "sample_evaluations"
    __table_args__ = (Index("ix_sample_evaluations_job_position", "job_id", "position"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"), unique=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    position: Mapped[int] = mapped_column(Integer)
    scores: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSONB)  # as Cot.scores
    grade_error: Mapped[str | None] = mapped_column(Text)
    guard: Mapped[dict[str, Any] | None] = mapped_column(
        NULLABLE_JSONB
    )  # {unsafe, categories, rationale, error}
    # The judge against the other set's sample (the item's baseline_item_id): a | b | tie,
    # from the other's side as `a`; None with votes: no readable vote; no votes: not judged.
    winner: Mapped[str | None] = mapped_column(String(8))
    votes: Mapped[list[Any] | None] = mapped_column(NULLABLE_JSONB)
    created_at: Mapped[datetime] = _now()


class ModelAnswer(Base):
    """A model evaluation item: which model under test (the plan's target number) answers
    which benchmark prompt, what is expected of a safe model, and, once the item completed,
    the judges' verdicts on the answer. The answer's text is its `respond` turn (hazardous:
    a harmful prompt's answer may be harmful), so this row holds flags only."""

    __tablename__ = "model_answers"
    __table_args__ = (Index("ix_model_answers_job_target", "job_id", "target"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"), unique=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    owner_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))  # the job's owner
    target: Mapped[int] = mapped_column(Integer)  # index into the plan's targets
    benchmark: Mapped[str] = mapped_column(String(100))
    category: Mapped[str] = mapped_column(String(100))
    expected: Mapped[str] = mapped_column(String(8))  # refuse | comply
    # Set when the item completes; None before, or (verdicts) when the judge was unreadable.
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    unsafe: Mapped[bool | None] = mapped_column(Boolean)
    refused: Mapped[bool | None] = mapped_column(Boolean)
    judged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Annotation(Base):
    """A human review of one CoT, imported from a labeling tool. Append-only: the model's
    output is never changed, and a re-imported version of the same annotation is a no-op,
    while an edited one adds a row and a deleted one adds a retraction.

    An annotation's identity is (owner, item, source, the tool's id): tools number their
    annotations per instance (Label Studio from 1), so the tool's id alone names nothing, and
    no import of one key or one tool instance can change what another's reviews mean. The
    latest version of an identity counts; a retraction is a version that counts as nothing."""

    __tablename__ = "annotations"
    __table_args__ = (
        UniqueConstraint(
            "owner_key_id", "item_id", "source", "external_id", "annotated_at", name="uq_annotations_version"
        ),
        Index("ix_annotations_item", "item_id", "annotated_at"),
        Index("ix_annotations_job", "job_id"),
        Index("ix_annotations_owner_external", "owner_key_id", "source", "external_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))  # the job's owner
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    source: Mapped[str] = mapped_column(String(16))  # label_studio | argilla
    external_id: Mapped[str] = mapped_column(String(200))  # the tool's id for this annotation
    # The webhook that delivered it; None: imported from a file. No foreign key: a revoked
    # webhook may be deleted, and its reviews still name it (another webhook's deletions
    # must leave them alone).
    webhook_id: Mapped[uuid.UUID | None]
    annotator: Mapped[str] = mapped_column(String(200))
    annotated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # True: the annotation was deleted in the tool; this version withdraws it.
    retracted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    verdict: Mapped[str | None] = mapped_column(String(8))  # accept | reject; None: no decision
    edited_response: Mapped[str | None] = mapped_column(Text)  # the reviewer's version, if any
    policy_faithfulness: Mapped[int | None] = mapped_column(Integer)  # 1-5
    flagged_thoughts: Mapped[list[Any]] = mapped_column(
        JSONB, default=list
    )  # refined thought numbers, 1-based
    comment: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[dict[str, Any]]  # what the tool sent, for audit
    created_at: Mapped[datetime] = _now()


class Webhook(Base):
    """An endpoint a labeling tool delivers reviews to, owned by one API key: its secret
    admits reviews of that key's items only, so a leaked secret exposes one tenant at most.
    The secret is stored as SHA-256 (it is random and long, like an API key)."""

    __tablename__ = "webhooks"
    __table_args__ = (
        # A key's webhooks, oldest first, as GET /v1/webhooks pages them.
        Index("ix_webhooks_owner_created", "owner_key_id", "created_at", "id"),
        UniqueConstraint("owner_key_id", "idempotency_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))
    source: Mapped[str] = mapped_column(String(16))  # label_studio
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The POST that made it: its Idempotency-Key (None: it sent none) and RequestHash.value.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))


class WebhookRejection(Base):
    """A delivery a webhook refused, with why. Label Studio sends each delivery once and keeps
    no failure log, so this is the only trace of a review that did not arrive. The body is
    kept only for deliveries that carried the right secret (the owner's own data)."""

    __tablename__ = "webhook_rejections"
    __table_args__ = (Index("ix_webhook_rejections_webhook_received", "webhook_id", "received_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id"))
    owner_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))
    received_at: Mapped[datetime] = _now()
    code: Mapped[str] = mapped_column(String(32))  # the error code the tool was answered with
    message: Mapped[str] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)  # as received (capped); None: not authenticated


class JobDeletion(Base):
    """The trace a deleted job leaves (DELETE /v1/jobs/{id}): which key deleted it, when, and
    how many rows of each table went with it. That key reads it (GET /v1/deletions), numbered
    among its own deletions: the row ids, one sequence for all keys, would count the others'."""

    __tablename__ = "job_deletions"
    __table_args__ = (Index("ix_job_deletions_key_number", "deleted_by_key_id", "number", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    number: Mapped[int] = mapped_column(BigInteger)  # 1, 2, 3, ... per deleting key
    job_id: Mapped[uuid.UUID]  # no foreign key: the job is gone
    mode: Mapped[str] = mapped_column(String(32))  # the job's plan mode
    deleted_by_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))  # the job's owner
    deleted_at: Mapped[datetime] = _now()
    row_counts: Mapped[dict[str, Any]]  # {table: rows deleted}


class CallbackStatus(StrEnum):
    """pending -> delivered | gave_up | refused. Pending deliveries are due at next_attempt_at."""

    PENDING = "pending"
    DELIVERED = "delivered"  # the receiver answered 2xx
    GAVE_UP = "gave_up"  # still failing when the retry period ran out
    REFUSED = "refused"  # its host left the operator's allow-list: never sent again


class CallbackDelivery(Base):
    """The outbox: a job's end to announce to its callback URL, written in the transaction
    that finished the job, and sent (and retried) by the workers. The body is frozen then."""

    __tablename__ = "callback_deliveries"
    __table_args__ = (
        # Each key's pending deliveries in the order they fall due: the workers' claims
        # (app/store/callbacks.py claim_due) take the keys in turns from it.
        Index(
            "ix_callback_deliveries_owner_due",
            "owner_key_id",
            "next_attempt_at",
            postgresql_where=text(f"status = '{CallbackStatus.PENDING}'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # One per job: its end. Deleting the job deletes its deliveries and their log.
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    owner_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))  # the job's owner
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]]  # the JSON body, signed anew at each attempt
    status: Mapped[str] = mapped_column(String(16), default=CallbackStatus.PENDING)  # a CallbackStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far; the claim token
    # When a worker may send it next: due, or backed off, or leased to the worker sending it.
    next_attempt_at: Mapped[datetime] = _now()
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CallbackAttempt(Base):
    """One try at a delivery, for its owner to read: the receiver's status code or our
    words for what failed, and the first characters of its answer."""

    __tablename__ = "callback_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "number"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("callback_deliveries.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # the delivery's attempt counter when it was sent
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer)  # None: no answer (or not sent)
    error: Mapped[str | None] = mapped_column(Text)  # None: delivered
    response_snippet: Mapped[str | None] = mapped_column(Text)  # capped: CALLBACK_SNIPPET_CHARS
