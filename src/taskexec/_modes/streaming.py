"""Every mode, streamed: the deltas of one task as they arrive, for :mod:`taskexec._stream`.

Each function here is an async generator of text deltas for one task's :class:`Call`. It
retries like the mode's ``execute`` (the same budget, the same waits) but only until the first
delta: once text has been yielded, a failure ends the stream and is reported in the
:class:`StreamState`, never retried, so no text is ever yielded twice. Closing the generator
(``aclose()``, or a cancellation at a ``yield``'s await) closes the HTTP response or kills the
script's process group before it returns.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import signal
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from .._http import HttpResponse, TransportError
from .._limits import (
    LimiterUnavailable,
    LimitWaitTooLong,
    RateHeaders,
    estimate_tokens,
    has_limits,
    limiter_for,
    over_tpm,
)
from .._models import ExecutionError, Usage
from .._pricing import load_table, needs_table
from .._retry import (
    AttemptFailed,
    attempt_timeout,
    classify_response,
    next_wait,
    transport_failure,
)
from .._sse import SSEDecoder
from ..providers import get_provider
from ..providers.base import StreamReply
from . import Call
from .api import api_request, parse_api_response
from .llm import _endpoint, limit_wait_error, limiter_unavailable
from .script import (
    _READ_CHUNK,
    PIPE_DRAIN_S,
    _await_group_exit,
    _feed,
    _read_into,
    _ScriptProtocol,
    _signal_group,
    _stop,
    exit_error,
    forget_group,
    parse_script_output,
    script_env,
    script_stdin,
    track_group,
)

__all__ = ("STREAM_MODES", "ScriptText", "StreamState", "stream_api", "stream_llm", "stream_script")

#: What an ``api``-mode stream asks for: server-sent events, or a whole JSON reply.
API_STREAM_ACCEPT = "text/event-stream, application/json"


@dataclass(slots=True)
class StreamState:
    """What a streamed task reports besides its text: how it ended, its usage, its metadata."""

    error: ExecutionError | None = None
    usage: Usage = field(default_factory=Usage)
    metadata: dict[str, Any] = field(default_factory=dict)


async def stream_llm(call: Call, state: StreamState) -> AsyncGenerator[str, None]:
    """Stream a chat reply from the agent's provider (or its script, if the provider cannot run).

    A stream holds one of the agent's ``max_in_flight`` places while it is open and takes an
    ``rpm``/``tpm`` slot like any request; the token schedule is corrected by the usage the
    stream reported, also when it was cut short.
    """
    agent = call.agent
    provider = get_provider(agent.provider)
    unavailable = provider.unavailable(agent)
    if unavailable is not None:
        if agent.command:
            async with contextlib.aclosing(stream_script(call, state)) as pieces:
                async for piece in pieces:
                    yield piece
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
    if needs_table(agent):
        await load_table()  # once per process, in a thread: the stream is priced as it ends
    limiter = (
        limiter_for(agent, provider.name, _endpoint(provider, agent), provider.api_key(agent))
        if has_limits(agent)
        else None
    )
    loop = asyncio.get_running_loop()
    waited = 0.0
    while True:
        call.attempts += 1
        reply = StreamReply()
        started = False
        estimate = estimate_tokens(agent, call.prompt) if limiter is not None else 0
        too_large = over_tpm(agent, estimate, limiter.in_force.tpm) if limiter is not None else None
        if too_large is not None:
            state.error = ExecutionError(kind="configuration", message=too_large)
            return
        charged = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                if limiter is not None:
                    # The limiter's clock is time.monotonic(); the deadline is the loop's.
                    deadline = call.deadline - loop.time() + time.monotonic()
                    waited += await limiter.acquire(estimate, deadline)
                    charged = True
                    await stack.enter_async_context(limiter.request(deadline))
                timeout_s = attempt_timeout(call, loop.time())
                pieces = await stack.enter_async_context(
                    contextlib.aclosing(
                        provider.stream(agent, call.prompt, call.pool, timeout_s, reply)
                    )
                )
                async for piece in pieces:
                    started = True
                    yield piece
            if limiter is not None:
                await limiter.tighten(RateHeaders.parse(reply.headers))
            return
        except LimitWaitTooLong as exc:
            assert limiter is not None  # only a limiter raises it
            state.error = limit_wait_error(call, exc, limiter.in_force)
            return
        except LimiterUnavailable as exc:
            state.error = limiter_unavailable(call, exc)
            return
        except AttemptFailed as failed:
            if limiter is not None and failed.error.status_code == 429:
                # One 429 pauses the agent, not one task (its Retry-After, else 1 s).
                await limiter.pause(failed.retry_after_s or 1.0)
            wait = None if started else next_wait(call, failed, loop.time())
            if wait is None:
                state.error = failed.error
                return
        finally:
            state.usage = reply.usage
            if limiter is not None:
                state.metadata["rate_limit_wait_s"] = round(waited, 6)
                if charged:
                    # tpm is settled from what the stream reported, however it ended.
                    used = reply.usage.input_tokens + reply.usage.output_tokens
                    await limiter.correct(estimate, used)
        await asyncio.sleep(wait)


async def stream_api(call: Call, state: StreamState) -> AsyncGenerator[str, None]:
    """Stream an ``api``-mode reply: the ``data:`` of each event of a ``text/event-stream``
    reply, or the whole ``{"output"}`` of any other reply as one delta."""
    state.metadata["execution_mode"] = "api"
    request = api_request(call)
    headers = {**request.headers, "accept": API_STREAM_ACCEPT}
    loop = asyncio.get_running_loop()
    while True:
        call.attempts += 1
        started = False
        try:
            timeout_s = attempt_timeout(call, loop.time())
            async with call.pool.get().stream(
                request.url, request.body, headers, timeout_s
            ) as response:
                if response.headers.get("content-type", "").startswith("text/event-stream"):
                    if not 200 <= response.status < 300:
                        body = await response.read()
                        reply = HttpResponse(response.status, response.headers, body)
                        failure = classify_response(reply, request.redact, where=request.where)
                        assert failure is not None
                        raise failure
                    events = SSEDecoder()
                    async for chunk in response:
                        for _, data in events.feed(chunk):
                            if data:
                                started = True
                                yield data
                else:
                    body = await response.read()
                    reply = HttpResponse(response.status, response.headers, body)
                    output = parse_api_response(request, reply)
                    if output:
                        started = True
                        yield output
            return
        except TransportError as exc:
            failed = transport_failure(exc, request.redact, where=request.where)
        except AttemptFailed as exc:
            failed = exc
        wait = None if started else next_wait(call, failed, loop.time())
        if wait is None:
            state.error = failed.error
            return
        await asyncio.sleep(wait)


class ScriptText:
    """A script's stdout as text deltas whose join is the output ``execute`` would give.

    Leading whitespace is dropped and trailing whitespace held back until more text follows
    (``execute`` strips stdout). Stdout that starts with ``{`` is a JSON document, not prose:
    it is held whole and its ``"output"`` given as one delta when the script exits.
    """

    __slots__ = ("_decoder", "_document", "_held", "_started")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._started = False
        self._held = ""
        self._document: list[str] | None = None

    def feed(self, data: bytes, final: bool = False) -> str:
        """Return the text that ``data`` makes certain (often all of it)."""
        text = self._decoder.decode(data, final)
        if self._document is not None:
            self._document.append(text)
            return ""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
            if text.startswith("{"):
                self._document = [text]
                return ""
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        return body

    def finish(self) -> str:
        """Return the rest, once the script exited successfully."""
        tail = self.feed(b"", final=True)
        if self._document is not None:
            return parse_script_output("".join(self._document).encode())
        return tail


async def stream_script(call: Call, state: StreamState) -> AsyncGenerator[str, None]:
    """Run the agent's command and yield its stdout as the script writes it.

    Closing the stream early stops the script's whole process group (SIGTERM, the grace period,
    SIGKILL), as a cancelled ``execute`` does.
    """
    command = call.agent.command
    assert command  # the executor checks this before choosing the mode
    call.attempts += 1
    state.metadata["execution_mode"] = "script"
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
        state.error = ExecutionError(kind="configuration", message=message)
        return
    process = asyncio.subprocess.Process(transport, protocol, loop)
    pid = process.pid
    track_group(pid)
    stdout = process.stdout
    assert stdout is not None
    stderr = bytearray()
    io = [
        asyncio.ensure_future(_read_into(process.stderr, stderr)),
        asyncio.ensure_future(_feed(process.stdin, script_stdin(call))),
    ]
    drain: asyncio.TimerHandle | None = None

    def on_exit(_: object) -> None:
        nonlocal drain
        # The script is done; what it left in its group is not: end it, so the pipes close.
        # A grandchild that left the group may hold stdout for ever: stop reading after
        # PIPE_DRAIN_S, as execute does.
        _signal_group(pid, signal.SIGKILL)
        drain = loop.call_later(PIPE_DRAIN_S, stdout.feed_eof)

    exited.add_done_callback(on_exit)
    text = ScriptText()
    finished = False
    try:
        while chunk := await stdout.read(_READ_CHUNK):
            piece = text.feed(chunk)
            if piece:
                yield piece
        await asyncio.shield(exited)
        await _await_group_exit(pid)
        finished = True
    finally:
        exited.remove_done_callback(on_exit)
        if drain is not None:
            drain.cancel()
        try:
            if not finished:
                # Closed early, cancelled, or past the deadline: leave nothing running.
                await _stop(pid, exited)
        finally:
            for part in io:
                part.cancel()
            await asyncio.gather(*io, return_exceptions=True)
            transport.close()
            forget_group(pid)
    returncode = transport.get_returncode()
    assert returncode is not None
    if returncode != 0:
        state.error = exit_error(call, returncode, bytes(stderr))
        return
    rest = text.finish()
    if rest:
        yield rest


#: How each mode streams: ``(call, state) -> deltas``.
STREAM_MODES: dict[str, Callable[[Call, StreamState], AsyncGenerator[str, None]]] = {
    "llm": stream_llm,
    "api": stream_api,
    "script": stream_script,
}
