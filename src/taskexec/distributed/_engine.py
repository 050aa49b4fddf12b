"""The workers engine: a batch's scheduling stays in the orchestrator, its tasks run on workers.

Dependencies, the concurrency bound, fail-fast, placeholders and the bus's events are the async
engine's own scheduler (:func:`~taskexec._async_engine.run_batch`); only the step that runs one
ready task differs: the task goes to a worker through RabbitMQ and its result comes back through
Redis. So a plan gets the same results on workers as in-process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import ClassVar

from .._async_engine import run_batch
from .._engines import Batch, Engine, Job
from .._models import AgentTask, EngineName, ExecutionResult, ExecutionStatus
from .._results import Progress
from ._config import Cluster, check_run_id
from ._dispatch import Dispatcher, new_run_id

__all__ = ("WorkersEngine",)


class WorkersEngine(Engine):
    """Runs tasks on the workers of a cluster.

    Args:
        cluster: The broker and results store.
        run_id: The run's id (default: a new one per call). Results already stored under it
            are used instead of running their tasks again.
    """

    #: Workers run tasks on the async engine, so results say ``engine="async"``.
    name: ClassVar[EngineName] = "async"

    def __init__(
        self,
        cluster: Cluster,
        run_id: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.run_id = check_run_id(run_id) if run_id is not None else None
        #: After a batch: how many task executions the workers counted, and how many results
        #: lost the first-writer race (tasks that ran twice after a crash).
        self.counters: dict[str, int] = {}

    async def execute(self, job: Job) -> ExecutionResult:
        agent, mode = job.roster.resolve(job.task, job.agent, job.mode)
        async with Dispatcher(self.cluster, self.run_id or new_run_id()) as dispatcher:
            stored = await dispatcher.stored([job.task.id])
            if job.task.id in stored:
                return stored[job.task.id]
            return await dispatcher.run(job.task, agent.name, mode)

    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        batch.check()
        run_id = self.run_id or new_run_id()
        async with Dispatcher(self.cluster, run_id) as dispatcher:
            stored = await dispatcher.stored([t.id for t in batch.tasks])
            # A re-run of a run id clears its cancellation, so that its tasks run again.
            await dispatcher.store.set_cancelled(run_id, False)

            async def run_one(
                task: AgentTask, outputs: Mapping[str, str | None] | None, _: Progress
            ) -> ExecutionResult:
                if task.id in stored:
                    return stored[task.id]
                agent, mode = batch.roster.resolve(task)
                return await dispatcher.run(
                    task, agent.name, mode, dict(outputs) if outputs else None
                )

            try:
                results = await run_batch(batch, run_one)
            except asyncio.CancelledError:
                # Workers drop the run's queued tasks instead of running them for nobody.
                await asyncio.shield(dispatcher.store.set_cancelled(run_id, True))
                raise
            if any(r.status is ExecutionStatus.CANCELLED for r in results):
                await dispatcher.store.set_cancelled(run_id, True)
            self.counters = await dispatcher.store.counters(run_id)
            return results
