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
task and do nothing more either. The API is imported on first use, not with taskexec. With an
SDK provider, what a task costs is mostly the SDK's own work for its two spans (see
docs/TRACING.md, What it costs); the hooks here keep their own part small.

The W3C trace context crosses process boundaries with :func:`inject_trace_context` (into a
message's headers) and :func:`trace_context_from` (around the work the message asks for).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

if TYPE_CHECKING:
    from ._models import AgentTask, ExecutionError, ExecutionResult

__all__ = (
    "CAPTURE_CONTENT_ENV",
    "CAPTURE_VALUES",
    "INSTRUMENTATION_NAME",
    "PROVIDER_NAMES",
    "Otel",
    "add_event",
    "end_current_span",
    "error_type",
    "inject_trace_context",
    "otel_api",
    "record_exception",
    "start_current_span",
    "trace_context_from",
    "trace_dispatch",
    "trace_task",
    "trace_task_blocking",
)

INSTRUMENTATION_NAME = "taskexec"
#: The GenAI conventions' opt-in for prompt and reply text on spans.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
CAPTURE_VALUES = frozenset({"true", "1", "span_only", "span_and_event"})
#: ``gen_ai.provider.name`` of taskexec's providers (others go by their own name).
PROVIDER_NAMES = {"gemini": "gcp.gemini"}
#: The conventions' advised buckets for the two histograms.
_TOKEN_BUCKETS = tuple(float(4**n) for n in range(14))  # 1, 4, 16 ... 67,108,864
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)  # fmt: skip

S = TypeVar("S")
P = ParamSpec("P")
RunOne = Callable[
    ["AgentTask", "Mapping[str, str | None] | None", Any], Coroutine[Any, Any, "ExecutionResult"]
]


class Otel:
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
        # (the API's global provider, what it gave), for the last global seen.
        self._tracer_for: tuple[object, Any] | None = None
        self._meter_for: tuple[object, tuple[Any, Any] | None] | None = None

    def tracer(self) -> Any | None:
        """Return a tracer of the global provider, or None while no SDK provider is set."""
        # Every task asks twice (its span, its attempts). The answer is cached against the API's
        # global itself, so that a provider seen before costs one read of it; the API's getter
        # would look the environment up at each call. A global of None (the common case of an
        # installed but unused API) means no provider, unless the environment names one.
        current = vars(self.trace).get("_TRACER_PROVIDER")
        cached = self._tracer_for
        if cached is not None and cached[0] is current:
            return cached[1]
        if current is None and not self._named["OTEL_PYTHON_TRACER_PROVIDER"]:
            return None
        provider = self.trace.get_tracer_provider()  # may load the one the environment names
        tracer = (
            None
            if isinstance(provider, self._no_sdk)
            else provider.get_tracer(INSTRUMENTATION_NAME, _version())
        )
        self._tracer_for = (vars(self.trace).get("_TRACER_PROVIDER"), tracer)
        return tracer

    def instruments(self) -> tuple[Any, Any] | None:
        """Return the token-usage and duration histograms, or None without a meter provider."""
        current = vars(self._metrics_globals).get("_METER_PROVIDER")  # as in tracer()
        cached = self._meter_for
        if cached is not None and cached[0] is current:
            return cached[1]
        if current is None and not self._named["OTEL_PYTHON_METER_PROVIDER"]:
            return None
        provider = self.metrics.get_meter_provider()
        instruments: tuple[Any, Any] | None = None
        # The API's stand-ins before an SDK provider is set (the proxy's class is private).
        if type(provider).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider"):
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
            instruments = (tokens, duration)
        self._meter_for = (vars(self._metrics_globals).get("_METER_PROVIDER"), instruments)
        return instruments


_otel: Otel | None = None
_absent = False


def otel_api() -> Otel | None:
    """Return the loaded API, or None when the ``otel`` extra is not installed."""
    global _otel, _absent
    if _otel is not None or _absent:
        return _otel
    try:
        _otel = Otel()
    except ImportError:
        _absent = True  # checked once: the hooks cost one global lookup from now on
    return _otel


def _version() -> str:
    from ._version import __version__

    return __version__


# -- tasks --------------------------------------------------------------------------------------


def start_current_span(
    otel: Otel, tracer: Any, name: str, attributes: Mapping[str, Any], kind: Any = None
) -> tuple[Any, object]:
    """Start a span and make it the current one; return it and the token that undoes that.

    What ``tracer.start_as_current_span`` does, less its two generator-based context managers
    (it and ``use_span``), which were over a quarter of what a task's two spans cost (SDK
    1.45). :func:`end_current_span` must follow in a ``finally``, in the same context.
    """
    if kind is None:
        span = tracer.start_span(name, attributes=attributes)
    else:
        span = tracer.start_span(name, kind=kind, attributes=attributes)
    return span, otel.context.attach(otel.trace.set_span_in_context(span))


def end_current_span(otel: Otel, span: Any, token: object) -> None:
    """Restore the context :func:`start_current_span` replaced, then end the span."""
    otel.context.detach(token)
    span.end()


def record_exception(otel: Otel, span: Any, exc: Exception) -> None:
    """Mark a span failed by an exception, as ``start_as_current_span`` would have."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(
            otel.trace.Status(otel.trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        )


def trace_task(
    task: AgentTask, run: Coroutine[Any, Any, ExecutionResult]
) -> Coroutine[Any, Any, ExecutionResult]:
    """Return ``run`` inside the task's span, or ``run`` itself when nothing collects spans.

    Returning the same coroutine when tracing is off adds no frame to every task.
    """
    otel = otel_api()
    tracer = otel.tracer() if otel is not None else None
    if tracer is None:
        return run
    assert otel is not None
    return _traced_task(otel, tracer, task, run)


async def _traced_task(
    otel: Otel, tracer: Any, task: AgentTask, run: Coroutine[Any, Any, ExecutionResult]
) -> ExecutionResult:
    with _TaskSpan(otel, tracer, task) as span:
        return span.ended(await run)


class _TaskSpan:
    """A task's span, current while the task runs; a raised exception (a configuration error:
    task failures are results, not raised) is recorded on it. A class, not a generator: the
    generator-based context managers were over a quarter of what a task's two spans cost."""

    __slots__ = ("otel", "span", "token")

    def __init__(self, otel: Otel, tracer: Any, task: AgentTask) -> None:
        self.otel = otel
        self.span, self.token = start_current_span(
            otel, tracer, "taskexec.task", {"taskexec.task.id": task.id}
        )

    def __enter__(self) -> _TaskSpan:
        return self

    def ended(self, result: ExecutionResult) -> ExecutionResult:
        """Record the task's result on its span; return it."""
        _end_task(self.otel, self.span, result)
        return result

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        try:
            if isinstance(exc, Exception):
                record_exception(self.otel, self.span, exc)
        finally:
            end_current_span(self.otel, self.span, self.token)


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
        otel = otel_api()
        tracer = otel.tracer() if otel is not None else None
        if tracer is None:
            return method(self, task, *args, **kwargs)
        assert otel is not None
        with _TaskSpan(otel, tracer, task) as span:
            return span.ended(method(self, task, *args, **kwargs))

    return execute


def _end_task(otel: Otel, span: Any, result: ExecutionResult) -> None:
    if not span.is_recording():
        return
    # One set_attributes call: the SDK checks every value and takes a lock per call.
    attributes: dict[str, Any] = {
        "taskexec.agent": result.agent,
        "taskexec.mode": result.mode,
        "taskexec.engine": result.engine,
        "taskexec.status": result.status.value,
        "taskexec.attempts": result.attempts,
    }
    if result.usage.cost_usd is not None:
        attributes["taskexec.cost_usd"] = result.usage.cost_usd
    if result.error is not None:
        attributes["error.type"] = result.error.kind
        span.set_status(otel.trace.Status(otel.trace.StatusCode.ERROR, result.error.kind))
    span.set_attributes(attributes)


def add_event(name: str, attributes: Mapping[str, str | int | float | bool]) -> None:
    """Add an event to the current span (the task's), when spans are being collected."""
    otel = otel_api()
    if otel is None:
        return
    span = otel.trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes=dict(attributes))


def error_type(error: ExecutionError) -> str:
    """Return ``error.type`` of a failed attempt: the HTTP status, else the error's kind."""
    return str(error.status_code) if error.status_code is not None else error.kind


# -- across processes ---------------------------------------------------------------------------


def inject_trace_context(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Write the current trace context (W3C ``traceparent``, ``tracestate``, ``baggage``) into a
    carrier, e.g. a task message's headers, and return it as a dict.

    Without the ``otel`` extra, or outside any span, the carrier comes back unchanged.
    """
    out = dict(carrier or {})
    otel = otel_api()
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
    otel = otel_api()
    if otel is None or not carrier:
        yield
        return
    strings = {str(k): v for k, v in carrier.items() if isinstance(v, str)}
    token = otel.context.attach(otel.propagate.extract(strings))
    try:
        yield
    finally:
        otel.context.detach(token)
