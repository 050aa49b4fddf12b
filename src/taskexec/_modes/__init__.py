"""The ways a task reaches its agent: one module per mode, one shared call record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._http import ClientPool
from .._models import Agent, AgentTask, ExecutionError, Usage
from .._retry import RetryPolicy

__all__ = ("Call", "Outcome", "timeout_outcome")


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

    @property
    def task_id(self) -> str:
        """The task's id (for log lines)."""
        return self.task.id


@dataclass(slots=True)
class Outcome:
    """What a mode produced: an output or an error, with usage and result metadata."""

    output: str | None = None
    error: ExecutionError | None = None
    usage: Usage = field(default_factory=Usage)
    metadata: dict[str, Any] = field(default_factory=dict)


def timeout_outcome(task: AgentTask, deadline_s: float, mode: str) -> Outcome:
    """Return the outcome of a task stopped by its deadline (the same on both engines)."""
    message = f"task {task.id!r} did not finish within its {deadline_s:g} s deadline"
    return Outcome(
        error=ExecutionError(kind="timeout", message=message), metadata={"execution_mode": mode}
    )
