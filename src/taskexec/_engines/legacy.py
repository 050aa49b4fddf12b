"""The rollback flag's engine: the pre-refactor sync code, one task after another."""

from __future__ import annotations

import asyncio
from typing import ClassVar, Literal

from .._models import EngineName, ExecutionResult
from .base import Batch, Engine, Job

__all__ = ("LegacyEngine",)


class LegacyEngine(Engine):
    """Runs tasks with :mod:`taskexec._legacy`, the code the rollback flag goes back to.

    From a coroutine it runs in a worker thread, so the caller's event loop is never blocked;
    from a blocking caller it runs in that caller's thread, without any event loop of the sync
    bridge, so that the rollback path does not depend on the bridge.
    """

    name: ClassVar[str] = "legacy"
    stream_path: ClassVar[Literal["loop", "blocking"] | None] = "blocking"
    result_engine: ClassVar[EngineName] = "legacy"
    runs_in_caller_thread: ClassVar[bool] = True

    async def execute(self, job: Job) -> ExecutionResult:
        return await asyncio.to_thread(self.execute_blocking, job)

    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        # The batch is checked once, in the worker thread; a PlanError comes back from there.
        return await asyncio.to_thread(self.execute_tasks_blocking, batch)

    def execute_blocking(self, job: Job) -> ExecutionResult:
        from .._legacy import LegacyRunner  # loaded only when the rollback engine is used

        runner = LegacyRunner(job.roster, job.settings)
        outputs = dict(job.outputs) if job.outputs is not None else None
        return runner.execute(job.task, job.agent, job.mode, outputs)

    def execute_tasks_blocking(self, batch: Batch) -> list[ExecutionResult]:
        from .._legacy import LegacyRunner

        batch.check()
        runner = LegacyRunner(batch.roster, batch.settings)
        return runner.execute_tasks(batch.tasks, batch.fail_fast, batch.on_result)
