"""The workers engine: a batch's scheduling stays in the orchestrator, its tasks run on workers.

Dependencies, the concurrency bound, fail-fast, placeholders and the bus's events are the async
engine's own scheduler (:func:`~taskexec._async_engine.run_batch`); only the step that runs one
ready task differs: the task goes to a worker through RabbitMQ and its result comes back through
Redis. So a plan gets the same results on workers as in-process.

The engine belongs to one executor. It opens one connection to the cluster (a
:class:`~taskexec.distributed._dispatch.Dispatcher`: AMQP connection, channel, event queue,
Redis pool) per event loop on first use, shares it between every call made through that
executor, and closes it with the executor.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator, Mapping
from typing import ClassVar

from .._async_engine import run_batch
from .._engines.base import Batch, Engine, Job, check_run_id, new_run_id
from .._engines.registry import EngineSpec, register_engine
from .._engines.selection import BROKER_ENV_VAR, RESULTS_ENV_VAR, Selection, env_value
from .._loops import close_with_loop
from .._models import AgentTask, EngineName, ExecutionResult, ExecutionStatus
from .._plugins import wants_workers
from .._results import Progress
from ._config import Cluster, redact_url
from ._dispatch import Dispatcher
from ._wire import inputs_digest

__all__ = ("WorkersEngine", "register")

log = logging.getLogger("taskexec")


class _CallRuns:
    """The runs of ``execute()`` calls on one connection.

    Each call must behave as a run of its own (a task id called again runs again), but a new
    run per call would cost a broker round trip each (listening for its results). So calls
    share one run while their task ids differ; a task id seen again in it, or a run grown to
    :attr:`SIZE` tasks, starts the next run.
    """

    SIZE = 10_000

    def __init__(self) -> None:
        self.run_id = ""
        self.task_ids: set[str] = set()

    def run_for(self, task_id: str) -> str:
        if not self.run_id or task_id in self.task_ids or len(self.task_ids) >= self.SIZE:
            self.run_id, self.task_ids = new_run_id(), set()
        self.task_ids.add(task_id)
        return self.run_id


class WorkersEngine(Engine):
    """Runs tasks on the workers of a cluster.

    Args:
        cluster: The broker and results store.
    """

    name: ClassVar[str] = "workers"
    keeps_runs: ClassVar[bool] = True
    #: Workers run tasks on the async engine, so results say ``engine="async"``.
    result_engine: ClassVar[EngineName] = "async"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # One connection per event loop (the sync bridge's, a test's, the command line's),
        # opened on first use: a connection belongs to the loop it was opened on.
        self._dispatchers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Future[Dispatcher]
        ] = weakref.WeakKeyDictionary()
        self._closers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncGenerator[None, None]
        ] = weakref.WeakKeyDictionary()
        self._call_runs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _CallRuns] = (
            weakref.WeakKeyDictionary()
        )
        self._counts: dict[str, dict[str, int]] = {}
        #: How many connections this engine has opened (one per loop it ran on).
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"<WorkersEngine cluster={self.cluster!r}>"

    async def dispatcher(self) -> Dispatcher:
        """Return this loop's connection to the cluster, opening it on first use.

        Calls that start at once share one opening; a failed opening is tried again by the
        next call.

        Raises:
            ClusterUnavailableError: The broker or Redis cannot be reached.
        """
        loop = asyncio.get_running_loop()
        opening = self._dispatchers.get(loop)
        if opening is None or (opening.done() and opening.exception() is not None):
            opening = self._dispatchers[loop] = asyncio.ensure_future(self._open())
        return await asyncio.shield(opening)

    async def _open(self) -> Dispatcher:
        dispatcher = Dispatcher(self.cluster)
        await dispatcher.open()
        self.connections_opened += 1
        # An executor that is never closed still releases its connection when its loop ends.
        self._closers[asyncio.get_running_loop()] = close_with_loop(dispatcher.aclose)
        return dispatcher

    async def aclose(self) -> None:
        """Close the connection of the running loop (and forget those of other loops)."""
        loop = asyncio.get_running_loop()
        openings = dict(self._dispatchers)
        self._dispatchers.clear()
        for owner, opening in openings.items():
            if owner is not loop:
                continue  # a connection can only be closed on its own loop; it ends with it
            closer = self._closers.pop(owner, None)
            if closer is not None:
                await closer.aclose()  # closes the dispatcher, once
                continue
            try:
                dispatcher = await opening
            except Exception:
                continue  # an opening that failed holds nothing to close
            await dispatcher.aclose()

    async def execute(self, job: Job) -> ExecutionResult:
        agent, mode = job.roster.resolve(job.task, job.agent, job.mode)
        dispatcher = await self.dispatcher()
        loop = asyncio.get_running_loop()
        runs = self._call_runs.get(loop)
        if runs is None:
            runs = self._call_runs[loop] = _CallRuns()
        run_id = runs.run_for(job.task.id)  # as in-process, a task id called again runs again
        await dispatcher.attach(run_id)
        outputs = dict(job.outputs) if job.outputs is not None else None
        return await dispatcher.run(run_id, job.task, agent.name, mode, outputs)

    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        batch.check()
        run_id = check_run_id(batch.run_id) if batch.run_id is not None else new_run_id()
        dispatcher = await self.dispatcher()
        await dispatcher.attach(run_id)
        store = dispatcher.store
        what = f"run {run_id}"
        task_ids = [t.id for t in batch.tasks]
        stored = await dispatcher.with_redis(lambda: dispatcher.stored(run_id, task_ids), what)
        before = await dispatcher.with_redis(lambda: store.counters(run_id), what)
        reused = 0
        # Tasks an earlier orchestrator of this id sent and that have no result yet: under a
        # live lease, queued, or lost. A re-run after a crash waits on them instead of sending
        # them again (and sends those nobody holds). Not after a cancellation: workers dropped
        # that run's queued tasks.
        unstored = [t for t in task_ids if t not in stored]
        sent = await dispatcher.with_redis(lambda: store.sent_many(run_id, unstored), what)
        # A re-run of a run id clears its cancellation, so that its tasks run again.
        if await dispatcher.with_redis(lambda: store.set_cancelled(run_id, False), what):
            sent = {}

        async def run_one(
            task: AgentTask, outputs: Mapping[str, str | None] | None, _: Progress
        ) -> ExecutionResult:
            nonlocal reused
            agent, mode = batch.roster.resolve(task)
            inputs = inputs_digest(task, agent.name, mode, agent.model, outputs)
            earlier = stored.get(task.id)
            if earlier is not None:
                if earlier.metadata.get("inputs") == inputs:
                    reused += 1
                    return earlier
                # Stored under this run id for other inputs (an edited plan, another plan
                # under a reused id, last week's "nightly"): it does not count; run again.
                await dispatcher.with_redis(lambda: store.forget(run_id, task.id), what)
            return await dispatcher.run(
                run_id,
                task,
                agent.name,
                mode,
                dict(outputs) if outputs else None,
                inputs,
                send=sent.get(task.id) != inputs,
            )

        try:
            results = await run_batch(batch, run_one)
        except asyncio.CancelledError:
            # Workers drop the run's queued tasks instead of running them for nobody.
            await asyncio.shield(store.set_cancelled(run_id, True))
            raise
        if any(r.status is ExecutionStatus.CANCELLED for r in results):
            await store.set_cancelled(run_id, True)
        after = await dispatcher.with_redis(lambda: store.counters(run_id), what)
        self._counts[run_id] = {
            "reused": reused,
            **{name: after[name] - before.get(name, 0) for name in after},
        }
        return results

    async def run_counts(self, run_id: str) -> dict[str, int]:
        """What a run of this engine did this time: results ``reused`` from an earlier run of
        the id (same inputs), task ``executions`` the workers counted, and ``duplicates``
        (results that lost the first-writer race: tasks that ran twice after a crash)."""
        return dict(self._counts.get(run_id, {}))


#: Whether this process has said that its calls run on workers because of the environment.
_told_environment = False


def _cluster_of(selection: Selection) -> Cluster:
    global _told_environment
    assert selection.cluster is not None
    cluster = Cluster.from_env(selection.cluster.broker, selection.cluster.results)
    assert cluster is not None
    if not _told_environment and selection.cluster.broker == env_value(BROKER_ENV_VAR):
        # Once per process, not per call: someone who exported the variables for a worker
        # (docs/DISTRIBUTED.md) and then ran an in-process example should see why it waits.
        _told_environment = True
        log.warning(
            "taskexec: calls run on the workers of the cluster that %s and %s name (%s); "
            "unset them to run in this process",
            BROKER_ENV_VAR,
            RESULTS_ENV_VAR,
            redact_url(cluster.broker_url),
        )
    return cluster


def register() -> None:
    """Register the workers engine: the async engine's calls go to workers when a cluster is
    configured (the executor's ``broker_url``/``results_url``, or the environment)."""
    register_engine(
        EngineSpec(
            "workers",
            wants_workers,
            lambda selection: WorkersEngine(_cluster_of(selection)),
            rank=100,
            key=lambda selection: selection.cluster,
        )
    )
