"""A pytest plugin: the mock LLM server as a fixture, for other projects' test suites.

Enable it in a ``conftest.py``::

    pytest_plugins = ["taskexec.pytest_plugin"]

then take the fixture ``taskexec_mock_server``: a running :class:`~taskexec.testing.MockServer`
on a free loopback port, shared by the session, with its counters, recorded requests and fault
schedule cleared before each test. Point agents at ``server.openai_base_url`` (OpenAI-compatible),
``server.url`` (Anthropic, Gemini) or ``server.agent_url`` (api mode).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .testing import MockServer, mock_server_in_thread

__all__ = ("taskexec_mock_server",)


@pytest.fixture(scope="session")
def _taskexec_mock_server_session() -> Iterator[MockServer]:
    with mock_server_in_thread() as server:
        yield server


#: How long a test waits for requests an earlier test abandoned to end before it starts.
DRAIN_TIMEOUT_S = 10.0


@pytest.fixture
def taskexec_mock_server(_taskexec_mock_server_session: MockServer) -> MockServer:
    """The session's mock LLM server, reset for this test (latency 0, no faults, no counts).

    Requests an earlier test abandoned (a cancelled call, a stalled reply) are drained first,
    so they cannot show up in this test's counters.
    """
    server = _taskexec_mock_server_session
    end = time.monotonic() + DRAIN_TIMEOUT_S
    while server.stats.in_flight and time.monotonic() < end:
        time.sleep(0.005)
    server.reset()
    server.latency_s = 0.0
    return server
