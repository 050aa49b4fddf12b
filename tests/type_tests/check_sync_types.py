"""Checked by mypy in CI (`mypy tests/type_tests`), never run: the shims block, not await."""

from typing import assert_type

from taskexec import AgentTask, ExecutionResult
from taskexec import TaskExecutor as AsyncTaskExecutor
from taskexec.sync import ProjectOrchestrator, TaskExecutor


def shims_return_results_not_awaitables(task: AgentTask) -> None:
    executor = TaskExecutor()
    assert_type(executor.execute(task), ExecutionResult)
    orchestrator = ProjectOrchestrator(executor)
    assert_type(orchestrator.execute_task(task), ExecutionResult)
    assert_type(orchestrator.execute_tasks([task]), list[ExecutionResult])
    assert_type(executor.close(), None)


async def async_side_is_awaited(task: AgentTask) -> None:
    assert_type(await AsyncTaskExecutor().execute(task), ExecutionResult)
