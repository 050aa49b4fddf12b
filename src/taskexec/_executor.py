"""The async TaskExecutor: the public face of running one task.

It holds the agents (a :class:`~taskexec._calls.Roster`) and how calls are made (a
:class:`~taskexec._calls.CallSettings` with the connection pool), and hands each call to the
engine the rollback flag names (:mod:`taskexec._engines`); the modes themselves live in
:mod:`taskexec._modes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Self

import httpx

from ._calls import DEFAULT_TIMEOUT_S, CallSettings, Roster
from ._engines import Job, current_engine, dispatched
from ._http import ClientPool
from ._models import Agent, AgentTask, ExecutionResult, Mode
from ._retry import RetryPolicy
from ._stream import TaskStream, create_stream

__all__ = ("DEFAULT_TIMEOUT_S", "TaskExecutor")


class TaskExecutor:
    """Runs agent tasks: ``await executor.execute(task)`` returns one :class:`ExecutionResult`.

    Calls may run concurrently from one event loop (``asyncio.gather`` or a ``TaskGroup``); HTTP
    connections are pooled per event loop and shared by every call. Close the executor with
    ``await executor.aclose()`` or use it as ``async with TaskExecutor(...) as executor``.

    Args:
        agents: The agents tasks may name.
        default_agent: The agent for tasks that name none (default: the only agent, if one).
        http_client: An ``httpx.AsyncClient`` to send every request through instead of the
            built-in pool; taskexec never closes it (its owner does).
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
        self._roster = Roster(agents, default_agent)
        self._pool = ClientPool(
            max_connections=max_connections,
            connect_timeout_s=connect_timeout_s,
            httpx_client=http_client,
        )
        self._settings = CallSettings(self._pool, retry_policy or RetryPolicy(), attempt_timeout_s)

    def __repr__(self) -> str:
        return (
            f"<TaskExecutor agents=[{self._roster.names()}] default_agent={self.default_agent!r}>"
        )

    @property
    def agents(self) -> Mapping[str, Agent]:
        """The registered agents by name (read-only)."""
        return self._roster.agents

    @property
    def default_agent(self) -> str | None:
        """The agent for tasks that name none (None: the only agent, if there is one)."""
        return self._roster.default_agent

    @property
    def retry_policy(self) -> RetryPolicy:
        """The backoff between attempts."""
        return self._settings.retry_policy

    @property
    def attempt_timeout_s(self) -> float | None:
        """The cap on one HTTP attempt (None: until the task's deadline)."""
        return self._settings.attempt_timeout_s

    def _job(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> Job:
        return Job(self._roster, self._settings, task, agent, mode)

    @dispatched(_job)
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
        return await current_engine().execute(self._job(task, agent, mode))

    # -- streaming (issue 20) ------------------------------------------------------------------
    def stream(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> TaskStream:
        """Stream a task's reply: iterate the returned :class:`TaskStream` for text deltas.

        Nothing is sent until the stream is iterated; leaving its block early closes the
        request at once. Its ``result`` is the task's result once the stream has ended.

        Args:
            task: The task to run.
            agent: An agent name or an :class:`Agent`; wins over ``task.agent``.
            mode: ``"llm"``, ``"api"`` or ``"script"``; wins over ``task.mode`` and the agent's.

        Returns:
            The task's stream.

        Raises:
            UnknownAgentError: The agent named is not registered.
            UnsupportedModeError: The agent cannot serve the mode.
            ConfigurationError: No agent is named anywhere and there is no default.
        """
        # TODO(issue 17): the engine seam picks the stream's engine; for now the flag does.
        return create_stream(self._job(task, agent, mode))

    # -------------------------------------------------------------------------------------------

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

    def resolve(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> tuple[Agent, Mode]:
        """Return the agent and mode a task would run with, checking that they fit.

        Raises:
            UnknownAgentError: The agent named is not registered.
            UnsupportedModeError: The agent cannot serve the mode.
            ConfigurationError: No agent is named anywhere and there is no default.
        """
        return self._roster.resolve(task, agent, mode)

    def _derive(
        self, extra_agents: Iterable[Agent], default_agent: str | None = None
    ) -> TaskExecutor:
        """Return an executor with more agents (and perhaps another default) that shares this
        one's pool and settings."""
        derived = object.__new__(TaskExecutor)
        derived.__dict__.update(self.__dict__)
        derived._roster = self._roster.extended(extra_agents, default_agent)
        return derived
