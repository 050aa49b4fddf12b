"""Shared fixtures: a real mock LLM server on 127.0.0.1 and helpers to build agents for it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskexec import Agent, RetryPolicy
from taskexec.providers import Provider
from taskexec.testing import MockServer

ROOT = Path(__file__).resolve().parent.parent
AGENTS_DIR = Path(__file__).resolve().parent / "agents"
#: Retries in tests wait milliseconds, not seconds.
FAST_RETRY = RetryPolicy(base_delay_s=0.001, max_delay_s=0.01, max_retry_after_s=0.05)


#: The mock server fixture is the one taskexec ships for other projects' suites.
pytest_plugins = ["taskexec.pytest_plugin"]


@pytest.fixture
def mock_server(taskexec_mock_server: MockServer) -> MockServer:
    """The shared mock server, drained and reset for this test (``taskexec.pytest_plugin``)."""
    return taskexec_mock_server


@pytest.fixture(autouse=True)
def _no_vendor_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's real keys or endpoints."""
    for var in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "GOOGLE_API_KEY",
        "GEMINI_API_KEY",
        "GEMINI_BASE_URL",
        "TASKEXEC_ENGINE",
        "TASKEXEC_WARN_SYNC",
        "TASKEXEC_BROKER_URL",
        "TASKEXEC_RESULTS_URL",
        "TASKEXEC_NAMESPACE",
    ):
        monkeypatch.delenv(var, raising=False)


def openai_agent(server: MockServer, name: str = "gpt", **fields: object) -> Agent:
    """An OpenAI-compatible agent pointed at the mock server."""
    return Agent(name=name, provider="openai", base_url=server.openai_base_url, **fields)


def script_agent(name: str, script: str, *args: str, **fields: object) -> Agent:
    """A script-mode agent running ``tests/agents/<script>`` with this interpreter."""
    command = [sys.executable, str(AGENTS_DIR / script), *args]
    return Agent(name=name, mode="script", command=command, **fields)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        # The process went between the two checks: reading the stat file of a process that is
        # being reaped raises ESRCH, not ENOENT.
        return False


async def eventually(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` is true, polling; fail the test if it never becomes true.

    This waits for a state, it does not time anything: the bound only keeps a broken test from
    hanging.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.005)


class SyncDriven:
    """Drives a ``taskexec.sync`` object from async test code through asgiref's sync_to_async.

    Its blocking methods become awaitables (run in a worker thread, with the test's loop as the
    application loop, as in a Django view); anything else is read from the async object behind.
    """

    _BLOCKING = frozenset({"execute", "execute_task", "execute_tasks", "run", "close"})

    def __init__(self, sync_object: Any) -> None:
        self._sync = sync_object

    def __getattr__(self, name: str) -> object:
        from asgiref.sync import sync_to_async

        if name in self._BLOCKING:
            return sync_to_async(getattr(self._sync, name), thread_sensitive=False)
        return getattr(self._sync._async, name)

    async def aclose(self) -> None:
        close = self.close
        assert callable(close)
        await close()

    async def __aenter__(self) -> SyncDriven:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ThreadDriven(SyncDriven):
    """Drives a ``taskexec.sync`` object from a plain thread, the way a script or a thread pool
    calls it: no asgiref, so the calls take the bridge's shared loop (``SyncDriven`` takes
    asgiref's path). The caller's contextvars go along, as they would in the calling thread."""

    _callers = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="plain-sync-caller")

    def __getattr__(self, name: str) -> object:
        if name not in self._BLOCKING:
            return getattr(self._sync._async, name)
        method = getattr(self._sync, name)

        async def call(*args: object, **kwargs: object) -> object:
            context = contextvars.copy_context()
            work = functools.partial(context.run, method, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._callers, work)

        return call


@pytest.fixture(params=["async", "sync", "thread"])
def api(request: pytest.FixtureRequest) -> str:
    """Run the test body through the async classes, and through the sync shims twice: from
    inside asgiref's ``sync_to_async`` and from a plain thread.

    A test that cannot run in a plain thread (cancelling the awaiting coroutine cannot stop a
    blocked thread) narrows it with ``@pytest.mark.parametrize("api", ["async", "sync"])``.
    """
    return str(request.param)


def _driven(api: str, sync_object: object) -> SyncDriven:
    return ThreadDriven(sync_object) if api == "thread" else SyncDriven(sync_object)


MakeExecutor = Callable[..., Any]
"""``make(agents, **options)``: an executor of the API under test, used with ``async with``."""
MakeOrchestrator = Callable[..., contextlib.AbstractAsyncContextManager[Any]]
"""``make(agents, executor_options=None, **options)``: an orchestrator of the API under test."""


@pytest.fixture
def make_executor(api: str) -> MakeExecutor:
    """Return ``make(agents, **options)``: a TaskExecutor of the API under test."""
    import taskexec
    import taskexec.sync

    def make(agents: Agent | Iterable[Agent] = (), **options: Any) -> Any:
        roster = [agents] if isinstance(agents, Agent) else list(agents)
        options.setdefault("retry_policy", FAST_RETRY)
        if api == "async":
            return taskexec.TaskExecutor(roster, **options)
        return _driven(api, taskexec.sync.TaskExecutor(roster, **options))

    return make


@pytest.fixture
def make_orchestrator(api: str) -> MakeOrchestrator:
    """Return ``make(agents, executor_options=..., **orchestrator_options)`` for the API under test.

    The orchestrator is built over an executor of the same API and closes it on exit.
    """
    import taskexec
    import taskexec.sync

    @contextlib.asynccontextmanager
    async def make(
        agents: Iterable[Agent] = (),
        executor_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncIterator[Any]:
        executor_options = {"retry_policy": FAST_RETRY, **(executor_options or {})}
        if api == "async":
            async with taskexec.TaskExecutor(agents, **executor_options) as executor:
                yield taskexec.ProjectOrchestrator(executor, **options)
        else:
            sync_executor = taskexec.sync.TaskExecutor(agents, **executor_options)
            shim = taskexec.sync.ProjectOrchestrator(sync_executor, **options)
            try:
                yield _driven(api, shim)
            finally:
                await _driven(api, sync_executor).aclose()

    return make


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    """Block until ``condition()`` is true, polling; fail naming ``what`` if it never is.

    The sync twin of :func:`eventually`: it waits for a state and times nothing; the bound only
    keeps a broken test from hanging.
    """
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def extra_providers(*extra: Provider | type[Provider]) -> Iterator[None]:
    """Register ``extra`` providers for the ``with`` block; the registry is restored after."""
    from taskexec import providers

    saved = dict(providers._registry)
    try:
        for provider in extra:
            providers.register_provider(provider)
        yield
    finally:
        providers._registry.clear()
        providers._registry.update(saved)


@pytest.fixture
def provider_registry() -> Iterator[Callable[..., None]]:
    """``register(provider, name=None)``, with registrations undone after the test."""
    from taskexec import providers

    with extra_providers():
        yield providers.register_provider
