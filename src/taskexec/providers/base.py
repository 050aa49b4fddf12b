"""The provider interface: one chat attempt against one vendor's protocol.

A provider turns (agent, rendered prompt) into one request and its reply into text and usage. It
does not retry, pool, or time anything: the ``llm`` mode does that, the same way for every vendor.
"""

from __future__ import annotations

import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from .._http import ClientPool, HttpResponse, TransportError
from .._models import Agent, ExecutionError, Usage
from .._retry import AttemptFailed, body_snippet, classify_response, transport_failure
from .._secrets import Redactor
from .._sse import SSEDecoder

__all__ = (
    "ChatReply",
    "HttpProvider",
    "Provider",
    "StreamDecoder",
    "StreamErrorEvent",
    "StreamReply",
    "Unavailable",
    "redactor",
)

FallbackReason = Literal["missing_api_key", "missing_dependency"]


@dataclass(frozen=True, slots=True)
class ChatReply:
    """What one successful chat attempt produced."""

    text: str
    usage: Usage
    #: The reply's HTTP headers (rate-limit headers tighten the agent's limiter).
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The model that answered, as the vendor names it (it may be more precise than the
    #: request's, e.g. a dated version); None when the reply does not say.
    model: str | None = None
    #: The vendor's id of the reply, when it sends one.
    response_id: str | None = None
    #: Why the model stopped, one entry per choice (``stop``, ``end_turn``, ``STOP``...).
    finish_reasons: tuple[str, ...] = ()


@dataclass(slots=True)
class StreamReply:
    """What a streamed chat attempt reports besides its text, filled in as the stream goes."""

    usage: Usage = field(default_factory=Usage)
    #: The reply's HTTP headers (rate-limit headers tighten the agent's limiter).
    headers: Mapping[str, str] = field(default_factory=dict)


class StreamErrorEvent(Exception):
    """A stream reported an error in an event of its own (after a 2xx status line)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class StreamDecoder(ABC):
    """Reads one vendor's stream, one server-sent event at a time (one decoder per attempt).

    Attributes:
        usage: The usage the stream reported so far (the last report wins).
        done: The stream's own end marker arrived; a stream that stops without it was cut.
    """

    def __init__(self) -> None:
        self.usage = Usage()
        self.done = False

    @abstractmethod
    def event(self, name: str, data: str) -> str | None:
        """Return the text an event adds, if any.

        Raises:
            StreamErrorEvent: The event reports an error.
            KeyError, IndexError, TypeError, ValueError: The event is not what the protocol says.
        """


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why a provider cannot run for an agent here and now, and what to do about it."""

    reason: FallbackReason
    message: str


def redactor(*secrets: str | None) -> Callable[[str], str]:
    """Return a function that replaces every given secret in a text by ``***``.

    Pieces of a secret of six characters or more at either end of the text are replaced too
    (see :class:`taskexec._secrets.Redactor`).
    """
    return Redactor(secrets)


class Provider(ABC):
    """A way to get a chat reply for an agent.

    Subclasses set ``name`` and implement :meth:`complete`. Providers that need an API key list the
    environment variables to read it from in ``key_env_vars`` (first set wins); providers that
    need extra packages list their import names in ``requires`` and the extra to install in
    ``extra``.
    """

    name: ClassVar[str]
    key_env_vars: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None

    def api_key(self, agent: Agent | None) -> str | None:
        """Return the key for ``agent``: its ``api_key``, its ``api_key_env``, else the first set
        variable of ``key_env_vars`` (when :meth:`takes_environment_key` allows)."""
        if agent is not None:
            if agent.api_key is not None:
                return agent.api_key.get_secret_value()
            if agent.api_key_env is not None:
                return os.environ.get(agent.api_key_env) or None
            if not self.takes_environment_key(agent):
                return None
        return self.environment_key()

    def environment_key(self) -> str | None:
        """Return the value of the first set variable of ``key_env_vars``, or None."""
        for var in self.key_env_vars:
            value = os.environ.get(var)
            if value:
                return value
        return None

    def takes_environment_key(self, agent: Agent) -> bool:
        """Return True when a key from ``key_env_vars`` may be sent where ``agent`` points.

        A provider that talks to one fixed service may always take it; HTTP providers take it
        only for the vendor's endpoint and the base URL the environment names.
        """
        return True

    def needs_key(self, agent: Agent | None) -> bool:
        """Return True when the endpoint ``agent`` talks to requires an API key."""
        return bool(self.key_env_vars) or (agent is not None and agent.api_key_env is not None)

    def key_hint(self, agent: Agent | None) -> str:
        """Return where a key for ``agent`` is looked for, for error messages."""
        if agent is not None and agent.api_key_env is not None:
            return agent.api_key_env
        return " or ".join([*self.key_env_vars, "the agent's api_key"])

    def unavailable(self, agent: Agent | None) -> Unavailable | None:
        """Return why this provider cannot serve ``agent`` here and now, or None if it can."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                hint = (
                    f"pip install 'taskexec[{self.extra}]'"
                    if self.extra
                    else f"pip install {module}"
                )
                return Unavailable(
                    "missing_dependency",
                    f"provider {self.name!r} needs the package {module!r}: {hint}",
                )
        if self.needs_key(agent) and not self.api_key(agent):
            return Unavailable(
                "missing_api_key",
                f"provider {self.name!r} needs an API key: set {self.key_hint(agent)}",
            )
        return None

    async def stream(
        self,
        agent: Agent,
        prompt: str,
        pool: ClientPool,
        timeout_s: float | None,
        reply: StreamReply,
    ) -> AsyncGenerator[str, None]:
        """Make one attempt at a chat reply, yielding its text as it arrives.

        The default makes one :meth:`complete` call and yields its text whole: a provider
        without a stream of its own still streams, in one piece.

        Args:
            agent: The agent.
            prompt: The rendered task prompt.
            pool: The client pool.
            timeout_s: Most time between two pieces of the reply.
            reply: Filled in with the usage and headers the stream reports.

        Raises:
            AttemptFailed: The attempt failed (before or after some text was yielded).
        """
        whole = await self.complete(agent, prompt, pool, timeout_s)
        reply.usage, reply.headers = whole.usage, whole.headers
        if whole.text:
            yield whole.text

    @abstractmethod
    async def complete(
        self, agent: Agent, prompt: str, pool: ClientPool, timeout_s: float | None
    ) -> ChatReply:
        """Make one attempt at a chat reply.

        Args:
            agent: The agent (model, system prompt, endpoint, limits).
            prompt: The rendered task prompt, sent as the last user message.
            pool: The client pool; ``pool.get()`` is the running loop's client.
            timeout_s: Time this attempt may take.

        Raises:
            AttemptFailed: The attempt failed; its error says whether a retry may help.
        """


class HttpProvider(Provider):
    """A provider that makes one JSON POST per attempt; subclasses describe the protocol."""

    default_base_url: ClassVar[str]
    base_url_env_var: ClassVar[str | None] = None

    def environment_base_url(self) -> str | None:
        """Return the base URL the environment names (``base_url_env_var``), or None."""
        value = os.environ.get(self.base_url_env_var, "") if self.base_url_env_var else ""
        return value.strip().rstrip("/") or None  # blank: unset

    def base_url(self, agent: Agent) -> str:
        """Return the agent's ``base_url``, else the environment's, else the vendor's."""
        return agent.base_url or self.environment_base_url() or self.default_base_url

    def takes_environment_key(self, agent: Agent) -> bool:
        # The operator's key goes only where the operator's own settings point: the vendor, or
        # the base URL the environment names. A base_url from a plan or an Agent gets a key only
        # when it names one (api_key, api_key_env), so a plan file cannot exfiltrate the key.
        return agent.base_url is None or agent.base_url in (
            self.default_base_url,
            self.environment_base_url(),
        )

    def needs_key(self, agent: Agent | None) -> bool:
        # A custom endpoint (a local Ollama, vLLM or llama.cpp server) usually takes no key.
        return (
            agent is None
            or agent.api_key_env is not None
            or self.base_url(agent) == self.default_base_url
        )

    @abstractmethod
    def endpoint(self, agent: Agent) -> str:
        """Return the URL to POST to."""

    @abstractmethod
    def headers(self, agent: Agent, key: str | None) -> dict[str, str]:
        """Return the request headers; send no credential header when ``key`` is None."""

    @abstractmethod
    def payload(self, agent: Agent, prompt: str) -> dict[str, Any]:
        """Return the JSON body."""

    @abstractmethod
    def parse(self, data: Any) -> ChatReply:
        """Return the reply in a 2xx body; raise KeyError, TypeError or ValueError if malformed."""

    async def complete(
        self, agent: Agent, prompt: str, pool: ClientPool, timeout_s: float | None
    ) -> ChatReply:
        key = self.api_key(agent)
        redact = Redactor([key, self.environment_key()])
        url = self.endpoint(agent)
        where = f"{self.name} at {url}"
        body = json.dumps(self.payload(agent, prompt)).encode()
        try:
            response = await pool.get().post(url, body, self.headers(agent, key), timeout_s)
        except TransportError as exc:
            raise transport_failure(exc, redact, where=where) from None
        failure = classify_response(response, redact, where=where)
        if failure is not None:
            if key is None and response.status in (401, 403) and self.environment_key():
                failure.error = failure.error.model_copy(
                    update={"message": failure.error.message + self._withheld_hint()}
                )
            raise failure
        try:
            reply = self.parse(json.loads(response.body))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            snippet = body_snippet(redact, response.body, 200)
            message = (
                f"{where} sent a {response.status} reply that is not a chat response "
                f"({exc!r}): {snippet}"
            )
            raise AttemptFailed(ExecutionError(kind="bad_response", message=message)) from None
        return replace(reply, headers=response.headers)

    def stream_endpoint(self, agent: Agent) -> str:
        """Return the URL to POST a streamed request to (default: :meth:`endpoint`)."""
        return self.endpoint(agent)

    def stream_payload(self, agent: Agent, prompt: str) -> dict[str, Any]:
        """Return the JSON body of a streamed request (default: the payload, ``stream: true``)."""
        return {**self.payload(agent, prompt), "stream": True}

    def stream_decoder(self) -> StreamDecoder:
        """Return a decoder for one streamed reply; a provider that streams overrides this."""
        raise NotImplementedError(f"provider {self.name!r} has no stream decoder")

    def stream_request(self, agent: Agent, prompt: str) -> tuple[str, dict[str, str], bytes]:
        """Return the URL, headers and body of a streamed request (shared by both engines)."""
        headers = self.headers(agent, self.api_key(agent))
        headers["accept"] = "text/event-stream"
        body = json.dumps(self.stream_payload(agent, prompt)).encode()
        return self.stream_endpoint(agent), headers, body

    def stream_failure(
        self, agent: Agent, status: int, headers: Mapping[str, str], body: bytes
    ) -> AttemptFailed:
        """Return the failure a non-2xx reply to a streamed request stands for."""
        key = self.api_key(agent)
        redact = Redactor([key, self.environment_key()])
        where = f"{self.name} at {self.stream_endpoint(agent)}"
        failure = classify_response(HttpResponse(status, headers, body), redact, where=where)
        assert failure is not None
        if key is None and status in (401, 403) and self.environment_key():
            failure.error = failure.error.model_copy(
                update={"message": failure.error.message + self._withheld_hint()}
            )
        return failure

    def stream_event_failure(self, agent: Agent, exc: Exception) -> AttemptFailed:
        """Return the failure an unreadable or error event of a stream stands for."""
        redact = Redactor([self.api_key(agent), self.environment_key()])
        where = f"{self.name} at {self.stream_endpoint(agent)}"
        if isinstance(exc, StreamErrorEvent):
            status = exc.status_code
            retryable = status is None or status in (408, 409, 429) or status >= 500
            message = f"{where} reported an error mid-stream: {redact(exc.message)}"
            return AttemptFailed(
                ExecutionError(
                    kind="http_status", message=message, status_code=status, retryable=retryable
                )
            )
        message = f"{where} sent a stream event that is not what the protocol says ({exc!r})"
        return AttemptFailed(ExecutionError(kind="bad_response", message=redact(message)))

    async def stream(
        self,
        agent: Agent,
        prompt: str,
        pool: ClientPool,
        timeout_s: float | None,
        reply: StreamReply,
    ) -> AsyncGenerator[str, None]:
        url, headers, body = self.stream_request(agent, prompt)
        decoder = self.stream_decoder()
        try:
            async with pool.get().stream(url, body, headers, timeout_s) as response:
                reply.headers = response.headers
                if not 200 <= response.status < 300:
                    error_body = await response.read()
                    raise self.stream_failure(agent, response.status, response.headers, error_body)
                events = SSEDecoder()
                async for chunk in response:
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
                            raise self.stream_event_failure(agent, exc) from None
                        reply.usage = decoder.usage
                        if text:
                            yield text
        except TransportError as exc:
            if decoder.done:
                return  # the end event arrived; only the connection's own ending was lost
            redact = Redactor([self.api_key(agent), self.environment_key()])
            raise transport_failure(exc, redact, where=f"{self.name} at {url}") from None
        if not decoder.done:
            message = f"{self.name} at {url}: the stream ended before its end event"
            raise AttemptFailed(ExecutionError(kind="connection", message=message, retryable=True))

    def _withheld_hint(self) -> str:
        names = " or ".join(self.key_env_vars)
        return (
            f" (the key in {names} is not sent to a base_url set by the plan or the agent; "
            f"set the agent's api_key_env: {self.key_env_vars[0]} to send it there)"
        )


def tokens(value: Any) -> int:
    """Return a token count from a vendor's usage field (missing or null counts as 0)."""
    return int(value) if isinstance(value, int | float) else 0


def text_or_none(value: Any) -> str | None:
    """Return a string field of a reply, or None when it is missing or not a string."""
    return value if isinstance(value, str) and value else None
