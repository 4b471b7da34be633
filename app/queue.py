"""The arq queue as the API and the sweeper use it: one arq job per item."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from uuid import UUID

from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, ReadOnlyError, TimeoutError

RUN_ITEM = "run_item"
_BATCH = 1000  # jobs per Redis call: bounded requests, and Redis is not blocked for long


# A worker's commands are tried again through a Redis restart (about a minute) instead of
# letting the first ConnectionError end its poll loop. An API request's are tried again once,
# on a new connection: a Redis that is away or hung costs the client seconds (a 503), not a
# minute per command.
WORKER_RETRIES = 40
REQUEST_RETRIES = 1


def redis_settings(redis_url: str, retries: int) -> RedisSettings:
    """arq's connection, each command tried again up to `retries` times, on a new connection,
    after a connection error, (once `bound_calls` set one) a timeout, or a READONLY: a
    failover can leave a connection on the old primary, now a replica, for good."""
    settings = RedisSettings.from_dsn(redis_url)
    settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=retries)
    settings.retry_on_error = [ConnectionError, TimeoutError, ReadOnlyError]
    settings.conn_retries = 30
    return settings


async def bound_calls(pool: ArqRedis, timeout_s: float) -> None:
    """Give arq's pool the read timeout its settings lack: a call that hears nothing for
    `timeout_s` raises TimeoutError, which `redis_settings`' retry answers by sending it again
    on a new connection. What is sent again must be harmless to repeat, as it already must be
    for a connection that broke."""
    connections = pool.connection_pool
    connections.connection_kwargs["socket_timeout"] = timeout_s
    # A connection keeps the options it was made with, reconnecting too: close those made
    # before (arq's ping and server info at start-up) and forget them, so none is used again.
    await connections.disconnect()
    connections.reset()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated


def arq_job_id(item_id: UUID, enqueues: int) -> str:
    # arq refuses a job id it still holds a result or in-progress key for; the enqueue
    # counter makes every re-enqueue of an item a new id.
    return f"item:{item_id}:{enqueues}"


def item_of_job(job_id: str) -> tuple[UUID, int]:
    """The (item id, enqueue counter) an arq_job_id was made of."""
    _, item_id, enqueues = job_id.split(":")
    return UUID(item_id), int(enqueues)


# Jobs wait in line by place, not by time. A score in the queue below LINE_END is a place in
# line; from LINE_END on it is a time in ms, as arq scores jobs: a running job's (when its mark
# runs out), a deferred one's (a Retry's backoff), or one queued by an older release. Places
# are all in arq's past, so always due. 10^12 ms is 2001-09-09: the line would need 10^12
# items to reach it.
LINE_END = 10**12


def line_key(queue_name: str) -> str:
    """The line's record: the furthest place given (under ''), and each share's last place."""
    return f"{queue_name}:line"


# For the scripts that give places: LINE_END; the front of the line: the place of the first
# job waiting, else (none waits) the place after the furthest given; and `take_places`: a
# share's `count` places after `first` ('' for none), or after its last one if that is
# further (start-time fair queueing), kept in the line's record; returns the new `first`.
FRONT_OF_LINE = f"""
local LINE_END = '{LINE_END}'
local function front_of_line(queue, line)
  local head = redis.call('ZRANGEBYSCORE', queue, '-inf', '(' .. LINE_END, 'WITHSCORES', 'LIMIT', 0, 1)
  if head[2] then return tonumber(head[2]) end
  return tonumber(redis.call('HGET', line, '') or '0') + 1
end
local function take_places(line, share, first, count)
  if share ~= '' then
    first = math.max(first, tonumber(redis.call('HGET', line, share) or '0'))
    redis.call('HSET', line, share, first + count)
  end
  if first + count > tonumber(redis.call('HGET', line, '') or '0') then
    redis.call('HSET', line, '', first + count)
  end
  return first
end
"""

# What ArqRedis.enqueue_job writes for each job (the pickled job under arq:job:<id> with
# arq's expiry, and the id in the queue's sorted set), for many jobs in one call, with NX
# in place of its WATCH/EXISTS check: a job that is already there stays as it is.
# KEYS: the queue, its line's record. ARGV: arq's job key prefix, its expiry in ms, the share
# ('' for none), how many jobs to make room for ahead of every job waiting (0: not ahead), the
# last place an earlier batch of the same call took ('' for none), then (job id, pickled job)
# pairs. Returns the last place given. A share's jobs take the places after its last one, or
# from the front of the line on if that is further (start-time fair queueing): one tenant's
# new job interleaves with the backlog of another who queued 100,000 prompts, one for one,
# instead of waiting behind it all. Jobs at the same place go in the order of their ids.
_ENQUEUE = (
    FRONT_OF_LINE
    + """
local job_key_prefix, expiry_ms, share, room, after = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local count = (#ARGV - 5) / 2
local first  -- the places given are first + 1 .. first + count
if after ~= '' then
  first = tonumber(after)
elseif room > 0 then
  first = front_of_line(KEYS[1], KEYS[2]) - room - 1
else
  first = front_of_line(KEYS[1], KEYS[2]) - 1  -- a share new to the line starts level with its front
end
first = take_places(KEYS[2], share, first, count)
for k = 1, count do
  local i = 4 + 2 * k
  redis.call('SET', job_key_prefix .. ARGV[i], ARGV[i + 1], 'PX', expiry_ms, 'NX')
  redis.call('ZADD', KEYS[1], 'NX', first + k, ARGV[i])  -- in the order given: prompts run in order
end
return first + count
"""
)


async def enqueue_items(
    redis: ArqRedis,
    queue_name: str,
    items: Iterable[tuple[UUID, int]],
    *,
    share: UUID | None = None,
    ahead: bool = False,
) -> None:
    """Enqueue (item id, enqueue counter) pairs as arq jobs of RUN_ITEM: one Redis call
    per 1,000 rather than arq's four round trips per job. Duplicates are harmless: a worker
    claims an item in Postgres before running it, and a second arq job finds nothing.
    `share`: whose turn the items take in line (the API key of the job), fairly against other
    shares' items waiting; None: right after the front of the line. `ahead`: before the jobs
    already waiting (items taken back from a dead worker resume first, not behind the
    backlog)."""
    enqueue = redis.register_script(_ENQUEUE)
    pending = list(items)
    share_id, room, after = str(share or ""), len(pending) if ahead else 0, ""
    for start in range(0, len(pending), _BATCH):
        enqueued_ms = timestamp_ms()
        args: list[str | bytes | int] = [job_key_prefix, redis.expires_extra_ms, share_id, room, after]
        for item_id, enqueues in pending[start : start + _BATCH]:
            job = serialize_job(
                RUN_ITEM, (str(item_id),), {}, None, enqueued_ms, serializer=redis.job_serializer
            )
            args += [arq_job_id(item_id, enqueues), job]
        after = str(await enqueue(keys=[queue_name, line_key(queue_name)], args=args))


async def enqueue_shares(
    redis: ArqRedis, queue_name: str, by_owner: Mapping[UUID | None, list[tuple[UUID, int]]]
) -> None:
    """Enqueue items grouped by their job's owner key, each group as its key's share."""
    for owner_key_id, items in by_owner.items():
        await enqueue_items(redis, queue_name, items, share=owner_key_id)
