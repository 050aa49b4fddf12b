"""Checked by mypy in CI (`mypy tests/type_tests`), never run: the shims block, not await."""

from typing import assert_type

from taskexec import AgentTask, ExecutionResult
from taskexec import TaskExecutor as AsyncTaskExecutor
from taskexec import TaskStream as AsyncTaskStream
from taskexec.sync import ProjectOrchestrator, TaskExecutor, TaskStream


def shims_return_results_not_awaitables(task: AgentTask) -> None:
    executor = TaskExecutor()
    assert_type(executor.execute(task), ExecutionResult)
    orchestrator = ProjectOrchestrator(executor)
    assert_type(orchestrator.execute_task(task), ExecutionResult)
    assert_type(orchestrator.execute_tasks([task]), list[ExecutionResult])
    assert_type(executor.close(), None)


async def async_side_is_awaited(task: AgentTask) -> None:
    assert_type(await AsyncTaskExecutor().execute(task), ExecutionResult)


def sync_streams_iterate_str_not_awaitables(task: AgentTask) -> None:
    with TaskExecutor().stream(task) as stream:
        assert_type(stream, TaskStream)
        for delta in stream:
            assert_type(delta, str)
    assert_type(stream.result, ExecutionResult)
    assert_type(stream.close(), None)


async def async_streams_are_async_iterators(task: AgentTask) -> None:
    async with AsyncTaskExecutor().stream(task) as stream:
        assert_type(stream, AsyncTaskStream)
        async for delta in stream:
            assert_type(delta, str)
    assert_type(stream.result, ExecutionResult)
