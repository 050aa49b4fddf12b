"""What every entry point calls: choose the engine, then run the work on it.

Blocking callers (``taskexec.sync``) run the entry's coroutine by hand in their own thread,
first with :data:`BLOCKING_CALLER` set (see :mod:`taskexec._bridge`). An engine that runs in
the caller's thread (the rollback engine) then runs the work right there and the coroutine
finishes without ever suspending: no event loop is involved. Any other engine needs a loop:
the coroutine yields :data:`NEED_LOOP` before it touches one, and the bridge goes on running
it on its shared loop. Async callers never see either: :data:`BLOCKING_CALLER` is unset for
them, and nothing is yielded.
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Generator
from typing import Any, Final

from .._models import ExecutionResult
from .base import Batch, Job
from .registry import EngineSet, select_engine

__all__ = ("BLOCKING_CALLER", "NEED_LOOP", "execute", "execute_tasks", "need_loop")

#: Set (in a copy of its context) by a blocking caller that runs an entry's coroutine by hand.
BLOCKING_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "taskexec_blocking_caller", default=False
)


class _NeedLoop:
    """The value an entry's coroutine yields to a blocking caller to ask for an event loop."""

    def __repr__(self) -> str:
        return "NEED_LOOP"


NEED_LOOP: Final = _NeedLoop()


@types.coroutine
def need_loop() -> Generator[Any, None, None]:
    """Ask a blocking caller for an event loop, before the first use of one (else a no-op)."""
    if BLOCKING_CALLER.get():
        yield NEED_LOOP


async def execute(engines: EngineSet, job: Job) -> ExecutionResult:
    """Run one task on the engine chosen for this call."""
    engine = select_engine(engines)
    if engine.runs_in_caller_thread and BLOCKING_CALLER.get():
        return engine.execute_blocking(job)
    await need_loop()
    return await engine.execute(job)


async def execute_tasks(engines: EngineSet, batch: Batch) -> list[ExecutionResult]:
    """Run a batch on the engine chosen for this call."""
    engine = select_engine(engines)
    if engine.runs_in_caller_thread and BLOCKING_CALLER.get():
        return engine.execute_tasks_blocking(batch)
    await need_loop()
    return await engine.execute_tasks(batch)
