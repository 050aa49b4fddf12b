"""Redis: each run's results (the first one per task wins), and the registry of live workers."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, ValidationError
from redis.exceptions import RedisError

from .._errors import ClusterUnavailableError
from .._models import ExecutionError, ExecutionResult, ExecutionStatus
from ._batch import Batched
from ._config import Cluster, redact_url

__all__ = (
    "LEASED",
    "POISON",
    "STORED",
    "ResultStore",
    "WorkerInfo",
    "connect_redis",
    "worker_info",
)

log = logging.getLogger("taskexec")
_MGET_CHUNK = 500
#: Connections to Redis per process: each round trip is short, so a few serve many tasks.
REDIS_CONNECTIONS = 32
#: How long a Redis command may go unanswered before it fails. Every command here takes well
#: under a millisecond; without a bound, a Redis that stops answering without closing the
#: connection (a partition that drops packets, a paused host) holds a task, a heartbeat or a
#: poll for ever (redis-py waits without limit by default).
REDIS_COMMAND_TIMEOUT_S = 10.0
#: :meth:`ResultStore.skip_reason` of a task that has a result, and of one whose run ended.
STORED = "it already has a result"
CANCELLED = "its run was cancelled"
#: :meth:`ResultStore.take` of a task another worker holds, and of one every taker died with.
LEASED = "another worker holds it under a live lease"
POISON = "every worker that took it died"

# Server-side scripts, so that each step of a task is one round trip to Redis, and the steps of
# tasks that happen together one round trip for all of them (see _batch.py).
# Storing results: KEYS, three per result: result, duplicates counter, lease. ARGV: ttl, then
# four per result: result, lease token ('' for none), the run's notification channel, task id.
# Returns, per result, 0 if it was stored (or already stored by this very call, retried), else
# the stored one. Either way the writer's lease (if it still holds it) is released in the same
# round trip (the task has a result, nobody needs to hold it), and the task's id is published
# on its run's channel (one JSON list per run): whoever waits on it reads the result that counts
# from the store.
_PUT_FIRST = """
local out, ids, channels = {}, {}, {}
for i = 0, #KEYS / 3 - 1 do
  local k, a = i * 3, 1 + i * 4
  local token = ARGV[a + 2]
  if token ~= '' and redis.call('GET', KEYS[k + 3]) == token then redis.call('DEL', KEYS[k + 3]) end
  local stored = 0
  if not redis.call('SET', KEYS[k + 1], ARGV[a + 1], 'NX', 'EX', ARGV[1]) then
    stored = redis.call('GET', KEYS[k + 1])
    -- The very same result: a retry whose first answer was lost with the connection.
    if stored == ARGV[a + 1] then
      stored = 0
    else
      redis.call('INCR', KEYS[k + 2])
      redis.call('EXPIRE', KEYS[k + 2], ARGV[1])
    end
  end
  out[i + 1] = stored
  local channel = ARGV[a + 3]
  if ids[channel] == nil then
    ids[channel] = {}
    table.insert(channels, channel)
  end
  table.insert(ids[channel], ARGV[a + 4])
end
for _, channel in ipairs(channels) do redis.call('PUBLISH', channel, cjson.encode(ids[channel])) end
return out
"""
# Marking tasks sent: KEYS, two per task: the mark, the record of a worker that could not read
# an earlier message of the task (dropped: it is about a message of before). ARGV: ttl, then
# the inputs digest of each.
_MARK_SENT = """
for i = 1, #KEYS / 2 do
  redis.call('SET', KEYS[2 * i - 1], ARGV[i + 1], 'EX', ARGV[1])
  redis.call('DEL', KEYS[2 * i])
end
return 0
"""
# KEYS: cancelled mark, result, executions counter. ARGV: ttl. Returns 1 cancelled, 2 stored,
# else counts the execution and returns 0 (a take without a lease; see _TAKE).
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[1])
return 0
"""
# Taking tasks under leases. KEYS, five per task: cancelled mark, result, lease, attempts (a set
# of the lease tokens of the takes that did not hand the task back), executions counter.
# ARGV: lease ttl in ms, result ttl in s, poison limit, then per task its lease token and the
# token of a lease to take over ('' for none: a lease held by a taker known to be dead).
# Returns, per task, 1 cancelled, 2 stored, 3 leased by another taker (its lease is live), 4
# every one of ``limit`` earlier takers died with it (poison); else takes the lease, counts the
# attempt and the execution, and gives 0. The lease expires on Redis's clock unless renewed.
# Two deliveries of one task in one call: the first takes it, the second finds it leased.
_TAKE = """
local out = {}
for i = 0, #KEYS / 5 - 1 do
  local k = i * 5
  local code = 0
  local lease = redis.call('GET', KEYS[k + 3])
  if redis.call('EXISTS', KEYS[k + 1]) == 1 then code = 1
  elseif redis.call('EXISTS', KEYS[k + 2]) == 1 then code = 2
  elseif lease and lease ~= ARGV[5 + 2 * i] then code = 3
  elseif redis.call('SCARD', KEYS[k + 4]) >= tonumber(ARGV[3]) then code = 4
  else
    local token = ARGV[4 + 2 * i]
    redis.call('SET', KEYS[k + 3], token, 'PX', ARGV[1])
    redis.call('SADD', KEYS[k + 4], token)
    redis.call('EXPIRE', KEYS[k + 4], ARGV[2])
    redis.call('INCR', KEYS[k + 5])
    redis.call('EXPIRE', KEYS[k + 5], ARGV[2])
  end
  out[i + 1] = code
end
return out
"""
# A take handed back (a worker stopping, or one that cannot finish for want of Redis): it
# releases its lease and no longer counts as an attempt. KEYS: lease, attempts, executions
# counter. ARGV: token, 1 if the task ran (else the take's execution is not counted either:
# a take whose answer was lost with the connection). Idempotent: counted back only once.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('SREM', KEYS[2], ARGV[1]) == 1 and ARGV[2] == '0' then
  redis.call('DECR', KEYS[3])
end
return 0
"""
# Renewing a worker's leases, one round trip per heartbeat. KEYS: leases. ARGV: ttl in ms,
# then one token per lease. Returns how many were still held (and are renewed).
_RENEW = """
local held = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    held = held + 1
  end
end
return held
"""
# The registry: a sorted set of worker names by expiry, and a hash of their registrations.
# Expiries are on Redis's clock, so that workers and orchestrators on machines whose clocks
# differ agree on who is live. Listing is O(workers), never a scan of the keyspace.
# KEYS: expiries, registrations. ARGV: name, registration, ttl in ms.
_REGISTER = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 0
"""
# KEYS: expiries, registrations. ARGV: the longest ttl a registration may have, in ms.
# Returns the live workers' registrations. An expiry further away than a heartbeat's ttl was
# not written by a worker (it renews with three heartbeats): dropped as expired, so that a
# forged "live for a year" entry cannot keep a task waiting for a worker that does not exist.
_LIVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local latest = '(' .. (now + tonumber(ARGV[1]))
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], latest, '+inf')) do
  table.insert(dead, name)
end
for _, name in ipairs(dead) do
  redis.call('ZREM', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
if #live == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(live))
"""


async def connect_redis(cluster: Cluster, name: str | None = None) -> aioredis.Redis:
    """Return a client of the cluster's Redis, after checking that it answers.

    Every connection of the client is named ``name`` (``CLIENT SETNAME``) if given: a worker
    names its connections so that others can tell when it is gone.

    Raises:
        ClusterUnavailableError: Redis cannot be reached; the message names the URL (password
            redacted) and the cause.
    """
    try:
        # A blocking pool: a task that finds every connection busy waits for one. redis-py's
        # default pool raises MaxConnectionsError past 100 connections instead, which a worker
        # running 500 tasks at once hits (seen in a profile of the throughput benchmark).
        pool = aioredis.BlockingConnectionPool.from_url(
            cluster.results_url,
            max_connections=REDIS_CONNECTIONS,
            timeout=30,
            socket_connect_timeout=5,
            socket_timeout=REDIS_COMMAND_TIMEOUT_S,
            health_check_interval=10,
            client_name=name,
        )
        client: aioredis.Redis = aioredis.Redis.from_pool(pool)
    except ValueError as exc:
        raise ClusterUnavailableError(
            f"results URL {redact_url(cluster.results_url)}: {cluster.redactor()(str(exc))}"
        ) from None
    try:
        await client.ping()
    except BaseException as exc:
        # Cancelled too (a loop that ends while a worker or orchestrator starts): the
        # connection is closed here, not left to the garbage collector on a dead loop.
        await client.aclose()
        if not isinstance(exc, (RedisError, OSError)):
            raise
        cause = cluster.redactor()(str(exc) or type(exc).__name__)
        raise ClusterUnavailableError(
            f"cannot reach Redis at {redact_url(cluster.results_url)}: {cause}"
        ) from None
    return client


class WorkerInfo(BaseModel):
    """A live worker, as it registers itself (renewed every heartbeat)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    host: str
    pid: int
    agents: list[str]
    concurrency: int
    in_flight: int = 0
    done: int = 0
    started_at: float
    seen_at: float
    #: The task protocols the worker reads (an earlier worker registers none: ``task/1`` only,
    #: so orchestrators send it no batches).
    protocols: list[str] = ["task/1"]
    #: The agents of tasks delivered to this worker that wait for one of its slots (unleased).
    holding: list[str] = []


class ResultStore:
    """One cluster's keys in Redis.

    Results live under ``<ns>:run:<run>:result:<task>``, written with ``SET NX``: the first
    writer wins, a later one (a task that ran twice after a worker crash) only counts a
    duplicate. Workers register in ``<ns>:workers:*`` with an expiry that their heartbeat
    renews, so a worker that dies drops out of the registry by itself.
    """

    def __init__(self, client: aioredis.Redis, cluster: Cluster) -> None:
        self.client = client
        self.cluster = cluster
        self._put_first = client.register_script(_PUT_FIRST)
        self._mark_sent = client.register_script(_MARK_SENT)
        self._claim = client.register_script(_CLAIM)
        self._take = client.register_script(_TAKE)
        # The calls made together go out together (one script call for all of them).
        self._puts: Batched[tuple[str, ExecutionResult, str], bytes | int] = Batched(self._put_many)
        self._takes: Batched[tuple[str, str, str, str], int] = Batched(self._take_many)
        self._marks: Batched[tuple[str, str, str], None] = Batched(self._mark_many)
        self._connected: Batched[str, bool] = Batched(self._connected_many)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._register = client.register_script(_REGISTER)
        self._live = client.register_script(_LIVE)
        self._unreadable_warned = False

    def _result_key(self, run_id: str, task_id: str) -> str:
        return self.cluster.key("run", run_id, "result", task_id)

    def _counter(self, run_id: str, name: str) -> str:
        return self.cluster.key("run", run_id, name)

    def _lease_key(self, run_id: str, task_id: str) -> str:
        return self.cluster.key("run", run_id, "lease", task_id)

    def _attempts_key(self, run_id: str, task_id: str) -> str:
        return self.cluster.key("run", run_id, "attempts", task_id)

    def done_channel(self, run_id: str) -> str:
        """The run's notification channel: the id of each task that got a result (or whose
        result was asked for again) is published there by the script that stores it."""
        return self.cluster.key("done", run_id)

    @property
    def done_pattern(self) -> str:
        """Every run's notification channel (one subscription per orchestrator)."""
        return self.cluster.key("done", "*")

    def _rejected_key(self, run_id: str, task_id: str) -> str:
        return self.cluster.key("run", run_id, "rejected", task_id)

    async def record_rejection(self, run_id: str, task_id: str, digest: str, reason: str) -> None:
        """Record that a worker could not read a message naming this task (its digest and
        why), and tell the run. Only the orchestrator that sent that very message fails the
        task for it: a message someone else made changes nothing."""
        value = json.dumps({"digest": digest, "reason": reason})
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self._rejected_key(run_id, task_id), value, ex=self.cluster.result_ttl_s)
            pipe.publish(self.done_channel(run_id), json.dumps({"rejected": [task_id]}))
            await pipe.execute()

    async def rejections(self, run_id: str, task_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Return the recorded rejections of those of ``task_ids`` that have one:
        task id -> (digest of the rejected message, why)."""
        found: dict[str, tuple[str, str]] = {}
        for task_id, value in await self._found(task_ids, lambda t: self._rejected_key(run_id, t)):
            try:
                data = json.loads(value)
            except ValueError:
                continue
            if isinstance(data, dict) and all(
                isinstance(data.get(k), str) for k in ("digest", "reason")
            ):
                found[task_id] = (data["digest"], data["reason"])
        return found

    async def notify(self, run_id: str, task_id: str) -> None:
        """Publish that a task has a result (a worker that found it stored, say)."""
        await self.client.publish(self.done_channel(run_id), json.dumps([task_id]))

    @property
    def lease_ttl_ms(self) -> int:
        """How long a lease lives unrenewed (``Cluster.lease_s``; workers renew theirs three
        times as often, on a loop of their own, apart from the registry's heartbeat)."""
        return max(1, int(self.cluster.lease_s * 1000))

    async def put_first(
        self, run_id: str, result: ExecutionResult, lease: str = ""
    ) -> ExecutionResult:
        """Store ``result`` unless the task has one; return the one that counts.

        One round trip (shared with the results stored at the same moment): a server-side
        script stores the result if it is the first, and otherwise counts a duplicate and
        returns the stored one; it also releases the task's lease if ``lease`` (a token from
        :meth:`take`) still holds it, and publishes the task's id on the run's channel.
        """
        current = await self._puts((run_id, result, lease))
        if current == 0:
            return result
        assert isinstance(current, bytes | str)
        return self._decode(run_id, result.task_id, current)

    async def _put_many(
        self, items: Sequence[tuple[str, ExecutionResult, str]]
    ) -> list[bytes | int]:
        keys: list[str] = []
        args: list[str | int] = [self.cluster.result_ttl_s]
        for run_id, result, lease in items:
            task_id = result.task_id
            keys += [
                self._result_key(run_id, task_id),
                self._counter(run_id, "duplicates"),
                self._lease_key(run_id, task_id),
            ]
            args += [result.model_dump_json(), lease, self.done_channel(run_id), task_id]
        return list(await self._put_first(keys=keys, args=args))

    async def claim(self, run_id: str, task_id: str) -> str | None:
        """Return why a worker should not run a task (see :meth:`skip_reason`); else count the
        execution that is about to start and return None. One round trip."""
        keys = [
            self.cluster.key("run", run_id, "cancelled"),
            self._result_key(run_id, task_id),
            self._counter(run_id, "executions"),
        ]
        found = await self._claim(keys=keys, args=[self.cluster.result_ttl_s])
        return (None, CANCELLED, STORED)[int(found)]

    async def take(
        self, run_id: str, task_id: str, token: str, dead: str | None = None
    ) -> str | None:
        """Take a task under a lease held by ``token``, unless it should not run here now.

        Returns None when taken (the execution and the attempt are counted); else
        :data:`CANCELLED`, :data:`STORED`, :data:`LEASED` (another taker's lease is live: wait
        for its result or its expiry) or :data:`POISON` (``delivery_limit`` earlier takers
        died with it). A live lease held by ``dead`` (the token of a taker known to be gone)
        is taken over. One round trip, shared with the takes made at the same moment.
        """
        found = await self._takes((run_id, task_id, token, dead or ""))
        return (None, CANCELLED, STORED, LEASED, POISON)[found]

    async def holder(self, run_id: str, task_id: str) -> str | None:
        """The token of the task's live lease, or None."""
        value = await self.client.get(self._lease_key(run_id, task_id))
        return value.decode() if isinstance(value, bytes) else value

    async def connected(self, name: str) -> bool:
        """Whether a client named ``name`` is connected to Redis now (``CLIENT LIST``, one
        for the questions asked at the same moment).

        Raises:
            redis.exceptions.ResponseError: the Redis user may not list clients (an ACL
                without ``CLIENT``, or a managed Redis that renamed the command).
        """
        return await self._connected(name)

    async def _connected_many(self, names: Sequence[str]) -> list[bool]:
        found = {client.get("name") for client in await self.client.client_list()}
        return [name in found for name in names]

    async def _take_many(self, items: Sequence[tuple[str, str, str, str]]) -> list[int]:
        keys: list[str] = []
        tokens: list[str] = []
        for run_id, task_id, token, dead in items:
            keys += [
                self.cluster.key("run", run_id, "cancelled"),
                self._result_key(run_id, task_id),
                self._lease_key(run_id, task_id),
                self._attempts_key(run_id, task_id),
                self._counter(run_id, "executions"),
            ]
            tokens += [token, dead]
        args: list[str | int] = [
            self.lease_ttl_ms,
            self.cluster.result_ttl_s,
            self.cluster.delivery_limit,
            *tokens,
        ]
        return [int(code) for code in await self._take(keys=keys, args=args)]

    async def release(self, run_id: str, task_id: str, token: str, ran: bool) -> None:
        """Hand a take back: release its lease; it no longer counts as an attempt, nor as an
        execution unless it ``ran``. A no-op for a token that took nothing, or again."""
        keys = [
            self._lease_key(run_id, task_id),
            self._attempts_key(run_id, task_id),
            self._counter(run_id, "executions"),
        ]
        await self._release(keys=keys, args=[token, int(ran)])

    async def renew(self, leases: dict[tuple[str, str], str]) -> int:
        """Renew the leases (``(run, task)`` to token) still held; return how many were."""
        if not leases:
            return 0
        keys = [self._lease_key(run_id, task_id) for run_id, task_id in leases]
        return int(await self._renew(keys=keys, args=[self.lease_ttl_ms, *leases.values()]))

    async def _found(
        self, task_ids: Sequence[str], key: Callable[[str], str]
    ) -> list[tuple[str, bytes | str]]:
        """The values of ``key(task)`` for those of ``task_ids`` that have one (MGET, in
        chunks)."""
        found: list[tuple[str, bytes | str]] = []
        for start in range(0, len(task_ids), _MGET_CHUNK):
            chunk = task_ids[start : start + _MGET_CHUNK]
            values = await self.client.mget([key(t) for t in chunk])
            found += [(t, v) for t, v in zip(chunk, values, strict=True) if v is not None]
        return found

    async def leased(self, run_id: str, task_ids: Sequence[str]) -> set[str]:
        """Return those of ``task_ids`` that a worker holds under a live lease."""
        return {t for t, _ in await self._found(task_ids, lambda t: self._lease_key(run_id, t))}

    async def get_many(self, run_id: str, task_ids: Sequence[str]) -> dict[str, ExecutionResult]:
        """Return the stored results of those of ``task_ids`` that have one."""
        stored = await self._found(task_ids, lambda t: self._result_key(run_id, t))
        return {t: self._decode(run_id, t, value) for t, value in stored}

    async def forget(self, run_id: str, task_id: str) -> None:
        """Drop a task's stored result (its inputs changed: it must run again)."""
        await self.client.delete(self._result_key(run_id, task_id))

    def _decode(self, run_id: str, task_id: str, value: bytes | str) -> ExecutionResult:
        """The stored result, or a ``failed`` one of kind ``bad_result`` that says why not.

        Something other than a worker of this version wrote the key (another program, a
        newer taskexec, a hand edit): the task gets one clear result instead of a traceback or
        a wait for a result that never parses.
        """
        try:
            result = ExecutionResult.model_validate_json(value)
        except ValueError as exc:  # pydantic's ValidationError, and JSON that is not JSON
            problems = exc.error_count() if isinstance(exc, ValidationError) else 1
            message = (
                f"the result stored for task {task_id!r} of run {run_id!r} in Redis is not a "
                f"taskexec result ({problems} problem(s)); delete key "
                f"{self._result_key(run_id, task_id)!r} or use another run id"
            )
            return _unreadable(task_id, message)
        if result.task_id != task_id:
            message = (
                f"the result stored for task {task_id!r} of run {run_id!r} in Redis belongs to "
                f"task {result.task_id!r}; delete key {self._result_key(run_id, task_id)!r}"
            )
            return _unreadable(task_id, message)
        return result

    async def skip_reason(self, run_id: str, task_id: str) -> str | None:
        """Why a worker should not run a task now: its run was cancelled, or it has a result."""
        cancelled, stored = await self.client.mget(
            [self.cluster.key("run", run_id, "cancelled"), self._result_key(run_id, task_id)]
        )
        if cancelled is not None:
            return CANCELLED
        if stored is not None:
            return STORED
        return None

    async def is_cancelled(self, run_id: str, task_id: str) -> bool:
        """True when a task's run, or the task alone, was marked cancelled (its caller left)."""
        keys = [
            self.cluster.key("run", run_id, "cancelled"),
            self.cluster.key("run", run_id, "cancelled", task_id),
        ]
        return bool(await self.client.exists(*keys))

    async def cancel_task(self, run_id: str, task_id: str) -> None:
        """Mark one task of a run cancelled (a stream whose caller left), not the whole run."""
        key = self.cluster.key("run", run_id, "cancelled", task_id)
        await self.client.set(key, b"1", ex=self.cluster.result_ttl_s)

    async def set_cancelled(self, run_id: str, cancelled: bool) -> bool:
        """Mark a run cancelled (workers then drop its queued tasks), or clear the mark;
        return whether clearing found one."""
        key = self.cluster.key("run", run_id, "cancelled")
        if cancelled:
            await self.client.set(key, b"1", ex=self.cluster.result_ttl_s)
            return True
        return bool(await self.client.delete(key))

    def _sent_key(self, run_id: str, task_id: str) -> str:
        return self.cluster.key("run", run_id, "sent", task_id)

    async def mark_sent(self, run_id: str, task_id: str, inputs: str) -> None:
        """Record that a task is being sent with these inputs (a crashed orchestrator's re-run
        waits on it instead of sending it again). One round trip, shared with the tasks
        marked at the same moment."""
        await self._marks((run_id, task_id, inputs))

    async def _mark_many(self, items: Sequence[tuple[str, str, str]]) -> list[None]:
        keys = [
            key
            for run_id, task_id, _ in items
            for key in (self._sent_key(run_id, task_id), self._rejected_key(run_id, task_id))
        ]
        args: list[str | int] = [self.cluster.result_ttl_s, *(inputs for _, _, inputs in items)]
        await self._mark_sent(keys=keys, args=args)
        return [None] * len(items)

    async def sent_many(self, run_id: str, task_ids: Sequence[str]) -> dict[str, str]:
        """Return the inputs digests of those of ``task_ids`` an orchestrator sent."""
        sent = await self._found(task_ids, lambda t: self._sent_key(run_id, t))
        return {t: v.decode(errors="replace") if isinstance(v, bytes) else v for t, v in sent}

    async def counters(self, run_id: str) -> dict[str, int]:
        """Return the run's ``executions`` and ``duplicates`` (results that lost the race)."""
        names = ("executions", "duplicates")
        values = await self.client.mget([self.cluster.key("run", run_id, n) for n in names])
        return {n: int(v or 0) for n, v in zip(names, values, strict=True)}

    # The worker registry.

    async def register(self, info: WorkerInfo) -> None:
        """Register or renew a worker, to expire after three missed heartbeats."""
        ttl_ms = max(1, int(self.cluster.heartbeat_s * 3 * 1000))
        await self._register(
            keys=self._registry(), args=[info.name, info.model_dump_json(), ttl_ms]
        )

    async def unregister(self, name: str) -> None:
        """Remove a worker from the registry (it is stopping)."""
        expiries, infos = self._registry()
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(expiries, name)
            pipe.hdel(infos, name)
            await pipe.execute()

    async def workers(self) -> list[WorkerInfo]:
        """Return the live workers, by name (and forget the expired ones)."""
        # A second of slack over a worker's own ttl, for a renewal on its way.
        longest_ms = max(1, int(self.cluster.heartbeat_s * 3 * 1000)) + 1000
        values = await self._live(keys=self._registry(), args=[longest_ms])
        found: list[WorkerInfo] = []
        unreadable = 0
        for value in values:
            if value is None:
                continue
            try:
                found.append(WorkerInfo.model_validate_json(value))
            except ValidationError:
                # A worker of another version (a rolling upgrade), or a foreign write: skipped,
                # so that one entry cannot stop every run of the cluster.
                unreadable += 1
        if unreadable and not self._unreadable_warned:
            self._unreadable_warned = True
            log.warning(
                "%d worker registration(s) in %s are not of this version of taskexec; "
                "skipped (are all workers and orchestrators on the same version?)",
                unreadable,
                self._registry()[1],
            )
        return sorted(found, key=lambda w: w.name)

    def _registry(self) -> list[str]:
        return [self.cluster.key("workers", "expiry"), self.cluster.key("workers", "info")]


def worker_info(
    name: str,
    host: str,
    pid: int,
    agents: Iterable[str],
    concurrency: int,
    in_flight: int,
    done: int,
    started_at: float,
    *,
    protocols: Iterable[str] = ("task/1",),
    holding: Iterable[str] = (),
) -> WorkerInfo:
    """Return a worker's registration as of now."""
    return WorkerInfo(
        name=name,
        host=host,
        pid=pid,
        agents=sorted(agents),
        concurrency=concurrency,
        in_flight=in_flight,
        done=done,
        started_at=started_at,
        seen_at=time.time(),
        protocols=list(protocols),
        holding=sorted(holding),
    )


def _unreadable(task_id: str, message: str) -> ExecutionResult:
    now = datetime.now(UTC)
    return ExecutionResult(
        task_id=task_id,
        status=ExecutionStatus.FAILED,
        error=ExecutionError(kind="bad_result", message=message),
        agent="",
        mode="",
        engine="async",
        attempts=0,
        started_at=now,
        finished_at=now,
        duration_s=0.0,
    )
