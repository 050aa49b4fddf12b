"""From a task to a call record: which agent, which mode, which deadline; shared by every engine.

Both engines (and whatever runs tasks next) prepare a task the same way, from a :class:`Roster`
(the agents a task may name) and :class:`CallSettings` (pool, retry policy, attempt timeout),
and build its result the same way (:mod:`taskexec._results`). Neither needs the executor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType

from ._budget import Ledger, RunBudget, check_ceiling, unpriced_agents
from ._callsite import MIGRATION_GUIDE, warn_at_caller
from ._errors import (
    ConfigurationError,
    ProviderNotFoundError,
    UnknownAgentError,
    UnpricedAgentError,
    UnsupportedModeError,
)
from ._http import ClientPool
from ._models import (
    Agent,
    AgentTask,
    EngineName,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
    Mode,
)
from ._modes import Call
from ._plan import mode_problem
from ._pricing import to_decimal
from ._retry import RetryPolicy
from .providers import get_provider

__all__ = (
    "DEFAULT_TIMEOUT_S",
    "MIGRATION_GUIDE",
    "CallSettings",
    "Roster",
    "budget_settings",
    "prepare",
)

#: A task's deadline when neither the task nor its agent sets ``timeout_s``.
DEFAULT_TIMEOUT_S = 600.0
_MODES = ("llm", "api", "script")


class Roster:
    """The agents tasks may name, and the default for tasks that name none.

    Args:
        agents: The agents; names must be unique.
        default_agent: The agent for tasks that name none (default: the only agent, if one).

    Raises:
        ConfigurationError: Two agents share a name, or ``default_agent`` is not among them.
    """

    __slots__ = ("_agents", "default_agent")

    def __init__(self, agents: Iterable[Agent] = (), default_agent: str | None = None) -> None:
        self._agents = _index_agents(agents)
        if default_agent is not None and default_agent not in self._agents:
            raise UnknownAgentError(
                f"default_agent {default_agent!r} is not among the agents "
                f"({self.names()}); pass its Agent in agents=[...]"
            )
        self.default_agent = default_agent

    @property
    def agents(self) -> Mapping[str, Agent]:
        """The agents by name (read-only)."""
        return MappingProxyType(self._agents)

    def names(self) -> str:
        """The agents' names, sorted, for messages."""
        return ", ".join(sorted(self._agents))

    def extended(self, extra: Iterable[Agent], default_agent: str | None) -> Roster:
        """Return a roster with ``extra`` agents added and, if given, another default."""
        return Roster([*self._agents.values(), *extra], default_agent or self.default_agent)

    def resolve(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> tuple[Agent, Mode]:
        """Return the agent and mode a task would run with, checking that they fit.

        Raises:
            UnknownAgentError: The agent named is not registered.
            UnsupportedModeError: The agent cannot serve the mode.
            ProviderNotFoundError: The agent names an unknown provider.
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
                        + (f"; registered agents: {self.names()}" if self._agents else "")
                    )
                name = next(iter(self._agents))
            found = self._agents.get(name)
            if found is None:
                raise UnknownAgentError(
                    f"task {task.id!r} names unknown agent {name!r}; registered agents: "
                    f"{self.names() or '(none)'}. Add Agent(name={name!r}, ...) to the "
                    "executor's agents"
                )
            resolved = found
        chosen: Mode = mode or task.mode or resolved.mode
        if chosen not in _MODES:
            raise UnsupportedModeError(f"unknown mode {chosen!r}; use one of {', '.join(_MODES)}")
        problem_at = mode_problem(resolved, chosen)
        if problem_at is not None:
            field_name, problem = problem_at
            if field_name == "provider":
                raise ProviderNotFoundError(problem)
            raise UnsupportedModeError(
                f"agent {resolved.name!r} cannot run task {task.id!r}: {problem}"
            )
        return resolved, chosen

    def resolve_names(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> tuple[str, str]:
        """Return the agent name and mode a task would use (``""`` where unresolvable)."""
        try:
            resolved, chosen = self.resolve(task, agent, mode)
        except ConfigurationError:
            name = agent.name if isinstance(agent, Agent) else (agent or task.agent or "")
            return name, mode or task.mode or ""
        return resolved.name, chosen

    def not_run_result(
        self, task: AgentTask, status: ExecutionStatus, error: ExecutionError, engine: EngineName
    ) -> ExecutionResult:
        """Return the result of a task that never ran (``skipped`` or ``cancelled``).

        Its ``agent`` and ``mode`` are what the task would have used, ``""`` where unresolved.
        """
        agent, mode = self.resolve_names(task)
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


@dataclass(slots=True)
class CallSettings:
    """How calls are made: the pool, the retry policy, the per-attempt timeout."""

    pool: ClientPool
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    attempt_timeout_s: float | None = None
    #: Agents whose script use has been warned about (once per agent).
    warned_script_agents: set[str] = field(default_factory=set)
    #: The run's cost ceiling (``max_cost_usd``), held by the engine that schedules the run.
    budget: RunBudget | None = None


def prepare(
    roster: Roster,
    settings: CallSettings,
    task: AgentTask,
    agent: str | Agent | None,
    mode: Mode | None,
    outputs: Mapping[str, str | None] | None,
    start: float,
) -> tuple[Call, Mode, float]:
    """Resolve a task and return its call record, its mode and its deadline in seconds.

    ``start`` is the clock reading the deadline counts from (``loop.time()`` or
    ``time.monotonic()``, which are the same clock).
    """
    resolved, chosen = roster.resolve(task, agent, mode)
    deadline_s = task.timeout_s or resolved.timeout_s or DEFAULT_TIMEOUT_S
    call = Call(
        task=task,
        agent=resolved,
        prompt=task.render_prompt(outputs),
        deadline=start + deadline_s,
        max_retries=task.max_retries if task.max_retries is not None else resolved.max_retries,
        pool=settings.pool,
        policy=settings.retry_policy,
        attempt_timeout_s=settings.attempt_timeout_s,
    )
    if chosen == "script" or (chosen == "llm" and resolved.command):
        _warn_script(settings, resolved, chosen)
    return call, chosen, deadline_s


def _warn_script(settings: CallSettings, agent: Agent, mode: Mode) -> None:
    if mode == "llm" and get_provider(agent.provider).unavailable(agent) is None:
        return  # the provider runs: the script is not used
    if agent.name in settings.warned_script_agents:
        return
    settings.warned_script_agents.add(agent.name)
    warn_at_caller(
        f"agent {agent.name!r}: script execution is deprecated in favour of a direct "
        f"provider (Agent(mode='llm', provider=...)); see {MIGRATION_GUIDE}",
        DeprecationWarning,
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


def budget_settings(
    settings: CallSettings,
    roster: Roster,
    tasks: Iterable[AgentTask],
    max_cost_usd: float | None,
    *,
    allow_unpriced: bool = False,
    spent_usd: float = 0.0,
) -> CallSettings:
    """Return the call settings of a run held to ``max_cost_usd`` (unchanged without one).

    Each call gets a ledger of its own: the ceiling is per run. ``spent_usd`` is what the run
    spent before (``taskexec run --resume``: the cost of the results kept from the earlier
    run), counted against the same ceiling.

    Raises:
        InvalidValueError: ``max_cost_usd`` is not a positive finite number.
        UnpricedAgentError: Some agent of the run has no known price (unless
            ``allow_unpriced``); the error names them all.
    """
    if max_cost_usd is None:
        return settings
    ceiling = check_ceiling(max_cost_usd)
    unpriced = unpriced_agents(roster, tasks)
    if unpriced and not allow_unpriced:
        raise UnpricedAgentError(unpriced, max_cost_usd)
    ledger = Ledger(ceiling)
    ledger.spent = to_decimal(float(spent_usd))
    return replace(settings, budget=RunBudget(ledger, allow_unpriced=allow_unpriced))
