"""The ways a task reaches its agent: one module per mode, one shared call record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._http import ClientPool
from .._models import Agent, AgentTask, ExecutionError, Usage
from .._retry import RetryPolicy

__all__ = ("Call", "Outcome")


@dataclass(slots=True)
class Call:
    """Everything a mode needs for one task; ``attempts`` is counted as tries happen."""

    task: AgentTask
    agent: Agent
    prompt: str
    deadline: float  # loop.time() by which the task must be over
    max_retries: int
    pool: ClientPool
    policy: RetryPolicy
    attempt_timeout_s: float | None
    attempts: int = 0


@dataclass(slots=True)
class Outcome:
    """What a mode produced: an output or an error, with usage and result metadata."""

    output: str | None = None
    error: ExecutionError | None = None
    usage: Usage = field(default_factory=Usage)
    metadata: dict[str, Any] = field(default_factory=dict)
