"""ProjectOrchestrator: dependencies, concurrency bound, failures, cancellation, the bus."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskexec import (
    Agent,
    AgentTask,
    ExecutionStatus,
    InvalidValueError,
    MessageBus,
    PlanError,
    ProjectOrchestrator,
    TaskExecutor,
    Usage,
    load_plan,
)
from taskexec import providers as providers_module
from taskexec.bus import Envelope, TaskEvent, current_bus
from taskexec.testing import MockServer

from .conftest import ROOT, eventually, extra_providers, openai_agent, pid_alive, script_agent
from .scripted import ScriptedProvider

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*script execution is deprecated:DeprecationWarning"
)


@pytest.fixture
def scripted(provider_registry: Callable[..., None]) -> ScriptedProvider:
    provider = ScriptedProvider()
    provider_registry(provider)
    return provider


def task(task_id: str, outcome: str = "success", *deps: str, **fields: object) -> AgentTask:
    return AgentTask(id=task_id, prompt=f"{task_id}:{outcome}", depends_on=list(deps), **fields)  # type: ignore[arg-type]


SCRIPTED = Agent(name="s", provider="scripted")


# -- the property: random DAGs, outcomes and limits ------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[AgentTask], int]:
    n = draw(st.integers(1, 40))
    tasks = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        outcome = draw(st.sampled_from(["success"] * 6 + ["fail", "hang"]))
        timeout = 0.05 if outcome == "hang" else None
        tasks.append(task(f"t{i}", outcome, *(f"t{d}" for d in deps), timeout_s=timeout))
    order = draw(st.permutations(tasks))
    return list(order), draw(st.integers(1, 8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags())
def test_random_dags_get_exactly_one_correct_result_each(case: tuple[list[AgentTask], int]) -> None:
    tasks, limit = case
    provider = ScriptedProvider()
    with extra_providers(provider):  # hypothesis runs many examples: no function fixture
        results, events = asyncio.run(_run_with_events(tasks, limit))

    # Exactly one result per task, in input order.
    assert [r.task_id for r in results] == [t.id for t in tasks]
    # Expected statuses: a task runs only if every dependency succeeded.
    by_id = {t.id: t for t in tasks}
    expected: dict[str, ExecutionStatus] = {}

    def status_of(task_id: str) -> ExecutionStatus:
        if task_id not in expected:
            t = by_id[task_id]
            if any(status_of(d) is not ExecutionStatus.SUCCESS for d in t.depends_on):
                expected[task_id] = ExecutionStatus.SKIPPED
            else:
                outcome = t.prompt.split(":")[1]
                expected[task_id] = {
                    "success": ExecutionStatus.SUCCESS,
                    "fail": ExecutionStatus.FAILED,
                    "hang": ExecutionStatus.TIMEOUT,
                }[outcome]
        return expected[task_id]

    assert {r.task_id: r.status for r in results} == {t.id: status_of(t.id) for t in tasks}
    for result in results:
        if result.status is ExecutionStatus.SKIPPED:
            assert result.error is not None
            assert result.error.kind == "dependency_failed"
            assert result.attempts == 0
    # No task started before all its dependencies finished successfully.
    finished_ok: set[str] = set()
    for topic, event in events:
        if topic == "task.started":
            assert set(by_id[event.task_id].depends_on) <= finished_ok, event.task_id
        elif topic == "task.finished" and event.result is not None and event.result.ok:
            finished_ok.add(event.task_id)
    # Never more running at once than the limit.
    assert provider.peak <= limit
    assert provider.active == 0


async def _run_with_events(
    tasks: list[AgentTask], limit: int
) -> tuple[list, list[tuple[str, TaskEvent]]]:
    bus = MessageBus(maxsize=10_000)
    events: list[tuple[str, TaskEvent]] = []
    subscription = bus.subscribe("task.*")
    async with (
        TaskExecutor([SCRIPTED]) as executor,
        ProjectOrchestrator(executor, max_concurrency=limit, bus=bus) as orch,
    ):
        results = await orch.execute_tasks(tasks)
    subscription.close()
    async for envelope in subscription:
        assert isinstance(envelope.message, TaskEvent)
        events.append((envelope.topic, envelope.message))
    assert [t for t, _ in events].count("task.finished") == len(tasks)
    return results, events


# -- specific behaviours ------------------------------------------------------------------------


async def test_dependency_outputs_fill_placeholders(make_orchestrator: Any) -> None:
    agent = Agent(name="w")
    tasks = [
        AgentTask(id="a", prompt="first"),
        AgentTask(id="b", prompt="use [{{a}}]", depends_on=["a"]),
    ]
    async with make_orchestrator([agent]) as orchestrator:
        first, second = await orchestrator.execute_tasks(tasks)
    assert first.output is not None
    assert second.output is not None
    assert f"use [{first.output}]" in second.output


async def test_skipped_names_the_dependency(
    scripted: ScriptedProvider, make_orchestrator: Any
) -> None:
    tasks = [task("a", "fail"), task("b", "success", "a"), task("c", "success", "b")]
    async with make_orchestrator([SCRIPTED]) as orchestrator:
        a, b, c = await orchestrator.execute_tasks(tasks)
    assert a.status is ExecutionStatus.FAILED
    assert (b.status, c.status) == (ExecutionStatus.SKIPPED, ExecutionStatus.SKIPPED)
    assert b.error is not None
    assert c.error is not None
    assert b.error.message == "dependency 'a' did not succeed (failed)"
    assert c.error.message == "dependency 'b' did not succeed (skipped)"
    assert (b.agent, b.mode, b.engine) == ("s", "llm", "async")
    assert [e for e in scripted.events if e[0] == "start"] == [("start", "a")]


async def test_fail_fast_cancels_the_rest(
    scripted: ScriptedProvider, make_orchestrator: Any
) -> None:
    tasks = [
        task("hang1", "hang"),
        task("boom", "fail"),
        task("later", "success", "hang1"),
        task("hang2", "hang"),
    ]
    async with make_orchestrator([SCRIPTED], max_concurrency=3) as orchestrator:
        results = await orchestrator.execute_tasks(tasks, fail_fast=True)
    statuses = [r.status for r in results]
    assert statuses == [
        ExecutionStatus.CANCELLED,
        ExecutionStatus.FAILED,
        ExecutionStatus.CANCELLED,
        ExecutionStatus.CANCELLED,
    ]
    assert results[0].error is not None
    assert results[0].error.kind == "cancelled"
    assert "'boom'" in results[0].error.message
    assert scripted.active == 0
    # hang1 and hang2 were running when boom failed: they report the attempt they made and the
    # time they ran; later never started, so it reports none.
    assert [r.attempts for r in results] == [1, 1, 0, 1]
    assert results[0].duration_s > 0
    assert results[3].duration_s > 0
    assert results[2].duration_s == 0
    assert results[0].metadata == {"execution_mode": "llm"}


async def test_fail_fast_kills_running_scripts(
    tmp_path: Path, scripted: ScriptedProvider, make_orchestrator: Any
) -> None:
    pidfile = tmp_path / "pids"
    agents = [SCRIPTED, script_agent("sleepy", "sleepy.py", str(pidfile))]
    tasks = [
        AgentTask(id="sleeper", prompt="x", agent="sleepy"),
        task("boom", f"failwhen={pidfile}"),  # fails once the sleeper and its child are up
    ]
    async with make_orchestrator(agents, executor_options={"default_agent": "s"}) as orchestrator:
        sleeper, boom = await orchestrator.execute_tasks(tasks, fail_fast=True)
    assert (sleeper.status, boom.status) == (ExecutionStatus.CANCELLED, ExecutionStatus.FAILED)
    assert (sleeper.attempts, sleeper.mode, sleeper.agent) == (1, "script", "sleepy")
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    assert not any(pid_alive(p) for p in pids)


@pytest.mark.parametrize("api", ["async", "sync"])  # cancels the awaiting coroutine
async def test_caller_cancellation_cleans_up_before_propagating(
    mock_server: MockServer, tmp_path: Path, make_orchestrator: Any
) -> None:
    mock_server.latency_s = 30
    pidfile = tmp_path / "pids"
    agents = [openai_agent(mock_server), script_agent("sleepy", "sleepy.py", str(pidfile))]
    tasks = [
        AgentTask(id="llm1", prompt="x", agent="gpt"),
        AgentTask(id="llm2", prompt="y", agent="gpt"),
        AgentTask(id="script", prompt="z", agent="sleepy"),
        AgentTask(id="after", prompt="w", agent="gpt", depends_on=["llm1"]),
    ]
    async with make_orchestrator(agents) as orchestrator:
        running = asyncio.create_task(orchestrator.execute_tasks(tasks))
        await eventually(
            lambda: (
                mock_server.stats.in_flight == 2
                and pidfile.exists()
                and len(pidfile.read_text().split()) == 2
            )
        )
        pids = [int(p) for p in pidfile.read_text().split()]
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # By the time the cancellation reached us, the children were already gone.
        assert not any(pid_alive(p) for p in pids)
        await eventually(lambda: mock_server.stats.client_disconnects == 2)
    assert mock_server.stats.chat_requests == 2


async def test_seed_case_three_requests_in_flight_at_once(
    mock_server: MockServer, make_orchestrator: Any
) -> None:
    tasks = [AgentTask(id=f"t{i}", prompt=f"[[barrier=3:20]] task {i}") for i in range(3)]
    async with make_orchestrator([openai_agent(mock_server, max_retries=0)]) as orchestrator:
        results = await orchestrator.execute_tasks(tasks)
    assert [r.status for r in results] == [ExecutionStatus.SUCCESS] * 3
    assert mock_server.stats.max_in_flight == 3


async def test_concurrency_limit_is_what_the_server_sees(
    mock_server: MockServer, make_orchestrator: Any
) -> None:
    # Replies are held until four requests are in flight: the twelve tasks pass only as three
    # waves of exactly four, and a fifth in flight would show in max_in_flight.
    tasks = [AgentTask(id=f"t{i}", prompt=f"[[barrier=4:20]] task {i}") for i in range(12)]
    agent = openai_agent(mock_server, max_retries=0)
    async with make_orchestrator([agent], max_concurrency=4) as orch:
        results = await orch.execute_tasks(tasks)
    assert all(r.ok for r in results)
    assert mock_server.stats.max_in_flight == 4
    assert mock_server.stats.chat_requests == 12


async def test_plan_errors_are_listed_before_anything_runs(
    scripted: ScriptedProvider, make_orchestrator: Any
) -> None:
    tasks = [
        task("a"),
        task("a"),
        task("b", "success", "ghost"),
        task("c", "success", "d"),
        task("d", "success", "c"),
        AgentTask(id="e", prompt="x", agent="nobody"),
    ]
    async with make_orchestrator([SCRIPTED]) as orchestrator:
        with pytest.raises(PlanError) as info:
            await orchestrator.execute_tasks(tasks)
    problems = info.value.problems
    assert len(problems) == 4
    assert "duplicate task id 'a'" in problems[0]
    assert "tasks[2] (id 'b').depends_on: unknown task 'ghost'" in problems[1]
    assert "dependency cycle c -> d -> c" in problems[2]
    assert "tasks[5] (id 'e')" in problems[3]
    assert "unknown agent 'nobody'" in problems[3]
    assert scripted.events == []


async def test_stream_yields_results_as_they_finish(scripted: ScriptedProvider) -> None:
    tasks = [task("slow", "success", "fast"), task("fast")]
    async with TaskExecutor([SCRIPTED]) as executor, ProjectOrchestrator(executor) as orchestrator:
        seen = [r.task_id async for r in orchestrator.stream(tasks)]
    assert seen == ["fast", "slow"]


async def test_leaving_a_stream_early_cancels_the_rest(scripted: ScriptedProvider) -> None:
    tasks = [task("quick"), task("stuck", "hang")]
    async with TaskExecutor([SCRIPTED]) as executor, ProjectOrchestrator(executor) as orchestrator:
        stream = orchestrator.stream(tasks)
        async for result in stream:
            assert result.task_id == "quick"
            break
        await stream.aclose()  # type: ignore[attr-defined]
    assert scripted.active == 0


async def test_execute_task_delegates(make_orchestrator: Any) -> None:
    async with make_orchestrator([Agent(name="w")]) as orchestrator:
        result = await orchestrator.execute_task(AgentTask(id="t", prompt="p"))
    assert (result.status, result.agent) == (ExecutionStatus.SUCCESS, "w")
    with pytest.raises(InvalidValueError, match="at least 1"):
        ProjectOrchestrator(max_concurrency=0)


async def test_an_agent_can_use_the_bus_end_to_end(
    monkeypatch: pytest.MonkeyPatch, provider_registry: Callable[..., None]
) -> None:
    """A provider asks a reviewer agent on the bus; the reviewer answers by request/reply."""
    from pydantic import BaseModel

    from taskexec.providers import ChatReply, Provider

    class Question(BaseModel):
        text: str

    class Answer(BaseModel):
        text: str

    class AskingProvider(Provider):
        name = "asking"

        async def complete(self, agent, prompt, pool, timeout_s):  # type: ignore[no-untyped-def]
            bus = current_bus()
            assert bus is not None
            answer = await bus.request("review", Question(text=prompt), timeout_s=5)
            assert isinstance(answer, Answer)
            return ChatReply(answer.text, providers_module.Usage())  # type: ignore[attr-defined]

    provider_registry(AskingProvider())
    monkeypatch.setattr(providers_module, "Usage", __import__("taskexec").Usage, raising=False)
    bus = MessageBus()

    async def reviewer(envelope: Envelope) -> None:
        assert isinstance(envelope.message, Question)
        await bus.reply(envelope, Answer(text=f"approved: {envelope.message.text}"))

    bus.on("review", reviewer)
    async with (
        TaskExecutor([Agent(name="dev", provider="asking")]) as executor,
        ProjectOrchestrator(executor, bus=bus) as orch,
    ):
        (result,) = await orch.execute_tasks([AgentTask(id="t", prompt="my patch")])
    await bus.aclose()
    assert result.output == "approved: my patch"
    assert current_bus() is None


# -- plans ------------------------------------------------------------------------------------


async def test_example_plan_runs_offline() -> None:
    plan = load_plan(ROOT / "examples" / "project.yaml")
    bus = MessageBus()
    finished = bus.subscribe("task.finished")
    results = await ProjectOrchestrator(bus=bus).run(plan)
    assert [r.task_id for r in results] == [
        "design",
        "implement-api",
        "implement-storage",
        "review",
    ]
    assert all(r.ok for r in results)
    order = [e.message.task_id for e in [await finished.get() for _ in range(4)]]  # type: ignore[attr-defined]
    assert order[0] == "design"
    assert order[-1] == "review"


async def test_run_with_an_executor_joins_agents_and_rejects_clashes() -> None:
    plan = load_plan(ROOT / "examples" / "project.yaml")
    executor = TaskExecutor([Agent(name="extra")])
    async with ProjectOrchestrator(executor) as orchestrator:
        results = await orchestrator.run(plan)
        assert all(r.ok for r in results)
        assert set(executor.agents) == {"extra"}  # the plan's agents joined for the run only
    clash = TaskExecutor([Agent(name="reviewer")])
    with pytest.raises(PlanError, match="'reviewer' is both a plan agent and an executor agent"):
        await ProjectOrchestrator(clash).run(plan)


async def test_a_bug_in_a_provider_still_gives_exactly_one_result(
    provider_registry: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    from taskexec.providers import ChatReply, Provider

    class BrokenProvider(Provider):
        name = "broken"

        async def complete(self, agent, prompt, pool, timeout_s):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0)  # fail after a suspension, not at once
            raise RuntimeError("provider bug")

    class InstantBug(Provider):
        name = "instant-bug"

        async def complete(self, agent, prompt, pool, timeout_s) -> ChatReply:  # type: ignore[no-untyped-def]
            raise ValueError("bug before any await")

    provider_registry(BrokenProvider())
    provider_registry(InstantBug())
    agents = [
        Agent(name="b", provider="broken"),
        Agent(name="i", provider="instant-bug"),
        Agent(name="ok"),
    ]
    async with TaskExecutor(agents) as executor:
        with pytest.raises(RuntimeError, match="provider bug"):
            await executor.execute(AgentTask(id="t", prompt="x"), agent="b")
        with pytest.raises(ValueError, match="bug before any await"):
            await executor.execute(AgentTask(id="t", prompt="x"), agent="i")
        results = await ProjectOrchestrator(executor).execute_tasks(
            [
                AgentTask(id="a", prompt="x", agent="b"),
                AgentTask(id="c", prompt="x", agent="i"),
                AgentTask(id="d", prompt="x", agent="ok", depends_on=["a"]),
            ]
        )
    assert [r.status for r in results] == [
        ExecutionStatus.FAILED,
        ExecutionStatus.FAILED,
        ExecutionStatus.SKIPPED,
    ]
    assert results[0].error is not None
    assert (results[0].error.kind, results[0].error.message) == (
        "internal",
        "RuntimeError: provider bug",
    )
    assert "unexpected error" in caplog.text


async def test_the_pool_follows_the_concurrency_the_orchestrator_allows(
    mock_server: MockServer, make_orchestrator: Any
) -> None:
    # 300 requests must be in flight at once for any reply to come back: above the default
    # of 256 connections, so this passes only if the pool grew to the orchestrator's bound.
    n = 300
    tasks = [AgentTask(id=f"t{i}", prompt=f"[[barrier={n}:20]] {i}") for i in range(n)]
    agent = openai_agent(mock_server, max_retries=0)
    async with make_orchestrator([agent], max_concurrency=n) as orchestrator:
        results = await orchestrator.execute_tasks(tasks)
    assert [r.status for r in results] == [ExecutionStatus.SUCCESS] * n
    assert mock_server.stats.max_in_flight == n


async def test_an_explicit_connection_limit_is_kept(
    mock_server: MockServer, make_orchestrator: Any
) -> None:
    tasks = [AgentTask(id=f"t{i}", prompt=f"[[latency=0.01]] {i}") for i in range(40)]
    agent = openai_agent(mock_server, max_retries=0)
    options = {"max_connections": 4}
    async with make_orchestrator(
        [agent], executor_options=options, max_concurrency=40
    ) as orchestrator:
        results = await orchestrator.execute_tasks(tasks)
    assert all(r.ok for r in results)
    assert mock_server.stats.max_in_flight <= 4
    assert mock_server.stats.connections_opened <= 4


async def test_tasks_waiting_for_a_slot_hold_no_coroutine(
    provider_registry: Callable[..., None],
) -> None:
    from taskexec.providers import ChatReply, Provider

    seen: list[int] = []

    class Counting(Provider):
        name = "counting"

        async def complete(self, agent, prompt, pool, timeout_s):  # type: ignore[no-untyped-def]
            seen.append(len(asyncio.all_tasks()))
            await asyncio.sleep(0)
            return ChatReply(prompt, Usage())

    provider_registry(Counting)
    async with TaskExecutor([Agent(name="c", provider="counting")]) as executor:
        tasks = [AgentTask(id=f"t{i}", prompt="x") for i in range(200)]
        results = await ProjectOrchestrator(executor, max_concurrency=3).execute_tasks(tasks)
    assert all(r.ok for r in results)
    assert len(seen) == 200
    # The test's own task plus at most three running: the other 197 are not asyncio tasks yet.
    assert max(seen) <= 1 + 3


@pytest.mark.parametrize("engine", ["async", "legacy"])
async def test_a_stream_of_an_invalid_batch_raises_before_any_result(engine: str) -> None:
    from taskexec import flags

    tasks = [AgentTask(id="a", prompt="x", depends_on=["missing"])]
    async with TaskExecutor([Agent(name="o")]) as executor:
        with flags.use_engine(engine):
            stream = ProjectOrchestrator(executor).stream(tasks)
            with pytest.raises(PlanError, match="unknown task 'missing'"):
                await anext(stream)  # no result comes from an invalid batch
