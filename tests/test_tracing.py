"""OpenTelemetry spans and metrics, checked with the SDK's in-memory exporter and reader."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from taskexec import (
    Agent,
    AgentTask,
    ExecutionStatus,
    ProjectOrchestrator,
    TaskExecutor,
    UnknownAgentError,
)
from taskexec._async_engine import execute_task, run_batch
from taskexec._tracing import (
    CAPTURE_CONTENT_ENV,
    inject_trace_context,
    trace_context_from,
    trace_task,
)
from taskexec._tracing_llm import traced_complete
from taskexec.flags import use_engine
from taskexec.providers import get_provider
from taskexec.testing import MockServer

from .conftest import FAST_RETRY, ROOT, openai_agent


class Collected:
    """What the test's SDK providers received."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = list(self.exporter.get_finished_spans())
        return [s for s in found if name is None or s.name == name]

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        assert parent.context is not None
        return [
            s
            for s in self.spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id
        ]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for m in scope.metrics
            if m.name == metric
            for point in m.data.data_points
        ]


def use_providers(
    monkeypatch: pytest.MonkeyPatch, collected: Collected, *, spans: bool = True
) -> None:
    """Make the SDK providers global for this test only: the API's globals are patched, not
    set for good (the API lets a process set them once)."""
    from opentelemetry.metrics import _internal as metrics_globals

    if spans:
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", collected.tracer_provider)
    monkeypatch.setattr(metrics_globals, "_METER_PROVIDER", collected.meter_provider)
    assert metrics.get_meter_provider() is collected.meter_provider


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collected]:
    """SDK providers for this test only."""
    collected = Collected()
    use_providers(monkeypatch, collected)
    assert trace.get_tracer_provider() is collected.tracer_provider
    yield collected
    collected.tracer_provider.shutdown()
    collected.meter_provider.shutdown()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_span_per_task_and_a_client_span_per_attempt(
    otel: Collected, mock_server: MockServer
) -> None:
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini", max_tokens=50, temperature=0.5)
    tasks = [AgentTask(id=f"t{i}", prompt=f"say {i} [[cached=1]]") for i in range(3)]
    async with ProjectOrchestrator(TaskExecutor([agent])) as orchestrator:
        results = await orchestrator.execute_tasks(tasks)
    assert all(r.ok for r in results)
    task_spans = otel.spans("taskexec.task")
    assert sorted(attrs(s)["taskexec.task.id"] for s in task_spans) == ["t0", "t1", "t2"]
    for span in task_spans:
        result = next(r for r in results if r.task_id == attrs(span)["taskexec.task.id"])
        assert attrs(span)["taskexec.status"] == "success"
        assert attrs(span)["taskexec.agent"] == "gpt"
        assert attrs(span)["taskexec.cost_usd"] == result.usage.cost_usd
        (chat,) = otel.children(span)
        assert chat.name == "chat gpt-4o-mini"
        assert chat.kind is SpanKind.CLIENT
        assert chat.context is not None
        assert span.context is not None
        assert chat.context.trace_id == span.context.trace_id
        found = attrs(chat)
        assert found["gen_ai.operation.name"] == "chat"
        assert found["gen_ai.provider.name"] == "openai"
        assert found["gen_ai.request.model"] == "gpt-4o-mini"
        assert found["gen_ai.request.max_tokens"] == 50
        assert found["gen_ai.request.temperature"] == 0.5
        assert found["gen_ai.response.model"] == "gpt-4o-mini"
        assert found["gen_ai.response.id"].startswith("chatcmpl-mock-")
        assert found["gen_ai.response.finish_reasons"] == ("stop",)
        assert found["gen_ai.usage.input_tokens"] == result.usage.input_tokens
        assert found["gen_ai.usage.output_tokens"] == result.usage.output_tokens
        assert found["gen_ai.usage.cache_read.input_tokens"] == 1
        assert found["server.address"] == "127.0.0.1"
        assert found["server.port"] == mock_server.port
        assert "error.type" not in found
        # No content unless the user opts in.
        assert not any(k.startswith(("gen_ai.input", "gen_ai.output")) for k in found)
    assert mock_server.stats.chat_requests == 3


async def test_retries_are_attempt_spans_and_backoff_events(
    otel: Collected, mock_server: MockServer
) -> None:
    mock_server.set_faults(["429", "503"])
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini")
    async with TaskExecutor([agent], retry_policy=FAST_RETRY) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="hello"))
    assert result.ok
    assert result.attempts == 3
    assert mock_server.stats.chat_requests == 3
    (task_span,) = otel.spans("taskexec.task")
    chats = sorted(otel.children(task_span), key=lambda s: s.start_time or 0)
    assert [attrs(s).get("error.type") for s in chats] == ["429", "503", None]
    assert [s.status.status_code for s in chats] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    backoffs = [e for e in task_span.events if e.name == "taskexec.retry.backoff"]
    assert [dict(e.attributes or {})["error.type"] for e in backoffs] == ["429", "503"]
    assert [dict(e.attributes or {})["taskexec.attempt"] for e in backoffs] == [1, 2]
    durations = otel.points("gen_ai.client.operation.duration")
    assert sorted(str(dict(p.attributes).get("error.type")) for p in durations) == [
        "429",
        "503",
        "None",
    ]
    assert all(p.count == 1 for p in durations)


async def test_a_failed_task_marks_its_span(otel: Collected, mock_server: MockServer) -> None:
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini", max_retries=0)
    async with TaskExecutor([agent]) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x [[fault=400]]"))
    assert result.status is ExecutionStatus.FAILED
    (task_span,) = otel.spans("taskexec.task")
    assert task_span.status.status_code is StatusCode.ERROR
    assert attrs(task_span)["error.type"] == "http_status"


async def test_a_task_that_raises_marks_its_span_and_restores_the_context(
    otel: Collected,
) -> None:
    # The spans are started and made current by hand (not start_as_current_span): an error
    # raised through them must still be recorded, and the caller's context come back.
    executor = TaskExecutor([Agent(name="a")])
    before = trace.get_current_span()
    with pytest.raises(UnknownAgentError):
        await execute_task(
            executor.parts.roster, executor.parts.settings, AgentTask(id="t", prompt="x"), "b", None
        )
    assert trace.get_current_span() is before
    (task_span,) = otel.spans("taskexec.task")
    assert task_span.status.status_code is StatusCode.ERROR
    assert [e.name for e in task_span.events] == ["exception"]
    assert task_span.end_time is not None


async def test_unsampled_tasks_record_nothing_but_their_metrics(
    mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    collected = Collected()
    collected.tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    collected.tracer_provider.add_span_processor(SimpleSpanProcessor(collected.exporter))
    use_providers(monkeypatch, collected)
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini")
    tasks = [AgentTask(id=f"t{i}", prompt="x") for i in range(3)]
    async with ProjectOrchestrator(TaskExecutor([agent])) as orchestrator:
        results = await orchestrator.execute_tasks(tasks)
    assert all(r.ok for r in results)
    assert collected.spans() == []
    (point,) = collected.points("gen_ai.client.operation.duration")
    assert point.count == 3
    collected.meter_provider.shutdown()


async def test_each_agent_object_has_its_own_attempt_attributes(
    otel: Collected, mock_server: MockServer
) -> None:
    # What an attempt's span says of its agent is made once per agent object: a new agent
    # under the same name, another model and endpoint, is not served the old one's.
    first = openai_agent(mock_server, "gpt", model="gpt-4o-mini")
    second = Agent(name="gpt", provider="openai", model="gpt-4o", base_url="http://localhost:1")
    for agent in (first, first, second):
        async with TaskExecutor([agent], retry_policy=FAST_RETRY) as executor:
            await executor.execute(AgentTask(id="t", prompt="x", max_retries=0))
    chats = sorted(otel.spans(), key=lambda s: s.start_time or 0)
    chats = [s for s in chats if s.kind is SpanKind.CLIENT]
    assert [s.name for s in chats] == ["chat gpt-4o-mini", "chat gpt-4o-mini", "chat gpt-4o"]
    assert [attrs(s)["server.address"] for s in chats] == ["127.0.0.1", "127.0.0.1", "localhost"]
    assert attrs(chats[2])["server.port"] == 1


async def test_an_attempt_cut_off_by_the_deadline_ends_its_span(
    otel: Collected, mock_server: MockServer
) -> None:
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini")
    async with TaskExecutor([agent]) as executor:
        result = await executor.execute(
            AgentTask(id="t", prompt="slow [[latency=30]]", timeout_s=0.2)
        )
    assert result.status is ExecutionStatus.TIMEOUT
    (chat,) = otel.spans("chat gpt-4o-mini")
    assert attrs(chat)["error.type"] == "CancelledError"
    assert chat.end_time is not None


async def test_content_only_when_opted_in(
    otel: Collected, mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini", system_prompt="be brief")
    async with TaskExecutor([agent]) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="the prompt"))
    (chat,) = otel.spans("chat gpt-4o-mini")
    found = attrs(chat)
    sent = json.loads(found["gen_ai.input.messages"])
    assert sent == [{"role": "user", "parts": [{"type": "text", "content": "the prompt"}]}]
    assert json.loads(found["gen_ai.system_instructions"]) == [
        {"type": "text", "content": "be brief"}
    ]
    (reply,) = json.loads(found["gen_ai.output.messages"])
    assert reply["parts"][0]["content"] == result.output
    assert reply["finish_reason"] == "stop"


async def test_token_usage_metric(otel: Collected, mock_server: MockServer) -> None:
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini")
    async with TaskExecutor([agent]) as executor:
        results = [
            await executor.execute(AgentTask(id=f"t{i}", prompt="one two three " * i))
            for i in range(1, 4)
        ]
    points = {
        dict(p.attributes)["gen_ai.token.type"]: p for p in otel.points("gen_ai.client.token.usage")
    }
    assert points["input"].sum == sum(r.usage.input_tokens for r in results)
    assert points["output"].sum == sum(r.usage.output_tokens for r in results)
    assert points["input"].count == 3
    assert dict(points["input"].attributes)["gen_ai.provider.name"] == "openai"


async def test_vendor_names_and_cache_writes(otel: Collected, mock_server: MockServer) -> None:
    agents = [
        Agent(name="c", provider="anthropic", model="claude-sonnet-4-5", base_url=mock_server.url),
        Agent(name="g", provider="gemini", model="gemini-2.5-flash", base_url=mock_server.url),
    ]
    async with TaskExecutor(agents) as executor:
        for agent in agents:
            task = AgentTask(id=agent.name, prompt="a b c d [[cache_write=2]]")
            assert (await executor.execute(task, agent=agent.name)).ok
    claude = attrs(otel.spans("chat claude-sonnet-4-5")[0])
    gemini = attrs(otel.spans("chat gemini-2.5-flash")[0])
    assert claude["gen_ai.provider.name"] == "anthropic"
    assert claude["gen_ai.usage.cache_creation.input_tokens"] == 2
    assert claude["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert gemini["gen_ai.provider.name"] == "gcp.gemini"
    assert gemini["gen_ai.response.finish_reasons"] == ("STOP",)


async def test_a_rate_limit_wait_is_an_event(otel: Collected, mock_server: MockServer) -> None:
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini", rpm=6000)  # 10 ms apart
    tasks = [AgentTask(id=f"t{i}", prompt="x") for i in range(3)]
    async with ProjectOrchestrator(TaskExecutor([agent])) as orchestrator:
        assert all(r.ok for r in await orchestrator.execute_tasks(tasks))
    waits = [e for s in otel.spans("taskexec.task") for e in s.events if e.name.endswith(".wait")]
    assert waits  # three requests at once, spaced: at least two waited
    assert all(dict(e.attributes or {})["taskexec.wait_s"] > 0 for e in waits)


async def test_the_legacy_engine_traces_the_same_tree(
    otel: Collected, mock_server: MockServer
) -> None:
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini")
    with use_engine("legacy"):
        async with TaskExecutor([agent]) as executor:
            result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.engine == "legacy"
    (task_span,) = otel.spans("taskexec.task")
    assert attrs(task_span)["taskexec.engine"] == "legacy"
    assert [s.name for s in otel.children(task_span)] == ["chat gpt-4o-mini"]


async def test_a_workers_spans_are_children_of_the_dispatching_task_span(
    otel: Collected, mock_server: MockServer
) -> None:
    """The orchestrator's side sends the task with its trace context (as a message's headers);
    the worker's side runs it inside that context: one trace, the worker's spans below."""
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini")
    executor = TaskExecutor([agent])
    orchestrator = ProjectOrchestrator(executor)
    sent: list[dict[str, str]] = []

    async def over_the_wire(task: AgentTask, outputs: Any, progress: Any) -> Any:
        headers = inject_trace_context({"x-task": task.id})
        sent.append(headers)
        body = json.dumps(headers)  # what a broker would carry
        with trace_context_from(json.loads(body)):
            return await execute_task(
                executor.parts.roster, executor.parts.settings, task, None, None, outputs
            )

    batch = orchestrator._batch([AgentTask(id="a", prompt="x"), AgentTask(id="b", prompt="y")])
    async with orchestrator:
        results = await run_batch(batch, over_the_wire)
    assert all(r.ok for r in results)
    assert all("traceparent" in h and h["x-task"] for h in sent)
    task_spans = otel.spans("taskexec.task")
    dispatch = [s for s in task_spans if s.parent is None]
    worker = [s for s in task_spans if s.parent is not None]
    assert len(dispatch) == len(worker) == 2
    for span in worker:
        (parent,) = [d for d in dispatch if d.context.span_id == span.parent.span_id]  # type: ignore[union-attr]
        assert attrs(parent)["taskexec.task.id"] == attrs(span)["taskexec.task.id"]
        assert [c.name for c in otel.children(span)] == ["chat gpt-4o-mini"]


def test_context_helpers_do_nothing_without_a_context() -> None:
    assert inject_trace_context({"k": "v"}) == {"k": "v"}  # no span: nothing to send
    with trace_context_from({}), trace_context_from(None):
        pass


async def test_nothing_is_wrapped_while_no_sdk_is_set() -> None:
    # The API's own providers (no SDK set in this process): no span, no extra frame.
    provider = get_provider("offline")
    assert traced_complete(provider, Agent(name="a")) == provider.complete

    async def run() -> Any:
        return None

    coroutine = run()
    assert trace_task(AgentTask(id="t", prompt="x"), coroutine) is coroutine  # type: ignore[arg-type]
    await coroutine


def test_without_the_extra_nothing_of_opentelemetry_is_imported() -> None:
    program = """
import asyncio, sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
from taskexec import Agent, AgentTask, ProjectOrchestrator, TaskExecutor
from taskexec._tracing import inject_trace_context, trace_context_from

async def main():
    tasks = [AgentTask(id=f"t{i}", prompt="x") for i in range(20)]
    async with ProjectOrchestrator(TaskExecutor([Agent(name="a")])) as orchestrator:
        results = await orchestrator.execute_tasks(tasks)
    assert all(r.ok for r in results)
    assert inject_trace_context({"k": "v"}) == {"k": "v"}
    with trace_context_from({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}):
        pass

asyncio.run(main())
loaded = sorted(m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v)
print(loaded)
"""
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


async def test_metrics_alone_without_spans(
    mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    collected = Collected()
    use_providers(monkeypatch, collected, spans=False)
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini")
    async with TaskExecutor([agent]) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x y"))
    (point,) = collected.points("gen_ai.client.operation.duration")
    assert point.count == 1
    assert collected.spans() == []
    tokens = {
        dict(p.attributes)["gen_ai.token.type"]: p.sum
        for p in collected.points("gen_ai.client.token.usage")
    }
    assert tokens == {"input": result.usage.input_tokens, "output": result.usage.output_tokens}
    collected.meter_provider.shutdown()


async def test_providers_set_to_the_apis_no_ops_wrap_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.metrics import _internal as metrics_globals

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", trace.NoOpTracerProvider())
    monkeypatch.setattr(metrics_globals, "_METER_PROVIDER", NoOpMeterProvider())
    provider = get_provider("offline")
    assert traced_complete(provider, Agent(name="a")) == provider.complete
