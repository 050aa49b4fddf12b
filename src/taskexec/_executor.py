"""The async TaskExecutor: the public face of running one task.

It holds its parts (:class:`~taskexec._engines.parts.ExecutorParts`: the agents, how calls are
made with the connection pool, and the engines it has opened) and hands each call to the engine
seam (:mod:`taskexec._engines.entry`), which chooses the engine; the modes themselves live in
:mod:`taskexec._modes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Self

import httpx

from ._calls import DEFAULT_TIMEOUT_S, CallSettings, Roster
from ._engines import entry
from ._engines.parts import ExecutorParts
from ._engines.registry import EngineSet, select_engine
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
        broker_url: Run tasks on the workers of this RabbitMQ (``amqp://...``); wins over
            ``TASKEXEC_BROKER_URL``. Needs the ``workers`` extra (see docs/DISTRIBUTED.md).
        results_url: The Redis of those workers' results; wins over ``TASKEXEC_RESULTS_URL``.

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
        broker_url: str | None = None,
        results_url: str | None = None,
    ) -> None:
        pool = ClientPool(
            max_connections=max_connections,
            connect_timeout_s=connect_timeout_s,
            httpx_client=http_client,
        )
        #: The agents, call settings and engines, for the engine seam (not a user API).
        self.parts = ExecutorParts(
            Roster(agents, default_agent),
            CallSettings(pool, retry_policy or RetryPolicy(), attempt_timeout_s),
            EngineSet(broker_url, results_url),
        )

    def __repr__(self) -> str:
        names = self.parts.roster.names()
        return f"<TaskExecutor agents=[{names}] default_agent={self.default_agent!r}>"

    @property
    def agents(self) -> Mapping[str, Agent]:
        """The registered agents by name (read-only)."""
        return self.parts.roster.agents

    @property
    def default_agent(self) -> str | None:
        """The agent for tasks that name none (None: the only agent, if there is one)."""
        return self.parts.roster.default_agent

    @property
    def retry_policy(self) -> RetryPolicy:
        """The backoff between attempts."""
        return self.parts.settings.retry_policy

    @property
    def attempt_timeout_s(self) -> float | None:
        """The cap on one HTTP attempt (None: until the task's deadline)."""
        return self.parts.settings.attempt_timeout_s

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
        return await entry.execute(self.parts.engines, self.parts.job(task, agent, mode))

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
            ConfigurationError: No agent is named anywhere and there is no default, or the
                engine of the call cannot stream (workers, for now).
        """
        # The engine seam chooses, as for execute(); the stream runs on that engine.
        engine = select_engine(self.parts.engines)
        return create_stream(self.parts.job(task, agent, mode), engine)

    # -------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every pooled HTTP connection, and the cluster connection if one was opened."""
        await self.parts.engines.aclose()
        await self.parts.settings.pool.aclose()

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
        return self.parts.roster.resolve(task, agent, mode)

    def _derive(
        self, extra_agents: Iterable[Agent], default_agent: str | None = None
    ) -> TaskExecutor:
        """Return an executor with more agents (and perhaps another default) that shares this
        one's pool and settings."""
        derived = object.__new__(TaskExecutor)
        derived.parts = self.parts.with_agents(extra_agents, default_agent)
        return derived
