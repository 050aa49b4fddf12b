"""The rollback engine's streams (``TASKEXEC_ENGINE=legacy``): blocking, one thread, no loop.

The same deltas as the async engine's streams, over the legacy engine's blocking client (one
``httpx.Client`` per task, as its ``execute`` does), and the same rules: retries only before the
first delta, the deadline over the whole stream, a stream closed early closes its request (kills
its script) at once. Sync callers iterate it in their own thread, like the legacy ``execute``;
async callers step it in a worker thread (:class:`taskexec._stream.TaskStream`), and may
:meth:`LegacyStream.abort` a step that blocks from the loop's thread.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Self

from ._http import BlockingClient, HttpResponse, TransportError
from ._models import ExecutionError, ExecutionResult
from ._modes.api import api_request, parse_api_response
from ._modes.script import (
    PIPE_DRAIN_S,
    exit_error,
    forget_group,
    script_env,
    script_stdin,
    track_group,
)
from ._modes.streaming import API_STREAM_ACCEPT, ScriptText
from ._retry import AttemptFailed, attempt_timeout, classify_response, next_wait, transport_failure
from ._secrets import Redactor
from ._sse import SSEDecoder
from .providers import get_provider
from .providers.base import HttpProvider, StreamErrorEvent
from .providers.offline import OfflineProvider, offline_pieces, offline_reply

if TYPE_CHECKING:
    from ._http_stream import BlockingStream
    from ._stream_run import StreamJob, StreamRun

__all__ = ("LegacyStream",)

_Deltas = Generator[str, None, None]


class _Deadline(Exception):
    """The task's deadline passed while its stream was being read."""


class LegacyStream:
    """A task's deltas, blocking: ``next()`` for each, ``close()`` to stop early.

    A thin owner of the stream's state (:class:`_Core`, whose generators refer back to it):
    with no reference cycle here, a stream dropped half-read is closed the moment its last
    reference goes, not at some later garbage collection.

    Args:
        job: The task, with its executor's agents and call settings.
        run: The task's run record (its call, its text so far, its state).
    """

    __slots__ = ("_core",)

    def __init__(self, job: StreamJob, run: StreamRun) -> None:
        self._core = _Core(job, run)

    @property
    def run(self) -> StreamRun:
        """The task's run record."""
        return self._core.run

    @property
    def result(self) -> ExecutionResult | None:
        """The task's result once the stream has ended (None before)."""
        return self._core.result

    @result.setter
    def result(self, value: ExecutionResult | None) -> None:
        self._core.result = value

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> str:
        delta = self._core.next_or_none()
        if delta is None:
            raise StopIteration
        return delta

    def next_or_none(self) -> str | None:
        """Return the next delta, or None once the stream has ended (its result is then set)."""
        return self._core.next_or_none()

    def close(self) -> None:
        """Stop the stream: its request is closed (its script killed) before this returns."""
        self._core.close()

    def abort(self) -> None:
        """Stop a step blocked in another thread (thread-safe): close what it reads."""
        self._core.abort()

    def __del__(self) -> None:
        # Dropped half-read: close its connection (kill its script) now.
        core = self._core
        if core.result is None and core.started:
            with contextlib.suppress(Exception):
                core.close()


class _Core:
    """The state of a :class:`LegacyStream`: its generators, what to abort, its result.

    Args:
        job: The task, with its executor's agents and call settings.
        run: The task's run record (its call, its text so far, its state).
    """

    def __init__(self, job: StreamJob, run: StreamRun) -> None:
        self._job = job
        self.run = run
        self.result: ExecutionResult | None = None
        self._deltas: _Deltas | None = None
        self._lock = threading.Lock()
        #: Stops what the current step blocks on (closes the response, kills the script).
        self._aborter: Callable[[], None] | None = None
        self._aborted = False

    @property
    def started(self) -> bool:
        """True once the stream was opened (its first delta asked for)."""
        return self._deltas is not None

    def next_or_none(self) -> str | None:
        """Return the next delta, or None once the stream has ended (its result is then set)."""
        if self.result is not None:
            return None
        run = self.run
        if self._deltas is None:
            self._deltas = self._open()
        try:
            if time.monotonic() >= run.deadline:
                raise _Deadline
            delta = next(self._deltas)
        except StopIteration:
            self._end(None)
            return None
        except _Deadline:
            self._deltas.close()
            self._end(run.timeout_error())
            return None
        except BaseException:
            # Ctrl-C (or an abort from the loop's thread): the generator's own cleanup closed
            # the request on the way out; the interrupt goes on after that.
            self._end(ExecutionError(kind="cancelled", message="cancelled while streaming"))
            raise
        run.parts.append(delta)
        return delta

    def close(self) -> None:
        """Stop the stream: its request is closed (its script killed) before this returns."""
        if self.result is not None:
            return
        if self._deltas is not None:
            self._deltas.close()
        self._end(ExecutionError(kind="cancelled", message="the stream was closed before its end"))

    def abort(self) -> None:
        """Stop a step blocked in another thread (thread-safe): close what it reads."""
        with self._lock:
            self._aborted = True
            aborter = self._aborter
        if aborter is not None:
            with contextlib.suppress(Exception):
                aborter()

    def _end(self, error: ExecutionError | None) -> None:
        self._deltas = None
        self.result = self.run.result(error)

    def _set_aborter(self, aborter: Callable[[], None] | None) -> None:
        with self._lock:
            self._aborter = aborter
            aborted = self._aborted
        if aborted and aborter is not None:
            aborter()

    # -- the modes -----------------------------------------------------------------------------

    def _open(self) -> _Deltas:
        mode = self.run.mode
        if mode == "script":
            return self._script()
        if mode == "api":
            return self._api()
        return self._llm()

    def _time_left(self) -> float:
        left = self.run.deadline - time.monotonic()
        if left <= 0:
            raise _Deadline
        return left

    def _llm(self) -> _Deltas:
        call, state = self.run.call, self.run.state
        agent = call.agent
        provider = get_provider(agent.provider)
        unavailable = provider.unavailable(agent)
        if unavailable is not None:
            if agent.command:
                yield from self._script()
                state.metadata.update(
                    execution_mode="script_fallback", fallback_reason=unavailable.reason
                )
                return
            state.error = ExecutionError(kind="configuration", message=unavailable.message)
            state.metadata.update(execution_mode="llm", provider=agent.provider)
            return
        state.metadata.update(execution_mode="llm", provider=agent.provider)
        if agent.model:
            state.metadata["model"] = agent.model
        if isinstance(provider, OfflineProvider):
            call.attempts += 1
            text = offline_reply(agent.name, agent.model, call.prompt)
            state.usage = state.usage.model_copy(
                update={
                    "input_tokens": len(call.prompt.split()),
                    "output_tokens": len(text.split()),
                }
            )
            yield from offline_pieces(text)
            return
        if not isinstance(provider, HttpProvider):
            # A provider of another kind has no blocking stream: the legacy engine's own
            # execute() runs it, and its whole reply is one delta.
            from ._legacy import LegacyRunner

            job = self._job
            result = LegacyRunner(job.roster, job.settings).execute(job.task, job.agent, job.mode)
            call.attempts = result.attempts
            state.usage, state.error = result.usage, result.error
            if result.output and result.error is None:
                yield result.output
            return
        url, headers, body = provider.stream_request(agent, call.prompt)

        def read(response: BlockingStream) -> _Deltas:
            if not 200 <= response.status < 300:
                raise provider.stream_failure(
                    agent, response.status, response.headers, response.read()
                )
            decoder = provider.stream_decoder()
            events = SSEDecoder()
            try:
                for chunk in response:
                    for name, data in events.feed(chunk):
                        try:
                            text = decoder.event(name, data)
                        except (
                            StreamErrorEvent,
                            KeyError,
                            IndexError,
                            TypeError,
                            ValueError,
                        ) as exc:
                            raise provider.stream_event_failure(agent, exc) from None
                        state.usage = decoder.usage
                        if text:
                            yield text
                    self._time_left()
            except TransportError:
                if decoder.done:
                    return
                raise
            if not decoder.done:
                message = f"{provider.name} at {url}: the stream ended before its end event"
                raise AttemptFailed(
                    ExecutionError(kind="connection", message=message, retryable=True)
                )

        redact = Redactor([provider.api_key(agent), provider.environment_key()])
        yield from self._attempts(url, headers, body, read, redact, f"{provider.name} at {url}")

    def _api(self) -> _Deltas:
        call, state = self.run.call, self.run.state
        state.metadata["execution_mode"] = "api"
        request = api_request(call)
        headers = {**request.headers, "accept": API_STREAM_ACCEPT}

        def read(response: BlockingStream) -> _Deltas:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                reply = HttpResponse(response.status, response.headers, response.read())
                output = parse_api_response(request, reply)
                if output:
                    yield output
                return
            if not 200 <= response.status < 300:
                reply = HttpResponse(response.status, response.headers, response.read())
                failure = classify_response(reply, request.redact, where=request.where)
                assert failure is not None
                raise failure
            events = SSEDecoder()
            for chunk in response:
                for _, data in events.feed(chunk):
                    if data:
                        yield data
                self._time_left()

        yield from self._attempts(
            request.url, headers, request.body, read, request.redact, request.where
        )

    def _attempts(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        read: Callable[[BlockingStream], _Deltas],
        redact: Redactor,
        where: str,
    ) -> _Deltas:
        """Open the stream, retrying (only before the first delta) like the legacy execute."""
        call, state = self.run.call, self.run.state
        connect = call.pool.connect_timeout_s
        with BlockingClient(connect_timeout_s=connect) as client:
            while True:
                call.attempts += 1
                started = False
                left = self._time_left()
                timeout = min(attempt_timeout(call, time.monotonic()) or left, left)
                try:
                    with client.stream(url, body, headers, timeout) as response:
                        self._set_aborter(client.close)
                        try:
                            for delta in read(response):
                                started = True
                                yield delta
                        finally:
                            self._set_aborter(None)
                    return
                except TransportError as exc:
                    if exc.kind == "timeout" and time.monotonic() >= self.run.deadline:
                        raise _Deadline from None
                    failed = transport_failure(exc, redact, where=where)
                except AttemptFailed as exc:
                    failed = exc
                wait = None if started else next_wait(call, failed, time.monotonic())
                if wait is None:
                    state.error = failed.error
                    return
                time.sleep(wait)

    def _script(self) -> _Deltas:
        call, state = self.run.call, self.run.state
        command = call.agent.command
        assert command
        call.attempts += 1
        state.metadata["execution_mode"] = "script"
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
            state.error = ExecutionError(kind="configuration", message=message)
            return
        from ._legacy import _feed, _pump, _stop

        track_group(process.pid)
        stderr = bytearray()
        helpers = [
            threading.Thread(target=_pump, args=(process.stderr, stderr), daemon=True),
            threading.Thread(target=_feed, args=(process.stdin, script_stdin(call)), daemon=True),
        ]
        for helper in helpers:
            helper.start()
        self._set_aborter(lambda: _kill(process))
        assert process.stdout is not None
        text = ScriptText()
        finished = False
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)
                fd = process.stdout.fileno()
                drained_by: float | None = None
                while True:
                    # Wait for output no longer than the deadline allows; once the script
                    # exited, end its group and read what is left for PIPE_DRAIN_S at most
                    # (a grandchild that left the group may hold stdout for ever).
                    if drained_by is None and process.poll() is not None:
                        _kill(process)
                        drained_by = time.monotonic() + PIPE_DRAIN_S
                    if drained_by is not None and time.monotonic() >= drained_by:
                        break
                    if not selector.select(min(self._time_left(), 0.05)):
                        continue
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break
                    piece = text.feed(chunk)
                    if piece:
                        yield piece
            process.wait(timeout=self._time_left())
            finished = True
        except subprocess.TimeoutExpired:
            raise _Deadline from None
        finally:
            self._set_aborter(None)
            if not finished:
                _stop(process)
            process.stdout.close()
            for helper in helpers:
                helper.join(1.0)
            forget_group(process.pid)
        if process.returncode != 0:
            state.error = exit_error(call, process.returncode, bytes(stderr))
            return
        rest = text.finish()
        if rest:
            yield rest


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
