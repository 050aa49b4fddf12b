"""TaskExecutor against real sockets (the mock server) and real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest

from taskexec import (
    Agent,
    AgentTask,
    ConfigurationError,
    ExecutionStatus,
    ProviderNotFoundError,
    TaskExecutor,
    UnknownAgentError,
    UnsupportedModeError,
    _bridge,
)
from taskexec._async_engine import execute_task
from taskexec.providers.offline import offline_reply
from taskexec.testing import MockServer

from .conftest import AGENTS_DIR, FAST_RETRY, eventually, openai_agent, pid_alive, script_agent

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*script execution is deprecated:DeprecationWarning"
)


Make = Any  # the make_executor fixture: make(agents, **options) -> async-usable executor


def executor_for(*agents: Agent, **options: object) -> TaskExecutor:
    options.setdefault("retry_policy", FAST_RETRY)
    return TaskExecutor(agents, **options)  # type: ignore[arg-type]


# -- llm mode ---------------------------------------------------------------------------------


async def test_offline_is_deterministic_and_needs_no_network(make_executor: Make) -> None:
    task = AgentTask(id="t1", prompt="Design the API")
    async with make_executor(Agent(name="writer", model="m1")) as executor:
        first = await executor.execute(task)
        second = await executor.execute(task)
    assert first.status is ExecutionStatus.SUCCESS
    assert first.output == second.output == offline_reply("writer", "m1", "Design the API")
    assert (first.agent, first.mode, first.engine, first.attempts) == ("writer", "llm", "async", 1)
    assert first.metadata["execution_mode"] == "llm"
    assert first.usage.input_tokens == 3
    assert executor.parts.settings.pool.clients_created == 0


@pytest.mark.parametrize(
    ("provider", "path"),
    [
        ("openai", "/v1/chat/completions"),
        ("anthropic", "/v1/messages"),
        ("gemini", "/v1beta/models/gemini-test:generateContent"),
    ],
)
async def test_each_vendor_against_the_mock_server(
    mock_server: MockServer, provider: str, path: str, make_executor: Make
) -> None:
    base = mock_server.openai_base_url if provider == "openai" else mock_server.url
    agent = Agent(
        name="a",
        provider=provider,
        model="gemini-test" if provider == "gemini" else "m",
        base_url=base,
        system_prompt="You are terse.",
        max_tokens=50,
        temperature=0.2,
    )
    task = AgentTask(id="t", prompt="Say hi", deliverables=["a greeting"])
    async with make_executor(agent) as executor:
        result = await executor.execute(task)
    assert result.status is ExecutionStatus.SUCCESS, result.error
    assert result.output == "mock reply to: " + task.render_prompt()
    assert result.usage.input_tokens == len(task.render_prompt().split())
    assert result.usage.output_tokens == len(result.output.split())
    assert result.metadata == {"execution_mode": "llm", "provider": provider, "model": agent.model}
    (request,) = mock_server.recorded
    assert request.path == path
    body = json.dumps(request.json())
    assert "You are terse." in body
    # A custom base_url needs no key, and no credential header is sent without one.
    assert not {"authorization", "x-api-key", "x-goog-api-key"} & set(request.headers)


async def test_api_key_is_sent_in_each_vendors_header(
    mock_server: MockServer, make_executor: Make
) -> None:
    agents = [
        Agent(name="o", provider="openai", base_url=mock_server.openai_base_url, api_key="k-o"),  # type: ignore[arg-type]
        Agent(name="a", provider="anthropic", base_url=mock_server.url, api_key="k-a"),  # type: ignore[arg-type]
        Agent(name="g", provider="gemini", base_url=mock_server.url, api_key="k-g"),  # type: ignore[arg-type]
    ]
    async with make_executor(agents) as executor:
        for agent in agents:
            result = await executor.execute(AgentTask(id="t", prompt="x"), agent=agent.name)
            assert result.ok
    headers = [r.headers for r in mock_server.recorded]
    assert headers[0]["authorization"] == "Bearer k-o"
    assert headers[1]["x-api-key"] == "k-a"
    assert headers[1]["anthropic-version"] == "2023-06-01"
    assert headers[2]["x-goog-api-key"] == "k-g"


async def test_sequential_calls_reuse_one_pooled_connection(
    mock_server: MockServer, make_executor: Make
) -> None:
    async with make_executor(openai_agent(mock_server)) as executor:
        for i in range(20):
            assert (await executor.execute(AgentTask(id=f"t{i}", prompt="x"))).ok
        assert executor.parts.settings.pool.clients_created == 1
    assert mock_server.stats.connections_opened == 1
    assert mock_server.stats.chat_requests == 20


async def test_concurrent_calls_are_in_flight_together(
    mock_server: MockServer, make_executor: Make
) -> None:
    # No reply comes back until all three requests are in flight at once.
    tasks = [AgentTask(id=f"t{i}", prompt=f"[[barrier=3:20]] p{i}") for i in range(3)]
    async with make_executor(openai_agent(mock_server, max_retries=0)) as executor:
        results = await asyncio.gather(*(executor.execute(t) for t in tasks))
    assert [r.status for r in results] == [ExecutionStatus.SUCCESS] * 3
    assert mock_server.stats.max_in_flight == 3


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "429ms:1", "500", "503", "408", "409", "reset"])
async def test_retryable_faults_are_retried(
    mock_server: MockServer, fault: str, make_executor: Make
) -> None:
    mock_server.set_faults([fault, fault])
    async with make_executor(openai_agent(mock_server)) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.status is ExecutionStatus.SUCCESS, result.error
    assert result.attempts == 3
    assert mock_server.stats.chat_requests == 3


@pytest.mark.parametrize(
    ("fault", "kind", "status_code"),
    [
        ("400", "http_status", 400),
        ("401", "http_status", 401),
        ("429q", "http_status", 429),
        ("malformed", "bad_response", None),
    ],
)
async def test_permanent_faults_are_not_retried(
    mock_server: MockServer, fault: str, kind: str, status_code: int | None, make_executor: Make
) -> None:
    mock_server.set_faults([fault])
    async with make_executor(openai_agent(mock_server)) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert (result.error.kind, result.error.status_code, result.error.retryable) == (
        kind,
        status_code,
        False,
    )
    assert result.attempts == 1
    assert mock_server.stats.chat_requests == 1


async def test_budget_exhausted_returns_last_error(
    mock_server: MockServer, make_executor: Make
) -> None:
    mock_server.set_faults(["503"] * 10)
    async with make_executor(openai_agent(mock_server, max_retries=2)) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
        # The task's max_retries wins over the agent's.
        mock_server.set_faults(["503"] * 10)
        overridden = await executor.execute(AgentTask(id="t", prompt="x", max_retries=0))
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert (result.error.kind, result.error.status_code, result.error.retryable) == (
        "http_status",
        503,
        True,
    )
    assert result.attempts == 3
    assert overridden.attempts == 1


async def test_stalled_reply_is_retried_after_the_attempt_timeout(
    mock_server: MockServer, make_executor: Make
) -> None:
    mock_server.set_faults(["stall"])
    async with make_executor(openai_agent(mock_server), attempt_timeout_s=0.2) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.status is ExecutionStatus.SUCCESS
    assert result.attempts == 2


async def test_deadline_covers_every_attempt(mock_server: MockServer, make_executor: Make) -> None:
    # The first attempt fails at once and is retried; the second never gets a complete reply.
    # The task's one deadline, not a per-attempt timeout (there is none), ends it.
    mock_server.set_faults(["503", "stall"])
    agent = openai_agent(mock_server, max_retries=50)
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x", timeout_s=0.5))
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error is not None
    assert result.error.kind == "timeout"
    assert "0.5 s deadline" in result.error.message
    assert result.attempts == 2
    assert mock_server.stats.chat_requests == 2


async def test_retry_after_sets_the_wait(
    mock_server: MockServer, monkeypatch: pytest.MonkeyPatch, make_executor: Make
) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr("taskexec._retry.asyncio.sleep", recording_sleep)
    mock_server.set_faults(["429:0.04", "429ms:30", "429:999"])
    async with make_executor(openai_agent(mock_server, max_retries=5)) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.ok
    # Retry-After seconds, retry-after-ms, then a huge Retry-After capped by the policy.
    assert waits == [0.04, 0.03, FAST_RETRY.max_retry_after_s]


async def test_connection_refused_is_a_connection_error(make_executor: Make) -> None:
    agent = Agent(name="a", provider="openai", base_url="http://127.0.0.1:9", max_retries=1)
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert (result.error.kind, result.error.retryable) == ("connection", True)
    assert result.attempts == 2


# -- api mode ---------------------------------------------------------------------------------


async def test_api_mode_posts_the_task(mock_server: MockServer, make_executor: Make) -> None:
    agent = Agent(name="remote", mode="api", url=mock_server.agent_url)
    task = AgentTask(id="t", prompt="Review it", metadata={"ticket": 7})
    async with make_executor(agent) as executor:
        result = await executor.execute(task)
    assert result.status is ExecutionStatus.SUCCESS
    assert result.output == "mock reply to: Review it"
    assert (result.mode, result.metadata["execution_mode"]) == ("api", "api")
    (request,) = mock_server.recorded
    assert request.json() == {
        "task_id": "t",
        "prompt": "Review it",
        "agent": "remote",
        "metadata": {"ticket": 7},
    }


async def test_api_mode_retries_and_rejects_bad_bodies(
    mock_server: MockServer, make_executor: Make
) -> None:
    agent = Agent(name="remote", mode="api", url=mock_server.agent_url, api_key="tok")  # type: ignore[arg-type]
    mock_server.set_faults(["500", "malformed"])
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.error is not None
    assert (result.status, result.error.kind, result.attempts) == (
        ExecutionStatus.FAILED,
        "bad_response",
        2,
    )
    assert mock_server.recorded[0].headers["authorization"] == "Bearer tok"


# -- script mode ------------------------------------------------------------------------------


async def test_script_mode_json_output() -> None:
    agent = script_agent("bot", "echo.py")
    task = AgentTask(id="t", prompt="Do {{d}}", depends_on=["d"])
    async with executor_for(agent) as executor:
        result = await execute_task(
            executor.parts.roster, executor.parts.settings, task, None, None, {"d": "the thing"}
        )
    assert result.status is ExecutionStatus.SUCCESS
    assert result.output == "echo bot: Do the thing"
    assert (result.mode, result.attempts, result.metadata) == (
        "script",
        1,
        {"execution_mode": "script"},
    )


async def test_script_mode_plain_output_is_stripped(make_executor: Make) -> None:
    async with make_executor(script_agent("bot", "plain.py")) as executor:
        result = await executor.execute(AgentTask(id="t9", prompt="x"))
    assert result.output == "plain answer to t9"


async def test_script_exit_reports_code_and_stderr_tail(make_executor: Make) -> None:
    async with make_executor(script_agent("bot", "fail.py", "7")) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.kind == "script_exit"
    assert "exited with 7" in result.error.message
    assert "something went wrong in the agent" in result.error.message


async def test_missing_script_program_is_a_configuration_failure(make_executor: Make) -> None:
    agent = Agent(name="bot", mode="script", command=["/nonexistent/agent-program"])
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.error is not None
    assert (result.status, result.error.kind) == (ExecutionStatus.FAILED, "configuration")
    assert "/nonexistent/agent-program" in result.error.message


async def _wait_for_pids(pidfile: Path) -> list[int]:
    await eventually(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2)
    return [int(p) for p in pidfile.read_text().split()]  # noqa: ASYNC240 (a tiny local file)


@pytest.mark.parametrize("api", ["async", "sync"])  # cancels the awaiting coroutine
async def test_script_timeout_kills_the_process_group(tmp_path: Path, make_executor: Make) -> None:
    pidfile = tmp_path / "pids"
    agent = script_agent("bot", "sleepy.py", str(pidfile))
    async with make_executor(agent) as executor:
        running = asyncio.create_task(executor.execute(AgentTask(id="t", prompt="x", timeout_s=30)))
        pids = await _wait_for_pids(pidfile)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert pids
    assert not any(pid_alive(p) for p in pids)


async def test_script_past_deadline_is_timeout_and_leaves_nothing(
    tmp_path: Path, make_executor: Make
) -> None:
    pidfile = tmp_path / "pids"
    agent = script_agent("bot", "sleepy.py", str(pidfile), timeout_s=1.0)
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.status is ExecutionStatus.TIMEOUT
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    assert not any(pid_alive(p) for p in pids)


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["async", "sync"])  # cancels the awaiting coroutine
async def test_cancelling_an_llm_call_closes_its_request(
    mock_server: MockServer, make_executor: Make
) -> None:
    mock_server.latency_s = 30
    async with make_executor(openai_agent(mock_server)) as executor:
        running = asyncio.create_task(executor.execute(AgentTask(id="t", prompt="x")))
        await eventually(lambda: mock_server.stats.chat_requests == 1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await eventually(lambda: mock_server.stats.client_disconnects == 1)
    assert mock_server.stats.in_flight == 0


# -- the async path never makes an event loop -------------------------------------------------


async def test_execute_never_creates_an_event_loop(
    mock_server: MockServer, monkeypatch: pytest.MonkeyPatch, make_executor: Make
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the async path must not create or run another event loop")

    agents = [
        Agent(name="off"),
        openai_agent(mock_server),
        Agent(name="remote", mode="api", url=mock_server.agent_url),
        script_agent("bot", "echo.py"),
    ]
    # The sync shims' one loop per process is made before (whichever test comes first), and
    # counts as long idle, so that the first call takes its idle path too (a pass to read the
    # sockets first): that must not run the loop another way either.
    _bridge._shared.loop()
    monkeypatch.setattr(_bridge._shared, "_idle_since", 1.0)
    async with make_executor(agents) as executor:
        with monkeypatch.context() as patched:
            patched.setattr(asyncio, "run", forbidden)
            patched.setattr(asyncio, "new_event_loop", forbidden)
            patched.setattr(asyncio.BaseEventLoop, "run_until_complete", forbidden)
            results = await asyncio.gather(
                *(
                    executor.execute(AgentTask(id=f"t{i}", prompt="x"), agent=a.name)
                    for i, a in enumerate(agents)
                )
            )
    assert [r.status for r in results] == [ExecutionStatus.SUCCESS] * 4


# -- resolution and programmer errors ---------------------------------------------------------


async def test_agent_and_mode_precedence(mock_server: MockServer) -> None:
    agents = [
        Agent(name="a"),
        Agent(name="b", url=mock_server.agent_url),
    ]
    executor = executor_for(*agents, default_agent="a")
    task = AgentTask(id="t", prompt="x", agent="b")
    assert executor.resolve(AgentTask(id="t", prompt="x")) == (agents[0], "llm")
    assert executor.resolve(task) == (agents[1], "llm")
    assert executor.resolve(task.model_copy(update={"mode": "api"}))[1] == "api"
    assert executor.resolve(task, agent="a") == (agents[0], "llm")
    assert executor.resolve(task, mode="api") == (agents[1], "api")
    inline = Agent(name="inline")
    assert executor.resolve(task, agent=inline) == (inline, "llm")
    assert (
        TaskExecutor([Agent(name="only")]).resolve(AgentTask(id="t", prompt="x"))[0].name == "only"
    )
    await executor.aclose()


def test_programmer_errors_raise_with_the_fix() -> None:
    executor = TaskExecutor([Agent(name="a"), Agent(name="b")])
    task = AgentTask(id="t", prompt="x")
    with pytest.raises(ConfigurationError, match="default_agent='name'"):
        executor.resolve(task)
    with pytest.raises(UnknownAgentError, match=r"unknown agent 'zed'.*registered agents: a, b"):
        executor.resolve(task, agent="zed")
    with pytest.raises(UnsupportedModeError, match="api mode needs a url"):
        executor.resolve(task, agent="a", mode="api")
    with pytest.raises(UnsupportedModeError, match="script mode needs a command"):
        executor.resolve(task, agent="a", mode="script")
    with pytest.raises(
        ProviderNotFoundError, match="known providers: anthropic, gemini, offline, openai"
    ):
        executor.resolve(task, agent=Agent(name="c", provider="nope"))
    with pytest.raises(ConfigurationError, match="two agents are named 'a'"):
        TaskExecutor([Agent(name="a"), Agent(name="a")])
    with pytest.raises(UnknownAgentError, match="default_agent 'x'"):
        TaskExecutor([Agent(name="a")], default_agent="x")
    assert executor.parts.roster.resolve_names(task, agent="zed") == ("zed", "")
    assert executor.parts.roster.resolve_names(task, agent="a", mode="script") == ("a", "script")
    assert "agents=[a, b]" in repr(executor)


async def test_execute_raises_programmer_errors() -> None:
    async with TaskExecutor() as executor:
        with pytest.raises(ConfigurationError, match="names no agent"):
            await executor.execute(AgentTask(id="t", prompt="x"))


# -- providers that cannot run: fallback and configuration errors -----------------------------


async def test_missing_key_without_script_is_a_configuration_failure(make_executor: Make) -> None:
    async with make_executor(Agent(name="gpt", provider="openai")) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.kind == "configuration"
    assert "OPENAI_API_KEY" in result.error.message
    assert result.output is None


async def test_missing_key_falls_back_to_the_script(make_executor: Make) -> None:
    agent = Agent(name="claude", provider="anthropic", command=script_agent("x", "echo.py").command)
    async with make_executor(agent) as executor:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            first = await executor.execute(AgentTask(id="t", prompt="x"))
            second = await executor.execute(AgentTask(id="u", prompt="y"))
    (warning,) = warned
    assert warning.category is DeprecationWarning
    assert "'claude'" in str(warning.message)
    assert "docs/MIGRATION.md" in str(warning.message)
    assert first.status is ExecutionStatus.SUCCESS
    assert first.output == "echo claude: x"
    assert first.metadata == {
        "execution_mode": "script_fallback",
        "fallback_reason": "missing_api_key",
    }
    assert second.ok


async def test_key_set_uses_the_provider_not_the_script(
    mock_server: MockServer, monkeypatch: pytest.MonkeyPatch, make_executor: Make
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_BASE_URL", mock_server.openai_base_url)
    agent = Agent(name="gpt", provider="openai", command=["false"])
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.ok
    assert result.metadata["execution_mode"] == "llm"
    assert mock_server.recorded[0].headers["authorization"] == "Bearer sk-env"


async def test_script_mode_warns_once_per_agent(make_executor: Make) -> None:
    agents = [script_agent("one", "echo.py"), script_agent("two", "echo.py")]
    async with make_executor(agents) as executor:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            for name in ("one", "two", "one", "two"):
                assert (await executor.execute(AgentTask(id="t", prompt="x"), agent=name)).ok
    messages = [str(w.message) for w in warned if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == 2
    assert all("script execution is deprecated" in m for m in messages)


# -- secrets ----------------------------------------------------------------------------------


async def test_secret_never_leaks(
    mock_server: MockServer, caplog: pytest.LogCaptureFixture, make_executor: Make
) -> None:
    secret = "sk-DISTINCTIVE-4f9a2c77e1"
    agent = openai_agent(mock_server, api_key=secret, max_retries=1)
    caplog.set_level(logging.DEBUG)
    mock_server.set_faults(["503", "401"])  # the 401 body echoes the key back
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
        text = repr(executor) + repr(agent) + result.model_dump_json() + repr(result)
    assert result.error is not None
    assert result.error.status_code == 401
    assert "Incorrect API key provided: ***" in result.error.message
    assert secret not in text
    assert secret not in caplog.text
    assert mock_server.recorded[-1].headers["authorization"] == f"Bearer {secret}"


async def test_gemini_retries_429_and_503_but_not_400(
    mock_server: MockServer, make_executor: Make
) -> None:
    agent = Agent(name="g", provider="gemini", base_url=mock_server.url, api_key="g-key")  # type: ignore[arg-type]
    async with make_executor(agent) as executor:
        mock_server.set_faults(["429", "503"])
        retried = await executor.execute(AgentTask(id="t", prompt="x"))
        mock_server.set_faults(["400"])
        rejected = await executor.execute(AgentTask(id="u", prompt="y"))
    assert (retried.status, retried.attempts, retried.output) == (
        ExecutionStatus.SUCCESS,
        3,
        "mock reply to: x",
    )
    assert rejected.error is not None
    assert (rejected.status, rejected.attempts, rejected.error.status_code) == (
        ExecutionStatus.FAILED,
        1,
        400,
    )


# -- what a finished script leaves behind -----------------------------------------------------


@pytest.mark.parametrize("engine", ["async", "legacy"])
@pytest.mark.parametrize("how", ["holds-stdout", "detached"])
async def test_a_finished_script_leaves_no_grandchild_and_is_not_a_timeout(
    tmp_path: Path, make_executor: Make, engine: str, how: str
) -> None:
    from taskexec import flags

    pidfile = tmp_path / "grandchild"
    # The deadline is far above what the script needs: it is only reached if the result waits
    # for the grandchild's pipes instead of the script's exit.
    agent = script_agent("f", "forker.py", str(pidfile), how, timeout_s=20)
    async with make_executor(agent) as executor:
        with flags.use_engine(engine):
            result = await executor.execute(AgentTask(id="t", prompt="x"))
    grandchild = int(pidfile.read_text())
    try:
        assert (result.status, result.output) == (ExecutionStatus.SUCCESS, f"done ({how})")
        assert not pid_alive(grandchild)  # ended with the script's group, before the result
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


@pytest.mark.parametrize("engine", ["async", "legacy"])
async def test_a_grandchild_that_left_the_group_cannot_hold_the_result(
    tmp_path: Path, make_executor: Make, engine: str
) -> None:
    from taskexec import flags

    pidfile = tmp_path / "grandchild"
    agent = script_agent("f", "forker.py", str(pidfile), "setsid", timeout_s=20)
    try:
        async with make_executor(agent) as executor:
            with flags.use_engine(engine):
                result = await executor.execute(AgentTask(id="t", prompt="x"))
        # It escaped the group (setsid), so it lives on, but the result did not wait for it.
        assert (result.status, result.output) == (ExecutionStatus.SUCCESS, "done (setsid)")
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_the_script_deprecation_warning_is_shown_by_default_at_the_callers_line(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    program = tmp_path / "legacy_caller.py"
    echo = AGENTS_DIR / "echo.py"
    program.write_text(
        f"""
import asyncio
import sys

from asgiref.sync import async_to_sync, sync_to_async

import taskexec
import taskexec.sync

agents = [
    taskexec.Agent(name=name, mode="script", command=[sys.executable, {str(echo)!r}])
    for name in ("a1", "a2", "a3")
]
task = taskexec.AgentTask(id="t", prompt="x")


async def main():
    async with taskexec.TaskExecutor(agents) as executor:
        await executor.execute(task, agent="a1")  # ASYNC


asyncio.run(main())
with taskexec.sync.TaskExecutor(agents) as executor:
    executor.execute(task, agent="a2")  # SYNC

    def view():
        return executor.execute(task, agent="a3")  # ASGIREF

    async def handler():
        return await sync_to_async(view)()

    async_to_sync(handler)()
"""
    )
    lines_of = {
        marker: number
        for number, text in enumerate(program.read_text().splitlines(), 1)
        for marker in ("ASYNC", "SYNC", "ASGIREF")
        if text.endswith(f"# {marker}")
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    completed = subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, timeout=60, env=env
    )
    assert completed.returncode == 0, completed.stderr
    for marker, agent in (("ASYNC", "a1"), ("SYNC", "a2"), ("ASGIREF", "a3")):
        assert (
            f"{program}:{lines_of[marker]}: DeprecationWarning: agent '{agent}': script "
            "execution is deprecated"
        ) in completed.stderr, completed.stderr
