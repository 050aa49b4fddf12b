"""OpenTelemetry traces and metrics of tasks and LLM calls, when the application collects them.

taskexec configures no SDK: it uses the global tracer and meter providers, which the application
sets (or ``opentelemetry-instrument`` does). It emits:

- a span per task (``taskexec.task``, INTERNAL), with the task's id, agent, mode, status,
  attempts and cost; a rate-limit wait and each retry's backoff are events on it;
- a CLIENT span per attempt of an LLM call, ``chat {model}``, with the GenAI semantic
  conventions' attributes (``gen_ai.operation.name``, ``gen_ai.provider.name``,
  ``gen_ai.request.model``, ``gen_ai.response.*``, ``gen_ai.usage.*``, ``error.type``), and the
  prompt and reply text only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` opts in;
- the metrics ``gen_ai.client.token.usage`` and ``gen_ai.client.operation.duration``.

Cost: without the ``otel`` extra (``opentelemetry-api``) nothing is imported and every hook is a
check of one module global. With the API but no SDK provider set, the hooks see that at each
task and do nothing more either. The API is imported on first use, not with taskexec.

The W3C trace context crosses process boundaries with :func:`inject_trace_context` (into a
message's headers) and :func:`trace_context_from` (around the work the message asks for).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ._http import ClientPool
    from ._models import Agent, AgentTask, ExecutionError, ExecutionResult
    from .providers.base import ChatReply, Provider

__all__ = (
    "CAPTURE_CONTENT_ENV",
    "INSTRUMENTATION_NAME",
    "add_event",
    "error_type",
    "inject_trace_context",
    "trace_context_from",
    "trace_dispatch",
    "trace_task",
    "trace_task_blocking",
    "traced_complete",
)

INSTRUMENTATION_NAME = "taskexec"
#: The GenAI conventions' opt-in for prompt and reply text on spans.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_CAPTURE_VALUES = frozenset({"true", "1", "span_only", "span_and_event"})
#: ``gen_ai.provider.name`` of taskexec's providers (others go by their own name).
_PROVIDER_NAMES = {"gemini": "gcp.gemini"}
#: The conventions' advised buckets for the two histograms.
_TOKEN_BUCKETS = tuple(float(4**n) for n in range(14))  # 1, 4, 16 ... 67,108,864
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)  # fmt: skip

S = TypeVar("S")
P = ParamSpec("P")
RunOne = Callable[
    ["AgentTask", "Mapping[str, str | None] | None", Any], Coroutine[Any, Any, "ExecutionResult"]
]
Complete = Callable[["Agent", str, "ClientPool", "float | None"], Coroutine[Any, Any, "ChatReply"]]


class _Otel:
    """The OpenTelemetry API, loaded, with the tracer and instruments of the current providers."""

    def __init__(self) -> None:
        from opentelemetry import context, metrics, propagate, trace
        from opentelemetry.metrics import _internal as metrics_globals

        self.trace = trace
        self._metrics_globals = metrics_globals
        # Whether the environment names a provider for the getters to load, read once.
        self._named = {
            name: name in os.environ
            for name in ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")
        }
        self.metrics = metrics
        self.context = context
        self.propagate = propagate
        # The API's stand-ins while no SDK provider is set, as a tuple: isinstance() with a
        # union built at each call costs more than the rest of the check.
        self._no_sdk = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        self._tracer_for: tuple[object, Any] | None = None
        self._meter_for: tuple[object, Any, Any] | None = None

    def tracer(self) -> Any | None:
        """Return a tracer of the global provider, or None while no SDK provider is set."""
        # Every task asks. The API's getter looks the environment up at each call; while no
        # provider is set (its global is None, the common case of an installed but unused
        # API) that answer is known without it. Only the fast path reads the global.
        if (
            vars(self.trace).get("_TRACER_PROVIDER", 0) is None
            and not self._named["OTEL_PYTHON_TRACER_PROVIDER"]
        ):
            return None
        provider = self.trace.get_tracer_provider()
        if isinstance(provider, self._no_sdk):
            return None
        cached = self._tracer_for
        if cached is None or cached[0] is not provider:
            version = _version()
            cached = self._tracer_for = (
                provider,
                provider.get_tracer(INSTRUMENTATION_NAME, version),
            )
        return cached[1]

    def instruments(self) -> tuple[Any, Any] | None:
        """Return the token-usage and duration histograms, or None without a meter provider."""
        if (
            vars(self._metrics_globals).get("_METER_PROVIDER", 0) is None
            and not self._named["OTEL_PYTHON_METER_PROVIDER"]
        ):
            return None  # as in tracer(): nothing set, known without the getter
        provider = self.metrics.get_meter_provider()
        # The API's stand-ins before an SDK provider is set (the proxy's class is private).
        if type(provider).__name__ in ("_ProxyMeterProvider", "NoOpMeterProvider"):
            return None
        cached = self._meter_for
        if cached is None or cached[0] is not provider:
            meter = provider.get_meter(INSTRUMENTATION_NAME, _version())
            tokens = meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used",
                explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
            )
            duration = meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration",
                explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
            )
            cached = self._meter_for = (provider, tokens, duration)
        return cached[1], cached[2]


_otel: _Otel | None = None
_absent = False


def _api() -> _Otel | None:
    """Return the loaded API, or None when the ``otel`` extra is not installed."""
    global _otel, _absent
    if _otel is not None or _absent:
        return _otel
    try:
        _otel = _Otel()
    except ImportError:
        _absent = True  # checked once: the hooks cost one global lookup from now on
    return _otel


def _version() -> str:
    from ._version import __version__

    return __version__


# -- tasks --------------------------------------------------------------------------------------


def trace_task(
    task: AgentTask, run: Coroutine[Any, Any, ExecutionResult]
) -> Coroutine[Any, Any, ExecutionResult]:
    """Return ``run`` inside the task's span, or ``run`` itself when nothing collects spans.

    Returning the same coroutine when tracing is off adds no frame to every task.
    """
    otel = _api()
    tracer = otel.tracer() if otel is not None else None
    if tracer is None:
        return run
    return _traced_task(tracer, task, run)


async def _traced_task(
    tracer: Any, task: AgentTask, run: Coroutine[Any, Any, ExecutionResult]
) -> ExecutionResult:
    with tracer.start_as_current_span(
        "taskexec.task", attributes={"taskexec.task.id": task.id}
    ) as span:
        result = await run
        _end_task(span, result)
        return result


def trace_dispatch(run_one: RunOne) -> RunOne:
    """Wrap a batch's way of sending a task elsewhere (to a worker) in the task's span, so that
    the trace context sent along with it (:func:`inject_trace_context`) names that span."""

    def run(
        task: AgentTask, outputs: Mapping[str, str | None] | None, progress: Any
    ) -> Coroutine[Any, Any, ExecutionResult]:
        return trace_task(task, run_one(task, outputs, progress))

    return run


def trace_task_blocking(
    method: Callable[Concatenate[S, AgentTask, P], ExecutionResult],
) -> Callable[Concatenate[S, AgentTask, P], ExecutionResult]:
    """Decorate a blocking ``execute(task, ...)`` method so that each call has a task span."""

    @functools.wraps(method)
    def execute(self: S, task: AgentTask, /, *args: P.args, **kwargs: P.kwargs) -> ExecutionResult:
        otel = _api()
        tracer = otel.tracer() if otel is not None else None
        if tracer is None:
            return method(self, task, *args, **kwargs)
        with tracer.start_as_current_span(
            "taskexec.task", attributes={"taskexec.task.id": task.id}
        ) as span:
            result = method(self, task, *args, **kwargs)
            _end_task(span, result)
            return result

    return execute


def _end_task(span: Any, result: ExecutionResult) -> None:
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "taskexec.agent": result.agent,
            "taskexec.mode": result.mode,
            "taskexec.engine": result.engine,
            "taskexec.status": result.status.value,
            "taskexec.attempts": result.attempts,
        }
    )
    if result.usage.cost_usd is not None:
        span.set_attribute("taskexec.cost_usd", result.usage.cost_usd)
    if result.error is not None:
        span.set_attribute("error.type", result.error.kind)
        otel = _api()
        assert otel is not None
        span.set_status(otel.trace.Status(otel.trace.StatusCode.ERROR, result.error.kind))


def add_event(name: str, attributes: Mapping[str, str | int | float | bool]) -> None:
    """Add an event to the current span (the task's), when spans are being collected."""
    otel = _api()
    if otel is None:
        return
    span = otel.trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes=dict(attributes))


def error_type(error: ExecutionError) -> str:
    """Return ``error.type`` of a failed attempt: the HTTP status, else the error's kind."""
    return str(error.status_code) if error.status_code is not None else error.kind


# -- LLM calls ----------------------------------------------------------------------------------


def traced_complete(provider: Provider, agent: Agent) -> Complete:
    """Return ``provider.complete``, wrapped in a CLIENT span per attempt when spans or
    metrics are collected (decided once per task)."""
    otel = _api()
    if otel is None:
        return provider.complete
    tracer = otel.tracer()
    instruments = otel.instruments()
    if tracer is None and instruments is None:
        return provider.complete
    return _Attempts(otel, tracer, instruments, provider, agent).complete


class _Attempts:
    """Spans and metrics of one task's attempts at a chat reply."""

    def __init__(
        self,
        otel: _Otel,
        tracer: Any | None,
        instruments: tuple[Any, Any] | None,
        provider: Provider,
        agent: Agent,
    ) -> None:
        self.otel = otel
        self.tracer = tracer
        self.instruments = instruments
        self.provider = provider
        model = agent.model or getattr(provider, "default_model", None) or ""
        self.model = str(model)
        self.base: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": _PROVIDER_NAMES.get(provider.name, provider.name),
            "gen_ai.request.model": self.model,
        }
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

    async def complete(
        self, agent: Agent, prompt: str, pool: ClientPool, timeout_s: float | None
    ) -> ChatReply:
        if self.tracer is None:
            return await self._measured(None, agent, prompt, pool, timeout_s)
        name = f"chat {self.model}" if self.model else "chat"
        kind = self.otel.trace.SpanKind.CLIENT
        with self.tracer.start_as_current_span(
            name,
            kind=kind,
            attributes=self.request,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if span.is_recording() and _capture_content():
                span.set_attribute("gen_ai.input.messages", _input_messages(prompt))
                if agent.system_prompt:
                    span.set_attribute(
                        "gen_ai.system_instructions",
                        json.dumps([{"type": "text", "content": agent.system_prompt}]),
                    )
            return await self._measured(span, agent, prompt, pool, timeout_s)

    async def _measured(
        self,
        span: Any | None,
        agent: Agent,
        prompt: str,
        pool: ClientPool,
        timeout_s: float | None,
    ) -> ChatReply:
        from ._retry import AttemptFailed  # here: the retry loop imports this module

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
        response = dict(self.base)
        if reply.model:
            response["gen_ai.response.model"] = reply.model
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
                attributes["gen_ai.response.finish_reasons"] = list(reply.finish_reasons)
            if usage.cache_read_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_tokens
            if usage.cache_write_tokens:
                attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
            if _capture_content():
                attributes["gen_ai.output.messages"] = _output_messages(reply)
            span.set_attributes(attributes)
        if self.instruments is not None:
            tokens, duration = self.instruments
            duration.record(elapsed, response)
            tokens.record(reply.usage.input_tokens, {**response, "gen_ai.token.type": "input"})
            tokens.record(reply.usage.output_tokens, {**response, "gen_ai.token.type": "output"})


def _capture_content() -> bool:
    # Read at each attempt, like the conventions' other instrumentations, so that it can be
    # switched without a restart of a long-lived worker's configuration.
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in _CAPTURE_VALUES


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


# -- across processes ---------------------------------------------------------------------------


def inject_trace_context(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Write the current trace context (W3C ``traceparent``, ``tracestate``, ``baggage``) into a
    carrier, e.g. a task message's headers, and return it as a dict.

    Without the ``otel`` extra, or outside any span, the carrier comes back unchanged.
    """
    out = dict(carrier or {})
    otel = _api()
    if otel is not None:
        otel.propagate.inject(out)
    return out


@contextlib.contextmanager
def trace_context_from(carrier: Mapping[str, Any] | None) -> Iterator[None]:
    """Run the block in the trace context a carrier holds, so its spans are that trace's.

    A worker wraps the task a message asks for in it, with the message's headers: the task's
    spans are then children of the orchestrator's span that sent it. Without the extra, or
    with no context in the carrier, the block runs as it is.
    """
    otel = _api()
    if otel is None or not carrier:
        yield
        return
    strings = {str(k): v for k, v in carrier.items() if isinstance(v, str)}
    token = otel.context.attach(otel.propagate.extract(strings))
    try:
        yield
    finally:
        otel.context.detach(token)
