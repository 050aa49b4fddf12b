"""The default engine: tasks run concurrently on the caller's event loop."""

from __future__ import annotations

from typing import ClassVar, Literal

from .._async_engine import execute_task, run_batch
from .._models import EngineName, ExecutionResult
from .base import Batch, Engine, Job

__all__ = ("AsyncEngine",)


class AsyncEngine(Engine):
    """Runs each task's mode on the running loop, sharing the executor's connection pool."""

    name: ClassVar[str] = "async"
    stream_path: ClassVar[Literal["loop", "blocking"] | None] = "loop"
    result_engine: ClassVar[EngineName] = "async"

    async def execute(self, job: Job) -> ExecutionResult:
        return await execute_task(
            job.roster, job.settings, job.task, job.agent, job.mode, job.outputs
        )

    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        batch.check()
        return await run_batch(batch)
