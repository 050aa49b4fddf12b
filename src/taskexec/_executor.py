"""The async TaskExecutor: the one place a task meets its mode."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import Any, Self, TypeVar, cast

import httpx

from ._callsite import warn_at_caller
from ._errors import (
    ConfigurationError,
    ProviderNotFoundError,
    UnknownAgentError,
    UnsupportedModeError,
)
from ._http import ClientPool
from ._models import (
    Agent,
    AgentTask,
    Engine,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
    Mode,
)
from ._modes import Call, Outcome, timeout_outcome
from ._modes.api import run_api
from ._modes.llm import run_llm
from ._modes.script import run_script
from ._plan import mode_problem
from ._retry import RetryPolicy
from .flags import get_engine
from .providers import get_provider

__all__ = ("DEFAULT_TIMEOUT_S", "MIGRATION_GUIDE", "TaskExecutor")

log = logging.getLogger("taskexec")
T = TypeVar("T")

#: A task's deadline when neither the task nor its agent sets ``timeout_s``.
DEFAULT_TIMEOUT_S = 600.0
MIGRATION_GUIDE = "docs/MIGRATION.md"
_MODES = ("llm", "api", "script")


class TaskExecutor:
    """Runs agent tasks: ``await executor.execute(task)`` returns one :class:`ExecutionResult`.

    Calls may run concurrently from one event loop (``asyncio.gather`` or a ``TaskGroup``); HTTP
    connections are pooled per event loop and shared by every call. Close the executor with
    ``await executor.aclose()`` or use it as ``async with TaskExecutor(...) as executor``.

    Args:
        agents: The agents tasks may name.
        default_agent: The agent for tasks that name none (default: the only agent, if one).
        http_client: An ``httpx.AsyncClient`` to send every request through instead of the
            built-in pool; it is not closed by :meth:`aclose`.
        max_connections: Most HTTP connections open at once per event loop (0: no limit). By
            default 256, raised to the ``max_concurrency`` of an orchestrator that runs tasks on
            this executor; a value given here is kept as given.
        connect_timeout_s: Time allowed to open one connection.
        attempt_timeout_s: Cap on one HTTP attempt, so a stalled reply is retried
            (default: an attempt may use all the time left before the task's deadline).
        retry_policy: Backoff between attempts.

    Raises:
        ConfigurationError: Two agents share a name, or ``default_agent`` is not among them.
    """

    def __init__(
        self,
        agents: Iterable[Agent] = (),
        *,
        default_agent: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        max_connections: int | None = None,
        connect_timeout_s: float = 10.0,
        attempt_timeout_s: float | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self._agents = _index_agents(agents)
        if default_agent is not None and default_agent not in self._agents:
            raise UnknownAgentError(
                f"default_agent {default_agent!r} is not among the agents "
                f"({_names(self._agents)}); pass its Agent in agents=[...]"
            )
        self.default_agent = default_agent
        self._pool = ClientPool(
            max_connections=max_connections,
            connect_timeout_s=connect_timeout_s,
            httpx_client=http_client,
        )
        self.attempt_timeout_s = attempt_timeout_s
        self.retry_policy = retry_policy or RetryPolicy()
        self._warned_script_agents: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"<TaskExecutor agents=[{_names(self._agents)}] default_agent={self.default_agent!r}>"
        )

    @property
    def agents(self) -> Mapping[str, Agent]:
        """The registered agents by name (read-only)."""
        return MappingProxyType(self._agents)

    async def execute(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> ExecutionResult:
        """Execute a single task using the specified agent.

        Args:
            task: The task to run.
            agent: An agent name or an :class:`Agent`; wins over ``task.agent``.
            mode: ``"llm"``, ``"api"`` or ``"script"``; wins over ``task.mode`` and the agent's.

        Returns:
            The task's result. Failures, timeouts and bad replies are results, not exceptions.

        Raises:
            UnknownAgentError: The agent named is not registered.
            UnsupportedModeError: The agent cannot serve the mode.
            ConfigurationError: No agent is named anywhere and there is no default.
        """
        if get_engine() == "legacy":
            # Rollback flag: the pre-refactor sync engine, in a worker thread so that this
            # event loop is never blocked.
            return await asyncio.to_thread(self._legacy_execute, task, agent, mode)
        return await self._execute(task, agent, mode, None)

    def _legacy_execute(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> ExecutionResult:
        from ._legacy import LegacyEngine  # the legacy engine is loaded only when used

        return LegacyEngine(self).execute(task, agent, mode)

    async def aclose(self) -> None:
        """Close every pooled HTTP connection."""
        await self._pool.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals shared with the orchestrator ------------------------------------------------

    def _derive(self, extra_agents: Iterable[Agent]) -> TaskExecutor:
        """Return an executor with more agents that shares this one's pool and settings."""
        derived = object.__new__(TaskExecutor)
        derived.__dict__.update(self.__dict__)
        agents = list(self._agents.values())
        derived._agents = _index_agents([*agents, *extra_agents])
        return derived

    def resolve(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> tuple[Agent, Mode]:
        """Return the agent and mode a task would run with, checking that they fit.

        Raises:
            UnknownAgentError: The agent named is not registered.
            UnsupportedModeError: The agent cannot serve the mode.
            ConfigurationError: No agent is named anywhere and there is no default.
        """
        if isinstance(agent, Agent):
            resolved = agent
        else:
            name = agent or task.agent or self.default_agent
            if name is None:
                if len(self._agents) != 1:
                    raise ConfigurationError(
                        f"task {task.id!r} names no agent and there is no default: pass "
                        "execute(task, agent='name'), set AgentTask(agent='name'), or create "
                        "TaskExecutor(agents, default_agent='name')"
                        + (f"; registered agents: {_names(self._agents)}" if self._agents else "")
                    )
                name = next(iter(self._agents))
            found = self._agents.get(name)
            if found is None:
                raise UnknownAgentError(
                    f"task {task.id!r} names unknown agent {name!r}; registered agents: "
                    f"{_names(self._agents) or '(none)'}. Add Agent(name={name!r}, ...) to the "
                    "executor's agents"
                )
            resolved = found
        chosen: Mode = mode or task.mode or resolved.mode
        if chosen not in _MODES:
            raise UnsupportedModeError(f"unknown mode {chosen!r}; use one of {', '.join(_MODES)}")
        problem_at = mode_problem(resolved, chosen)
        if problem_at is not None:
            field, problem = problem_at
            if field == "provider":
                raise ProviderNotFoundError(problem)
            raise UnsupportedModeError(
                f"agent {resolved.name!r} cannot run task {task.id!r}: {problem}"
            )
        return resolved, chosen

    def _resolve_names(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> tuple[str, str]:
        """Return the agent name and mode a task would use (``""`` where unresolvable)."""
        try:
            resolved, chosen = self.resolve(task, agent, mode)
        except ConfigurationError:
            name = agent.name if isinstance(agent, Agent) else (agent or task.agent or "")
            return name, mode or task.mode or ""
        return resolved.name, chosen

    def _not_run_result(
        self,
        task: AgentTask,
        status: ExecutionStatus,
        error: ExecutionError,
        *,
        engine: Engine = "async",
    ) -> ExecutionResult:
        """Return the result of a task that never ran (``skipped`` or ``cancelled``).

        Its ``agent`` and ``mode`` are what the task would have used, ``""`` where unresolved.
        """
        agent, mode = self._resolve_names(task)
        now = datetime.now(UTC)
        return ExecutionResult(
            task_id=task.id,
            status=status,
            error=error,
            agent=agent,
            mode=mode,
            engine=engine,
            attempts=0,
            started_at=now,
            finished_at=now,
            duration_s=0.0,
        )

    def _prepare(
        self,
        task: AgentTask,
        agent: str | Agent | None,
        mode: Mode | None,
        outputs: Mapping[str, str | None] | None,
        start: float,
    ) -> tuple[Call, Mode, float]:
        """Resolve a task and return its call record, its mode and its deadline in seconds."""
        resolved, chosen = self.resolve(task, agent, mode)
        deadline_s = task.timeout_s or resolved.timeout_s or DEFAULT_TIMEOUT_S
        call = Call(
            task=task,
            agent=resolved,
            prompt=task.render_prompt(outputs),
            deadline=start + deadline_s,
            max_retries=task.max_retries if task.max_retries is not None else resolved.max_retries,
            pool=self._pool,
            policy=self.retry_policy,
            attempt_timeout_s=self.attempt_timeout_s,
        )
        if chosen == "script" or (chosen == "llm" and resolved.command):
            self._warn_script(resolved, chosen)
        return call, chosen, deadline_s

    async def _execute(
        self,
        task: AgentTask,
        agent: str | Agent | None,
        mode: Mode | None,
        outputs: Mapping[str, str | None] | None,
        progress: Progress | None = None,
    ) -> ExecutionResult:
        loop = asyncio.get_running_loop()
        started_at = datetime.now(UTC)
        start = loop.time()
        call, chosen, deadline_s = self._prepare(task, agent, mode, outputs, start)
        if progress is not None:
            progress.begin(call, chosen, started_at, start)
        runner = _MODES_RUN[chosen](call)
        # Run the mode eagerly up to its first suspension. A mode that finishes without ever
        # suspending (the offline provider, an in-process provider) cannot be interrupted by a
        # deadline anyway, so it gets no timer: that timer was a tenth of the per-task cost on
        # 10,000 offline tasks. Anything that suspends runs on under the deadline as before.
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

    def _warn_script(self, agent: Agent, mode: Mode) -> None:
        if mode == "llm":
            provider = get_provider(agent.provider)
            if provider.unavailable(agent) is None:
                return
        if agent.name in self._warned_script_agents:
            return
        self._warned_script_agents.add(agent.name)
        warn_at_caller(
            f"agent {agent.name!r}: script execution is deprecated in favour of a direct "
            f"provider (Agent(mode='llm', provider=...)); see {MIGRATION_GUIDE}",
            DeprecationWarning,
        )


_MODES_RUN: dict[str, Callable[[Call], Coroutine[Any, Any, Outcome]]] = {
    "llm": run_llm,
    "api": run_api,
    "script": run_script,
}


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


class Progress:
    """How far a task got: filled in when it starts, read if it is cancelled while running.

    A task cancelled in flight (fail-fast, Ctrl-C) still gets its one result, and that result
    reports the attempts made and the time spent, not zeros.
    """

    __slots__ = ("call", "mode", "start", "started_at")

    def __init__(self) -> None:
        self.call: Call | None = None
        self.mode: Mode = "llm"
        self.started_at = datetime.now(UTC)
        self.start = 0.0

    def begin(self, call: Call, mode: Mode, started_at: datetime, start: float) -> None:
        """Record that the task started (``start`` on the clock of :meth:`cancelled_result`)."""
        self.call, self.mode, self.started_at, self.start = call, mode, started_at, start

    def cancelled_result(
        self, message: str, now: float, engine: Engine = "async"
    ) -> ExecutionResult | None:
        """Return the ``cancelled`` result of the started task, or None if it never started."""
        if self.call is None:
            return None
        error = ExecutionError(kind="cancelled", message=message)
        outcome = Outcome(error=error, metadata={"execution_mode": self.mode})
        duration = max(0.0, now - self.start)
        return make_result(self.call, self.mode, outcome, self.started_at, duration, engine)


def make_result(
    call: Call,
    mode: Mode,
    outcome: Outcome,
    started_at: datetime,
    duration: float,
    engine: Engine,
) -> ExecutionResult:
    """Return the result of a task that ran, from its outcome (the same on both engines)."""
    if outcome.error is None:
        status = ExecutionStatus.SUCCESS
    elif outcome.error.kind == "timeout":
        status = ExecutionStatus.TIMEOUT
    elif outcome.error.kind == "cancelled":
        status = ExecutionStatus.CANCELLED
    else:
        status = ExecutionStatus.FAILED
        log.info("task %s failed: %s", call.task.id, outcome.error.message)
    return ExecutionResult(
        task_id=call.task.id,
        status=status,
        output=outcome.output,
        error=outcome.error,
        agent=call.agent.name,
        mode=mode,
        engine=engine,
        attempts=call.attempts,
        started_at=started_at,
        finished_at=started_at + timedelta(seconds=duration),
        duration_s=duration,
        usage=outcome.usage,
        metadata=outcome.metadata,
    )


def _index_agents(agents: Iterable[Agent]) -> dict[str, Agent]:
    index: dict[str, Agent] = {}
    for agent in agents:
        if agent.name in index:
            raise ConfigurationError(
                f"two agents are named {agent.name!r}; give each agent a unique name"
            )
        index[agent.name] = agent
    return index


def _names(agents: Mapping[str, Agent]) -> str:
    return ", ".join(sorted(agents))
