"""The work an engine runs, and the protocol every engine follows.

Every entry point (``TaskExecutor.execute``, ``ProjectOrchestrator.execute_task`` /
``execute_tasks`` / ``run`` / ``stream``, the sync shims, the command line, a worker) describes
its work as a :class:`Job` (one task) or a :class:`Batch` (many, with dependencies) and hands
it to the engine that :func:`~taskexec._engines.registry.select_engine` chose.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Protocol

from .._calls import CallSettings, Roster
from .._errors import ConfigurationError, PlanError
from .._graph import graph_problems
from .._models import Agent, AgentTask, EngineName, ExecutionResult, Mode
from .._modes import Call
from .._modes.streaming import StreamState
from ..bus import Bus

__all__ = (
    "RUN_ID_PATTERN",
    "Batch",
    "Engine",
    "Job",
    "OnResult",
    "StreamRunLike",
    "check_run_id",
    "new_run_id",
)

#: What a run id may be: it names queues, routing keys and Redis keys.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def new_run_id() -> str:
    """Return a fresh run id."""
    return uuid.uuid4().hex[:16]


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it can name a run (1-64 letters, digits, ``_`` or ``-``).

    Raises:
        ConfigurationError: It cannot.
    """
    if not RUN_ID_PATTERN.fullmatch(run_id):  # fullmatch: "$" also matches before a final "\n"
        raise ConfigurationError(
            f"run id {run_id!r} is not valid: use 1-64 letters, digits, '_' or '-'"
        )
    return run_id


class StreamRunLike(Protocol):
    """What an engine's own stream fills in (:class:`taskexec._stream_run.StreamRun` is one)."""

    @property
    def call(self) -> Call: ...
    @property
    def state(self) -> StreamState: ...


#: Called with each result of a batch the moment it is known.
OnResult = Callable[[ExecutionResult], None]


@dataclass(frozen=True, slots=True)
class Job:
    """One task, with the agents and call settings of the executor it came through."""

    roster: Roster
    settings: CallSettings
    task: AgentTask
    agent: str | Agent | None = None
    mode: Mode | None = None
    #: The outputs of the task's dependencies, for its ``{{dep}}`` placeholders (a worker's).
    outputs: Mapping[str, str | None] | None = None


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
    #: The run's id on engines that keep results between runs (workers); None: a new run.
    run_id: str | None = None

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
    """A way to run jobs and batches; the same results, statuses and error kinds on each.

    An engine belongs to the :class:`~taskexec._engines.registry.EngineSet` of one executor:
    it opens what it needs (connections, channels) on first use, shares it between the calls
    made through that executor, and releases it in :meth:`aclose`, which the executor's
    ``aclose()`` (or ``async with``) calls.
    """

    #: The engine's name in the registry.
    name: ClassVar[str]
    #: What results run on this engine say in ``ExecutionResult.engine``.
    result_engine: ClassVar[EngineName]
    #: True when blocking callers run work in their own thread with :meth:`execute_blocking` /
    #: :meth:`execute_tasks_blocking`, with no event loop at all (the rollback engine).
    runs_in_caller_thread: ClassVar[bool] = False
    #: True when results outlive a run, under its id (``Batch.run_id``), so that running the
    #: same id again reuses them (the workers engine).
    keeps_runs: ClassVar[bool] = False
    #: How the engine streams a task (``TaskExecutor.stream``): ``"loop"`` (the mode's own
    #: stream, on the caller's event loop), ``"blocking"`` (the blocking client's, in the
    #: caller's thread or a worker thread), ``"engine"`` (the engine's own
    #: :meth:`stream_deltas`), or None (not available on this engine).
    stream_path: ClassVar[Literal["loop", "blocking", "engine"] | None] = None

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

    def stream_deltas(self, job: Job, run: StreamRunLike) -> AsyncGenerator[str, None]:
        """Stream a task's text from wherever the engine runs it (``stream_path="engine"``).

        The generator yields the deltas in order and, before it ends, records the task's
        outcome in ``run`` (its ``state``: usage, error, metadata; ``call.attempts``). Closing
        it early must stop the task and close its request.
        """
        raise NotImplementedError

    async def run_counts(self, run_id: str) -> dict[str, int]:
        """What the engine counted for a run it keeps (executions, duplicates); else empty."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 (most engines hold nothing to close)
        """Release what the engine opened; it opens it again if used afterwards."""
