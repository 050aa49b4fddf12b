"""The one place HTTP clients are created and pooled.

Every async request taskexec makes goes through a :class:`ClientPool`, which keeps one client per
event loop: a client made on one loop is never used from another (a pooled connection belongs to
the loop that opened it; see httpx issue 2473). Changing the transport means changing this module
only.

The default transport is an aiohttp ``ClientSession``: at a thousand requests in flight it costs a
fraction of the CPU per request that ``httpx.AsyncClient`` does (see ``benchmarks/RESULTS.md``). A
caller may pass their own ``httpx.AsyncClient`` instead (``httpx.MockTransport`` is the unit-test
seam); that client is used as given and is never closed by taskexec.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import aiohttp
import httpx

from ._transport import TransportError as TransportError
from ._transport import describe_error

if TYPE_CHECKING:
    from ._http_stream import BlockingStream, HttpStream

__all__ = (
    "AiohttpClient",
    "BlockingClient",
    "ClientPool",
    "HttpClient",
    "HttpResponse",
    "HttpxClient",
    "TransportError",
)


#: Connections per event loop when nothing asks for more (an orchestrator's concurrency does).
DEFAULT_MAX_CONNECTIONS = 256


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response: status, headers (case-insensitive mapping) and the whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class HttpClient(Protocol):
    """What the modes need from a transport: one POST with a body, and closing."""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float | None
    ) -> HttpResponse:
        """POST ``body`` to ``url`` and return the whole response.

        Raises:
            TransportError: The connection failed or ``timeout_s`` passed before the response.
        """
        ...

    async def aclose(self) -> None:
        """Close every pooled connection."""
        ...

    def stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float | None
    ) -> HttpStream:
        """POST ``body`` and read the reply as it arrives (``timeout_s``: most time between
        two reads); see :mod:`taskexec._http_stream`."""
        ...


class AiohttpClient:
    """An :class:`HttpClient` over one aiohttp ``ClientSession`` (the default transport).

    Args:
        max_connections: Most connections open at once (0 for no limit).
        connect_timeout_s: Time allowed to open a connection.
    """

    def __init__(self, *, max_connections: int, connect_timeout_s: float) -> None:
        self.closer: AsyncGenerator[None, None] | None = None
        # The session binds to the running loop here; ClientPool guarantees it is only ever
        # used from that loop.
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0)
        self._connect_timeout_s = connect_timeout_s
        self._session = aiohttp.ClientSession(
            connector=connector, skip_auto_headers=("User-Agent",)
        )

    def raise_limit(self, limit: int) -> None:
        """Allow ``limit`` connections at once from now on (only ever raised)."""
        connector = self._session.connector
        # aiohttp has no public setter; its connector reads _limit on every acquire.
        if connector is not None and 0 < connector.limit < limit:
            connector._limit = limit

    def _timeout(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_timeout_s)

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float | None
    ) -> HttpResponse:
        try:
            # No redirects, as in httpx: a 3xx must not carry a key header to another host.
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                timeout=self._timeout(timeout_s),
                allow_redirects=False,
            ) as response:
                data = await response.read()
                return HttpResponse(response.status, response.headers, data)
        except TimeoutError as exc:
            # Only aiohttp's own (per-attempt) timeout lands here: a caller's asyncio.timeout
            # reaches this frame as CancelledError and propagates untouched.
            raise TransportError("timeout", "no response before the attempt timed out") from exc
        except aiohttp.ClientError as exc:
            raise TransportError("connection", describe_error(exc)) from exc

    def stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float | None
    ) -> HttpStream:
        from ._http_stream import AiohttpStream

        # No total: a stream lasts as long as the reply; a stall is caught between reads.
        timeout = aiohttp.ClientTimeout(sock_connect=self._connect_timeout_s, sock_read=timeout_s)
        return AiohttpStream(self._session, url, body, headers, timeout)

    async def aclose(self) -> None:
        await self._session.close()
        closer, self.closer = self.closer, None
        if closer is not None:
            await closer.aclose()  # its finally finds the client gone from the pool: a no-op

    def detach(self) -> None:
        """Forget the session's connector without closing anything (it is not ours to close).

        Used in a forked child: the sockets belong to the parent's connections, so they are
        left alone, and the objects are marked closed so that nothing warns about them.
        """
        connector = self._session.connector
        if connector is not None:
            connector._closed = True
        self._session._connector = None

    def close_abandoned(self) -> None:
        """Drop the sockets of a session whose loop is gone or closed, awaiting nothing.

        aiohttp has no public way to do this (its ``close()`` awaits on the session's loop), so
        this is the one place that reads its connector's private fields (``_conns``,
        ``_acquired``, ``_loop``, ``_close``, the session's ``_connector``);
        tests/test_library_internals.py fails loudly if aiohttp renames them.
        """
        connector = self._session.connector
        self._session._connector = None
        self.closer = None
        if connector is None or connector.closed:
            return
        protocols = [proto for conns in connector._conns.values() for proto, _ in conns]
        protocols += list(connector._acquired)
        loop_closed = connector._loop.is_closed()
        connector._close()  # sync part of close(); it leaves transports alone on a closed loop
        if not loop_closed:
            return
        for proto in protocols:
            transport = proto.transport
            if transport is None:
                continue
            # A closed loop cannot run the transport's close; do its last, synchronous step
            # here (it closes the socket object, so the file descriptor is released now, not
            # at garbage collection with a ResourceWarning). CPython's selector transports.
            with contextlib.suppress(Exception):
                transport._call_connection_lost(None)  # type: ignore[attr-defined]


class HttpxClient:
    """An :class:`HttpClient` over a caller's ``httpx.AsyncClient`` (never closed by us)."""

    def __init__(self, client: httpx.AsyncClient, *, connect_timeout_s: float) -> None:
        self._client = client
        self._connect_timeout_s = connect_timeout_s

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float | None
    ) -> HttpResponse:
        timeout = httpx.Timeout(timeout_s, connect=self._connect_timeout_s)
        try:
            response = await self._client.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise TransportError("timeout", "no response before the attempt timed out") from exc
        except httpx.TransportError as exc:
            raise TransportError("connection", describe_error(exc)) from exc
        return HttpResponse(response.status_code, response.headers, response.content)

    def stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float | None
    ) -> HttpStream:
        from ._http_stream import HttpxStream

        timeout = httpx.Timeout(None, connect=self._connect_timeout_s, read=timeout_s)
        return HttpxStream(self._client, url, body, headers, timeout)

    async def aclose(self) -> None:
        """Leave the caller's client open: its owner closes it."""


class BlockingClient:
    """A blocking client for the legacy engine: one per task, as before the refactor.

    Args:
        connect_timeout_s: Time allowed to open a connection.
    """

    def __init__(self, *, connect_timeout_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._client = httpx.Client(timeout=httpx.Timeout(None, connect=connect_timeout_s))

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        """POST ``body`` and return the whole response, like :meth:`HttpClient.post`."""
        timeout = httpx.Timeout(timeout_s, connect=min(self._connect_timeout_s, timeout_s))
        try:
            reply = self._client.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise TransportError("timeout", "no response before the attempt timed out") from exc
        except httpx.TransportError as exc:
            raise TransportError("connection", describe_error(exc)) from exc
        return HttpResponse(reply.status_code, reply.headers, reply.content)

    def stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> BlockingStream:
        """POST ``body`` and read the reply as it arrives (``timeout_s`` between reads)."""
        from ._http_stream import BlockingStream

        connect = min(self._connect_timeout_s, timeout_s)
        return BlockingStream(
            self._client, url, body, headers, httpx.Timeout(None, connect=connect, read=timeout_s)
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ClientPool:
    """One :class:`HttpClient` per event loop, created on first use in that loop.

    Every pool is listed (weakly) in ``ClientPool.instances``, so the sync bridge can close the
    connections it opened at interpreter exit and forget its loop's in a forked child.

    Args:
        max_connections: Connection limit of each client (0 for no limit). Default: 256, raised
            to the concurrency an orchestrator allows (:meth:`reserve`).
        connect_timeout_s: Time allowed to open a connection.
        httpx_client: Use this client for every request instead of creating aiohttp sessions.
    """

    instances: ClassVar[weakref.WeakSet[ClientPool]] = weakref.WeakSet()

    def __init__(
        self,
        *,
        max_connections: int | None = None,
        connect_timeout_s: float = 10.0,
        httpx_client: httpx.AsyncClient | None = None,
    ) -> None:
        #: Set by the caller: never changed by :meth:`reserve`.
        self.fixed_limit = max_connections is not None
        self.max_connections = (
            DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections
        )
        self.connect_timeout_s = connect_timeout_s
        self._factory: Callable[[], HttpClient]
        if httpx_client is not None:
            shared = HttpxClient(httpx_client, connect_timeout_s=connect_timeout_s)
            self._factory = lambda: shared
        else:
            self._factory = lambda: AiohttpClient(
                max_connections=self.max_connections, connect_timeout_s=connect_timeout_s
            )
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HttpClient] = (
            weakref.WeakKeyDictionary()
        )
        self.clients_created = 0
        ClientPool.instances.add(self)

    def reserve(self, concurrency: int) -> None:
        """Make room for ``concurrency`` requests at once, unless the limit was set explicitly.

        The orchestrator calls this with its ``max_concurrency`` before a run, so that the pool
        follows the concurrency a user allows instead of capping it at the default: a run of
        1,000 tasks at once gets 1,000 connections, not 256.
        """
        if self.fixed_limit or self.max_connections == 0 or concurrency <= self.max_connections:
            return
        self.max_connections = concurrency
        for client in list(self._clients.values()):
            if isinstance(client, AiohttpClient):
                client.raise_limit(concurrency)

    def get(self) -> HttpClient:
        """Return the client of the running loop, creating it on first use."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            self._drop_closed_loops()
            client = self._clients[loop] = self._factory()
            self.clients_created += 1
            if isinstance(client, AiohttpClient):
                self._close_with_loop(loop, client)
        return client

    def _close_with_loop(self, loop: asyncio.AbstractEventLoop, client: AiohttpClient) -> None:
        """Close ``client`` when its loop shuts down, without the user calling ``aclose()``.

        ``asyncio.run()`` (and so asgiref's ``async_to_sync``) ends by closing every async
        generator the loop has started, while the loop still runs: a generator suspended here
        closes the client in its ``finally``. A loop per request or per ``asyncio.run()`` call
        thus releases its connections when it ends, instead of leaving them open for the life
        of the pool.
        """

        async def closer() -> AsyncGenerator[None, None]:
            try:
                yield
            finally:
                client.closer = None  # this generator is the one closing: not again
                if self._clients.get(loop) is client:
                    del self._clients[loop]
                    await client.aclose()

        generator = closer()
        # Start it up to its yield, on this (the running) loop: its first step registers it
        # with the loop's async-generator hooks, which is what shutdown_asyncgens() closes.
        with contextlib.suppress(StopIteration):
            generator.asend(None).send(None)
        # The loop holds its generators weakly: the client keeps this one alive.
        client.closer = generator

    def _drop_closed_loops(self) -> None:
        # A loop closed without shutdown_asyncgens() (new_event_loop() ... close()) never ran
        # the closer: release its client's sockets now, without awaiting on a dead loop.
        for loop in [loop for loop in self._clients if loop.is_closed()]:
            client = self._clients.pop(loop)
            if isinstance(client, AiohttpClient):
                client.close_abandoned()

    def forget(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drop the client of ``loop`` without touching its sockets (a forked child's copy)."""
        client = self._clients.pop(loop, None)
        if isinstance(client, AiohttpClient):
            client.detach()

    async def aclose_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the client of ``loop`` (the running loop) only."""
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    async def aclose(self) -> None:
        """Close every client: on this loop directly, on other running loops through them."""
        if not self._clients:
            # Nothing opened: no loop needed (a blocking caller on the rollback engine closes
            # its executor without one).
            return
        current = asyncio.get_running_loop()
        clients = list(self._clients.items())
        self._clients.clear()
        for loop, client in clients:
            if loop is current:
                await client.aclose()
            elif loop.is_running():
                # A client may only be closed on its own loop: hand the close to that loop.
                future = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                await asyncio.wrap_future(future)
            elif isinstance(client, AiohttpClient):
                client.close_abandoned()
