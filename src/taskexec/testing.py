"""A real mock LLM server on loopback, for tests, benchmarks and ``taskexec mock-server``.

Built on ``aiohttp.web``'s low-level server, so it is real HTTP/1.1 with keep-alive; faults that
live below HTTP (a reset, a reply cut in half) are made on the connection's transport.

It speaks enough of each protocol for the official SDKs to accept it:

- OpenAI: ``POST /v1/chat/completions`` (also ``"stream": true`` as server-sent events, with
  the final usage chunk when ``stream_options.include_usage`` is set),
- Anthropic: ``POST /v1/messages`` (also ``"stream": true``: ``message_start``,
  ``content_block_delta``, ..., ``message_stop`` events),
- Gemini: ``POST /v1beta/models/{model}:generateContent`` (and ``/v1/...``, as google-genai sends),
  and ``:streamGenerateContent?alt=sse``,
- an ``api``-mode agent: ``POST /agent`` (``{"output": ...}``; server-sent ``data:`` events when
  the request accepts ``text/event-stream``),

plus ``GET /_stats``, ``POST /_reset`` and ``POST /_faults`` (a JSON list) to observe and steer it
from another process. Replies are deterministic: ``mock reply to: <prompt>``.

Faults come from a FIFO schedule (each chat request takes the next one) or from a directive in the
prompt itself, ``[[fault=500]]``, which hits every request carrying it. Known faults: ``429``
(``Retry-After: 0``), ``429:<seconds>``, ``429ms:<millis>`` (``retry-after-ms``), ``429q``
(``insufficient_quota``), ``400``, ``401`` (echoes the caller's key back, as some servers do),
``401:<n>`` (the same after ``n`` characters of padding, to put the key at any offset),
``408``, ``409``, ``500``, ``503``, ``reset`` (connection dropped before any reply), ``malformed``
(200 with a body that is not JSON) and ``stall`` (half a body, then nothing). ``[[latency=0.5]]``
in a prompt overrides the server's latency for that request. ``[[barrier=N]]`` (or
``[[barrier=N:timeout_s]]``) holds each reply until N requests carrying the same directive are
in flight, then releases them all; if they do not arrive within the timeout (30 s by default)
the held requests get a 503. Tests use it to prove requests overlap without timing anything.

Streams are written piece by piece (a word each), ``stream_delay_s`` apart (or
``[[chunk_delay=0.05]]`` in the prompt), so a client can leave mid-way; every streamed reply is
recorded in :attr:`MockServer.streams` (bytes and pieces sent, whether it completed, and when the
client went away), so tests assert what the server saw. The fault ``cut:<n>`` sends the first
``n`` bytes of a stream's body and then drops the connection.

From another project's tests: ``pytest_plugins = ["taskexec.pytest_plugin"]`` gives the fixture
``taskexec_mock_server`` (a running :class:`MockServer`, counters cleared per test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ._errors import InvalidValueError

__all__ = (
    "FAULTS",
    "USAGE",
    "MockServer",
    "MockStats",
    "RecordedRequest",
    "StreamRecord",
    "mock_server_in_thread",
)

#: What the server answers and how to steer it; ``taskexec mock-server --help`` prints it.
USAGE = """\
Endpoints (replies are deterministic: "mock reply to: <prompt>"):
  POST /v1/chat/completions                 OpenAI-compatible ("stream": true gives SSE)
  POST /v1/messages                         Anthropic ("stream": true gives SSE)
  POST /v1beta/models/{model}:generateContent   Gemini (also /v1/...)
  POST /v1beta/models/{model}:streamGenerateContent?alt=sse   Gemini, streamed
  POST /agent                               an api-mode agent: {"prompt"} -> {"output"}
                                            (SSE data: events with Accept: text/event-stream)

Control (to observe and steer it from another process):
  GET  /_stats     counters: requests, chat_requests, in_flight, max_in_flight,
                   connections_opened/closed, client_disconnects, faults_served, statuses
  POST /_reset     zero the counters, clear the fault schedule
  POST /_faults    replace the fault schedule with a JSON list, one fault per chat request

Faults: 429 (Retry-After: 0), 429:<seconds>, 429ms:<millis> (retry-after-ms),
  429q (insufficient_quota), 400, 401 (echoes the caller's key), 401:<n> (after n characters
  of padding), 408, 409, 500, 503, reset (connection dropped), malformed (200, not JSON),
  stall (half a body, then nothing), cut:<n> (a stream cut after n bytes of its body).

Provider-style limits (a request beyond the limit in any one-second window gets a 429 with
Retry-After: 1, as real providers quantise their per-minute limits; rejected requests do not
count against the window):
  --rate-limit N        at most N chat requests in any second
  --token-limit N       at most N tokens (prompt words plus reply words) in any second

Directives in a prompt (they apply to every request that carries them):
  [[fault=500]]         that fault
  [[latency=0.5]]       that latency instead of --latency
  [[chunk_delay=0.05]]  that wait between the pieces of a stream (default: none)
  [[barrier=N]]         hold the reply until N such requests are in flight, then release them
  [[barrier=N:30]]      the same, with a timeout (seconds) after which they get a 503
  [[cached=N]]          report N of the prompt's tokens as read from the prompt cache
  [[cache_write=N]]     report N of them as written to it (Anthropic's cache_creation_input_tokens)
"""

FAULTS = frozenset(
    {"429", "429q", "400", "401", "408", "409", "500", "503", "reset", "malformed", "stall"}
)
_DIRECTIVE_RE = re.compile(
    r"\[\[(fault|latency|barrier|cached|cache_write|chunk_delay)=([^\]]+)\]\]"
)
_CHAT_PATHS = ("/v1/chat/completions", "/v1/messages", "/agent")
_GEMINI_RE = re.compile(r"^/v1(?:beta)?/models/([^/:]+):(generateContent|streamGenerateContent)$")
#: How long a held reply (a stall) waits for its client to go away.
_HOLD_S = 3600.0


def _check_fault(spec: str) -> str:
    base = spec.split(":", 1)[0]
    if base not in FAULTS and base not in ("429ms", "cut"):
        raise InvalidValueError(f"unknown fault {spec!r}; known: {', '.join(sorted(FAULTS))}")
    return spec


@dataclass
class MockStats:
    """Counters of what the server saw; a snapshot when read through :attr:`MockServer.stats`."""

    connections_opened: int = 0
    connections_closed: int = 0
    requests: int = 0
    chat_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    client_disconnects: int = 0
    idle_closes: int = 0
    faults_served: int = 0
    rate_limited: int = 0
    #: Streamed replies begun, finished whole, and left by their client before the end.
    streams_started: int = 0
    streams_completed: int = 0
    stream_disconnects: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """Return the counters as JSON-ready data."""
        data = asdict(self)
        data["statuses"] = {str(k): v for k, v in self.statuses.items()}
        data["paths"] = dict(self.paths)
        return data


@dataclass
class StreamRecord:
    """One streamed reply, as the server wrote it (updated while it is being written).

    Attributes:
        path: The request's path.
        prompt: The prompt it answered.
        started_at: ``time.monotonic()`` when the first byte of the body was written.
        pieces_sent: Text pieces written so far.
        bytes_sent: Body bytes written so far.
        completed: The whole stream was written (its terminator included).
        cut: The server dropped the connection on purpose (the ``cut`` fault).
        disconnected_at: ``time.monotonic()`` when the server saw the client go away before the
            end (None: it did not).
    """

    path: str
    prompt: str
    started_at: float
    pieces_sent: int = 0
    bytes_sent: int = 0
    completed: bool = False
    cut: bool = False
    disconnected_at: float | None = None

    @property
    def ended(self) -> bool:
        """True once the stream is over, whichever way."""
        return self.completed or self.cut or self.disconnected_at is not None


@dataclass(frozen=True)
class RecordedRequest:
    """One chat or agent request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.body)


class _Connections(web.Server):
    """aiohttp's low-level server, telling the mock when connections open and close."""

    def __init__(self, mock: MockServer, **kwargs: Any) -> None:
        super().__init__(mock._handle, handler_cancellation=True, **kwargs)
        self._mock = mock

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._mock._opened(handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._mock._closed(handler)


class MockServer:
    """A mock of OpenAI, Anthropic, Gemini and an api-mode agent, over real HTTP on loopback.

    Args:
        host: Interface to bind (loopback by default).
        port: Port to bind; 0 picks a free one.
        latency_s: Wait before answering each chat request.
        faults: Initial fault schedule, one entry per chat request.
        record: How many recent chat requests to keep in :attr:`recorded`.
        rate_limit: At most this many chat requests in any one-second window; more get a 429
            with ``Retry-After: 1`` (None: no limit).
        token_limit: At most this many tokens (prompt plus reply words) in any one-second
            window (None: no limit).
        idle_timeout_s: Close a keep-alive connection idle this long (None: never), as real
            servers do; counted in ``stats.idle_closes``.
        stream_delay_s: Wait between the pieces of a streamed reply.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_s: float = 0.0,
        faults: Iterable[str] = (),
        record: int = 1000,
        idle_timeout_s: float | None = None,
        rate_limit: int | None = None,
        token_limit: int | None = None,
        stream_delay_s: float = 0.0,
    ) -> None:
        self.host = host
        self.stream_delay_s = stream_delay_s
        #: Every streamed reply of the last ``record`` requests, oldest first.
        self.streams: deque[StreamRecord] = deque(maxlen=record)
        self.rate_limit = rate_limit
        self.token_limit = token_limit
        #: Accepted chat requests of the last second: (arrival, tokens).
        self._window: deque[tuple[float, int]] = deque()
        self.port = port
        self.latency_s = latency_s
        self.idle_timeout_s = idle_timeout_s
        self.faults: deque[str] = deque(_check_fault(f) for f in faults)
        self.recorded: deque[RecordedRequest] = deque(maxlen=record)
        self._stats = MockStats()
        self._runner: web.ServerRunner | None = None
        self._counter = 0
        self._open: dict[RequestHandler, asyncio.TimerHandle | None] = {}
        self._stopping = False
        self._barriers: dict[str, asyncio.Event] = {}
        self._barrier_counts: dict[str, int] = {}

    @property
    def url(self) -> str:
        """The server's root URL, e.g. ``http://127.0.0.1:8765``."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """``base_url`` for an OpenAI-compatible agent."""
        return f"{self.url}/v1"

    @property
    def agent_url(self) -> str:
        """``url`` for an ``api``-mode agent."""
        return f"{self.url}/agent"

    @property
    def stats(self) -> MockStats:
        """A snapshot of the counters."""
        current = self._stats
        return MockStats(
            **{k: v for k, v in vars(current).items() if k not in ("statuses", "paths")},
            statuses=Counter(current.statuses),
            paths=Counter(current.paths),
        )

    def set_faults(self, faults: Iterable[str]) -> None:
        """Replace the fault schedule."""
        self.faults = deque(_check_fault(f) for f in faults)

    def reset(self) -> None:
        """Zero the counters, forget recorded requests and clear the fault schedule."""
        # In place, so that handlers of requests still in flight update the same counters.
        stats = self._stats
        for name, value in vars(MockStats(in_flight=stats.in_flight)).items():
            setattr(stats, name, value)
        stats.max_in_flight = stats.in_flight
        self.recorded.clear()
        self.streams.clear()
        self.faults.clear()

    async def start(self) -> None:
        """Start listening; :attr:`port` is set when this returns.

        Raises:
            OSError: The port cannot be bound (taken, or not allowed).
        """
        self._stopping = False
        runner = web.ServerRunner(_Connections(self, access_log=None), shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=4096)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening, drop every open connection, and wait for their handlers to end."""
        if self._runner is None:
            return
        self._stopping = True
        for protocol in list(self._open):
            if protocol.transport is not None:
                protocol.transport.abort()  # held replies (latency, stalls) end now
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        if self._runner is None:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- connections ---------------------------------------------------------------------------

    def _opened(self, protocol: RequestHandler) -> None:
        self._stats.connections_opened += 1
        self._open[protocol] = None

    def _closed(self, protocol: RequestHandler) -> None:
        if protocol in self._open:
            self._stats.connections_closed += 1
            timer = self._open.pop(protocol)
            if timer is not None:
                timer.cancel()

    def _busy(self, protocol: RequestHandler) -> None:
        timer = self._open.get(protocol)
        if timer is not None:
            timer.cancel()
            self._open[protocol] = None

    def _idle(self, protocol: RequestHandler) -> None:
        # The idle timeout is the mock's own, so that a close it makes is known to be one.
        if self.idle_timeout_s is not None and protocol in self._open:
            loop = asyncio.get_running_loop()
            self._open[protocol] = loop.call_later(self.idle_timeout_s, self._close_idle, protocol)

    def _close_idle(self, protocol: RequestHandler) -> None:
        if protocol in self._open and protocol.transport is not None:
            self._open[protocol] = None
            self._stats.idle_closes += 1
            protocol.transport.close()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        self._busy(protocol)
        try:
            response = await self._route(request)
            self._stats.statuses[response.status] += 1
            return response
        finally:
            self._idle(protocol)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        body = await request.read()
        self._stats.requests += 1
        self._stats.paths[path] += 1
        if path in _CHAT_PATHS or _GEMINI_RE.match(path):
            if method != "POST":
                return web.json_response({"error": "use POST"}, status=405)
            return await self._chat(request, path, body)
        if path == "/_stats":
            return web.json_response(self._stats.to_dict())
        if path == "/_reset" and method == "POST":
            self.reset()
            return web.json_response({"ok": True})
        if path == "/_faults" and method == "POST":
            try:
                self.set_faults(json.loads(body))
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
            return web.json_response({"faults": list(self.faults)})
        return web.json_response({"error": f"no route for {method} {path}"}, status=404)

    async def _chat(self, request: web.BaseRequest, path: str, body: bytes) -> web.StreamResponse:
        stats = self._stats
        stats.chat_requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.recorded.append(RecordedRequest("POST", path, headers, body))
        try:
            try:
                data = json.loads(body)
            except ValueError:
                return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
            prompt, model = _prompt_and_model(path, data)
            directives = dict(_DIRECTIVE_RE.findall(prompt))
            fault = directives.get("fault")
            if fault is None and self.faults:
                fault = self.faults.popleft()
            if not self._admit(prompt):
                stats.rate_limited += 1
                return web.json_response(
                    _error("rate limit exceeded"), status=429, headers={"retry-after": "1"}
                )
            latency = float(directives.get("latency", self.latency_s))
            if "barrier" in directives and not await self._barrier(directives["barrier"]):
                return web.json_response(
                    _error(f"barrier {directives['barrier']} not reached"), status=503
                )
            if latency > 0:
                await asyncio.sleep(latency)  # a client that goes away cancels this handler
            cut: int | None = None
            if fault is not None:
                stats.faults_served += 1
                if not fault.startswith("cut:"):
                    return await self._fault(request, fault, path, headers)
                cut = int(fault.partition(":")[2])
            events = self._stream_events(path, data, headers, prompt, model)
            if events is not None:
                delay = float(directives.get("chunk_delay", self.stream_delay_s))
                return await self._stream(request, path, prompt, events, delay, cut)
            return web.json_response(self._reply(path, prompt, model))
        except asyncio.CancelledError:
            # handler_cancellation: the client closed the connection while this reply waited.
            if not self._stopping:
                stats.client_disconnects += 1
            raise
        finally:
            stats.in_flight -= 1

    def _admit(self, prompt: str) -> bool:
        """Count a request against the one-second window; False if it is over a limit."""
        if self.rate_limit is None and self.token_limit is None:
            return True
        now = time.monotonic()
        window = self._window
        while window and window[0][0] <= now - 1.0:
            window.popleft()
        words = len(prompt.split())
        tokens = words + words + 3  # the reply is "mock reply to: <prompt>"
        if self.rate_limit is not None and len(window) >= self.rate_limit:
            return False
        if self.token_limit is not None and sum(t for _, t in window) + tokens > self.token_limit:
            return False
        window.append((now, tokens))
        return True

    async def _barrier(self, spec: str) -> bool:
        """Hold this reply until ``n`` requests with the same barrier are held (then release
        them all); False if that many never arrive within the timeout (``n:timeout``, 30 s)."""
        count, _, timeout = spec.partition(":")
        barrier = self._barriers.get(spec)
        if barrier is None or barrier.is_set():
            barrier = self._barriers[spec] = asyncio.Event()
            self._barrier_counts[spec] = 0
        self._barrier_counts[spec] += 1
        if self._barrier_counts[spec] >= int(count):
            barrier.set()
            del self._barriers[spec]
            return True
        try:
            async with asyncio.timeout(float(timeout or 30)):
                await barrier.wait()
        except TimeoutError:
            return False
        return True

    async def _fault(
        self, request: web.BaseRequest, fault: str, path: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        kind, _, arg = fault.partition(":")
        if kind == "reset":
            transport = request.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                # SO_LINGER 0: close with RST, the way a crashed upstream looks to the client.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if transport is not None:
                transport.abort()
            await asyncio.sleep(_HOLD_S)  # cancelled at once: the connection is gone
            return web.json_response(_error("reset"), status=500)  # not reached
        if kind == "malformed":
            return web.Response(
                status=200, body=b'{"choices": [ this is not json', content_type="application/json"
            )
        if kind == "stall":
            whole = json.dumps(self._reply(path, "stalled", "mock")).encode()
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            response.content_length = len(whole)
            await response.prepare(request)
            self._stats.statuses[200] += 1
            await response.write(whole[: len(whole) // 2])
            await asyncio.sleep(_HOLD_S)  # half a body, then nothing, until the client leaves
            return response
        if kind == "429q":
            error = {
                "message": "You exceeded your current quota, please check your plan.",
                "type": "insufficient_quota",
                "code": "insufficient_quota",
            }
            return web.json_response({"error": error}, status=429)
        if kind == "429ms":
            extra = {"retry-after-ms": arg or "0"}
            return web.json_response(_error("rate limited"), status=429, headers=extra)
        if kind == "429":
            extra = {"retry-after": arg or "0"}
            return web.json_response(_error("rate limited"), status=429, headers=extra)
        if kind == "401":
            key = (
                headers.get("x-api-key")
                or headers.get("x-goog-api-key")
                or headers.get("authorization", "").removeprefix("Bearer ")
            )
            padding = "." * int(arg) if arg else ""
            message = f"{padding}Incorrect API key provided: {key}"
            return web.json_response(_error(message), status=401)
        return web.json_response(_error(f"mock fault {kind}"), status=int(kind))

    def _reply(self, path: str, prompt: str, model: str) -> dict[str, Any]:
        self._counter += 1
        text = f"mock reply to: {prompt}"
        p_tokens, c_tokens = len(prompt.split()), len(text.split())
        if path == "/agent":
            return {"output": text}
        # Cache counts in each vendor's own form: Anthropic reports them apart from its
        # input_tokens, OpenAI and Gemini as a part of the prompt's count.
        directives = dict(_DIRECTIVE_RE.findall(prompt))
        cached = min(int(directives.get("cached", 0)), p_tokens)
        written = min(int(directives.get("cache_write", 0)), p_tokens - cached)
        if path == "/v1/messages":
            return {
                "id": f"msg_mock_{self._counter}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": p_tokens - cached - written,
                    "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": written,
                    "output_tokens": c_tokens,
                },
            }
        if path == "/v1/chat/completions":
            return {
                "id": f"chatcmpl-mock-{self._counter}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": p_tokens,
                    "completion_tokens": c_tokens,
                    "total_tokens": p_tokens + c_tokens,
                    "prompt_tokens_details": {"cached_tokens": cached},
                },
            }
        return {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": text}]},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": p_tokens,
                "cachedContentTokenCount": cached,
                "candidatesTokenCount": c_tokens,
                "totalTokenCount": p_tokens + c_tokens,
            },
            "modelVersion": model,
        }

    def _stream_events(
        self, path: str, data: Any, headers: dict[str, str], prompt: str, model: str
    ) -> list[tuple[bytes, bool]] | None:
        """The events of a streamed reply as ``(bytes, is a text piece)``; None: not streamed.

        Each vendor's own format: OpenAI ``chat.completion.chunk`` events and ``[DONE]``,
        Anthropic's ``message_start`` ... ``message_stop``, Gemini's ``GenerateContentResponse``
        per event (``\\r\\n`` line ends, no terminator, ``finishReason`` on the last).
        """
        gemini = _GEMINI_RE.match(path)
        if gemini is not None:
            if gemini.group(2) != "streamGenerateContent":
                return None
        elif path == "/agent":
            if "text/event-stream" not in headers.get("accept", ""):
                return None
        elif not (isinstance(data, dict) and data.get("stream")):
            return None
        self._counter += 1
        text = f"mock reply to: {prompt}"
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        p_tokens, c_tokens = len(prompt.split()), len(words)
        events: list[tuple[bytes, bool]] = []

        def sse(document: Any, event: str | None = None, end: str = "\n") -> bytes:
            head = f"event: {event}{end}" if event else ""
            return f"{head}data: {json.dumps(document)}{end}{end}".encode()

        if path == "/agent":
            # An api-mode agent's stream: the text of each piece as a data: line.
            return [(f"data: {piece}\n\n".encode(), True) for piece in pieces]
        if path == "/v1/chat/completions":
            ident = f"chatcmpl-mock-{self._counter}"
            options = data.get("stream_options")
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            for i, piece in enumerate(pieces):
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                events.append((sse(_chunk(ident, model, delta, None, usage)), True))
            events.append((sse(_chunk(ident, model, {}, "stop", usage)), False))
            if usage:
                final = _chunk(ident, model, {}, None, usage)
                final["choices"] = []
                final["usage"] = {
                    "prompt_tokens": p_tokens,
                    "completion_tokens": c_tokens,
                    "total_tokens": p_tokens + c_tokens,
                }
                events.append((sse(final), False))
            events.append((b"data: [DONE]\n\n", False))
            return events
        if path == "/v1/messages":
            message: dict[str, Any] = {
                "id": f"msg_mock_{self._counter}",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": model,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": p_tokens, "output_tokens": 1},
            }
            block = {"type": "text", "text": ""}
            events.append(
                (sse({"type": "message_start", "message": message}, "message_start"), False)
            )
            start = {"type": "content_block_start", "index": 0, "content_block": block}
            events.append((sse(start, "content_block_start"), False))
            events.append((sse({"type": "ping"}, "ping"), False))
            for piece in pieces:
                block_delta = {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                }
                events.append((sse(block_delta, "content_block_delta"), True))
            stop = {"type": "content_block_stop", "index": 0}
            events.append((sse(stop, "content_block_stop"), False))
            end = {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": c_tokens},
            }
            events.append((sse(end, "message_delta"), False))
            events.append((sse({"type": "message_stop"}, "message_stop"), False))
            return events
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            candidate: dict[str, Any] = {
                "content": {"parts": [{"text": piece}], "role": "model"},
                "index": 0,
            }
            metadata: dict[str, Any] = {"promptTokenCount": p_tokens}
            if last:
                candidate["finishReason"] = "STOP"
                metadata.update(candidatesTokenCount=c_tokens, totalTokenCount=p_tokens + c_tokens)
            document = {"candidates": [candidate], "usageMetadata": metadata, "modelVersion": model}
            events.append((sse(document, end="\r\n"), True))
        return events

    async def _stream(
        self,
        request: web.BaseRequest,
        path: str,
        prompt: str,
        events: list[tuple[bytes, bool]],
        delay: float,
        cut: int | None,
    ) -> web.StreamResponse:
        """Write a stream event by event, ``delay`` apart between text pieces, and record it."""
        stats = self._stats
        record = StreamRecord(path, prompt, time.monotonic())
        self.streams.append(record)
        stats.streams_started += 1
        response = web.StreamResponse(status=200, headers={"cache-control": "no-cache"})
        response.content_type = "text/event-stream"
        try:
            await response.prepare(request)
            for chunk, is_piece in events:
                if is_piece and delay > 0 and record.pieces_sent:
                    await asyncio.sleep(delay)  # a client that goes away cancels this handler
                if cut is not None and record.bytes_sent + len(chunk) > cut:
                    await self._cut(request, response, record, chunk[: cut - record.bytes_sent])
                await response.write(chunk)
                record.bytes_sent += len(chunk)
                record.pieces_sent += is_piece
            if cut is not None:
                await self._cut(request, response, record, b"")
            await response.write_eof()
        except ConnectionError:
            # The client left while a piece was being written: wait for aiohttp to notice the
            # lost connection and cancel this handler, which records the disconnect.
            await asyncio.sleep(_HOLD_S)
        except asyncio.CancelledError:
            if not (self._stopping or record.ended):
                record.disconnected_at = time.monotonic()
                stats.stream_disconnects += 1
            raise
        record.completed = True
        stats.streams_completed += 1
        return response

    async def _cut(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        record: StreamRecord,
        part: bytes,
    ) -> None:
        """Send ``part`` and drop the connection (the ``cut`` fault); returns only by cancel."""
        if part:
            await response.write(part)
            record.bytes_sent += len(part)
        record.cut = True
        if request.transport is not None:
            request.transport.close()  # what was written is flushed first, then FIN
        await asyncio.sleep(_HOLD_S)  # cancelled at once: the connection is gone


def _chunk(
    ident: str, model: str, delta: dict[str, str], finish: str | None, usage: bool = False
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        chunk["usage"] = None  # with include_usage, every chunk but the last has a null usage
    return chunk


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "mock_error", "code": None}}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _prompt_and_model(path: str, request: Any) -> tuple[str, str]:
    if not isinstance(request, dict):
        return "", "mock"
    if path == "/agent":
        return str(request.get("prompt", "")), "agent"
    if path in ("/v1/chat/completions", "/v1/messages"):
        messages = request.get("messages") or []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = _text_of(users[-1].get("content")) if users else ""
        return prompt, str(request.get("model", "mock"))
    contents = request.get("contents") or []
    match = _GEMINI_RE.match(path)
    model = match.group(1) if match else "mock"
    if contents and isinstance(contents[-1], dict):
        return _text_of(contents[-1].get("parts")), model
    return "", model


@contextlib.contextmanager
def mock_server_in_thread(**options: Any) -> Iterator[MockServer]:
    """Run a :class:`MockServer` on its own event loop in a daemon thread for the ``with`` block.

    Tests in any loop, or in none, can then talk to it over real sockets.
    """
    server = MockServer(**options)
    # The server needs a loop that outlives any test's loop, in its own thread; this is test
    # infrastructure, not the executor's async path, so making a loop here is on purpose.
    loop = asyncio.new_event_loop()  # the test server's own loop, in its own thread
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())  # in the server thread, not the async path
        except BaseException as exc:  # surfaced in the caller's thread below
            failure.append(exc)
            loop.close()
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())  # the server thread shutting its own loop down
        # Let the dropped connections' handlers finish, so nothing is destroyed while pending.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))  # same thread
        loop.close()

    thread = threading.Thread(target=run, name="taskexec-mock-server", daemon=True)
    thread.start()
    started.wait()
    if failure:
        raise failure[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
