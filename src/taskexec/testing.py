"""A real mock LLM server on loopback, for tests, benchmarks and ``taskexec mock-server``.

It speaks enough of each protocol for the official SDKs to accept it:

- OpenAI: ``POST /v1/chat/completions`` (also ``"stream": true`` as server-sent events),
- Anthropic: ``POST /v1/messages``,
- Gemini: ``POST /v1beta/models/{model}:generateContent`` (and ``/v1/...``, as google-genai sends),
- an ``api``-mode agent: ``POST /agent`` (``{"output": ...}``),

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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ._errors import InvalidValueError

__all__ = ("FAULTS", "MockServer", "MockStats", "RecordedRequest", "mock_server_in_thread")

FAULTS = frozenset(
    {"429", "429q", "400", "401", "408", "409", "500", "503", "reset", "malformed", "stall"}
)
_DIRECTIVE_RE = re.compile(r"\[\[(fault|latency|barrier)=([^\]]+)\]\]")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    409: "Conflict",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CHAT_PATHS = ("/v1/chat/completions", "/v1/messages", "/agent")
_GEMINI_RE = re.compile(r"^/v1(?:beta)?/models/([^/:]+):generateContent$")
#: How long stop() lets connection handlers end by themselves before they are cancelled.
_SHUTDOWN_GRACE_S = 1.0


def _check_fault(spec: str) -> str:
    base = spec.split(":", 1)[0]
    if base not in FAULTS and base != "429ms":
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
    statuses: Counter[int] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """Return the counters as JSON-ready data."""
        data = asdict(self)
        data["statuses"] = {str(k): v for k, v in self.statuses.items()}
        data["paths"] = dict(self.paths)
        return data


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


class MockServer:
    """An HTTP/1.1 server on asyncio streams that plays OpenAI, Anthropic, Gemini and an agent.

    Args:
        host: Interface to bind (loopback by default).
        port: Port to bind; 0 picks a free one.
        latency_s: Wait before answering each chat request.
        faults: Initial fault schedule, one entry per chat request.
        record: How many recent chat requests to keep in :attr:`recorded`.
        idle_timeout_s: Close a keep-alive connection idle this long (None: never), as real
            servers do.
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
    ) -> None:
        self.host = host
        self.port = port
        self.latency_s = latency_s
        self.idle_timeout_s = idle_timeout_s
        self.faults: deque[str] = deque(_check_fault(f) for f in faults)
        self.recorded: deque[RecordedRequest] = deque(maxlen=record)
        self._stats = MockStats()
        self._server: asyncio.Server | None = None
        self._counter = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
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
        self.faults.clear()

    async def start(self) -> None:
        """Start listening; :attr:`port` is set when this returns."""
        self._server = await asyncio.start_server(
            self._connection, self.host, self.port, limit=2**20, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, drop every open connection, and wait for their handlers to end."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None
        # A handler cancelled before it first ran cannot catch the cancellation, and Python
        # 3.11's streams callback then prints a traceback for it: let every handler start and
        # see its connection dropped, and end by itself, before anything is cancelled.
        for _ in range(2):
            await asyncio.sleep(0)
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=_SHUTDOWN_GRACE_S)

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.stop()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats = self._stats
        stats.connections_opened += 1
        self._writers.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            idle_timeout = None  # the first request may take its time to arrive
            while await self._one_request(reader, writer, idle_timeout):
                idle_timeout = self.idle_timeout_s
        except TimeoutError:
            self._stats.idle_closes += 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # The server is shutting down. Ending normally instead of as cancelled keeps
            # Python 3.11's streams callback (which calls task.exception() on the handler) from
            # printing a CancelledError traceback for every connection still open.
            pass
        finally:
            self._stats.connections_closed += 1
            self._writers.discard(writer)
            if handler is not None:
                self._handlers.discard(handler)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        idle_timeout: float | None = None,
    ) -> bool:
        async with asyncio.timeout(idle_timeout):  # a keep-alive connection left idle is closed
            head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        path = target.split("?", 1)[0]
        keep_alive = headers.get("connection", "").lower() != "close"
        self._stats.requests += 1
        self._stats.paths[path] += 1
        if path in _CHAT_PATHS or _GEMINI_RE.match(path):
            if method != "POST":
                return self._send(writer, 405, {"error": "use POST"}, keep_alive)
            return await self._chat(path, headers, body, reader, writer, keep_alive)
        if path == "/_stats":
            return self._send(writer, 200, self._stats.to_dict(), keep_alive)
        if path == "/_reset" and method == "POST":
            self.reset()
            return self._send(writer, 200, {"ok": True}, keep_alive)
        if path == "/_faults" and method == "POST":
            try:
                self.set_faults(json.loads(body))
            except (ValueError, TypeError) as exc:
                return self._send(writer, 400, {"error": str(exc)}, keep_alive)
            return self._send(writer, 200, {"faults": list(self.faults)}, keep_alive)
        return self._send(writer, 404, {"error": f"no route for {method} {path}"}, keep_alive)

    def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Any,
        keep_alive: bool,
        extra_headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> bool:
        body = raw if raw is not None else json.dumps(payload).encode()
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            "content-type: application/json",
            f"content-length: {len(body)}",
        ]
        head.extend(f"{k}: {v}" for k, v in (extra_headers or {}).items())
        if not keep_alive:
            head.append("connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self._stats.statuses[status] += 1
        return keep_alive

    async def _chat(
        self,
        path: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
    ) -> bool:
        stats = self._stats
        stats.chat_requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        self.recorded.append(RecordedRequest("POST", path, headers, body))
        try:
            try:
                request = json.loads(body)
            except ValueError:
                return self._send(
                    writer, 400, {"error": {"message": "body is not JSON"}}, keep_alive
                )
            prompt, model = _prompt_and_model(path, request)
            directives = dict(_DIRECTIVE_RE.findall(prompt))
            fault = directives.get("fault")
            if fault is None and self.faults:
                fault = self.faults.popleft()
            latency = float(directives.get("latency", self.latency_s))
            if "barrier" in directives and not await self._barrier(directives["barrier"]):
                message = f"barrier {directives['barrier']} not reached"
                return self._send(writer, 503, _error(message), keep_alive)
            if latency > 0 and not await self._wait_unless_disconnected(reader, latency):
                return False
            if fault is not None:
                stats.faults_served += 1
                return await self._fault(fault, path, headers, reader, writer, keep_alive)
            if path == "/v1/chat/completions" and request.get("stream"):
                await self._stream_openai(writer, prompt, model)
                return False
            return self._send(writer, 200, self._reply(path, prompt, model), keep_alive)
        finally:
            stats.in_flight -= 1

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

    async def _wait_unless_disconnected(self, reader: asyncio.StreamReader, delay: float) -> bool:
        """Sleep ``delay``; return False early if the client closes the connection meanwhile."""
        eof = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({eof}, timeout=delay)
        if done:
            self._stats.client_disconnects += 1
            return False
        eof.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await eof
        return True

    async def _fault(
        self,
        fault: str,
        path: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
    ) -> bool:
        kind, _, arg = fault.partition(":")
        if kind == "reset":
            transport = writer.transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close with RST, the way a crashed upstream looks to the client.
                import socket
                import struct

                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return False
        if kind == "malformed":
            return self._send(writer, 200, None, keep_alive, raw=b'{"choices": [ this is not json')
        if kind == "stall":
            body = json.dumps(self._reply(path, "stalled", "mock")).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            self._stats.statuses[200] += 1
            await self._wait_unless_disconnected(reader, 3600)
            return False
        if kind == "429q":
            error = {
                "message": "You exceeded your current quota, please check your plan.",
                "type": "insufficient_quota",
                "code": "insufficient_quota",
            }
            return self._send(writer, 429, {"error": error}, keep_alive)
        if kind == "429ms":
            extra = {"retry-after-ms": arg or "0"}
            return self._send(writer, 429, _error("rate limited"), keep_alive, extra)
        if kind == "429":
            extra = {"retry-after": arg or "0"}
            return self._send(writer, 429, _error("rate limited"), keep_alive, extra)
        if kind == "401":
            key = (
                headers.get("x-api-key")
                or headers.get("x-goog-api-key")
                or headers.get("authorization", "").removeprefix("Bearer ")
            )
            padding = "." * int(arg) if arg else ""
            message = f"{padding}Incorrect API key provided: {key}"
            return self._send(writer, 401, _error(message), keep_alive)
        return self._send(writer, int(kind), _error(f"mock fault {kind}"), keep_alive)

    def _reply(self, path: str, prompt: str, model: str) -> dict[str, Any]:
        self._counter += 1
        text = f"mock reply to: {prompt}"
        p_tokens, c_tokens = len(prompt.split()), len(text.split())
        if path == "/agent":
            return {"output": text}
        if path == "/v1/messages":
            return {
                "id": f"msg_mock_{self._counter}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": p_tokens, "output_tokens": c_tokens},
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
                "candidatesTokenCount": c_tokens,
                "totalTokenCount": p_tokens + c_tokens,
            },
            "modelVersion": model,
        }

    async def _stream_openai(self, writer: asyncio.StreamWriter, prompt: str, model: str) -> None:
        self._counter += 1
        ident = f"chatcmpl-mock-{self._counter}"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n\r\n"
        )
        self._stats.statuses[200] += 1
        words = f"mock reply to: {prompt}".split(" ")
        for i, word in enumerate(words):
            delta = {"content": word if i == 0 else " " + word}
            if i == 0:
                delta["role"] = "assistant"
            chunk = _chunk(ident, model, delta, None)
            writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await writer.drain()
        writer.write(f"data: {json.dumps(_chunk(ident, model, {}, 'stop'))}\n\n".encode())
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()


def _chunk(ident: str, model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


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


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


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
