"""ProjectOrchestrator: many tasks at once, in dependency order, within a concurrency bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Self

from ._errors import ConfigurationError, InvalidValueError, PlanError
from ._executor import Progress, TaskExecutor
from ._graph import graph_problems
from ._legacy import LegacyEngine
from ._models import (
    Agent,
    AgentTask,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
    Mode,
)
from ._plan import Plan
from .bus import Bus, MessageBus, TaskEvent, _current_bus
from .flags import get_engine
from .providers import secret_redactor

__all__ = ("ProjectOrchestrator",)

log = logging.getLogger("taskexec")
_OnResult = Callable[[ExecutionResult], None]
_INTERNAL_MESSAGE_LIMIT = 2000


class ProjectOrchestrator:
    """Runs many tasks concurrently: dependencies first, at most ``max_concurrency`` at once.

    Every task handed in gets exactly one result. A task whose dependency did not succeed is
    ``skipped``; with ``fail_fast`` the first failure cancels the rest. Lifecycle events
    (``task.queued``, ``task.started``, ``task.finished``) go to :attr:`bus`.

    Args:
        executor: Runs each task; without one, the orchestrator makes (and owns) its own.
        max_concurrency: Most tasks running at once.
        bus: Where lifecycle events go and agents coordinate (default: a new :class:`MessageBus`).

    Raises:
        InvalidValueError: ``max_concurrency`` is below 1 (a ``ValueError``).
    """

    def __init__(
        self,
        executor: TaskExecutor | None = None,
        *,
        max_concurrency: int = 64,
        bus: Bus | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise InvalidValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
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

    def _legacy_execute_task(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> ExecutionResult:
        return self.executor._legacy_execute(task, agent, mode)

    async def execute_tasks(
        self, tasks: Iterable[AgentTask], *, fail_fast: bool = False
    ) -> list[ExecutionResult]:
        """Execute tasks concurrently, respecting dependencies.

        Args:
            tasks: The tasks; dependencies are named by task id within this collection.
            fail_fast: Cancel everything left at the first task that does not succeed.

        Returns:
            One result per task, in input order.

        Raises:
            PlanError: Before anything runs, listing every problem (duplicate ids, unknown
                dependencies, cycles, unknown agents).
        """
        task_list = list(tasks)
        if get_engine() == "legacy":
            # Rollback flag: the pre-refactor engine, one task after another, in a worker
            # thread so that this event loop is never blocked.
            return await asyncio.to_thread(
                self._legacy_execute_tasks, task_list, fail_fast=fail_fast
            )
        return await self._run(self.executor, task_list, fail_fast, self.max_concurrency)

    def _legacy_execute_tasks(
        self, tasks: Iterable[AgentTask], *, fail_fast: bool = False
    ) -> list[ExecutionResult]:
        task_list = list(tasks)
        self._check(self.executor, task_list)
        return LegacyEngine(self.executor).execute_tasks(task_list, fail_fast)

    async def stream(
        self, tasks: Iterable[AgentTask], *, fail_fast: bool = False
    ) -> AsyncIterator[ExecutionResult]:
        """Execute tasks like :meth:`execute_tasks`, yielding each result as it finishes.

        Leaving the loop early cancels the tasks still running (and waits for their cleanup).
        """
        task_list = list(tasks)
        self._check(self.executor, task_list)
        queue: asyncio.Queue[ExecutionResult | None] = asyncio.Queue()
        if get_engine() == "legacy":
            loop = asyncio.get_running_loop()
            legacy = LegacyEngine(self.executor)

            def deliver(result: ExecutionResult) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, result)

            runner: asyncio.Future[list[ExecutionResult]] = asyncio.ensure_future(
                asyncio.to_thread(
                    legacy.execute_tasks,
                    task_list,
                    fail_fast,
                    deliver,
                )
            )
        else:
            runner = asyncio.create_task(
                self._run(
                    self.executor, task_list, fail_fast, self.max_concurrency, queue.put_nowait
                )
            )
        runner.add_done_callback(lambda _: queue.put_nowait(None))
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
        if get_engine() == "legacy":
            return await asyncio.to_thread(self._legacy_run, plan)
        settings = plan.settings
        limit = settings.max_concurrency or self.max_concurrency
        if self._executor is None:
            async with TaskExecutor(plan.agents, default_agent=settings.default_agent) as executor:
                return await self._run(executor, plan.tasks, settings.fail_fast, limit)
        executor = self._plan_executor(plan)
        return await self._run(executor, plan.tasks, settings.fail_fast, limit)

    def _legacy_run(self, plan: Plan) -> list[ExecutionResult]:
        if self._executor is None:
            executor = TaskExecutor(plan.agents, default_agent=plan.settings.default_agent)
        else:
            executor = self._plan_executor(plan)
        self._check(executor, plan.tasks)
        return LegacyEngine(executor).execute_tasks(plan.tasks, plan.settings.fail_fast)

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
        executor = self._executor._derive(plan.agents)
        if plan.settings.default_agent is not None:
            executor.default_agent = plan.settings.default_agent
        return executor

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

    def _check(self, executor: TaskExecutor, tasks: Sequence[AgentTask]) -> None:
        problems = graph_problems(tasks)
        for index, task in enumerate(tasks):
            try:
                executor.resolve(task)
            except ConfigurationError as exc:
                problems.append(f"tasks[{index}] (id {task.id!r}): {exc}")
        if problems:
            raise PlanError(problems)

    async def _run(
        self,
        executor: TaskExecutor,
        tasks: list[AgentTask],
        fail_fast: bool,
        limit: int,
        on_result: _OnResult | None = None,
    ) -> list[ExecutionResult]:
        self._check(executor, tasks)
        executor._pool.reserve(min(limit, len(tasks)))
        token = _current_bus.set(self.bus)
        try:
            return await _Run(executor, self.bus, tasks, fail_fast, limit, on_result).execute()
        finally:
            _current_bus.reset(token)


class _Run:
    """The state of one ``execute_tasks`` call.

    Every mutation of this state happens in plain code between awaits on one event loop, so no
    two tasks ever interleave inside it; an ``asyncio.Lock`` would guard nothing here.
    """

    def __init__(
        self,
        executor: TaskExecutor,
        bus: Bus,
        tasks: list[AgentTask],
        fail_fast: bool,
        limit: int,
        on_result: _OnResult | None,
    ) -> None:
        self.executor = executor
        self.bus = bus
        self.tasks = tasks
        self.fail_fast = fail_fast
        self.on_result = on_result
        self.limit = limit
        # Tasks whose dependencies are met, waiting for one of the `limit` slots. An asyncio task
        # is created only when a slot is free, so a run of 20,000 tasks holds `limit` coroutines
        # at a time, not 20,000 parked on a semaphore (a few KB each).
        self.ready: deque[AgentTask] = deque()
        self.results: dict[str, ExecutionResult] = {}
        self.waiting = {t.id: len(set(t.depends_on)) for t in tasks}
        self.dependents: dict[str, list[AgentTask]] = {t.id: [] for t in tasks}
        for task in tasks:
            for dep in set(task.depends_on):
                self.dependents[dep].append(task)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.stopped_by: str | None = None
        self._group: asyncio.TaskGroup | None = None

    async def execute(self) -> list[ExecutionResult]:
        if self.bus.has_subscribers("task.queued"):
            for task in self.tasks:
                await self.bus.publish("task.queued", TaskEvent(task_id=task.id))
        async with asyncio.TaskGroup() as group:
            self._group = group
            for task in self.tasks:
                if self.waiting[task.id] == 0:
                    self._start(task)
        if self.stopped_by is not None:
            error = ExecutionError(
                kind="cancelled",
                message=f"cancelled by fail_fast after task {self.stopped_by!r} did not succeed",
            )
            for task in self.tasks:
                if task.id not in self.results:
                    await self._record(
                        self.executor._not_run_result(task, ExecutionStatus.CANCELLED, error)
                    )
        return [self.results[t.id] for t in self.tasks]

    def _start(self, task: AgentTask) -> None:
        self.ready.append(task)
        self._fill()

    def _fill(self) -> None:
        """Start ready tasks while slots are free (and nothing stopped the run)."""
        assert self._group is not None
        while self.ready and len(self.running) < self.limit and self.stopped_by is None:
            task = self.ready.popleft()
            self.running[task.id] = self._group.create_task(self._run_one(task))

    async def _run_one(self, task: AgentTask) -> None:
        progress = Progress()
        try:
            if self.bus.has_subscribers("task.started"):
                await self.bus.publish("task.started", TaskEvent(task_id=task.id))
            outputs = (
                {d: self.results[d].output for d in task.depends_on} if task.depends_on else None
            )
            result = await self.executor._execute(task, None, None, outputs, progress)
        except asyncio.CancelledError:
            self.running.pop(task.id, None)
            now = asyncio.get_running_loop().time()
            if self.stopped_by is None:
                # The caller's cancellation: a task that was running still gets its result
                # (what it tried, for how long), delivered at once; then cancellation goes on.
                cancelled = progress.cancelled_result("cancelled while running", now)
                if cancelled is not None:
                    self._deliver(cancelled)
                raise
            message = f"cancelled by fail_fast after task {self.stopped_by!r} did not succeed"
            cancelled = progress.cancelled_result(message, now)
            if cancelled is not None:
                await self._record(cancelled)
            return  # execute() records the result of a task that never started
        except Exception as exc:  # a bug, not a task failure: still exactly one result
            # The exception may quote a key (a provider that put it in a message): redact the
            # message and the logged traceback alike.
            redact = secret_redactor(self.executor.agents.values())
            trace = "".join(traceback.format_exception(exc))
            log.error("task %s: unexpected error\n%s", task.id, redact(trace))
            message = redact.cut(f"{type(exc).__name__}: {exc}", _INTERNAL_MESSAGE_LIMIT)
            error = ExecutionError(kind="internal", message=message)
            result = self.executor._not_run_result(task, ExecutionStatus.FAILED, error)
        self.running.pop(task.id, None)
        await self._finish(task, result)
        self._fill()

    def _deliver(self, result: ExecutionResult) -> None:
        self.results[result.task_id] = result
        if self.on_result is not None:
            self.on_result(result)

    async def _record(self, result: ExecutionResult) -> None:
        self._deliver(result)
        if self.bus.has_subscribers("task.finished"):
            await self.bus.publish(
                "task.finished", TaskEvent(task_id=result.task_id, result=result)
            )

    async def _finish(self, task: AgentTask, result: ExecutionResult) -> None:
        await self._record(result)
        if result.status is ExecutionStatus.SUCCESS:
            for dependent in self.dependents[task.id]:
                self.waiting[dependent.id] -= 1
                if (
                    self.waiting[dependent.id] == 0
                    and dependent.id not in self.results
                    and self.stopped_by is None
                ):
                    self._start(dependent)
            return
        if self.fail_fast:
            if self.stopped_by is None:
                self.stopped_by = task.id
                for running in list(self.running.values()):
                    running.cancel()
            return
        await self._skip_dependents(task.id, result.status)

    async def _skip_dependents(self, failed_id: str, status: ExecutionStatus) -> None:
        frontier = [(failed_id, status)]
        while frontier:
            dep_id, dep_status = frontier.pop()
            for dependent in self.dependents[dep_id]:
                if dependent.id in self.results:
                    continue
                error = ExecutionError(
                    kind="dependency_failed",
                    message=f"dependency {dep_id!r} did not succeed ({dep_status.value})",
                )
                await self._record(
                    self.executor._not_run_result(dependent, ExecutionStatus.SKIPPED, error)
                )
                frontier.append((dependent.id, ExecutionStatus.SKIPPED))
