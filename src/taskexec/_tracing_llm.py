"""Spans and metrics of LLM calls: a CLIENT span ``chat {model}`` per attempt.

Apart from :mod:`taskexec._tracing` (a task's span, events, the trace context), since this part
wraps the providers and reads the retry loop's failures, both of which report to that module.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._retry import AttemptFailed
from ._tracing import (
    CAPTURE_CONTENT_ENV,
    CAPTURE_VALUES,
    PROVIDER_NAMES,
    Otel,
    end_current_span,
    error_type,
    otel_api,
)

if TYPE_CHECKING:
    from ._http import ClientPool
    from ._models import Agent
    from .providers.base import ChatReply, Provider

__all__ = ("Complete", "traced_complete")

Complete = Callable[["Agent", str, "ClientPool", "float | None"], Coroutine[Any, Any, "ChatReply"]]


def traced_complete(provider: Provider, agent: Agent) -> Complete:
    """Return ``provider.complete``, wrapped in a CLIENT span per attempt when spans or
    metrics are collected (decided once per task)."""
    otel = otel_api()
    if otel is None:
        return provider.complete
    tracer = otel.tracer()
    instruments = otel.instruments()
    if tracer is None and instruments is None:
        return provider.complete
    return _Attempts(otel, tracer, instruments, provider, agent).complete


class _AgentCalls:
    """What the spans and metrics of an agent's calls say before any reply: the same for every
    task of the agent, so made once per agent (its URL parsed once, not per task)."""

    __slots__ = ("agent", "base", "name", "provider", "request")

    def __init__(self, provider: Provider, agent: Agent) -> None:
        # The agent is held weakly: the cache below must not keep agents of closed executors.
        self.agent = weakref.ref(agent)
        self.provider = provider
        model = str(agent.model or getattr(provider, "default_model", None) or "")
        self.name = f"chat {model}" if model else "chat"
        #: The metrics' attributes. Neither dict is ever changed after this (the SDK copies).
        self.base: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER_NAMES.get(provider.name, provider.name),
            "gen_ai.request.model": model,
        }
        #: The attempt span's attributes at its start (where a sampler sees them).
        self.request = dict(self.base)
        if agent.max_tokens is not None:
            self.request["gen_ai.request.max_tokens"] = agent.max_tokens
        if agent.temperature is not None:
            self.request["gen_ai.request.temperature"] = agent.temperature
        base_url = getattr(provider, "base_url", None)
        if callable(base_url):
            where = urlsplit(str(base_url(agent)))
            if where.hostname:
                self.base["server.address"] = self.request["server.address"] = where.hostname
                port = where.port or (443 if where.scheme == "https" else 80)
                self.base["server.port"] = self.request["server.port"] = port


#: By ``id(agent)``; an entry counts only while its agent is alive and the same object.
_agent_calls: dict[int, _AgentCalls] = {}
_AGENT_CALLS_MAX = 256  # agents come and go with executors; past this, start over


def _calls_of(provider: Provider, agent: Agent) -> _AgentCalls:
    found = _agent_calls.get(id(agent))
    if found is not None and found.agent() is agent and found.provider is provider:
        return found
    if len(_agent_calls) >= _AGENT_CALLS_MAX:
        _agent_calls.clear()
    made = _agent_calls[id(agent)] = _AgentCalls(provider, agent)
    return made


class _Attempts:
    """Spans and metrics of one task's attempts at a chat reply."""

    def __init__(
        self,
        otel: Otel,
        tracer: Any | None,
        instruments: tuple[Any, Any] | None,
        provider: Provider,
        agent: Agent,
    ) -> None:
        self.otel = otel
        self.tracer = tracer
        self.instruments = instruments
        self.provider = provider
        calls = _calls_of(provider, agent)
        self.name = calls.name
        self.base = calls.base
        self.request = calls.request
        # Read once per task (not once per process, so that a long-lived worker's setting can
        # change): an os.environ lookup per attempt was a measurable part of a span's cost.
        self.capture = tracer is not None and _capture_content()

    async def complete(
        self, agent: Agent, prompt: str, pool: ClientPool, timeout_s: float | None
    ) -> ChatReply:
        if self.tracer is None:
            return await self._measured(None, agent, prompt, pool, timeout_s)
        otel = self.otel
        kind = otel.trace.SpanKind.CLIENT
        span = self.tracer.start_span(self.name, kind=kind, attributes=self.request)
        if not span.is_recording():
            # Not sampled: nothing to record on it, so it is not made current either (an HTTP
            # client's spans then have the task's span as parent). A sampler is the lever for
            # CPU-bound runs, so this path is kept short.
            return await self._measured(None, agent, prompt, pool, timeout_s)
        # Current while the request runs, so that an instrumented HTTP client's spans are its
        # children. A failure is recorded by _measured (error.type, status), not as an event.
        token = otel.context.attach(otel.trace.set_span_in_context(span))
        try:
            if self.capture:
                content = {"gen_ai.input.messages": _input_messages(prompt)}
                if agent.system_prompt:
                    content["gen_ai.system_instructions"] = json.dumps(
                        [{"type": "text", "content": agent.system_prompt}]
                    )
                span.set_attributes(content)
            return await self._measured(span, agent, prompt, pool, timeout_s)
        finally:
            end_current_span(otel, span, token)

    async def _measured(
        self,
        span: Any | None,
        agent: Agent,
        prompt: str,
        pool: ClientPool,
        timeout_s: float | None,
    ) -> ChatReply:
        start = time.perf_counter()
        try:
            reply = await self.provider.complete(agent, prompt, pool, timeout_s)
        except AttemptFailed as failed:
            self._failed(span, error_type(failed.error), failed.error.message, start)
            raise
        except BaseException as exc:  # cancelled (a deadline, fail-fast) or a provider's bug
            self._failed(span, type(exc).__qualname__, None, start)
            raise
        self._succeeded(span, reply, start)
        return reply

    def _failed(self, span: Any | None, kind: str, message: str | None, start: float) -> None:
        if span is not None and span.is_recording():
            span.set_attribute("error.type", kind)
            trace = self.otel.trace
            span.set_status(trace.Status(trace.StatusCode.ERROR, message))
        if self.instruments is not None:
            duration = self.instruments[1]
            duration.record(time.perf_counter() - start, {**self.base, "error.type": kind})

    def _succeeded(self, span: Any | None, reply: ChatReply, start: float) -> None:
        elapsed = time.perf_counter() - start
        if span is not None and span.is_recording():
            usage = reply.usage
            attributes: dict[str, Any] = {
                "gen_ai.usage.input_tokens": usage.input_tokens,
                "gen_ai.usage.output_tokens": usage.output_tokens,
            }
            if reply.model:
                attributes["gen_ai.response.model"] = reply.model
            if reply.response_id:
                attributes["gen_ai.response.id"] = reply.response_id
            if reply.finish_reasons:
                attributes["gen_ai.response.finish_reasons"] = reply.finish_reasons
            if usage.cache_read_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_tokens
            if usage.cache_write_tokens:
                attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
            if self.capture:
                attributes["gen_ai.output.messages"] = _output_messages(reply)
            span.set_attributes(attributes)
        if self.instruments is not None:
            tokens, duration = self.instruments
            response = dict(self.base)
            if reply.model:
                response["gen_ai.response.model"] = reply.model
            duration.record(elapsed, response)
            tokens.record(reply.usage.input_tokens, {**response, "gen_ai.token.type": "input"})
            tokens.record(reply.usage.output_tokens, {**response, "gen_ai.token.type": "output"})


def _capture_content() -> bool:
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in CAPTURE_VALUES


def _input_messages(prompt: str) -> str:
    return json.dumps([{"role": "user", "parts": [{"type": "text", "content": prompt}]}])


def _output_messages(reply: ChatReply) -> str:
    message: dict[str, Any] = {
        "role": "assistant",
        "parts": [{"type": "text", "content": reply.text}],
    }
    if reply.finish_reasons:
        message["finish_reason"] = reply.finish_reasons[0]
    return json.dumps([message])
