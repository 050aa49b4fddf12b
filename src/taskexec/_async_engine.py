"""The async engine: one task on the running loop, and many under a concurrency bound.

This is the default engine. A task's mode runs on the caller's event loop, sharing the pool's
connections with every other task on that loop; the orchestrator's scheduling (dependencies,
the concurrency bound, fail-fast, the bus's lifecycle events) lives here too.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._budget import with_budget
from ._calls import CallSettings, Roster, prepare
from ._models import (
    Agent,
    AgentTask,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
    Mode,
)
from ._modes import Call, Outcome, timeout_outcome
from ._modes.api import run_api
from ._modes.llm import run_llm
from ._modes.script import run_script
from ._results import Progress, make_result
from ._tracing import trace_dispatch, trace_task
from .bus import TaskEvent, _current_bus
from .providers import secret_redactor

if TYPE_CHECKING:
    from ._engines.base import Batch

__all__ = ("RunOne", "execute_task", "run_batch")

log = logging.getLogger("taskexec")
T = TypeVar("T")
#: How a batch runs one of its tasks whose dependencies succeeded: ``(task, outputs of its
#: dependencies, progress) -> result``. In-process by default; a distributed run sends the task
#: to a worker instead.
RunOne = Callable[
    [AgentTask, Mapping[str, str | None] | None, Progress], Coroutine[Any, Any, ExecutionResult]
]
_INTERNAL_MESSAGE_LIMIT = 2000

_MODES_RUN: dict[str, Callable[[Call], Coroutine[Any, Any, Outcome]]] = {
    "llm": run_llm,
    "api": run_api,
    "script": run_script,
}


def execute_task(
    roster: Roster,
    settings: CallSettings,
    task: AgentTask,
    agent: str | Agent | None,
    mode: Mode | None,
    outputs: Mapping[str, str | None] | None = None,
    progress: Progress | None = None,
) -> Coroutine[Any, Any, ExecutionResult]:
    """Run one task on the running loop and return its result (never raises for task failures).

    A plain function returning the coroutine: with no tracing, it is the task's own coroutine,
    not one more frame around it (see :func:`taskexec._tracing.trace_task`).

    Raises:
        ConfigurationError: The task names an unknown agent or a mode its agent cannot serve.
    """
    return trace_task(task, _execute_task(roster, settings, task, agent, mode, outputs, progress))


async def _execute_task(
    roster: Roster,
    settings: CallSettings,
    task: AgentTask,
    agent: str | Agent | None,
    mode: Mode | None,
    outputs: Mapping[str, str | None] | None,
    progress: Progress | None,
) -> ExecutionResult:
    loop = asyncio.get_running_loop()
    started_at = datetime.now(UTC)
    start = loop.time()
    call, chosen, deadline_s = prepare(roster, settings, task, agent, mode, outputs, start)
    if progress is not None:
        progress.begin(call, chosen, started_at, start)
    runner = _MODES_RUN[chosen](call)
    # Run the mode eagerly up to its first suspension. A mode that finishes without ever
    # suspending (the offline provider, an in-process provider) cannot be interrupted by a
    # deadline anyway, so it gets no timer. Still worth it (measured 2026-11-28, 10,000
    # offline tasks through the orchestrator, medians of 7): 25 us per task with it, 30.5 us
    # with a plain `async with timeout_at(...): await`. Anything that suspends runs on under
    # the deadline as before; _resume is the `await` that takes over the started coroutine.
    try:
        first = runner.send(None)
    except StopIteration as finished:
        outcome: Outcome = finished.value
    else:
        try:
            async with asyncio.timeout_at(start + deadline_s):
                outcome = await _resume(runner, first)
        except TimeoutError:
            outcome = timeout_outcome(task, deadline_s, chosen)
    return make_result(call, chosen, outcome, started_at, loop.time() - start, "async")


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], yielded: Any) -> Generator[Any, Any, T]:
    """Go on awaiting a coroutine that was started by hand and is suspended on ``yielded``.

    The same delegation ``await`` does, except that the first value the coroutine yielded
    (the future it waits on) is handed to the task first, instead of starting it again.
    """
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # cancellation (a deadline, the caller) goes on inside
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return cast(T, stop.value)
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return cast(T, stop.value)


async def run_batch(batch: Batch, run_one: RunOne | None = None) -> list[ExecutionResult]:
    """Run a checked batch of tasks on the running loop; one result per task, in input order.

    ``run_one`` runs each task (default: in this process, with :func:`execute_task`).
    """
    batch.settings.pool.reserve(min(batch.limit, len(batch.tasks)))
    token = _current_bus.set(batch.bus)
    try:
        return await _Run(batch, run_one).execute()
    finally:
        _current_bus.reset(token)


class _Run:
    """The state of one ``execute_tasks`` call.

    Every mutation of this state happens in plain code between awaits on one event loop, so no
    two tasks ever interleave inside it; an ``asyncio.Lock`` would guard nothing here.
    """

    def __init__(self, batch: Batch, run_one: RunOne | None = None) -> None:
        self.run_one = run_one or self._in_process
        if run_one is not None:  # tasks sent elsewhere (workers) get their span here
            self.run_one = trace_dispatch(run_one)
        if batch.settings.budget is not None:  # the run's cost ceiling, over any way of running
            self.run_one = with_budget(self.run_one, batch.settings.budget, batch.roster)
        self.roster = batch.roster
        self.settings = batch.settings
        self.bus = batch.bus
        self.tasks = tasks = batch.tasks
        self.fail_fast = batch.fail_fast
        self.on_result = batch.on_result
        self.limit = batch.limit
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
                    await self._record(self._not_run(task, ExecutionStatus.CANCELLED, error))
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
            result = await self.run_one(task, outputs, progress)
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
            redact = secret_redactor(self.roster.agents.values())
            trace = "".join(traceback.format_exception(exc))
            log.error("task %s: unexpected error\n%s", task.id, redact(trace))
            message = redact.cut(f"{type(exc).__name__}: {exc}", _INTERNAL_MESSAGE_LIMIT)
            error = ExecutionError(kind="internal", message=message)
            result = self._not_run(task, ExecutionStatus.FAILED, error)
        self.running.pop(task.id, None)
        await self._finish(task, result)
        self._fill()

    def _in_process(
        self, task: AgentTask, outputs: Mapping[str, str | None] | None, progress: Progress
    ) -> Coroutine[Any, Any, ExecutionResult]:
        return execute_task(self.roster, self.settings, task, None, None, outputs, progress)

    def _not_run(
        self, task: AgentTask, status: ExecutionStatus, error: ExecutionError
    ) -> ExecutionResult:
        return self.roster.not_run_result(task, status, error, "async")

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
                await self._record(self._not_run(dependent, ExecutionStatus.SKIPPED, error))
                frontier.append((dependent.id, ExecutionStatus.SKIPPED))
