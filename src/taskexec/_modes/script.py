"""``script`` mode: the pre-refactor subprocess path, kept as a fallback and deprecated.

The agent's ``command`` starts with no shell, in a new session (its own process group), so that on
timeout or cancellation the whole group can be stopped: SIGTERM, a grace period, then SIGKILL.
The result is taken when the script exits, not when its pipes close, and whatever the script
left running in its group is ended then: a finished script leaves no process behind.
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
    "PIPE_DRAIN_S",
    "TERMINATE_GRACE_S",
    "forget_group",
    "group_alive",
    "kill_live_groups",
    "parse_script_output",
    "run_script",
    "script_env",
    "script_stdin",
    "track_group",
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
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


#: How long to wait, after SIGKILL, for the rest of a script's process group to be gone.
GROUP_EXIT_WAIT_S = 0.5
#: How long a script's pipes may stay open after it exited and its group was ended. Only a
#: grandchild that left the group (``setsid``) and kept the pipe can hold them longer; what was
#: read by then is the output.
PIPE_DRAIN_S = 0.5
_READ_CHUNK = 1 << 16

#: Process groups of the scripts started and not yet stopped, in either engine. The command line
#: ends them all before it exits at once on a second Ctrl-C or SIGTERM.
_live_groups: set[int] = set()


def kill_live_groups() -> int:
    """SIGKILL the process group of every script still running; return how many there were."""
    groups = list(_live_groups)
    for pgid in groups:
        _signal_group(pgid, signal.SIGKILL)
    return len(groups)


def track_group(pgid: int) -> None:
    """Record a script's process group as live (until :func:`forget_group`)."""
    _live_groups.add(pgid)


def forget_group(pgid: int) -> None:
    """Record that a script's process group has been ended."""
    _live_groups.discard(pgid)


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


class _ScriptProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Stream protocol that also reports the moment the script itself exits.

    ``Process.wait()`` returns only once every pipe is closed too, and a grandchild can hold
    stdout open for ever: the result is taken when the script exits, not when its pipes close.
    """

    def __init__(self, exited: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_READ_CHUNK, loop=loop)
        self.exited = exited

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


async def _read_into(stream: asyncio.StreamReader | None, into: bytearray) -> None:
    # Chunk by chunk into a buffer the caller owns, so what was read survives a cancelled read.
    while stream is not None and (chunk := await stream.read(_READ_CHUNK)):
        into += chunk


async def _feed(stream: asyncio.StreamWriter | None, data: bytes) -> None:
    if stream is None:
        return
    # A script may exit without reading its stdin: that is its business, not an error.
    with contextlib.suppress(ConnectionError):
        stream.write(data)
        await stream.drain()
        stream.close()


async def _stop(pid: int, exited: asyncio.Future[None]) -> None:
    """Stop the script's whole process group: SIGTERM, wait for the grace period, SIGKILL."""
    if exited.done():
        _signal_group(pid, signal.SIGKILL)  # kill any grandchildren left behind
        await _await_group_exit(pid)
        return
    _signal_group(pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(exited), TERMINATE_GRACE_S)
    except (TimeoutError, asyncio.CancelledError):
        pass
    finally:
        # Always reached, even if we are cancelled again while waiting: nothing survives.
        _signal_group(pid, signal.SIGKILL)
    await asyncio.shield(exited)  # SIGKILL cannot be refused: the exit is reported promptly
    await _await_group_exit(pid)


async def run_script(call: Call) -> Outcome:
    """Run the agent's command with the task on stdin and its stdout as the output."""
    command = call.agent.command
    assert command  # the executor checks this before choosing the mode
    call.attempts += 1
    metadata: dict[str, object] = {"execution_mode": "script"}
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _ScriptProtocol(exited, loop),
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
    process = asyncio.subprocess.Process(transport, protocol, loop)
    pid = process.pid
    track_group(pid)
    stdout, stderr = bytearray(), bytearray()
    io = [
        asyncio.ensure_future(_read_into(process.stdout, stdout)),
        asyncio.ensure_future(_read_into(process.stderr, stderr)),
        asyncio.ensure_future(_feed(process.stdin, script_stdin(call))),
    ]
    try:
        # Shielded: a cancellation must not cancel the future that reports the exit, which
        # _stop still waits on.
        await asyncio.shield(exited)
        # The script is done; whatever it left in its group is not: end it, so that nothing
        # outlives the task and the pipes the group held close.
        _signal_group(pid, signal.SIGKILL)
        await asyncio.wait(io, timeout=PIPE_DRAIN_S)
        await _await_group_exit(pid)
    except BaseException:
        # Timeout (the task deadline cancels us) or the caller's cancellation: leave nothing
        # running, then let the cancellation go on.
        await _stop(pid, exited)
        raise
    finally:
        for part in io:
            part.cancel()
        await asyncio.gather(*io, return_exceptions=True)
        transport.close()
        forget_group(pid)
    returncode = transport.get_returncode()
    assert returncode is not None
    if returncode != 0:
        return Outcome(error=exit_error(call, returncode, bytes(stderr)), metadata=metadata)
    return Outcome(output=parse_script_output(bytes(stdout)), metadata=metadata)
