"""The public surface is what __init__ exports, as the contract names it."""

from __future__ import annotations

import taskexec
import taskexec.sync

CONTRACT = {
    "Agent",
    "AgentTask",
    "ExecutionResult",
    "ExecutionStatus",
    "ExecutionError",
    "Usage",
    "TaskExecutor",
    "ProjectOrchestrator",
    "Plan",
    "load_plan",
    "MessageBus",
    "TaskexecError",
    "ConfigurationError",
    "PlanError",
}


def test_all_is_the_public_surface() -> None:
    assert isinstance(taskexec.__all__, tuple)
    assert set(taskexec.__all__) >= CONTRACT
    for name in taskexec.__all__:
        assert hasattr(taskexec, name), name
    errors = [
        getattr(taskexec, n)
        for n in taskexec.__all__
        if n.endswith("Error") and n != "ExecutionError"
    ]
    assert all(issubclass(e, taskexec.TaskexecError) for e in errors)


def test_sync_exports_the_shims() -> None:
    assert set(taskexec.sync.__all__) == {"TaskExecutor", "ProjectOrchestrator", "TaskStream"}
    assert taskexec.sync.TaskExecutor is not taskexec.TaskExecutor
    assert taskexec.sync.TaskStream is not taskexec.TaskStream
