"""``script`` mode: the pre-refactor subprocess path, kept as a fallback and deprecated.

The agent's ``command`` starts with no shell, in a new session (its own process group), so that on
timeout or cancellation the whole group can be stopped: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal

from .._models import ExecutionError
from ..providers import secret_redactor
from . import Call, Outcome

__all__ = (
    "GROUP_EXIT_WAIT_S",
    "TERMINATE_GRACE_S",
    "group_alive",
    "parse_script_output",
    "run_script",
    "script_env",
    "script_stdin",
)

#: Seconds a script gets between SIGTERM and SIGKILL.
TERMINATE_GRACE_S = 2.0
_STDERR_TAIL = 2000


def script_stdin(call: Call) -> bytes:
    """Return the JSON a script reads on stdin: the task, the agent's name, the rendered prompt."""
    document = {
        "task": call.task.model_dump(mode="json"),
        "agent": call.agent.name,
        "prompt": call.prompt,
    }
    return json.dumps(document).encode()


def script_env(call: Call) -> dict[str, str] | None:
    """Return the environment the script starts with (None: this process's, inherited whole)."""
    return call.agent.env.build(os.environ)


def parse_script_output(stdout: bytes) -> str:
    """Return a script's output: ``"output"`` of a JSON object on stdout, else stdout stripped."""
    text = stdout.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            return text
        if isinstance(document, dict) and "output" in document:
            value = document["output"]
            return value if isinstance(value, str) else json.dumps(value)
    return text


def exit_error(call: Call, returncode: int, stderr: bytes) -> ExecutionError:
    """Return the error for a script that exited non-zero, with the tail of its stderr.

    Scripts inherit the provider keys by default, and some print their environment when they
    fail: the tail is redacted before it is cut.
    """
    command = call.agent.command or ["?"]
    redact = secret_redactor([call.agent])
    text = stderr[-4 * _STDERR_TAIL :].decode("utf-8", "replace")
    tail = redact.cut(text, _STDERR_TAIL, keep="tail").strip()
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with {returncode}"
    message = f"script {command[0]!r} {how}" + (f": {tail}" if tail else "")
    return ExecutionError(kind="script_exit", message=message)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


#: How long to wait, after SIGKILL, for the rest of a script's process group to be gone.
GROUP_EXIT_WAIT_S = 0.5


def group_alive(pgid: int) -> bool:
    """Return True while any process of the group exists (zombies not yet reaped included)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _await_group_exit(pgid: int) -> None:
    # SIGKILL is delivered asynchronously: give grandchildren a moment to actually die, so that
    # "nothing left running" holds when the task's result is returned. Bounded: a zombie that
    # the system has not reaped yet still counts as a member of the group.
    loop = asyncio.get_running_loop()
    end = loop.time() + GROUP_EXIT_WAIT_S
    while group_alive(pgid) and loop.time() < end:  # noqa: ASYNC110 (no event for a group exit)
        await asyncio.sleep(0.005)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Stop the script's whole process group: SIGTERM, wait for the grace period, SIGKILL."""
    if process.returncode is not None:
        _signal_group(process.pid, signal.SIGKILL)  # kill any grandchildren left behind
        await _await_group_exit(process.pid)
        return
    _signal_group(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), TERMINATE_GRACE_S)
    except (TimeoutError, asyncio.CancelledError):
        pass
    finally:
        # Always reached, even if we are cancelled again while waiting: nothing survives.
        _signal_group(process.pid, signal.SIGKILL)
    if process.returncode is None:
        await process.wait()
    await _await_group_exit(process.pid)


async def run_script(call: Call) -> Outcome:
    """Run the agent's command with the task on stdin and its stdout as the output."""
    command = call.agent.command
    assert command  # the executor checks this before choosing the mode
    call.attempts += 1
    metadata: dict[str, object] = {"execution_mode": "script"}
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=script_env(call),
        )
    except OSError as exc:
        message = f"could not start script {command[0]!r}: {exc.strerror or exc}"
        return Outcome(
            error=ExecutionError(kind="configuration", message=message), metadata=metadata
        )
    try:
        stdout, stderr = await process.communicate(script_stdin(call))
    except BaseException:
        # Timeout (the task deadline cancels us) or the caller's cancellation: leave nothing
        # running, then let the cancellation go on.
        await _stop(process)
        raise
    if process.returncode != 0:
        assert process.returncode is not None
        return Outcome(error=exit_error(call, process.returncode, stderr), metadata=metadata)
    return Outcome(output=parse_script_output(stdout), metadata=metadata)
