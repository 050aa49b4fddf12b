"""Random fault schedules against the real mock server: attempts and outcome follow the rules."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskexec import Agent, AgentTask, ExecutionStatus, TaskExecutor
from taskexec.testing import MockServer

from .conftest import FAST_RETRY

RETRYABLE = ["429", "500", "503", "408", "409", "reset"]
PERMANENT = {
    "400": "http_status",
    "401": "http_status",
    "429q": "http_status",
    "malformed": "bad_response",
}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    schedule=st.lists(st.sampled_from(RETRYABLE + list(PERMANENT)), max_size=6),
    max_retries=st.integers(0, 4),
)
def test_attempts_and_outcome_follow_the_schedule(
    mock_server: MockServer, schedule: list[str], max_retries: int
) -> None:
    mock_server.reset()
    mock_server.set_faults(schedule)
    agent = Agent(
        name="a", provider="openai", base_url=mock_server.openai_base_url, max_retries=max_retries
    )

    async def run() -> object:
        async with TaskExecutor([agent], retry_policy=FAST_RETRY) as executor:
            return await executor.execute(AgentTask(id="t", prompt="x", timeout_s=30))

    result = asyncio.run(run())

    # The model: walk the schedule; a permanent fault ends it, a retryable one costs a try while
    # the budget lasts, and past the schedule the server answers.
    expected_attempts, expected_kind = 0, None
    for fault in [*schedule, None]:
        expected_attempts += 1
        if fault is None:
            break
        if fault in PERMANENT:
            expected_kind = PERMANENT[fault]
            break
        if expected_attempts > max_retries:
            expected_kind = "connection" if fault == "reset" else "http_status"
            break
    assert result.attempts == expected_attempts  # type: ignore[attr-defined]
    assert mock_server.stats.chat_requests == expected_attempts
    if expected_kind is None:
        assert result.status is ExecutionStatus.SUCCESS  # type: ignore[attr-defined]
    else:
        assert result.status is ExecutionStatus.FAILED  # type: ignore[attr-defined]
        assert result.error.kind == expected_kind  # type: ignore[attr-defined]
