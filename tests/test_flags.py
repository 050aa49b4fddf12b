"""The rollback flag and the legacy engine: switching, logging, and identical results."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskexec.sync
from taskexec import (
    Agent,
    AgentTask,
    ConfigurationError,
    ExecutionResult,
    ExecutionStatus,
    ProjectOrchestrator,
    TaskExecutor,
    flags,
    load_plan,
)
from taskexec.testing import MockServer

from .conftest import FAST_RETRY, ROOT, openai_agent, pid_alive, script_agent

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*script execution is deprecated:DeprecationWarning"
)


@pytest.fixture(autouse=True)
def _reset_engine() -> Any:
    flags.set_engine(None)
    yield
    flags.set_engine(None)


def test_engine_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert flags.get_engine() == "async"
    monkeypatch.setenv("TASKEXEC_ENGINE", "LEGACY")
    assert flags.get_engine() == "legacy"
    flags.set_engine("async")
    assert flags.get_engine() == "async"
    with flags.use_engine("legacy"):
        assert flags.get_engine() == "legacy"
    assert flags.get_engine() == "async"
    flags.set_engine(None)
    assert flags.get_engine() == "legacy"
    monkeypatch.setenv("TASKEXEC_ENGINE", "turbo")
    with pytest.raises(ConfigurationError, match="TASKEXEC_ENGINE='turbo' is not an engine"):
        flags.get_engine()
    with pytest.raises(ConfigurationError, match="use one of: async, legacy"):
        flags.set_engine("fast")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("legacy", "legacy"), (" LEGACY ", "legacy"), ("Async", "async"), ("", None), ("  ", None)],
)
def test_one_parser_for_every_engine_setting(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: str | None
) -> None:
    assert flags.parse_engine(raw) == expected
    monkeypatch.setenv("TASKEXEC_ENGINE", raw)
    assert flags.environment_engine() == expected
    assert flags.get_engine() == (expected or "async")
    with flags.use_engine(raw.strip() or "async"):
        assert flags.get_engine() == (expected or "async")
    with pytest.raises(ConfigurationError, match="--engine='turbo' is not an engine"):
        flags.parse_engine("turbo", "--engine")


def test_each_switch_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="taskexec")
    flags.get_engine()
    caplog.clear()
    monkeypatch.setenv("TASKEXEC_ENGINE", "legacy")
    for _ in range(3):
        flags.get_engine()
    monkeypatch.delenv("TASKEXEC_ENGINE")
    flags.get_engine()
    switches = [r.getMessage() for r in caplog.records if "engine switched" in r.getMessage()]
    assert switches == [
        "taskexec engine switched from async to legacy (TASKEXEC_ENGINE)",
        "taskexec engine switched from legacy to async (default)",
    ]


async def test_switching_between_calls(monkeypatch: pytest.MonkeyPatch, make_executor: Any) -> None:
    task = AgentTask(id="t", prompt="hello")
    async with make_executor(Agent(name="a")) as executor:
        first = await executor.execute(task)
        monkeypatch.setenv("TASKEXEC_ENGINE", "legacy")
        second = await executor.execute(task)
        monkeypatch.setenv("TASKEXEC_ENGINE", "async")
        third = await executor.execute(task)
    assert [r.engine for r in (first, second, third)] == ["async", "legacy", "async"]
    assert first.output == second.output == third.output


async def test_seed_case_concurrent_on_async_sequential_on_legacy(
    mock_server: MockServer, make_orchestrator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the async engine no reply comes until all three are in flight; the legacy engine
    # sends them one after another (a barrier would never fill there).
    together = [AgentTask(id=f"t{i}", prompt=f"[[barrier=3:20]] task {i}") for i in range(3)]
    tasks = [AgentTask(id=f"t{i}", prompt=f"task {i}") for i in range(3)]
    async with make_orchestrator([openai_agent(mock_server, max_retries=0)]) as orchestrator:
        fast = await orchestrator.execute_tasks(together)
        assert mock_server.stats.max_in_flight == 3
        mock_server.reset()
        monkeypatch.setenv("TASKEXEC_ENGINE", "legacy")
        slow = await orchestrator.execute_tasks(tasks)
        assert mock_server.stats.max_in_flight == 1
        # The legacy engine opens a new client, hence a new connection, for every task.
        assert mock_server.stats.connections_opened == 3
    assert [r.engine for r in fast] == ["async"] * 3
    assert [r.engine for r in slow] == ["legacy"] * 3
    assert [r.output for r in fast] == [f"mock reply to: {t.prompt}" for t in together]
    assert [r.output for r in slow] == [f"mock reply to: {t.prompt}" for t in tasks]


async def test_legacy_plan_run_and_execute_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKEXEC_ENGINE", "legacy")
    plan = load_plan(ROOT / "examples" / "project.yaml")
    results = await ProjectOrchestrator().run(plan)
    assert [r.engine for r in results] == ["legacy"] * 4
    assert all(r.ok for r in results)
    async with TaskExecutor([Agent(name="extra")]) as executor:
        orchestrator = ProjectOrchestrator(executor)
        assert all(r.ok for r in await orchestrator.run(plan))
        single = await orchestrator.execute_task(AgentTask(id="t", prompt="x"))
    assert (single.engine, single.agent) == ("legacy", "extra")
    sync_results = await asyncio.to_thread(taskexec.sync.ProjectOrchestrator().run, plan)
    assert [r.output for r in sync_results] == [r.output for r in results]


async def test_legacy_fail_fast_and_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKEXEC_ENGINE", "legacy")
    bad = Agent(name="bad", mode="script", command=script_agent("x", "fail.py").command)
    agents = [Agent(name="ok"), bad]
    tasks = [
        AgentTask(id="a", prompt="x", agent="bad"),
        AgentTask(id="b", prompt="y", agent="ok", depends_on=["a"]),
        AgentTask(id="c", prompt="z", agent="ok"),
    ]
    async with TaskExecutor(agents) as executor:
        orchestrator = ProjectOrchestrator(executor)
        skipped = await orchestrator.execute_tasks(tasks)
        stopped = await orchestrator.execute_tasks(tasks, fail_fast=True)
    assert [r.status for r in skipped] == [
        ExecutionStatus.FAILED,
        ExecutionStatus.SKIPPED,
        ExecutionStatus.SUCCESS,
    ]
    assert skipped[1].error is not None
    assert skipped[1].error.message == "dependency 'a' did not succeed (failed)"
    assert [r.status for r in stopped] == [
        ExecutionStatus.FAILED,
        ExecutionStatus.CANCELLED,
        ExecutionStatus.CANCELLED,
    ]


async def test_legacy_timeouts_and_errors(
    mock_server: MockServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKEXEC_ENGINE", "legacy")
    pidfile = tmp_path / "pids"
    agents = [
        openai_agent(mock_server),
        Agent(name="remote", mode="api", url=mock_server.agent_url, max_retries=3),
        script_agent("sleepy", "sleepy.py", str(pidfile)),
        Agent(name="missing", mode="script", command=["/nonexistent/program"]),
        Agent(name="dead", mode="api", url="http://127.0.0.1:9", max_retries=0),
    ]
    async with TaskExecutor(agents, retry_policy=FAST_RETRY, attempt_timeout_s=0.3) as executor:
        llm_timeout = await executor.execute(
            AgentTask(id="t1", prompt="[[latency=5]]", timeout_s=0.3), agent="gpt"
        )
        mock_server.set_faults(["503", "stall"])
        api_retried = await executor.execute(AgentTask(id="t2", prompt="x"), agent="remote")
        api_timeout = await executor.execute(
            AgentTask(id="t3", prompt="[[latency=5]]", timeout_s=0.2), agent="remote"
        )
        script_timeout = await executor.execute(
            AgentTask(id="t4", prompt="x", timeout_s=0.5), agent="sleepy"
        )
        not_started = await executor.execute(AgentTask(id="t5", prompt="x"), agent="missing")
        refused = await executor.execute(AgentTask(id="t6", prompt="x"), agent="dead")
    assert (llm_timeout.status, llm_timeout.engine) == (ExecutionStatus.TIMEOUT, "legacy")
    assert (api_retried.status, api_retried.attempts) == (ExecutionStatus.SUCCESS, 3)
    assert api_timeout.status is ExecutionStatus.TIMEOUT
    assert script_timeout.status is ExecutionStatus.TIMEOUT
    assert not any(pid_alive(int(p)) for p in pidfile.read_text().split())
    assert not_started.error is not None
    assert not_started.error.kind == "configuration"
    assert refused.error is not None
    assert refused.error.kind == "connection"


# -- equivalence: async API, sync shims, legacy from both -------------------------------------


def _agents(server: MockServer) -> list[Agent]:
    return [
        Agent(name="offline"),
        Agent(name="llm", provider="openai", base_url=server.openai_base_url, max_retries=0),
        Agent(name="api", mode="api", url=server.agent_url, max_retries=0),
        script_agent("script", "echo.py"),
        script_agent("broken", "fail.py", "5"),
    ]


@st.composite
def task_lists(draw: st.DrawFn) -> list[AgentTask]:
    n = draw(st.integers(1, 6))
    tasks = []
    for i in range(n):
        agent = draw(st.sampled_from(["offline", "llm", "api", "script", "broken"]))
        fault = draw(
            st.sampled_from(["", "", " [[fault=500]]", " [[fault=400]]", " [[fault=malformed]]"])
        )
        deps = draw(st.lists(st.integers(0, i - 1), max_size=2, unique=True)) if i else []
        tasks.append(
            AgentTask(
                id=f"t{i}",
                prompt=f"task {i}{fault if agent in ('llm', 'api') else ''}",
                agent=agent,
                depends_on=[f"t{d}" for d in deps],
            )
        )
    return tasks


def _essence(results: list[ExecutionResult]) -> list[tuple[object, ...]]:
    return [
        (
            r.task_id,
            r.status,
            r.output,
            r.error.kind if r.error else None,
            r.agent,
            r.mode,
            r.metadata,
        )
        for r in results
    ]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tasks=task_lists())
def test_all_four_paths_give_the_same_results(
    mock_server: MockServer, tasks: list[AgentTask]
) -> None:
    import asyncio

    agents = _agents(mock_server)

    async def via_async() -> list[ExecutionResult]:
        async with TaskExecutor(agents, retry_policy=FAST_RETRY) as executor:
            return await ProjectOrchestrator(executor).execute_tasks(tasks)

    def via_sync() -> list[ExecutionResult]:
        with taskexec.sync.TaskExecutor(agents, retry_policy=FAST_RETRY) as executor:
            return taskexec.sync.ProjectOrchestrator(executor).execute_tasks(tasks)

    runs = {"async": asyncio.run(via_async()), "sync": via_sync()}
    with flags.use_engine("legacy"):
        runs["legacy-async"] = asyncio.run(via_async())
        runs["legacy-sync"] = via_sync()
    expected = _essence(runs["async"])
    for name, results in runs.items():
        assert _essence(results) == expected, name
        assert {r.engine for r in results} == {"legacy" if name.startswith("legacy") else "async"}
