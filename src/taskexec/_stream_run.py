"""One streamed task under way, as every engine's stream keeps it: its call, its text so far,
how it ended, and the result all of that makes.

Shared by the async engine's stream (:mod:`taskexec._stream`) and the rollback engine's
(:mod:`taskexec._legacy_stream`), which do not import each other.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol

from ._calls import CallSettings, Roster, prepare
from ._models import Agent, AgentTask, EngineName, ExecutionError, ExecutionResult, Mode
from ._modes import Call, Outcome
from ._modes.streaming import StreamState
from ._pricing import priced
from ._results import make_result

__all__ = ("StreamJob", "StreamRun")


class StreamJob(Protocol):
    """One task to stream, with the agents and call settings of its executor (an engine Job)."""

    @property
    def roster(self) -> Roster: ...
    @property
    def settings(self) -> CallSettings: ...
    @property
    def task(self) -> AgentTask: ...
    @property
    def agent(self) -> str | Agent | None: ...
    @property
    def mode(self) -> Mode | None: ...


class StreamRun:
    """One streamed task under way: its call, the text received so far, how it is going."""

    __slots__ = ("call", "deadline_s", "engine", "mode", "parts", "start", "started_at", "state")

    def __init__(
        self,
        job: StreamJob,
        engine: EngineName,
        start: float,
        outputs: Mapping[str, str | None] | None = None,
    ) -> None:
        self.started_at = datetime.now(UTC)
        self.start = start
        self.call: Call
        self.call, self.mode, self.deadline_s = prepare(
            job.roster, job.settings, job.task, job.agent, job.mode, outputs, start
        )
        self.engine: EngineName = engine
        self.state = StreamState()
        self.parts: list[str] = []

    @property
    def deadline(self) -> float:
        """When the task must be over (``time.monotonic()``, the loop's clock)."""
        return self.call.deadline

    def timeout_error(self) -> ExecutionError:
        """The error of a stream stopped by its deadline (the same words as ``execute``)."""
        message = (
            f"task {self.call.task.id!r} did not finish within its {self.deadline_s:g} s deadline"
        )
        return ExecutionError(kind="timeout", message=message)

    def result(self, error: ExecutionError | None = None) -> ExecutionResult:
        """Return the task's result: ``error`` (a deadline, the caller leaving) wins over the
        mode's own; the text received so far is the output."""
        error = error or self.state.error
        text = "".join(self.parts)
        # A failure before any text has no output, as with execute(); a stream cut short by
        # its caller or after some text has arrived keeps what arrived.
        keep = error is None or error.kind == "cancelled" or bool(self.parts)
        metadata = {"execution_mode": self.mode, **self.state.metadata, "streamed": True}
        usage = self.state.usage
        if metadata.get("execution_mode") == "llm":
            # The cost of what was streamed, as execute() prices a reply (cut short or not);
            # the async path loaded the price table off the loop before the first request.
            usage = priced(self.call.agent, usage)
        outcome = Outcome(
            output=text if keep else None,
            error=error,
            usage=usage,
            metadata=metadata,
        )
        duration = max(0.0, time.monotonic() - self.start)
        return make_result(self.call, self.mode, outcome, self.started_at, duration, self.engine)
