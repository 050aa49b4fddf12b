"""Responses read as they arrive: the transport side of streaming, for each client of ``_http``.

A stream is opened with ``async with client.stream(url, body, headers, timeout_s) as response``
(``with`` for the legacy engine's blocking client): entering sends the request and waits for the
status line and headers; iterating yields the body's bytes as the socket delivers them; leaving
closes the response. Leaving before the body was read to its end drops the connection, never
returns it to the pool: a connection handed back half-read would go on receiving (and the
provider on generating, and billing) the rest of a reply nobody reads. Whether releasing an
unfinished response closes its connection differs between clients and versions, so each class
here closes it explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Self

import aiohttp
import httpx

from ._transport import TransportError, describe_error

__all__ = ("AiohttpStream", "BlockingStream", "HttpStream", "HttpxStream")


class HttpStream:
    """A streamed response of an async client: ``status``, ``headers``, then body chunks."""

    status: int = 0
    headers: Mapping[str, str] = {}

    async def __aenter__(self) -> Self:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        raise NotImplementedError

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        """Return the next bytes of the body as they arrive.

        Raises:
            StopAsyncIteration: The body ended.
            TransportError: The connection failed or stalled past the read timeout.
        """
        raise NotImplementedError

    async def read(self) -> bytes:
        """Return the rest of the body (an error reply's, which is short)."""
        return b"".join([chunk async for chunk in self])


class AiohttpStream(HttpStream):
    """A streamed POST over an aiohttp session (the default transport)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        self._session = session
        self._args = (url, body, headers, timeout)
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> Self:
        url, body, headers, timeout = self._args
        try:
            # No redirects, as in httpx: a 3xx must not carry a key header to another host.
            response = await self._session.post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            )
        except TimeoutError as exc:
            raise TransportError("timeout", "no response before the attempt timed out") from exc
        except aiohttp.ClientError as exc:
            raise TransportError("connection", describe_error(exc)) from exc
        self._response = response
        self.status, self.headers = response.status, response.headers
        return self

    async def __anext__(self) -> bytes:
        assert self._response is not None
        try:
            chunk = await self._response.content.readany()
        except TimeoutError as exc:
            raise TransportError("timeout", _STALLED) from exc
        except aiohttp.ClientError as exc:
            raise TransportError("connection", describe_error(exc)) from exc
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        if exc_type is None and response.content.is_eof():
            response.release()  # read to its end: the connection may serve another request
        else:
            response.close()  # unfinished: drop the connection now, the server sees it close


_NO_RESPONSE = "no response before the attempt timed out"
_STALLED = "the stream stalled past the read timeout"


class _HttpxErrors:
    """httpx's errors as transport errors, for the async and the blocking streams alike (a
    timeout with ``timeout_message``); anything else, the end of the stream included, passes."""

    __slots__ = ("_timeout_message",)

    def __init__(self, timeout_message: str) -> None:
        self._timeout_message = timeout_message

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, httpx.TimeoutException):
            raise TransportError("timeout", self._timeout_message) from exc
        if isinstance(exc, httpx.TransportError):
            raise TransportError("connection", describe_error(exc)) from exc


class HttpxStream(HttpStream):
    """A streamed POST over a caller's ``httpx.AsyncClient``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: httpx.Timeout,
    ) -> None:
        self._request = client.build_request(
            "POST", url, content=body, headers=headers, timeout=timeout
        )
        self._client = client
        self._response: httpx.Response | None = None

    async def __aenter__(self) -> Self:
        with _HttpxErrors(_NO_RESPONSE):
            response = await self._client.send(self._request, stream=True)
        self._response = response
        self._chunks = response.aiter_raw()
        self.status, self.headers = response.status_code, response.headers
        return self

    async def __anext__(self) -> bytes:
        with _HttpxErrors(_STALLED):
            return await self._chunks.__anext__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        await self._chunks.aclose()  # type: ignore[attr-defined]
        # httpx closes a connection whose response was not read to its end.
        await response.aclose()


class BlockingStream:
    """A streamed POST over the legacy engine's blocking client (``with``, then ``for``)."""

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: httpx.Timeout,
    ) -> None:
        self._request = client.build_request(
            "POST", url, content=body, headers=headers, timeout=timeout
        )
        self._client = client
        self._response: httpx.Response | None = None
        self.status = 0
        self.headers: Mapping[str, str] = {}

    def __enter__(self) -> Self:
        with _HttpxErrors(_NO_RESPONSE):
            response = self._client.send(self._request, stream=True)
        self._response = response
        self._chunks = response.iter_raw()
        self.status, self.headers = response.status_code, response.headers
        return self

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with _HttpxErrors(_STALLED):
            return next(self._chunks)

    def read(self) -> bytes:
        """Return the rest of the body (an error reply's, which is short)."""
        return b"".join(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        response, self._response = self._response, None
        if response is not None:
            self._chunks.close()  # type: ignore[attr-defined]
            response.close()  # a response not read to its end takes its connection with it
