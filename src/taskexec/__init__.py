"""taskexec: run LLM agent tasks concurrently, async-first, with sync shims and a rollback flag."""

from ._errors import BusError as BusError
from ._errors import BusTimeoutError as BusTimeoutError
from ._errors import ClusterUnavailableError as ClusterUnavailableError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import InvalidValueError as InvalidValueError
from ._errors import MissingExtraError as MissingExtraError
from ._errors import NoSubscriberError as NoSubscriberError
from ._errors import NotAModelError as NotAModelError
from ._errors import NotARequestError as NotARequestError
from ._errors import PlanError as PlanError
from ._errors import ProviderNotFoundError as ProviderNotFoundError
from ._errors import StreamNotFinishedError as StreamNotFinishedError
from ._errors import SyncInAsyncContextError as SyncInAsyncContextError
from ._errors import TaskexecError as TaskexecError
from ._errors import UnknownAgentError as UnknownAgentError
from ._errors import UnpricedAgentError as UnpricedAgentError
from ._errors import UnsupportedModeError as UnsupportedModeError
from ._executor import TaskExecutor as TaskExecutor
from ._models import Agent as Agent
from ._models import AgentTask as AgentTask
from ._models import ErrorKind as ErrorKind
from ._models import ExecutionError as ExecutionError
from ._models import ExecutionResult as ExecutionResult
from ._models import ExecutionStatus as ExecutionStatus
from ._models import Price as Price
from ._models import ScriptEnv as ScriptEnv
from ._models import Usage as Usage
from ._orchestrator import ProjectOrchestrator as ProjectOrchestrator
from ._plan import Plan as Plan
from ._plan import PlanSettings as PlanSettings
from ._plan import load_agents as load_agents
from ._plan import load_plan as load_plan
from ._retry import RetryPolicy as RetryPolicy
from ._stream import TaskStream as TaskStream
from ._version import __version__ as __version__
from .bus import MessageBus as MessageBus

__all__ = (
    "Agent",
    "AgentTask",
    "BusError",
    "BusTimeoutError",
    "ClusterUnavailableError",
    "ConfigurationError",
    "ErrorKind",
    "ExecutionError",
    "ExecutionResult",
    "ExecutionStatus",
    "InvalidValueError",
    "MessageBus",
    "MissingExtraError",
    "NoSubscriberError",
    "NotAModelError",
    "NotARequestError",
    "Plan",
    "PlanError",
    "PlanSettings",
    "Price",
    "ProjectOrchestrator",
    "ProviderNotFoundError",
    "RetryPolicy",
    "ScriptEnv",
    "StreamNotFinishedError",
    "SyncInAsyncContextError",
    "TaskExecutor",
    "TaskStream",
    "TaskexecError",
    "UnknownAgentError",
    "UnpricedAgentError",
    "UnsupportedModeError",
    "Usage",
    "__version__",
    "load_agents",
    "load_plan",
)
