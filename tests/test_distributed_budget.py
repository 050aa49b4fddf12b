"""A run's cost ceiling over workers on the real RabbitMQ and Redis, with a worker killed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

import taskexec
from taskexec import AgentTask, ProjectOrchestrator, TaskExecutor
from taskexec._engines.registry import select_engine
from taskexec._pricing import to_decimal, worst_case_cost
from taskexec.distributed import Cluster
from taskexec.testing import MockServer, mock_server_in_thread

from .cluster import (
    WorkerProcess,
    cluster_env,
    drop_cluster,
    new_cluster,
    require_services,
    workers,
)
from .conftest import eventually

PRICE = {"input_per_mtok": 1000, "output_per_mtok": 2000}


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    require_services()
    made = new_cluster()
    for name, value in cluster_env(made).items():
        if name.startswith("TASKEXEC_"):
            monkeypatch.setenv(name, value)
    yield made
    await drop_cluster(made, ("writer",))


@pytest.fixture
def slow_server() -> Iterator[MockServer]:
    with mock_server_in_thread(latency_s=60.0) as server:
        yield server


def agents_file(path: Path, server: MockServer) -> Path:
    agent = {
        "name": "writer",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "base_url": server.openai_base_url,
        "max_tokens": 64,
        "max_retries": 0,
        "price": PRICE,
    }
    path.write_text(yaml.safe_dump({"agents": [agent]}))
    return path


async def test_reservations_survive_a_killed_worker(
    cluster: Cluster, tmp_path: Path, slow_server: MockServer, mock_server: MockServer
) -> None:
    """Ten tasks are in flight on a worker that is SIGKILLed, two more wait for room under the
    ceiling; another worker runs them all. Each task's one reservation is settled by its one
    result: nothing leaks, and the spend stays under the ceiling."""
    slow_file = agents_file(tmp_path / "slow.yaml", slow_server)
    fast_file = agents_file(tmp_path / "fast.yaml", mock_server)
    # Prompts of one length: each task's worst case is the same.
    tasks = [AgentTask(id=f"b{i}", prompt=f"p{i:02d}") for i in range(12)]
    agents = taskexec.load_agents(fast_file)
    worst = worst_case_cost(agents[0], tasks[0].prompt)
    assert worst is not None
    ceiling = worst * 21 / 2  # ten worst cases and a half: two tasks wait for room
    orchestrator = ProjectOrchestrator(
        TaskExecutor(agents), max_concurrency=12, max_cost_usd=float(ceiling)
    )
    batch = orchestrator._batch(tasks)
    budget = batch.settings.budget
    assert budget is not None
    engine = select_engine(orchestrator.executor.parts.engines)
    assert engine.name == "workers"
    with workers([WorkerProcess(slow_file, cluster, "slow", concurrency=12, grace_s=0.1)]) as (
        slow,
    ):
        await slow.registered()
        run = asyncio.create_task(engine.execute_tasks(batch))
        await eventually(lambda: slow_server.stats.chat_requests == 10, timeout_s=30)
        assert budget.ledger.reserved == worst * 10  # the two others wait: they do not fit yet
        slow.kill()
        with workers([WorkerProcess(fast_file, cluster, "fast", concurrency=12)]):
            results = await asyncio.wait_for(run, 60)
    await orchestrator.aclose()
    assert [r.task_id for r in results] == [t.id for t in tasks]  # one result per task
    assert all(r.ok and r.metadata["worker"] == "fast" for r in results)
    assert mock_server.stats.chat_requests == 12
    spent = sum((to_decimal(r.usage.cost_usd or 0.0) for r in results), Decimal(0))
    assert budget.ledger.reserved == 0
    assert budget.ledger.spent == spent
    assert spent <= ceiling
