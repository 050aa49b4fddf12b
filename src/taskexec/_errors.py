"""Exceptions raised for programmer and configuration errors.

Task-level failures (an HTTP 500, a script that exits 1, a timeout) never raise: they come back
as an :class:`~taskexec.ExecutionResult` whose ``error`` says what happened. The exceptions here are
for mistakes a caller can fix in their code or configuration, and each message names the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = (
    "BusError",
    "BusTimeoutError",
    "ClusterUnavailableError",
    "ConfigurationError",
    "InvalidValueError",
    "MissingExtraError",
    "NoSubscriberError",
    "NotAModelError",
    "NotARequestError",
    "PlanError",
    "ProviderNotFoundError",
    "StreamNotFinishedError",
    "SyncInAsyncContextError",
    "TaskexecError",
    "UnknownAgentError",
    "UnpricedAgentError",
    "UnsupportedModeError",
)


class TaskexecError(Exception):
    """Base class of every exception taskexec raises on purpose."""


class ConfigurationError(TaskexecError):
    """The executor was asked to do something its configuration cannot serve."""


class InvalidValueError(ConfigurationError, ValueError):
    """An argument has a value the API does not accept (``max_concurrency=0``, an unknown fault).

    Also a ``ValueError``, which is what such a mistake raised before it had a class of its own.
    """


class UnknownAgentError(ConfigurationError):
    """A task or call names an agent that is not registered with the executor."""


class UnsupportedModeError(ConfigurationError):
    """The resolved agent cannot serve the requested mode (e.g. ``api`` without a ``url``)."""


class ProviderNotFoundError(ConfigurationError):
    """An agent names an LLM provider that is not registered."""


class UnpricedAgentError(ConfigurationError):
    """A run has a cost ceiling, but the cost of some of its agents' calls is unknown.

    Neither the agent's ``price`` nor the price table knows their model, so the ceiling could
    not be held; ``agents`` names them. Give each a ``price`` (all zeros for a local model), or
    pass ``allow_unpriced=True`` to run them outside the ceiling.

    Args:
        agents: The names of the agents without a known price.
        max_cost_usd: The ceiling that was asked for.
    """

    def __init__(self, agents: Sequence[str], max_cost_usd: float) -> None:
        self.agents = list(agents)
        self.max_cost_usd = max_cost_usd
        names = ", ".join(repr(a) for a in self.agents)
        super().__init__(
            f"a cost ceiling (max_cost_usd={max_cost_usd:g}) needs the price of every agent "
            f"that makes LLM calls, and none is known for: {names}. Set the agent's price "
            "(USD per million tokens, e.g. price: {input_per_mtok: 0.15, output_per_mtok: "
            "0.6}; all zeros for a local model), or allow_unpriced=True to run them outside "
            "the ceiling"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (UnpricedAgentError, (self.agents, self.max_cost_usd))


class StreamNotFinishedError(TaskexecError, RuntimeError):
    """A stream's ``result`` was read before its iteration ended or its block exited."""


class SyncInAsyncContextError(TaskexecError, RuntimeError):
    """A blocking ``taskexec.sync`` call was made from a thread whose event loop is running.

    Also a ``RuntimeError``, as asgiref's ``SynchronousOnlyOperation`` family is for the same
    misuse, so code that catches either keeps working.
    """


class MissingExtraError(ConfigurationError):
    """A call or command needs an optional part of taskexec that is not installed.

    The message names the extra to install (``pip install 'taskexec[workers]'``).
    """


class ClusterUnavailableError(TaskexecError):
    """The broker (RabbitMQ) or the results store (Redis) of a distributed run cannot be reached.

    The message names the URL, with its password replaced by ``***``, and the cause.
    """


class BusError(TaskexecError):
    """A misuse of the message bus; each subclass is also the built-in error it used to be."""


class NotAModelError(BusError, TypeError):
    """A message published on the bus is not a pydantic model."""


class NoSubscriberError(BusError, LookupError):
    """A request was published on a topic nobody subscribes to."""


class NotARequestError(BusError, ValueError):
    """A reply was sent to a message that was not a request."""


class BusTimeoutError(BusError, TimeoutError):
    """No reply to a request came in time."""


class PlanError(TaskexecError):
    """A plan or task list is invalid; ``problems`` lists every problem found, not just the first.

    Args:
        problems: One human-readable line per problem, each naming the field at fault.
        source: The file the plan came from, when there is one.
    """

    def __init__(self, problems: Sequence[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        count = len(self.problems)
        header = f"{where}{count} problem{'s' if count != 1 else ''} found"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would call PlanError(message): rebuild from the parts instead, so the
        # error survives pickling (multiprocessing, concurrent.futures, a task queue).
        return (_rebuild_plan_error, (self.problems, self.source))


def _rebuild_plan_error(problems: list[str], source: str | None) -> PlanError:
    return PlanError(problems, source=source)
