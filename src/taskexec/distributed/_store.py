"""Redis: each run's results (the first one per task wins), and the registry of live workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, ValidationError
from redis.exceptions import RedisError

from .._errors import ClusterUnavailableError
from .._models import ExecutionError, ExecutionResult, ExecutionStatus
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

# Server-side scripts, so that each step of a task is one round trip to Redis.
# KEYS: result, duplicates counter, lease. ARGV: result, ttl, lease token ('' for none).
# Returns nil if stored (or already stored by this very call, retried), else the stored one.
# Either way the writer's lease (if it still holds
# it) is released in the same round trip: the task has a result, nobody needs to hold it.
_PUT_FIRST = """
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
local stored = redis.call('GET', KEYS[1])
-- The very same result: a retry whose first answer was lost with the connection.
if stored == ARGV[1] then return false end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return stored
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
# Taking a task under a lease. KEYS: cancelled mark, result, lease, attempts (a set of the
# lease tokens of the takes that did not hand the task back), executions counter.
# ARGV: token, lease ttl in ms, result ttl in s, poison limit.
# Returns 1 cancelled, 2 stored, 3 leased by another taker (its lease is live), 4 every one of
# ``limit`` earlier takers died with it (poison); else takes the lease, counts the attempt and
# the execution, and returns 0. The lease expires on Redis's clock unless renewed.
_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 3 end
if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[4]) then return 4 end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[3])
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[3])
return 0
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


async def connect_redis(cluster: Cluster) -> aioredis.Redis:
    """Return a client of the cluster's Redis, after checking that it answers.

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
        )
        client: aioredis.Redis = aioredis.Redis.from_pool(pool)
    except ValueError as exc:
        raise ClusterUnavailableError(
            f"results URL {redact_url(cluster.results_url)}: {cluster.redactor()(str(exc))}"
        ) from None
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
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
        self._claim = client.register_script(_CLAIM)
        self._take = client.register_script(_TAKE)
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

    @property
    def lease_ttl_ms(self) -> int:
        """How long a lease lives unrenewed (``Cluster.lease_s``; workers renew theirs three
        times as often, on a loop of their own, apart from the registry's heartbeat)."""
        return max(1, int(self.cluster.lease_s * 1000))

    async def put_first(
        self, run_id: str, result: ExecutionResult, lease: str = ""
    ) -> ExecutionResult:
        """Store ``result`` unless the task has one; return the one that counts.

        One round trip: a server-side script stores the result if it is the first, and
        otherwise counts a duplicate and returns the stored one; it also releases the task's
        lease if ``lease`` (a token from :meth:`take`) still holds it.
        """
        task_id = result.task_id
        keys = [
            self._result_key(run_id, task_id),
            self._counter(run_id, "duplicates"),
            self._lease_key(run_id, task_id),
        ]
        args: list[str | int] = [result.model_dump_json(), self.cluster.result_ttl_s, lease]
        current = await self._put_first(keys=keys, args=args)
        if current is None:
            return result
        return self._decode(run_id, result.task_id, current)

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

    async def take(self, run_id: str, task_id: str, token: str) -> str | None:
        """Take a task under a lease held by ``token``, unless it should not run here now.

        Returns None when taken (the execution and the attempt are counted); else
        :data:`CANCELLED`, :data:`STORED`, :data:`LEASED` (another taker's lease is live: wait
        for its result or its expiry) or :data:`POISON` (``delivery_limit`` earlier takers
        died with it). One round trip.
        """
        keys = [
            self.cluster.key("run", run_id, "cancelled"),
            self._result_key(run_id, task_id),
            self._lease_key(run_id, task_id),
            self._attempts_key(run_id, task_id),
            self._counter(run_id, "executions"),
        ]
        args: list[str | int] = [
            token,
            self.lease_ttl_ms,
            self.cluster.result_ttl_s,
            self.cluster.delivery_limit,
        ]
        found = await self._take(keys=keys, args=args)
        return (None, CANCELLED, STORED, LEASED, POISON)[int(found)]

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

    async def leased(self, run_id: str, task_ids: Sequence[str]) -> set[str]:
        """Return those of ``task_ids`` that a worker holds under a live lease."""
        held: set[str] = set()
        for start in range(0, len(task_ids), _MGET_CHUNK):
            chunk = task_ids[start : start + _MGET_CHUNK]
            values = await self.client.mget([self._lease_key(run_id, t) for t in chunk])
            held.update(t for t, v in zip(chunk, values, strict=True) if v is not None)
        return held

    async def get_many(self, run_id: str, task_ids: Sequence[str]) -> dict[str, ExecutionResult]:
        """Return the stored results of those of ``task_ids`` that have one."""
        found: dict[str, ExecutionResult] = {}
        for start in range(0, len(task_ids), _MGET_CHUNK):
            chunk = task_ids[start : start + _MGET_CHUNK]
            values = await self.client.mget([self._result_key(run_id, t) for t in chunk])
            for task_id, value in zip(chunk, values, strict=True):
                if value is not None:
                    found[task_id] = self._decode(run_id, task_id, value)
        return found

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
        waits on it instead of sending it again)."""
        await self.client.set(
            self._sent_key(run_id, task_id), inputs.encode(), ex=self.cluster.result_ttl_s
        )

    async def sent_many(self, run_id: str, task_ids: Sequence[str]) -> dict[str, str]:
        """Return the inputs digests of those of ``task_ids`` an orchestrator sent."""
        found: dict[str, str] = {}
        for start in range(0, len(task_ids), _MGET_CHUNK):
            chunk = task_ids[start : start + _MGET_CHUNK]
            values = await self.client.mget([self._sent_key(run_id, t) for t in chunk])
            for task_id, value in zip(chunk, values, strict=True):
                if value is not None:
                    found[task_id] = (
                        value.decode(errors="replace") if isinstance(value, bytes) else value
                    )
        return found

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

    async def served_agents(self) -> set[str]:
        """Return the agents that at least one live worker serves."""
        return {a for w in await self.workers() for a in w.agents}


def worker_info(
    name: str,
    host: str,
    pid: int,
    agents: Iterable[str],
    concurrency: int,
    in_flight: int,
    done: int,
    started_at: float,
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
