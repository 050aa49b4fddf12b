"""Results of tasks that ran, the same on every engine; and how far a cancelled task got."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from ._models import EngineName, ExecutionError, ExecutionResult, ExecutionStatus, Mode
from ._modes import Call, Outcome

__all__ = ("Progress", "make_result")

log = logging.getLogger("taskexec")


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
        self, message: str, now: float, engine: EngineName = "async"
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
    engine: EngineName,
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
