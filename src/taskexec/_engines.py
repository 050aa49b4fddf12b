"""Which engine runs a call: the one place the rollback flag is read.

Every entry point (``TaskExecutor.execute``, ``ProjectOrchestrator.execute_tasks`` / ``run`` /
``stream``, the sync shims, the command line) describes its work as a :class:`Job` (one task) or
a :class:`Batch` (many, with dependencies) and hands it to :func:`current_engine`. An engine
runs both, on an event loop (``execute``, ``execute_tasks``), and may run them in the calling
thread for blocking callers (``runs_in_caller_thread``). A new way to run tasks is a new
:class:`Engine` subclass registered in :data:`ENGINES`, not another ``if`` at each entry point.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

from ._async_engine import execute_task, run_batch
from ._calls import CallSettings, Roster
from ._errors import ConfigurationError, PlanError
from ._graph import graph_problems
from ._models import Agent, AgentTask, EngineName, ExecutionResult, Mode
from .bus import Bus
from .flags import get_engine

__all__ = (
    "ENGINES",
    "AsyncEngine",
    "Batch",
    "Engine",
    "Job",
    "LegacyEngine",
    "current_engine",
    "dispatched",
    "work_of",
)

F = TypeVar("F", bound=Callable[..., Any])
OnResult = Callable[[ExecutionResult], None]


@dataclass(frozen=True, slots=True)
class Job:
    """One task, with the agents and call settings of the executor it came through."""

    roster: Roster
    settings: CallSettings
    task: AgentTask
    agent: str | Agent | None = None
    mode: Mode | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Many tasks with dependencies, a concurrency bound and fail-fast, and where events go."""

    roster: Roster
    settings: CallSettings
    tasks: list[AgentTask]
    fail_fast: bool
    limit: int
    bus: Bus
    #: Called with each result the moment it is known (also a task cut off by cancellation).
    on_result: OnResult | None = None

    def with_results_to(self, on_result: OnResult) -> Batch:
        """Return the same batch, reporting each result to ``on_result``."""
        return replace(self, on_result=on_result)

    def check(self) -> None:
        """Raise PlanError listing every problem before anything runs.

        Duplicate ids, unknown dependencies, cycles, and tasks whose agent or mode cannot be
        resolved.
        """
        problems = graph_problems(self.tasks)
        for index, task in enumerate(self.tasks):
            try:
                self.roster.resolve(task)
            except ConfigurationError as exc:
                problems.append(f"tasks[{index}] (id {task.id!r}): {exc}")
        if problems:
            raise PlanError(problems)


class Engine(ABC):
    """A way to run jobs and batches; the same results, statuses and error kinds on each."""

    name: ClassVar[EngineName]
    #: True when blocking callers should run work in their own thread with
    #: :meth:`execute_blocking` / :meth:`execute_tasks_blocking`, not on the bridge's loop.
    runs_in_caller_thread: ClassVar[bool] = False

    @abstractmethod
    async def execute(self, job: Job) -> ExecutionResult:
        """Run one task from a coroutine."""

    @abstractmethod
    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        """Run a batch from a coroutine: one result per task, in input order."""

    def execute_blocking(self, job: Job) -> ExecutionResult:
        """Run one task in the calling thread (only where ``runs_in_caller_thread``)."""
        raise NotImplementedError

    def execute_tasks_blocking(self, batch: Batch) -> list[ExecutionResult]:
        """Run a batch in the calling thread (only where ``runs_in_caller_thread``)."""
        raise NotImplementedError

    def run_blocking(self, work: Job | Batch) -> Any:
        """Run a job or a batch in the calling thread."""
        if isinstance(work, Job):
            return self.execute_blocking(work)
        return self.execute_tasks_blocking(work)


class AsyncEngine(Engine):
    """The default: tasks run concurrently on the caller's event loop."""

    name: ClassVar[EngineName] = "async"

    async def execute(self, job: Job) -> ExecutionResult:
        return await execute_task(job.roster, job.settings, job.task, job.agent, job.mode)

    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        batch.check()
        return await run_batch(batch)


class LegacyEngine(Engine):
    """The rollback flag's engine: the pre-refactor sync code, one task after another.

    From a coroutine it runs in a worker thread, so the caller's event loop is never blocked;
    from a blocking caller it runs in that caller's thread, without any event loop of the sync
    bridge, so that the rollback path does not depend on the bridge.
    """

    name: ClassVar[EngineName] = "legacy"
    runs_in_caller_thread: ClassVar[bool] = True

    async def execute(self, job: Job) -> ExecutionResult:
        return await asyncio.to_thread(self.execute_blocking, job)

    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        # The batch is checked once, in the worker thread; a PlanError comes back from there.
        return await asyncio.to_thread(self.execute_tasks_blocking, batch)

    def execute_blocking(self, job: Job) -> ExecutionResult:
        from ._legacy import LegacyRunner  # the legacy engine is loaded only when used

        return LegacyRunner(job.roster, job.settings).execute(job.task, job.agent, job.mode)

    def execute_tasks_blocking(self, batch: Batch) -> list[ExecutionResult]:
        from ._legacy import LegacyRunner

        batch.check()
        runner = LegacyRunner(batch.roster, batch.settings)
        return runner.execute_tasks(batch.tasks, batch.fail_fast, batch.on_result)


#: Every engine by the name the rollback flag uses.
ENGINES: dict[EngineName, Engine] = {e.name: e for e in (AsyncEngine(), LegacyEngine())}


#: The environment variables that send work to workers (``taskexec.distributed``), named here
#: so that an in-process call does not import the broker and Redis clients to look at them.
CLUSTER_ENV_VARS = ("TASKEXEC_BROKER_URL", "TASKEXEC_RESULTS_URL")


def current_engine() -> Engine:
    """Return the engine for the call being made now, from settings read at call time.

    The rollback flag first: ``legacy`` runs in-process whatever else is set. Otherwise a
    configured cluster (``TASKEXEC_BROKER_URL`` and ``TASKEXEC_RESULTS_URL``) runs tasks on its
    workers, and without one the async engine runs them here.
    """
    name = get_engine()
    if name == "async" and any(os.environ.get(v, "").strip() for v in CLUSTER_ENV_VARS):
        from .distributed import Cluster, WorkersEngine

        cluster = Cluster.from_env()
        assert cluster is not None
        return WorkersEngine(cluster)
    return ENGINES[name]


def dispatched(build: Callable[..., Job | Batch]) -> Callable[[F], F]:
    """Mark a public async method whose work an engine runs, with how to describe that work.

    ``build`` takes the method's own arguments (``self`` first) and returns the :class:`Job` or
    :class:`Batch`. The sync bridge uses it to hand the work to an engine that runs in the
    caller's thread, without calling the coroutine at all.
    """

    def mark(method: F) -> F:
        method.__taskexec_work__ = build  # type: ignore[attr-defined]
        return method

    return mark


def work_of(method: Callable[..., Any], args: Any, kwargs: Any) -> Job | Batch | None:
    """Return the work a call of a :func:`dispatched` bound method stands for, or None."""
    function = getattr(method, "__func__", method)
    build = getattr(function, "__taskexec_work__", None)
    if build is None:
        return None
    work: Job | Batch = build(method.__self__, *args, **kwargs)  # type: ignore[attr-defined]
    return work
