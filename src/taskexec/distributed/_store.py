"""Redis: each run's results (the first one per task wins), and the registry of live workers."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

from .._errors import ClusterUnavailableError
from .._models import ExecutionResult
from ._config import Cluster, redact_url

__all__ = ("STORED", "ResultStore", "WorkerInfo", "connect_redis", "worker_info")

_MGET_CHUNK = 500
#: :meth:`ResultStore.skip_reason` of a task that has a result.
STORED = "it already has a result"


async def connect_redis(cluster: Cluster) -> aioredis.Redis:
    """Return a client of the cluster's Redis, after checking that it answers.

    Raises:
        ClusterUnavailableError: Redis cannot be reached; the message names the URL (password
            redacted) and the cause.
    """
    try:
        client: aioredis.Redis = aioredis.from_url(
            cluster.results_url, socket_connect_timeout=5, health_check_interval=10
        )
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
    duplicate. Workers register under ``<ns>:worker:<name>`` with an expiry that their heartbeat
    renews, so a worker that dies drops out of the registry by itself.
    """

    def __init__(self, client: aioredis.Redis, cluster: Cluster) -> None:
        self.client = client
        self.cluster = cluster

    def _result_key(self, run_id: str, task_id: str) -> str:
        return self.cluster.key("run", run_id, "result", task_id)

    async def put_first(self, run_id: str, result: ExecutionResult) -> ExecutionResult:
        """Store ``result`` unless the task has one; return the one that counts."""
        key = self._result_key(run_id, result.task_id)
        body = result.model_dump_json()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(key, body, nx=True, ex=self.cluster.result_ttl_s)
            pipe.get(key)
            stored, current = await pipe.execute()
        if stored:
            return result
        await self.client.incr(self.cluster.key("run", run_id, "duplicates"))
        if current is None:  # expired in between: nothing else counts
            return result
        return ExecutionResult.model_validate_json(current)

    async def get_many(self, run_id: str, task_ids: Sequence[str]) -> dict[str, ExecutionResult]:
        """Return the stored results of those of ``task_ids`` that have one."""
        found: dict[str, ExecutionResult] = {}
        for start in range(0, len(task_ids), _MGET_CHUNK):
            chunk = task_ids[start : start + _MGET_CHUNK]
            values = await self.client.mget([self._result_key(run_id, t) for t in chunk])
            for task_id, value in zip(chunk, values, strict=True):
                if value is not None:
                    found[task_id] = ExecutionResult.model_validate_json(value)
        return found

    async def skip_reason(self, run_id: str, task_id: str) -> str | None:
        """Why a worker should not run a task now: its run was cancelled, or it has a result."""
        cancelled, stored = await self.client.mget(
            [self.cluster.key("run", run_id, "cancelled"), self._result_key(run_id, task_id)]
        )
        if cancelled is not None:
            return "its run was cancelled"
        if stored is not None:
            return STORED
        return None

    async def set_cancelled(self, run_id: str, cancelled: bool) -> None:
        """Mark a run cancelled (workers then drop its queued tasks), or clear the mark."""
        key = self.cluster.key("run", run_id, "cancelled")
        if cancelled:
            await self.client.set(key, b"1", ex=self.cluster.result_ttl_s)
        else:
            await self.client.delete(key)

    async def count_execution(self, run_id: str) -> None:
        """Count one execution of a task of the run (a task that ran twice counts twice)."""
        key = self.cluster.key("run", run_id, "executions")
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, self.cluster.result_ttl_s)
            await pipe.execute()

    async def counters(self, run_id: str) -> dict[str, int]:
        """Return the run's ``executions`` and ``duplicates`` (results that lost the race)."""
        names = ("executions", "duplicates")
        values = await self.client.mget([self.cluster.key("run", run_id, n) for n in names])
        return {n: int(v or 0) for n, v in zip(names, values, strict=True)}

    # The worker registry.

    async def register(self, info: WorkerInfo) -> None:
        """Register or renew a worker, to expire after three missed heartbeats."""
        ttl_ms = max(1, int(self.cluster.heartbeat_s * 3 * 1000))
        await self.client.set(
            self.cluster.key("worker", info.name), info.model_dump_json(), px=ttl_ms
        )

    async def unregister(self, name: str) -> None:
        """Remove a worker from the registry (it is stopping)."""
        await self.client.delete(self.cluster.key("worker", name))

    async def workers(self) -> list[WorkerInfo]:
        """Return the live workers, by name."""
        keys = [k async for k in self.client.scan_iter(match=self.cluster.key("worker", "*"))]
        found: list[WorkerInfo] = []
        for start in range(0, len(keys), _MGET_CHUNK):
            values = await self.client.mget(keys[start : start + _MGET_CHUNK])
            found += [WorkerInfo.model_validate_json(v) for v in values if v is not None]
        return sorted(found, key=lambda w: w.name)

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
