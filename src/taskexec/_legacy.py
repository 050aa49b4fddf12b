"""The pre-refactor sync engine, kept on purpose for the rollback flag (``TASKEXEC_ENGINE=legacy``).

This is how the executor worked before it went async, and it stays that way so that operators
can roll back to it without a redeploy:

- ``llm`` mode runs ``asyncio.run(self._execute_via_llm(...))`` for every task, with a client of
  its own. This module is the one place in taskexec that calls ``asyncio.run``, on purpose: it is
  the old behaviour, a new event loop and a new HTTP client per task.
- ``api`` mode makes a blocking ``httpx`` call; ``script`` mode a blocking subprocess.
- The orchestrator runs tasks one after another, in dependency order.

It shares the providers, the retry rules, prompt rendering and result building with the async
engine, so both produce the same statuses, outputs and error kinds; only ``engine`` (``legacy``),
timing, and concurrency differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import IO

from ._calls import CallSettings, Roster, prepare
from ._graph import topological_order
from ._http import BlockingClient, ClientPool, TransportError
from ._models import (
    Agent,
    AgentTask,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
    Mode,
)
from ._modes import Call, Outcome, timeout_outcome
from ._modes.api import api_request, parse_api_response
from ._modes.llm import run_llm
from ._modes.script import (
    GROUP_EXIT_WAIT_S,
    PIPE_DRAIN_S,
    TERMINATE_GRACE_S,
    exit_error,
    forget_group,
    group_alive,
    parse_script_output,
    script_env,
    script_stdin,
    track_group,
)
from ._results import Progress, make_result
from ._retry import AttemptFailed, attempt_timeout, next_wait, transport_failure
from ._tracing import trace_task_blocking

__all__ = ("LegacyRunner",)


class LegacyRunner:
    """Runs tasks the pre-refactor way, with the agents and call settings it is given.

    Args:
        roster: The agents tasks may name.
        settings: Pool limits, retry policy and attempt timeout (the pool itself is not used:
            each task gets a client of its own, as before the refactor).
    """

    def __init__(self, roster: Roster, settings: CallSettings) -> None:
        self._roster = roster
        self._settings = settings

    @trace_task_blocking
    def execute(
        self,
        task: AgentTask,
        agent: str | Agent | None = None,
        mode: Mode | None = None,
        outputs: dict[str, str | None] | None = None,
        on_interrupt: Callable[[ExecutionResult], None] | None = None,
    ) -> ExecutionResult:
        """Run one task, blocking the calling thread until it is done.

        On Ctrl-C (``KeyboardInterrupt``) the script or request in flight is stopped,
        ``on_interrupt`` gets the task's ``cancelled`` result (with the attempts it made and
        the time it ran), and the interrupt goes on.
        """
        started_at = datetime.now(UTC)
        start = time.monotonic()
        call, chosen, deadline_s = prepare(
            self._roster, self._settings, task, agent, mode, outputs, start
        )
        try:
            if chosen == "llm":
                outcome = asyncio.run(self._execute_via_llm(call, deadline_s))
            elif chosen == "api":
                outcome = self._execute_api(call, deadline_s)
            else:
                outcome = self._execute_script(call, deadline_s)
        except KeyboardInterrupt:
            if on_interrupt is not None:
                progress = Progress()
                progress.begin(call, chosen, started_at, start)
                cancelled = progress.cancelled_result(
                    "cancelled while running", time.monotonic(), "legacy"
                )
                assert cancelled is not None
                on_interrupt(cancelled)
            raise
        return make_result(call, chosen, outcome, started_at, time.monotonic() - start, "legacy")

    async def _execute_via_llm(self, call: Call, deadline_s: float) -> Outcome:
        # A new pool, hence a new client and new connections, for this one task: the old way.
        shared = self._settings.pool
        pool = ClientPool(
            max_connections=shared.max_connections, connect_timeout_s=shared.connect_timeout_s
        )
        call.pool = pool
        try:
            # loop.time() is time.monotonic(), so the deadline computed outside still holds.
            async with asyncio.timeout_at(call.deadline):
                return await run_llm(call)
        except TimeoutError:
            return timeout_outcome(call.task, deadline_s, "llm")
        finally:
            await pool.aclose()

    def _execute_api(self, call: Call, deadline_s: float) -> Outcome:
        request = api_request(call)
        metadata = {"execution_mode": "api"}
        connect = self._settings.pool.connect_timeout_s
        with BlockingClient(connect_timeout_s=connect) as client:
            while True:
                call.attempts += 1
                now = time.monotonic()
                if now >= call.deadline:
                    return timeout_outcome(call.task, deadline_s, "api")
                timeout = attempt_timeout(call, now) or call.deadline - now
                try:
                    response = client.post(request.url, request.body, request.headers, timeout)
                    return Outcome(output=parse_api_response(request, response), metadata=metadata)
                except TransportError as exc:
                    if exc.kind == "timeout" and time.monotonic() >= call.deadline:
                        return timeout_outcome(call.task, deadline_s, "api")
                    failed = transport_failure(exc, request.redact, where=request.where)
                except AttemptFailed as exc:
                    failed = exc
                wait = next_wait(call, failed, time.monotonic())
                if wait is None:
                    return Outcome(error=failed.error, metadata=metadata)
                time.sleep(wait)

    def _execute_script(self, call: Call, deadline_s: float) -> Outcome:
        command = call.agent.command
        assert command
        call.attempts += 1
        metadata = {"execution_mode": "script"}
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=script_env(call),
            )
        except OSError as exc:
            message = f"could not start script {command[0]!r}: {exc.strerror or exc}"
            error = ExecutionError(kind="configuration", message=message)
            return Outcome(error=error, metadata=metadata)
        track_group(process.pid)
        stdout, stderr = bytearray(), bytearray()
        # Pipes are served by threads and the result is taken when the script exits (as in
        # the async engine): a grandchild holding stdout open cannot make it a timeout.
        pumps = [
            threading.Thread(target=_pump, args=(process.stdout, stdout), daemon=True),
            threading.Thread(target=_pump, args=(process.stderr, stderr), daemon=True),
            threading.Thread(target=_feed, args=(process.stdin, script_stdin(call)), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        try:
            process.wait(timeout=max(call.deadline - time.monotonic(), 0.001))
            _kill_group(process.pid)  # what the finished script left running in its group
            drained = time.monotonic() + PIPE_DRAIN_S
            for pump in pumps:
                pump.join(max(drained - time.monotonic(), 0))
            _wait_group_gone(process.pid)
        except subprocess.TimeoutExpired:
            _stop(process)
            return timeout_outcome(call.task, deadline_s, "script")
        except BaseException:
            _stop(process)  # Ctrl-C or any other interruption: leave nothing running
            raise
        finally:
            forget_group(process.pid)
        if process.returncode != 0:
            error = exit_error(call, process.returncode, bytes(stderr))
            return Outcome(error=error, metadata=metadata)
        return Outcome(output=parse_script_output(bytes(stdout)), metadata=metadata)

    def execute_tasks(
        self,
        tasks: Sequence[AgentTask],
        fail_fast: bool = False,
        on_result: Callable[[ExecutionResult], None] | None = None,
    ) -> list[ExecutionResult]:
        """Run tasks one after another in dependency order; the same skip and fail-fast rules."""
        results: dict[str, ExecutionResult] = {}
        stopped_by: str | None = None
        for task in topological_order(tasks):
            if stopped_by is not None:
                error = ExecutionError(
                    kind="cancelled",
                    message=f"cancelled by fail_fast after task {stopped_by!r} did not succeed",
                )
                result = self._roster.not_run_result(
                    task, ExecutionStatus.CANCELLED, error, "legacy"
                )
            else:
                failed = next((d for d in task.depends_on if not results[d].ok), None)
                if failed is not None:
                    error = ExecutionError(
                        kind="dependency_failed",
                        message=f"dependency {failed!r} did not succeed "
                        f"({results[failed].status.value})",
                    )
                    result = self._roster.not_run_result(
                        task, ExecutionStatus.SKIPPED, error, "legacy"
                    )
                else:
                    outputs = {d: results[d].output for d in task.depends_on}
                    run = functools.partial(
                        self.execute, task, outputs=outputs or None, on_interrupt=on_result
                    )
                    budget = self._settings.budget  # the run's cost ceiling, if it has one
                    result = (
                        budget.run_blocking(self._roster, task, outputs or None, run, "legacy")
                        if budget is not None
                        else run()
                    )
                    if not result.ok and fail_fast:
                        stopped_by = task.id
            results[task.id] = result
            if on_result is not None:
                on_result(result)
        return [results[t.id] for t in tasks]


def _pump(pipe: IO[bytes] | None, into: bytearray) -> None:
    if pipe is None:
        return
    with pipe:
        while chunk := os.read(pipe.fileno(), 1 << 16):
            into += chunk


def _feed(pipe: IO[bytes] | None, data: bytes) -> None:
    if pipe is None:
        return
    # A script may exit without reading its stdin: that is its business, not an error.
    with contextlib.suppress(BrokenPipeError, ConnectionError, ValueError), pipe:
        pipe.write(data)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a script's whole process group: SIGTERM, the grace period, then SIGKILL."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _kill_group(process.pid)
            process.wait()
    _kill_group(process.pid)
    _wait_group_gone(process.pid)


def _wait_group_gone(pgid: int) -> None:
    end = time.monotonic() + GROUP_EXIT_WAIT_S
    while group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.005)  # SIGKILL lands asynchronously; see _modes.script
