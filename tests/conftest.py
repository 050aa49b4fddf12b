"""Shared fixtures: a real mock LLM server on 127.0.0.1 and helpers to build agents for it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskexec import Agent, RetryPolicy
from taskexec.testing import MockServer, mock_server_in_thread

ROOT = Path(__file__).resolve().parent.parent
AGENTS_DIR = Path(__file__).resolve().parent / "agents"
#: Retries in tests wait milliseconds, not seconds.
FAST_RETRY = RetryPolicy(base_delay_s=0.001, max_delay_s=0.01, max_retry_after_s=0.05)


@pytest.fixture(scope="session")
def _mock_server_session() -> Iterator[MockServer]:
    with mock_server_in_thread() as server:
        yield server


@pytest.fixture
def mock_server(_mock_server_session: MockServer) -> MockServer:
    """The shared mock server, with counters, recordings and faults cleared for this test.

    Requests a previous test abandoned (a cancelled call, a stalled reply) are drained first, so
    they cannot show up in this test's counters.
    """
    server = _mock_server_session
    end = time.monotonic() + 10
    while server.stats.in_flight and time.monotonic() < end:
        time.sleep(0.005)
    _mock_server_session.reset()
    _mock_server_session.latency_s = 0.0
    return _mock_server_session


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
    ):
        monkeypatch.delenv(var, raising=False)


def openai_agent(server: MockServer, name: str = "gpt", **fields: object) -> Agent:
    """An OpenAI-compatible agent pointed at the mock server."""
    return Agent(name=name, provider="openai", base_url=server.openai_base_url, **fields)  # type: ignore[arg-type]


def script_agent(name: str, script: str, *args: str, **fields: object) -> Agent:
    """A script-mode agent running ``tests/agents/<script>`` with this interpreter."""
    command = [sys.executable, str(AGENTS_DIR / script), *args]
    return Agent(name=name, mode="script", command=command, **fields)  # type: ignore[arg-type]


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def eventually(condition: object, timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` is true, polling; fail the test if it never becomes true.

    This waits for a state, it does not time anything: the bound only keeps a broken test from
    hanging.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.005)
