"""ProjectOrchestrator: many tasks at once, in dependency order, within a concurrency bound.

The scheduling itself is the engine's (:mod:`taskexec._async_engine` on the default engine):
the orchestrator describes each run as a :class:`~taskexec._engines.base.Batch` and hands it to
the engine seam (:mod:`taskexec._engines.entry`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Self

from ._budget import check_ceiling
from ._calls import budget_settings
from ._engines import entry
from ._engines.base import Batch, check_run_id
from ._errors import InvalidValueError, PlanError
from ._executor import TaskExecutor
from ._models import Agent, AgentTask, ExecutionResult, Mode
from ._plan import Plan
from .bus import Bus, MessageBus

__all__ = ("ProjectOrchestrator",)


class ProjectOrchestrator:
    """Runs many tasks concurrently: dependencies first, at most ``max_concurrency`` at once.

    Every task handed in gets exactly one result. A task whose dependency did not succeed is
    ``skipped``; with ``fail_fast`` the first failure cancels the rest. Lifecycle events
    (``task.queued``, ``task.started``, ``task.finished``) go to :attr:`bus`.

    Args:
        executor: Runs each task; without one, the orchestrator makes (and owns) its own.
        max_concurrency: Most tasks running at once.
        bus: Where lifecycle events go and agents coordinate (default: a new :class:`MessageBus`).
        max_cost_usd: The most each run (each call of :meth:`execute_tasks`, :meth:`stream`,
            :meth:`run`) may spend, in USD; a plan's ``settings.max_cost_usd`` applies when
            this is None. A task whose worst-case cost does not fit what is left is
            ``skipped`` with error kind ``budget_exhausted``.
        allow_unpriced: With a ceiling, run agents whose price is unknown outside it, instead
            of refusing the run with :class:`UnpricedAgentError`.

    Raises:
        InvalidValueError: ``max_concurrency`` is below 1, or ``max_cost_usd`` is not a
            positive number (a ``ValueError``).
    """

    def __init__(
        self,
        executor: TaskExecutor | None = None,
        *,
        max_concurrency: int = 64,
        bus: Bus | None = None,
        max_cost_usd: float | None = None,
        allow_unpriced: bool = False,
    ) -> None:
        if max_concurrency < 1:
            raise InvalidValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
        if max_cost_usd is not None:
            check_ceiling(max_cost_usd)
        self.max_cost_usd = max_cost_usd
        self.allow_unpriced = allow_unpriced
        self._executor = executor
        self._owns_executor = executor is None
        self.max_concurrency = max_concurrency
        self.bus: Bus = bus if bus is not None else MessageBus()

    @property
    def executor(self) -> TaskExecutor:
        """The executor tasks run on (created on first use when none was given)."""
        if self._executor is None:
            self._executor = TaskExecutor()
        return self._executor

    async def execute_task(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> ExecutionResult:
        """Execute a single task through the executor.

        Args:
            task: The task.
            agent: An agent name or :class:`Agent`, winning over the task's.
            mode: A mode, winning over the task's and the agent's.

        Returns:
            The task's result.
        """
        return await self.executor.execute(task, agent, mode)

    def _batch(
        self,
        tasks: Iterable[AgentTask],
        *,
        fail_fast: bool = False,
        executor: TaskExecutor | None = None,
        limit: int | None = None,
        on_result: Callable[[ExecutionResult], None] | None = None,
        run_id: str | None = None,
        max_cost_usd: float | None = None,
    ) -> Batch:
        executor = executor or self.executor
        tasks = list(tasks)
        parts = executor.parts
        # The cost ceiling rides on the run's call settings, so every engine holds it.
        ceiling = self.max_cost_usd if self.max_cost_usd is not None else max_cost_usd
        settings = budget_settings(
            parts.settings, parts.roster, tasks, ceiling, allow_unpriced=self.allow_unpriced
        )
        return Batch(
            parts.roster,
            settings,
            tasks,
            fail_fast,
            limit or self.max_concurrency,
            self.bus,
            on_result,
            run_id,
        )

    async def execute_tasks(
        self,
        tasks: Iterable[AgentTask],
        *,
        fail_fast: bool = False,
        on_result: Callable[[ExecutionResult], None] | None = None,
        run_id: str | None = None,
    ) -> list[ExecutionResult]:
        """Execute tasks concurrently, respecting dependencies.

        Args:
            tasks: The tasks; dependencies are named by task id within this collection.
            fail_fast: Cancel everything left at the first task that does not succeed.
            on_result: Called with each result the moment its task ends (also for tasks
                skipped, or cut off by cancellation), from the thread that runs the tasks.
            run_id: On workers, the distributed run's id (1-64 letters, digits, ``_`` or
                ``-``): results stored under it for the same inputs are kept instead of running
                their tasks again (default: a new run). Checked, and otherwise unused, when
                tasks run in this process.

        Returns:
            One result per task, in input order.

        Raises:
            PlanError: Before anything runs, listing every problem (duplicate ids, unknown
                dependencies, cycles, unknown agents).
            ConfigurationError: ``run_id`` cannot name a run.
            UnpricedAgentError: With a cost ceiling, some agent's price is unknown.
        """
        if run_id is not None:
            check_run_id(run_id)  # in-process too: the same call must not fail only on workers
        batch = self._batch(tasks, fail_fast=fail_fast, on_result=on_result, run_id=run_id)
        return await entry.execute_tasks(self.executor.parts.engines, batch)

    async def stream(
        self, tasks: Iterable[AgentTask], *, fail_fast: bool = False
    ) -> AsyncIterator[ExecutionResult]:
        """Execute tasks like :meth:`execute_tasks`, yielding each result as it finishes.

        Leaving the loop early cancels the tasks still running (and waits for their cleanup).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ExecutionResult | None] = asyncio.Queue()

        def deliver(result: ExecutionResult) -> None:
            # Thread-safe: an engine may report from a worker thread (the legacy engine does).
            loop.call_soon_threadsafe(queue.put_nowait, result)

        batch = self._batch(tasks, fail_fast=fail_fast, on_result=deliver)
        # The engine checks the batch before anything runs; a PlanError ends the runner, and
        # surfaces from the first iteration, through `await runner` below.
        runner = asyncio.ensure_future(entry.execute_tasks(self.executor.parts.engines, batch))
        runner.add_done_callback(lambda _: loop.call_soon(queue.put_nowait, None))
        try:
            while (result := await queue.get()) is not None:
                yield result
            await runner
        finally:
            if not runner.done():
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner

    async def run(self, plan: Plan) -> list[ExecutionResult]:
        """Execute a plan's tasks with its agents and settings.

        Without an executor of its own, the orchestrator makes one from the plan and closes it
        afterwards; with one, the plan's agents join the executor's agents for this run.

        Args:
            plan: The plan (see :func:`taskexec.load_plan`).

        Returns:
            One result per task, in the plan's order.

        Raises:
            PlanError: The plan's agents clash with the executor's, or the plan is invalid.
        """
        settings = plan.settings
        if self._executor is None:
            executor = TaskExecutor(plan.agents, default_agent=settings.default_agent)
        else:
            executor = self._plan_executor(plan)
        limit = settings.max_concurrency or self.max_concurrency
        try:
            batch = self._batch(
                plan.tasks,
                fail_fast=settings.fail_fast,
                executor=executor,
                limit=limit,
                max_cost_usd=settings.max_cost_usd,
            )
            return await entry.execute_tasks(executor.parts.engines, batch)
        finally:
            if self._executor is None:
                await executor.aclose()  # the executor made for this plan

    def _plan_executor(self, plan: Plan) -> TaskExecutor:
        """Return the executor's view with the plan's agents added for one run."""
        assert self._executor is not None
        clashes = sorted({a.name for a in plan.agents} & set(self._executor.agents))
        if clashes:
            raise PlanError(
                [
                    f"agents: {name!r} is both a plan agent and an executor agent; rename one"
                    for name in clashes
                ]
            )
        return self._executor._derive(plan.agents, plan.settings.default_agent)

    async def aclose(self) -> None:
        """Close the executor if the orchestrator made it."""
        if self._owns_executor and self._executor is not None:
            await self._executor.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
