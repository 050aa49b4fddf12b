"""Distributed runs on the real RabbitMQ and Redis: workers as real processes, real SIGKILL,
connections cut under a running plan, poison and foreign messages, and keys that never travel."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml

import taskexec._engines.registry
import taskexec.sync
from taskexec import AgentTask, ExecutionStatus, MessageBus, ProjectOrchestrator, TaskExecutor
from taskexec._engines.base import Batch
from taskexec.cli import main
from taskexec.distributed import Cluster, Worker, WorkersEngine
from taskexec.distributed._dispatch import Dispatcher
from taskexec.distributed._wire import TASK_HEADER, TASK_VERSION, TaskMessage, message_digest
from taskexec.testing import MockServer, mock_server_in_thread

from .cluster import (
    CuttableProxy,
    WorkerProcess,
    cluster_env,
    drop_cluster,
    new_cluster,
    queue_depth,
    require_services,
    store_of,
    workers,
)
from .conftest import eventually, openai_agent, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # script-mode agents

AGENTS = ("writer", "reviewer", "killer", "other", "failing")


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """A cluster in a namespace of its own on the machine's RabbitMQ and Redis."""
    require_services()
    made = new_cluster()
    yield made
    await drop_cluster(made, AGENTS)


@pytest.fixture
def use_cluster(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """The cluster, also named by the environment, so that every entry point uses it."""
    for name, value in cluster_env(cluster).items():
        if name.startswith("TASKEXEC_"):
            monkeypatch.setenv(name, value)
    return cluster


@pytest.fixture
def slow_server() -> Iterator[MockServer]:
    """A mock LLM server that takes a minute to answer: tasks sent to it stay in flight."""
    with mock_server_in_thread(latency_s=60.0) as server:
        yield server


def write_agents(
    path: Path, agents: list[dict[str, Any]], tasks: list[dict[str, Any]] | None = None
) -> Path:
    data: dict[str, Any] = {"agents": agents}
    if tasks is not None:
        data["tasks"] = tasks
    path.write_text(yaml.safe_dump(data))
    return path


def plan_tasks(count: int) -> list[dict[str, Any]]:
    """Tasks over two agents, each third one depending on the one before it (placeholder too)."""
    tasks: list[dict[str, Any]] = []
    for i in range(count):
        task: dict[str, Any] = {
            "id": f"t{i}",
            "prompt": f"step {i}",
            "agent": "writer" if i % 2 else "reviewer",
        }
        if i % 3 == 2:
            task["depends_on"] = [f"t{i - 1}"]
            task["prompt"] = f"step {i} after {{{{t{i - 1}}}}}"
        tasks.append(task)
    return tasks


OFFLINE = [{"name": "writer"}, {"name": "reviewer", "model": "m2"}]


async def test_a_plan_on_two_workers_gets_the_in_process_results(
    use_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan_file = write_agents(tmp_path / "plan.yaml", OFFLINE, plan_tasks(30))
    plan = taskexec.load_plan(plan_file)
    with workers(
        [WorkerProcess(plan_file, use_cluster, f"w{i}", concurrency=4) for i in (1, 2)]
    ) as ws:
        for w in ws:
            await w.registered()
        distributed = await ProjectOrchestrator().run(plan)
        async with store_of(use_cluster) as store:
            names = {w.name for w in await store.workers()}
    monkeypatch.delenv("TASKEXEC_BROKER_URL")
    monkeypatch.delenv("TASKEXEC_RESULTS_URL")
    in_process = await ProjectOrchestrator().run(plan)

    def same(r: taskexec.ExecutionResult) -> tuple[object, ...]:
        return (r.task_id, r.status, r.output, r.agent, r.mode, r.engine, r.error)

    assert [same(r) for r in distributed] == [same(r) for r in in_process]
    assert all(r.status is ExecutionStatus.SUCCESS for r in distributed)
    assert {r.metadata["worker"] for r in distributed} <= names == {"w1", "w2"}
    assert "worker" not in in_process[0].metadata


async def test_the_sync_shim_runs_on_workers(use_cluster: Cluster, tmp_path: Path) -> None:
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    tasks = [AgentTask(id=f"s{i}", prompt=f"p{i}", agent="writer") for i in range(5)]
    with workers([WorkerProcess(agents_file, use_cluster, "ws")]) as (worker,):
        await worker.registered()

        def blocking() -> list[taskexec.ExecutionResult]:
            executor = taskexec.sync.TaskExecutor(taskexec.load_agents(agents_file))
            with taskexec.sync.ProjectOrchestrator(executor) as orchestrator:
                return orchestrator.execute_tasks(tasks)

        results = await asyncio.to_thread(blocking)
    assert [r.task_id for r in results] == [t.id for t in tasks]
    assert all(r.ok and r.metadata["worker"] == "ws" for r in results)


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM", "SIGHUP", "SIGTERM twice"])
async def test_a_stopped_worker_loses_no_task(
    use_cluster: Cluster,
    tmp_path: Path,
    slow_server: MockServer,
    mock_server: MockServer,
    stop: str,
) -> None:
    """Tasks in flight on a worker that is killed (or told to stop) run on another worker."""

    def agents(server: MockServer) -> list[dict[str, Any]]:
        return [
            {
                "name": "writer",
                "provider": "openai",
                "base_url": server.openai_base_url,
                "api_key": "sk-test",
                "max_retries": 0,
            }
        ]

    slow_file = write_agents(tmp_path / "slow.yaml", agents(slow_server))
    fast_file = write_agents(tmp_path / "fast.yaml", agents(mock_server))
    tasks = [AgentTask(id=f"k{i}", prompt=f"p{i}") for i in range(10)]
    # Told twice, a worker hands its tasks back at once, however long its grace.
    grace_s = 600.0 if stop == "SIGTERM twice" else 0.1
    with workers(
        [WorkerProcess(slow_file, use_cluster, "slow", concurrency=10, grace_s=grace_s)]
    ) as (slow,):
        await slow.registered()
        orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(fast_file)))
        run = asyncio.create_task(orchestrator.execute_tasks(tasks))
        await eventually(lambda: slow_server.stats.chat_requests == 10, timeout_s=30)
        if stop == "SIGKILL":
            slow.kill()
        elif stop == "SIGTERM twice":
            slow.process.send_signal(signal.SIGTERM)
            await eventually(lambda: "stopping" in slow.log.read_text(), timeout_s=30)
            assert slow.terminate() == 0  # the second SIGTERM; its wait is bounded at 30 s
            assert "handing back 10 task(s) now" in slow.log.read_text()
        else:
            # Hands its tasks back and exits cleanly (SIGHUP: its terminal closed).
            assert slow.terminate(getattr(signal, stop)) == 0
        with workers([WorkerProcess(fast_file, use_cluster, "fast", concurrency=10)]):
            results = await asyncio.wait_for(run, 60)
    assert [r.task_id for r in results] == [t.id for t in tasks]
    assert all(r.ok and r.metadata["worker"] == "fast" for r in results)
    assert mock_server.stats.chat_requests == 10
    async with store_of(use_cluster) as store:
        stored = await store.get_many(results[0].metadata["run_id"], [t.id for t in tasks])
    assert {t: r.output for t, r in stored.items()} == {r.task_id: r.output for r in results}


async def test_a_task_that_kills_every_worker_is_dead_lettered(
    use_cluster: Cluster, tmp_path: Path
) -> None:
    killer = {
        "name": "killer",
        "mode": "script",
        "command": [
            sys.executable,
            "-c",
            "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
        ],
    }
    agents_file = write_agents(tmp_path / "agents.yaml", [killer])
    orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(agents_file)))
    run = asyncio.create_task(orchestrator.execute_tasks([AgentTask(id="boom", prompt="x")]))
    started: list[WorkerProcess] = []
    with workers(started):
        # Every worker that takes the task dies; the next one records it as dead-lettered.
        for attempt in range(use_cluster.delivery_limit + 1):
            worker = WorkerProcess(agents_file, use_cluster, f"k{attempt}")
            started.append(worker)
            exit_code = await asyncio.to_thread(_wait_or_done, worker, run)
            if run.done():
                break
            assert exit_code == -9
        (result,) = await asyncio.wait_for(run, 30)
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.kind == "dead_lettered"
    assert f"{use_cluster.delivery_limit} times" in result.error.message
    assert len(started) == use_cluster.delivery_limit + 1
    assert await queue_depth(use_cluster, use_cluster.dead_letter_queue) == 1
    async with store_of(use_cluster) as store:
        counted = await store.counters(result.metadata["run_id"])
    assert counted == {"executions": use_cluster.delivery_limit, "duplicates": 0}


def _wait_or_done(worker: WorkerProcess, run: asyncio.Task[Any]) -> int | None:
    """Wait until the worker exits, or the run finished (polled: the run is on another thread)."""
    while not run.done():
        try:
            return worker.process.wait(0.1)
        except Exception:
            continue
    return worker.process.poll()


async def test_messages_that_are_not_tasks_go_to_the_dead_letter_queue_unrun(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    good = TaskMessage(run_id="r1", agent="writer", mode="llm", task=AgentTask(id="a", prompt="p"))
    foreign = TaskMessage(
        run_id="r1", agent="other", mode="llm", task=AgentTask(id="b", prompt="p")
    )
    header = {TASK_HEADER: TASK_VERSION}
    bad = [
        aio_pika.Message(b"rm -rf /"),  # no header, no content type
        aio_pika.Message(b"{not json", headers=header, content_type="application/json"),
        aio_pika.Message(
            good.encode(), headers={TASK_HEADER: "task/99"}, content_type="application/json"
        ),
        # A well-formed task for an agent this worker does not define, on its queue.
        aio_pika.Message(foreign.encode(), headers=header, content_type="application/json"),
    ]
    with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
        await worker.registered()
        connection = await aio_pika.connect(cluster.broker_url)
        try:
            channel = await connection.channel()
            for message in bad:
                await channel.default_exchange.publish(message, routing_key=cluster.queue("writer"))
        finally:
            await connection.close()
        for _ in range(200):
            if await queue_depth(cluster, cluster.dead_letter_queue) == len(bad):
                break
            await asyncio.sleep(0.05)
        assert await queue_depth(cluster, cluster.dead_letter_queue) == len(bad)
        async with store_of(cluster) as store:
            assert await store.counters("r1") == {"executions": 0, "duplicates": 0}
            # The two that name a run and a task tell their run why they did not run (another
            # version's message; an agent this worker does not define), with a digest of the
            # message, so that the orchestrator that sent it does not wait for ever; the two
            # that name none have no run to tell. None of it is a result.
            rejected = await store.rejections("r1", ["a", "b"])
            assert await store.get_many("r1", ["a", "b"]) == {}
        assert worker.process.poll() is None  # still serving
    assert rejected["a"][0] == message_digest(good.encode(), "task/99")
    assert "task/99" in rejected["a"][1]
    assert rejected["b"][0] == message_digest(foreign.encode(), TASK_VERSION)
    assert "agent 'other' is not defined by this worker" in rejected["b"][1]


async def test_a_wrong_version_message_naming_a_live_task_changes_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A message of another version that names a task running elsewhere (a forgery, a stale
    copy) is dead-lettered, and the task's real execution gives its result: it is not failed
    `configuration` while its request is paid for and dropped."""
    with mock_server_in_thread(latency_s=1.0) as server:
        agents_file = write_agents(tmp_path / "agents.yaml", _openai_agent(server))
        with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
            await worker.registered()
            async with Dispatcher(cluster) as dispatcher:
                await dispatcher.attach("live")
                task = AgentTask(id="t", prompt="the real one")
                running = asyncio.create_task(dispatcher.run("live", task, "writer", "llm"))
                await eventually(lambda: server.stats.chat_requests == 1, timeout_s=30)
                forged = TaskMessage(run_id="live", agent="writer", mode="llm", task=task)
                connection = await aio_pika.connect(cluster.broker_url)
                try:
                    channel = await connection.channel()
                    await channel.default_exchange.publish(
                        aio_pika.Message(
                            forged.encode(),
                            headers={TASK_HEADER: "task/99"},
                            content_type="application/json",
                        ),
                        routing_key=cluster.queue("writer"),
                    )
                finally:
                    await connection.close()
                async with store_of(cluster) as store:
                    for _ in range(200):  # the worker refused it, and said so
                        if await store.rejections("live", ["t"]):
                            break
                        await asyncio.sleep(0.02)
                    recorded = await store.rejections("live", ["t"])
                dead = await queue_depth(cluster, cluster.dead_letter_queue)
                still_running = not running.done()
                result = await asyncio.wait_for(running, 30)
    assert "task/99" in recorded["t"][1]
    assert (dead, still_running) == (1, True)
    assert result.status is ExecutionStatus.SUCCESS, result.error
    assert server.stats.chat_requests == 1


async def test_a_run_whose_messages_a_worker_cannot_read_fails_instead_of_waiting(
    use_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An orchestrator of a newer version (here: one that sends another protocol version)
    gets a failed result per task from today's workers, not a run that never ends."""
    import taskexec.distributed._dispatch as dispatch_module

    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    monkeypatch.setattr(dispatch_module, "TASK_VERSION", "task/2")
    with workers([WorkerProcess(agents_file, use_cluster, "old")]) as (worker,):
        await worker.registered()
        orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(agents_file)))
        tasks = [AgentTask(id=f"n{i}", prompt="p", agent="writer") for i in range(3)]
        results = await asyncio.wait_for(orchestrator.execute_tasks(tasks), 60)
    assert [(r.task_id, r.status) for r in results] == [
        (t.id, ExecutionStatus.FAILED) for t in tasks
    ]
    for r in results:
        assert r.error is not None
        assert r.error.kind == "configuration"
        assert "task/2" in r.error.message
        assert "same version of taskexec" in r.error.message
    assert await queue_depth(use_cluster, use_cluster.dead_letter_queue) == 3


async def test_a_task_delivered_again_after_its_result_was_stored_is_not_run_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The moment between storing a result and acknowledging its message: a worker that dies
    there leaves the message to be delivered again. The next delivery is acknowledged unrun,
    and whoever waits on the task gets the stored result (through the duplicate event)."""
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    task = AgentTask(id="once", prompt="p")
    with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
        await worker.registered()
        async with Dispatcher(cluster) as first:
            await first.attach("again")
            stored = await asyncio.wait_for(first.run("again", task, "writer", "llm"), 30)
        # The same message once more, as RabbitMQ would redeliver it; a second dispatcher of
        # the run (an orchestrator started again) waits on it.
        async with Dispatcher(cluster) as second:
            await second.attach("again")
            again = await asyncio.wait_for(second.run("again", task, "writer", "llm"), 30)
        async with store_of(cluster) as store:
            counted = await store.counters("again")
    assert stored.ok
    assert again == stored  # the stored result itself: same output, same times
    assert counted == {"executions": 1, "duplicates": 0}
    assert await queue_depth(cluster, cluster.queue("writer")) == 0


async def test_a_cancelled_runs_queued_tasks_are_dropped_unrun(
    cluster: Cluster, tmp_path: Path
) -> None:
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    message = TaskMessage(
        run_id="gone", agent="writer", mode="llm", task=AgentTask(id="a", prompt="p")
    )
    async with store_of(cluster) as store:
        await store.set_cancelled("gone", True)
        connection = await aio_pika.connect(cluster.broker_url)
        try:
            channel = await connection.channel()
            queue = await _declare(channel, cluster, "writer")
            await channel.default_exchange.publish(
                aio_pika.Message(
                    message.encode(),
                    headers={TASK_HEADER: TASK_VERSION},
                    content_type="application/json",
                ),
                routing_key=queue.name,
            )
            with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
                await worker.registered()
                for _ in range(200):
                    if await queue_depth(cluster, queue.name) == 0:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await connection.close()
        assert await queue_depth(cluster, cluster.queue("writer")) == 0
        assert await queue_depth(cluster, cluster.dead_letter_queue) == 0
        assert await store.counters("gone") == {"executions": 0, "duplicates": 0}
        assert await store.get_many("gone", ["a"]) == {}


async def _declare(channel: Any, cluster: Cluster, agent: str) -> Any:
    from taskexec.distributed._amqp import declare_agent_queue

    return await declare_agent_queue(channel, cluster, agent)


async def test_no_key_travels_through_the_broker(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, env_secret = "sk-plan-" + "Q" * 24, "sk-env-" + "Z" * 24
    monkeypatch.setenv("OPENAI_API_KEY", env_secret)
    agent = taskexec.Agent(name="writer", provider="openai", api_key=secret, system_prompt="s")
    async with store_of(cluster) as store:
        # A live worker for the agent, as far as the registry knows (none takes the task).
        from taskexec.distributed._store import worker_info

        await store.register(worker_info("fake", "h", 1, ["writer"], 1, 0, 0, 0.0))
        async with Dispatcher(cluster) as dispatcher:
            await dispatcher.attach("keys")
            sent = asyncio.create_task(
                dispatcher.run("keys", AgentTask(id="a", prompt="hello"), agent.name, "llm")
            )
            connection = await aio_pika.connect(cluster.broker_url)
            try:
                channel = await connection.channel()
                queue = await _declare(channel, cluster, "writer")
                message = None
                for _ in range(200):
                    message = await queue.get(no_ack=True, fail=False)
                    if message is not None:
                        break
                    await asyncio.sleep(0.02)
            finally:
                await connection.close()
            sent.cancel()
    assert message is not None
    raw = message.body + json.dumps(message.headers, default=str).encode()
    for value in (secret, env_secret, "sk-plan", "sk-env", "system_prompt"):
        assert value.encode() not in raw
    decoded = TaskMessage.model_validate_json(message.body)
    assert (decoded.agent, decoded.task.prompt) == ("writer", "hello")


async def test_a_task_without_a_live_worker_fails_after_the_wait(cluster: Cluster) -> None:
    quick = Cluster(
        cluster.broker_url,
        cluster.results_url,
        namespace=cluster.namespace,
        no_worker_wait_s=0.3,
        poll_s=0.05,
    )
    executor = TaskExecutor([taskexec.Agent(name="writer")])
    batch = Batch(
        executor.parts.roster,
        executor.parts.settings,
        [AgentTask(id="a", prompt="p"), AgentTask(id="b", prompt="{{a}}", depends_on=["a"])],
        False,
        8,
        MessageBus(),
    )
    engine = WorkersEngine(quick)
    try:
        first, second = await engine.execute_tasks(batch)
    finally:
        await engine.aclose()
    assert first.status is ExecutionStatus.FAILED
    assert first.error is not None
    assert first.error.kind == "no_worker"
    assert "taskexec worker" in first.error.message
    assert "'writer'" in first.error.message
    assert second.status is ExecutionStatus.SKIPPED


@pytest.mark.parametrize("service", ["RabbitMQ", "Redis"])
async def test_cut_connections_lose_nothing(
    use_cluster: Cluster,
    tmp_path: Path,
    mock_server: MockServer,
    monkeypatch: pytest.MonkeyPatch,
    service: str,
) -> None:
    """Every connection to RabbitMQ, or to Redis, drops mid-run (the workers' and the
    orchestrator's, as in a restart of the server): the clients reconnect, tasks whose result
    could not be stored run again, and the plan still gets one successful result per task."""
    agents = [
        {
            "name": "writer",
            "provider": "openai",
            "base_url": mock_server.openai_base_url,
            "api_key": "sk-test",
        }
    ]
    agents_file = write_agents(tmp_path / "agents.yaml", agents)
    tasks = [AgentTask(id=f"c{i}", prompt=f"[[latency=0.3]] p{i}") for i in range(40)]
    async with CuttableProxy("127.0.0.1", 5672 if service == "RabbitMQ" else 6379) as proxy:
        if service == "RabbitMQ":
            via_proxy = Cluster(
                proxy.url(use_cluster.broker_url),
                use_cluster.results_url,
                namespace=use_cluster.namespace,
            )
            monkeypatch.setenv("TASKEXEC_BROKER_URL", via_proxy.broker_url)
        else:
            via_proxy = Cluster(
                use_cluster.broker_url,
                proxy.url(use_cluster.results_url),
                namespace=use_cluster.namespace,
            )
            monkeypatch.setenv("TASKEXEC_RESULTS_URL", via_proxy.results_url)
        with workers([WorkerProcess(agents_file, via_proxy, "w", concurrency=8)]) as (worker,):
            await worker.registered()
            orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(agents_file)))
            run = asyncio.create_task(orchestrator.execute_tasks(tasks))
            await eventually(lambda: mock_server.stats.chat_requests >= 8, timeout_s=30)
            assert proxy.connections >= 2  # the worker's and the orchestrator's go through it
            proxy.cut()
            assert proxy.connections == 0
            await eventually(lambda: proxy.connections >= 2, timeout_s=30)  # both reconnected
            results = await asyncio.wait_for(run, 90)
    assert [r.task_id for r in results] == [t.id for t in tasks]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert {r.metadata["worker"] for r in results} == {"w"}
    async with store_of(use_cluster) as store:
        stored = await store.get_many(results[0].metadata["run_id"], [t.id for t in tasks])
    assert {t: r.output for t, r in stored.items()} == {r.task_id: r.output for r in results}


async def test_a_redis_that_stops_answering_fails_the_command_instead_of_holding_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis that neither answers nor closes (a partition that drops packets): a command fails
    after the store's timeout (here 0.5 s) instead of holding its task for ever."""
    import redis.exceptions

    from taskexec.distributed import _store as store_module

    monkeypatch.setattr(store_module, "REDIS_COMMAND_TIMEOUT_S", 0.5)
    async with CuttableProxy("127.0.0.1", 6379) as proxy:
        via_proxy = Cluster(
            cluster.broker_url, proxy.url(cluster.results_url), namespace=cluster.namespace
        )
        client = await store_module.connect_redis(via_proxy)
        try:
            store = store_module.ResultStore(client, via_proxy)
            assert await store.claim("frozen", "before") is None  # answered
            proxy.freeze()
            # The outer bound only keeps a broken test from hanging.
            with pytest.raises(redis.exceptions.TimeoutError):
                await asyncio.wait_for(store.claim("frozen", "during"), 30)
        finally:
            proxy.thaw()
            await client.aclose()


def test_a_rerun_with_the_same_run_id_keeps_stored_results(
    use_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_file = write_agents(tmp_path / "plan.yaml", OFFLINE, plan_tasks(6))
    out = tmp_path / "out.jsonl"
    with workers([WorkerProcess(plan_file, use_cluster, "w")]) as (worker,):
        asyncio.run(worker.registered())
        argv = ["run", str(plan_file), "--run-id", "again", "--output", str(out)]
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "run id again" in err
        assert "0 result(s) reused from an earlier run of this id, 6 task execution(s)" in err
        assert main(argv) == 0
        err = capsys.readouterr().err
    # The re-run says what it did itself: nothing ran again.
    assert "6 result(s) reused from an earlier run of this id, 0 task execution(s)" in err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 12
    first, second = lines[:6], lines[6:]
    assert sorted((r["task_id"], r["output"]) for r in first) == sorted(
        (r["task_id"], r["output"]) for r in second
    )


def test_a_registry_entry_of_another_version_is_skipped(
    use_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker of another version (a rolling upgrade) may register what this one cannot read:
    listing skips it instead of failing every run and ``taskexec workers``."""
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)

    async def register_foreign() -> None:
        async with store_of(use_cluster) as store:
            for name, entry in (("next", '{"name": "next", "agents": "writer"}'), ("junk", "{")):
                await store._register(keys=store._registry(), args=[name, entry, 5_000])

    asyncio.run(register_foreign())
    with workers([WorkerProcess(agents_file, use_cluster, "current")]) as (worker,):
        asyncio.run(worker.registered())
        assert main(["workers", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [w["name"] for w in listed["workers"]] == ["current"]
        plan_file = write_agents(tmp_path / "plan.yaml", OFFLINE, plan_tasks(3))
        assert main(["run", str(plan_file)]) == 0


async def test_a_second_worker_of_the_same_name_is_warned(cluster: Cluster, tmp_path: Path) -> None:
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    warning = "a live worker is already registered under this name"
    first = WorkerProcess(agents_file, cluster, "twin", log_dir=tmp_path / "a")
    with workers([first]):
        await first.registered()
        second = WorkerProcess(agents_file, cluster, "twin", log_dir=tmp_path / "b")
        with workers([second]):
            await eventually(lambda: warning in second.log.read_text(), timeout_s=30)
    assert warning not in first.log.read_text()


def test_the_workers_command_lists_live_workers(
    use_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    with workers([WorkerProcess(agents_file, use_cluster, "lister", concurrency=7)]) as (worker,):
        asyncio.run(worker.registered())
        assert main(["workers", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert main(["workers"]) == 0
        table = capsys.readouterr().out
    (listed,) = data["workers"]
    assert (listed["name"], listed["agents"], listed["concurrency"]) == (
        "lister",
        ["reviewer", "writer"],
        7,
    )
    assert listed["pid"] == worker.pid
    assert data["queued"] == {"reviewer": 0, "writer": 0}
    assert "lister" in table
    assert "reviewer, writer" in table


@pytest.mark.parametrize(
    ("option", "url", "shown"),
    [
        ("--broker", "amqp://guest:hunter2hunter2@127.0.0.1:{port}/", "amqp://guest:***@127.0.0.1"),
        ("--results", "redis://:hunter2hunter2@127.0.0.1:{port}/0", "redis://:***@127.0.0.1"),
        ("--broker", "amqp://guest:hunter2hunter2@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1"),
        ("--broker", "amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "refused the virtual host"),
        ("--results", "redis://127.0.0.1:6379/99", "DB index is out of range"),
    ],
    ids=["broker-down", "redis-down", "broker-wrong-password", "broker-no-vhost", "redis-no-db"],
)
@pytest.mark.parametrize("command", ["run", "worker", "workers"])
def test_an_unreachable_service_exits_2_naming_the_url_without_its_password(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    unused_tcp_port: int,
    option: str,
    url: str,
    shown: str,
    command: str,
) -> None:
    require_services()
    plan_file = write_agents(tmp_path / "plan.yaml", OFFLINE, plan_tasks(2))
    urls = {
        "--broker": "amqp://guest:guest@127.0.0.1:5672/",
        "--results": "redis://127.0.0.1:6379/0",
    }
    urls[option] = url.format(port=unused_tcp_port)
    argv = [command, *([str(plan_file)] if command != "workers" else [])]
    for name, value in urls.items():
        argv += [name, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert shown in err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--concurrency", "70000"], "must be at most 65535 (RabbitMQ's prefetch count)"),
        (["--concurrency", "0"], "must be at least 1"),
        (["--grace", "-1"], "must be a number of seconds >= 0"),
        (["--grace", "nan"], "must be a number of seconds >= 0"),
        (["--name", "w1\nforged log line"], "is not a worker name"),
        (["--name", ""], "is not a worker name"),
    ],
)
def test_bad_worker_settings_are_usage_errors(
    tmp_path: Path, flags: list[str], problem: str
) -> None:
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    completed = subprocess.run(
        [sys.executable, "-m", "taskexec", "worker", str(agents_file), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    (line,) = [x for x in completed.stderr.splitlines() if "error: argument" in x]
    assert line.startswith(f"taskexec worker: error: argument {flags[0]}: ")
    assert problem in line
    assert "Traceback" not in completed.stderr


def test_a_worker_refuses_settings_rabbitmq_cannot_take(cluster: Cluster) -> None:
    agents = [taskexec.Agent(name="writer")]
    with pytest.raises(ValueError, match="from 1 to 65535"):
        Worker(agents, cluster, concurrency=65536)
    with pytest.raises(ValueError, match="grace_s must be >= 0"):
        Worker(agents, cluster, grace_s=float("nan"))
    with pytest.raises(ValueError, match="worker name 'a b' is not valid"):
        Worker(agents, cluster, name="a b")


def test_run_id_without_a_broker_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_file = write_agents(tmp_path / "plan.yaml", OFFLINE, plan_tasks(1))
    assert main(["run", str(plan_file), "--run-id", "x"]) == 2
    assert "--run-id needs a distributed run" in capsys.readouterr().err


async def test_a_single_execute_runs_on_a_worker(use_cluster: Cluster, tmp_path: Path) -> None:
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    with workers([WorkerProcess(agents_file, use_cluster, "single")]) as (worker,):
        await worker.registered()
        async with TaskExecutor(taskexec.load_agents(agents_file)) as executor:
            result = await executor.execute(AgentTask(id="one", prompt="p"), agent="reviewer")
    assert result.ok
    assert (result.agent, result.metadata["worker"]) == ("reviewer", "single")


async def test_fail_fast_cancels_the_run_for_its_workers_too(
    use_cluster: Cluster, tmp_path: Path, slow_server: MockServer
) -> None:
    """After a failure with fail_fast, the run is marked cancelled: workers drop its tasks."""
    failing = {
        "name": "failing",
        "mode": "script",
        "command": [sys.executable, "-c", "raise SystemExit(3)"],
    }
    slow = {
        "name": "writer",
        "provider": "openai",
        "base_url": slow_server.openai_base_url,
        "api_key": "sk-test",
    }
    agents_file = write_agents(tmp_path / "agents.yaml", [slow, failing])
    tasks = [
        *(AgentTask(id=f"q{i}", prompt="p", agent="writer") for i in range(3)),
        AgentTask(id="bad", prompt="x", agent="failing"),
    ]
    with workers([WorkerProcess(agents_file, use_cluster, "ff", concurrency=8, grace_s=0.1)]) as (
        worker,
    ):
        await worker.registered()
        orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(agents_file)))
        results = await orchestrator.execute_tasks(tasks, fail_fast=True)
        run_id = results[3].metadata["run_id"]
        async with store_of(use_cluster) as store:
            assert await store.skip_reason(run_id, "q0") == "its run was cancelled"
    assert results[3].status is ExecutionStatus.FAILED
    assert [r.status for r in results[:3]] == [ExecutionStatus.CANCELLED] * 3


async def test_an_agent_the_worker_defines_differently_fails_with_its_reason(
    use_cluster: Cluster, tmp_path: Path
) -> None:
    """The worker's definition is the one that runs: a mode it cannot serve is a failed result
    (kind configuration), not a task bounced between workers."""
    worker_file = write_agents(tmp_path / "worker.yaml", OFFLINE)
    plan_agents = [{"name": "writer", "mode": "script", "command": [sys.executable, "-V"]}]
    plan_file = write_agents(tmp_path / "plan.yaml", plan_agents)
    with workers([WorkerProcess(worker_file, use_cluster, "mismatch")]) as (worker,):
        await worker.registered()
        orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(plan_file)))
        (result,) = await orchestrator.execute_tasks([AgentTask(id="s", prompt="p")])
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.kind == "configuration"
    assert "worker mismatch" in result.error.message
    assert "command" in result.error.message


@pytest.mark.parametrize(
    ("signum", "code"), [(2, 130), (15, 143), (1, 129)], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
async def test_an_interrupted_distributed_run_cancels_cleanly(
    use_cluster: Cluster, tmp_path: Path, slow_server: MockServer, signum: int, code: int
) -> None:
    """Ctrl-C, SIGTERM or SIGHUP on `taskexec run` against workers: one `cancelled` line per
    task, the usual exit code, and the run marked cancelled so that workers drop what is still
    queued."""
    agents = [
        {
            "name": "writer",
            "provider": "openai",
            "base_url": slow_server.openai_base_url,
            "api_key": "sk-test",
        }
    ]
    tasks = [{"id": f"i{i}", "prompt": f"p{i}"} for i in range(6)]
    plan_file = write_agents(tmp_path / "plan.yaml", agents, tasks)
    out = tmp_path / "out.jsonl"
    with workers(
        [WorkerProcess(plan_file, use_cluster, "slowpoke", concurrency=3, grace_s=0.1)]
    ) as (worker,):
        await worker.registered()
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskexec",
            "run",
            str(plan_file),
            "--run-id",
            "halt",
            "--output",
            str(out),
            env=cluster_env(use_cluster),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await eventually(lambda: slow_server.stats.chat_requests == 3, timeout_s=30)
        run.send_signal(signum)
        _, err = await asyncio.wait_for(run.communicate(), 60)
        async with store_of(use_cluster) as store:
            assert await store.skip_reason("halt", "i5") == "its run was cancelled"
    assert run.returncode == code, err.decode()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["task_id"] for r in lines) == [f"i{i}" for i in range(6)]
    assert {r["status"] for r in lines} == {"cancelled"}


async def test_gathered_calls_share_one_cluster_connection(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An executor opens its cluster connection once and every call shares it: 300 gathered
    execute() calls are counted at a proxy in front of RabbitMQ (one connection, not 300),
    and closing the executor closes it."""
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    monkeypatch.setenv("TASKEXEC_NAMESPACE", cluster.namespace)
    tasks = [AgentTask(id=f"t{i}", prompt=f"part {i}", agent="writer") for i in range(300)]
    async with CuttableProxy("127.0.0.1", 5672) as proxy:
        with workers([WorkerProcess(agents_file, cluster, "w", concurrency=100)]) as (worker,):
            await worker.registered()
            executor = TaskExecutor(
                taskexec.load_agents(agents_file),
                broker_url=proxy.url(cluster.broker_url),
                results_url=cluster.results_url,
            )
            async with executor:
                results = await asyncio.gather(*(executor.execute(t) for t in tasks))
                again = await executor.execute(tasks[0])  # a later call: the same connection
                for _ in range(3):  # more runs, and repeated ids: no binding left behind
                    await ProjectOrchestrator(executor).execute_tasks(tasks[:5])
                    await executor.execute(tasks[0])
                assert proxy.accepted == 1
                engine = taskexec._engines.registry.select_engine(executor.parts.engines)
                assert isinstance(engine, WorkersEngine)
                # Only the current run of execute() calls is still listened for.
                assert (await engine.dispatcher()).attached_runs == 1
            await eventually(lambda: proxy.connections == 0)
    async with TaskExecutor(taskexec.load_agents(agents_file)) as local:
        expected = await asyncio.gather(*(local.execute(t) for t in tasks))
    assert [r.status for r in results] == [ExecutionStatus.SUCCESS] * 300
    assert [r.output for r in results] == [r.output for r in expected]
    assert again.output == results[0].output
    assert {r.metadata["worker"] for r in results} == {"w"}
    # Each call is a run of its own: the same task id ran again for the later call.
    assert again.metadata["run_id"] != results[0].metadata["run_id"]


async def test_sync_calls_share_one_cluster_connection(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential sync calls run on the bridge's one loop: one cluster connection for all."""
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    monkeypatch.setenv("TASKEXEC_NAMESPACE", cluster.namespace)
    async with CuttableProxy("127.0.0.1", 5672) as proxy:

        def calls() -> list[ExecutionStatus]:
            with taskexec.sync.TaskExecutor(
                taskexec.load_agents(agents_file),
                broker_url=proxy.url(cluster.broker_url),
                results_url=cluster.results_url,
            ) as executor:
                return [
                    executor.execute(AgentTask(id=f"s{i}", prompt="p", agent="writer")).status
                    for i in range(10)
                ]

        with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
            await worker.registered()
            statuses = await asyncio.to_thread(calls)  # a plain thread, as a sync caller
        assert proxy.accepted == 1
    assert statuses == [ExecutionStatus.SUCCESS] * 10


def test_a_reused_run_id_reruns_the_tasks_whose_inputs_changed(
    use_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Results stored under a run id count again only for the same inputs: an edited prompt,
    another plan under the same id, or a dependency whose output changed runs again."""
    tasks = plan_tasks(6)
    plan_file = write_agents(tmp_path / "plan.yaml", OFFLINE, tasks)
    out = tmp_path / "out.jsonl"
    with workers([WorkerProcess(plan_file, use_cluster, "w")]) as (worker,):
        asyncio.run(worker.registered())
        argv = ["run", str(plan_file), "--run-id", "edited", "--output", str(out)]
        assert main(argv) == 0
        capsys.readouterr()
        tasks[1]["prompt"] = "step 1, edited"  # t2 depends on t1: its rendered prompt changes
        write_agents(plan_file, OFFLINE, tasks)
        assert main(argv) == 0
        err = capsys.readouterr().err
    assert "4 result(s) reused from an earlier run of this id, 2 task execution(s)" in err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    first, second = {r["task_id"]: r for r in lines[:6]}, {r["task_id"]: r for r in lines[6:]}
    assert second["t1"]["output"] != first["t1"]["output"]
    assert "step 1, edited" in second["t1"]["output"]
    assert second["t2"]["output"] != first["t2"]["output"]
    assert [second[t]["output"] for t in ("t0", "t3", "t4", "t5")] == [
        first[t]["output"] for t in ("t0", "t3", "t4", "t5")
    ]


async def test_results_come_from_the_store_never_from_an_event(cluster: Cluster) -> None:
    """A finished event published by anyone who can reach the events exchange changes
    nothing: the dispatcher reads each result from Redis."""
    from taskexec.distributed._store import worker_info
    from taskexec.distributed._wire import FinishedEvent, failure, routing_key

    task = AgentTask(id="a", prompt="hello")
    async with store_of(cluster) as store:
        await store.register(worker_info("fake", "h", 1, ["writer"], 1, 0, 0, 0.0))
        async with Dispatcher(cluster) as dispatcher:
            await dispatcher.attach("forged")
            waiting = asyncio.create_task(dispatcher.run("forged", task, "writer", "llm"))
            connection = await aio_pika.connect(cluster.broker_url)
            try:
                channel = await connection.channel()
                events = await channel.get_exchange(cluster.events_exchange)

                async def publish(output: str) -> None:
                    forged = failure("a", "writer", "llm", "http_status", "x").model_copy(
                        update={"status": ExecutionStatus.SUCCESS, "output": output, "error": None}
                    )
                    event = FinishedEvent(
                        run_id="forged", task_id="a", state="finished", worker="evil", result=forged
                    )
                    await events.publish(
                        aio_pika.Message(event.model_dump_json().encode()),
                        routing_key=routing_key("forged", "a", "finished"),
                    )

                await publish("PWNED before")  # nothing stored yet: the task keeps waiting
                real = failure("a", "writer", "llm", "http_status", "the real one")
                stored = await store.put_first("forged", real)
                await publish("PWNED after")  # the event only says: read the store
                result = await asyncio.wait_for(waiting, 30)
            finally:
                await connection.close()
    assert stored is real
    assert result.error is not None
    assert result.error.message == "the real one"
    assert "PWNED" not in (result.output or "")


async def test_a_result_is_announced_on_its_runs_redis_channel() -> None:
    """The script that stores a result publishes the task's id on its run's channel, and the
    dispatcher reads the result then, not at its next poll (poll_s is an hour here). Anything
    else on the channel (garbage, other shapes, a task nobody waits on) changes nothing."""
    from taskexec.distributed._store import worker_info
    from taskexec.distributed._wire import failure

    require_services()
    cluster = new_cluster(poll_s=3600.0)
    try:
        async with store_of(cluster) as store:
            await store.register(worker_info("fake", "h", 1, ["writer"], 1, 0, 0, 0.0))
            async with Dispatcher(cluster) as dispatcher:
                await dispatcher.attach("told")
                waiting = [
                    asyncio.create_task(
                        dispatcher.run("told", AgentTask(id=t, prompt="p"), "writer", "llm")
                    )
                    for t in ("a", "b")
                ]
                await eventually(lambda: len(dispatcher._pending) == 2)
                channel = store.done_channel("told")
                listener = store.client.pubsub()
                await listener.subscribe(channel)
                for junk in (b"not json", b'{"a": 1}', b'[1, null, "nobody"]', b"\xff"):
                    await store.client.publish(channel, junk)
                # Both stored at once (as a worker's results that end together are): one
                # script call, one notification naming both.
                stored = await asyncio.gather(
                    *(
                        store.put_first("told", failure(t, "writer", "llm", "http_status", t))
                        for t in ("a", "b")
                    )
                )
                results = await asyncio.wait_for(asyncio.gather(*waiting), 30)
                heard = []
                while (message := await listener.get_message(timeout=1)) is not None:
                    if message["type"] == "message":
                        heard.append(message["data"])
                await listener.aclose()  # type: ignore[no-untyped-call]
    finally:
        await drop_cluster(cluster, AGENTS)
    assert [r.error.message for r in results if r.error] == ["a", "b"]
    assert [r.task_id for r in stored] == ["a", "b"]
    assert heard[-1] == b'["a","b"]'


async def test_deliveries_taken_together_are_taken_once(cluster: Cluster) -> None:
    """Takes made at the same moment go to Redis as one script call; two of one task in it:
    the first takes the lease, the second finds it held."""
    from taskexec.distributed._store import LEASED

    async with store_of(cluster) as store:
        reasons = await asyncio.gather(
            store.take("together", "x", "w/1"),
            store.take("together", "x", "w/2"),
            store.take("together", "y", "w/3"),
        )
        counters = await store.counters("together")
    assert reasons == [None, LEASED, None]
    assert counters["executions"] == 2


async def test_a_garbage_stored_result_is_a_failed_result_not_a_traceback(
    cluster: Cluster,
) -> None:
    async with store_of(cluster) as store:
        key = cluster.key("run", "junk", "result", "a")
        await store.client.set(key, b"{not a result")
        await store.client.set(cluster.key("run", "junk", "result", "b"), b'{"task_id": "b"}')
        found = await store.get_many("junk", ["a", "b", "c"])
    assert sorted(found) == ["a", "b"]
    for task_id, result in found.items():
        assert result.task_id == task_id
        assert result.status is ExecutionStatus.FAILED
        assert result.error is not None
        assert result.error.kind == "bad_result"
        assert "delete key" in result.error.message


async def test_a_workers_spans_join_the_orchestrators_trace_over_rabbitmq(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, mock_server: MockServer
) -> None:
    """The W3C trace context travels in the task message: the worker's task span (and its
    chat span) are children of the orchestrator's span of the same task."""
    from .conftest import openai_agent
    from .test_tracing import Collected, attrs, use_providers

    collected = Collected()
    use_providers(monkeypatch, collected)
    agent = openai_agent(mock_server, "writer", model="gpt-4o-mini")
    worker = Worker([agent], cluster, concurrency=4)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), 30)
        monkeypatch.setenv("TASKEXEC_NAMESPACE", cluster.namespace)
        executor = TaskExecutor(
            [agent], broker_url=cluster.broker_url, results_url=cluster.results_url
        )
        async with executor:
            results = await ProjectOrchestrator(executor).execute_tasks(
                [AgentTask(id="a", prompt="x"), AgentTask(id="b", prompt="y")]
            )
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    assert [r.metadata.get("worker") for r in results] == [worker.name] * 2
    task_spans = collected.spans("taskexec.task")
    sent = {attrs(s)["taskexec.task.id"]: s for s in task_spans if s.parent is None}
    ran = {attrs(s)["taskexec.task.id"]: s for s in task_spans if s.parent is not None}
    assert sorted(sent) == sorted(ran) == ["a", "b"]
    for task_id, span in ran.items():
        parent = sent[task_id]
        assert span.parent is not None
        assert parent.context is not None
        assert span.parent.span_id == parent.context.span_id
        assert span.context is not None
        assert span.context.trace_id == parent.context.trace_id
        assert [c.name for c in collected.children(span)] == ["chat gpt-4o-mini"]
    collected.tracer_provider.shutdown()
    collected.meter_provider.shutdown()


def cluster_urls(cluster: Cluster) -> dict[str, str]:
    """An executor's own broker and results URLs for ``cluster``."""
    return {"broker_url": cluster.broker_url, "results_url": cluster.results_url}


def executor_on(cluster: Cluster, agents_file: Path) -> TaskExecutor:
    """An executor of the file's agents whose calls run on ``cluster``'s workers."""
    return TaskExecutor(taskexec.load_agents(agents_file), **cluster_urls(cluster))


def _streaming_agents(tmp_path: Path, server: MockServer) -> Path:
    return write_agents(
        tmp_path / "agents.yaml",
        [
            {
                "name": "writer",
                "provider": "openai",
                "base_url": server.openai_base_url,
                "api_key": "sk-test-not-real",
                "max_retries": 0,
            }
        ],
    )


async def test_a_stream_through_a_worker_arrives_piece_by_piece(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_server: MockServer
) -> None:
    """The worker streams the vendor's reply and publishes each piece as it arrives: the
    caller has its first piece while the server is still writing, and the pieces join to the
    stored result."""
    agents_file = _streaming_agents(tmp_path, mock_server)
    monkeypatch.setenv("TASKEXEC_NAMESPACE", cluster.namespace)
    prompt = "one two three four five six seven eight [[chunk_delay=0.05]]"
    with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
        await worker.registered()
        executor = executor_on(cluster, agents_file)
        async with executor:
            deltas: list[str] = []
            completed_at_first: bool | None = None
            async with executor.stream(AgentTask(id="s", prompt=prompt)) as stream:
                async for delta in stream:
                    if not deltas:
                        completed_at_first = mock_server.streams[-1].completed
                    deltas.append(delta)
            result = stream.result
    assert result.status is ExecutionStatus.SUCCESS, result.error
    assert "".join(deltas) == result.output
    assert len(deltas) > 3
    assert completed_at_first is False  # the first piece came while the server still wrote
    assert result.metadata["worker"] == "w"
    assert result.usage.output_tokens > 0
    assert mock_server.stats.chat_requests == 1


async def test_leaving_a_stream_through_a_worker_closes_the_request(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_server: MockServer
) -> None:
    agents_file = _streaming_agents(tmp_path, mock_server)
    monkeypatch.setenv("TASKEXEC_NAMESPACE", cluster.namespace)
    words = " ".join(f"w{i}" for i in range(200))
    prompt = f"{words} [[chunk_delay=0.05]]"  # ten seconds of pieces, if nobody leaves
    with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
        await worker.registered()
        executor = executor_on(cluster, agents_file)
        async with executor:
            got: list[str] = []
            async with executor.stream(AgentTask(id="s", prompt=prompt)) as stream:
                async for delta in stream:
                    got.append(delta)
                    if len(got) == 2:
                        break
            record = mock_server.streams[-1]
            await eventually(lambda: record.disconnected_at is not None, timeout_s=10)
    assert stream.result.status is ExecutionStatus.CANCELLED
    assert stream.result.output == "".join(got)
    assert not record.completed
    assert record.pieces_sent < 100  # stopped long before the end
    assert mock_server.stats.chat_requests == 1


async def test_a_sync_stream_through_a_worker(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_server: MockServer
) -> None:
    agents_file = _streaming_agents(tmp_path, mock_server)
    monkeypatch.setenv("TASKEXEC_NAMESPACE", cluster.namespace)

    def sync_caller() -> tuple[list[str], taskexec.ExecutionResult]:
        with taskexec.sync.TaskExecutor(
            taskexec.load_agents(agents_file), **cluster_urls(cluster)
        ) as executor:
            with executor.stream(AgentTask(id="s", prompt="a b c d")) as stream:
                pieces = list(stream)
            return pieces, stream.result

    with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
        await worker.registered()
        pieces, result = await asyncio.to_thread(sync_caller)
    assert result.ok
    assert "".join(pieces) == result.output


async def test_a_worker_killed_mid_stream_ends_it_failed_without_repeating_text(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_server: MockServer
) -> None:
    agents_file = _streaming_agents(tmp_path, mock_server)
    monkeypatch.setenv("TASKEXEC_NAMESPACE", cluster.namespace)
    words = [f"w{i}" for i in range(100)]
    prompt = " ".join(words) + " [[chunk_delay=0.05]]"
    first = WorkerProcess(agents_file, cluster, "first")
    second: WorkerProcess | None = None
    try:
        await first.registered()
        executor = executor_on(cluster, agents_file)
        async with executor:
            got: list[str] = []
            async with executor.stream(AgentTask(id="s", prompt=prompt)) as stream:
                async for delta in stream:
                    got.append(delta)
                    if len(got) == 5 and second is None:
                        second = WorkerProcess(agents_file, cluster, "second")
                        await second.registered()
                        first.kill()  # the message goes to the second worker, from the start
            result = stream.result
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert "lost mid-stream" in result.error.message
    text = "".join(got)
    assert result.output == text
    said = text.split()
    assert len(said) == len(set(said))  # no word twice: nothing was sent again
    assert len(said) >= 5
    assert mock_server.stats.chat_requests == 2  # the second worker started over


def _openai_agent(server: MockServer) -> list[dict[str, Any]]:
    return [
        {
            "name": "writer",
            "provider": "openai",
            "base_url": server.openai_base_url,
            "api_key": "sk-test",
            "max_retries": 0,
        }
    ]


async def test_hand_backs_never_count_toward_the_poison_limit(
    use_cluster: Cluster, tmp_path: Path, slow_server: MockServer, mock_server: MockServer
) -> None:
    """A healthy task whose worker is stopped (SIGTERM: hand back) more often than the delivery
    limit still runs to success on the next worker, and is not dead-lettered."""
    slow_file = write_agents(tmp_path / "slow.yaml", _openai_agent(slow_server))
    fast_file = write_agents(tmp_path / "fast.yaml", _openai_agent(mock_server))
    orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(fast_file)))
    run = asyncio.create_task(orchestrator.execute_tasks([AgentTask(id="healthy", prompt="p")]))
    stops = use_cluster.delivery_limit + 2
    for turn in range(stops):
        with workers([WorkerProcess(slow_file, use_cluster, f"slow{turn}", grace_s=0.1)]) as (
            slow,
        ):
            await eventually(
                lambda n=turn + 1: slow_server.stats.chat_requests == n,  # type: ignore[misc]
                timeout_s=30,
            )
            assert slow.terminate() == 0
    assert not run.done()
    with workers([WorkerProcess(fast_file, use_cluster, "fast")]):
        (result,) = await asyncio.wait_for(run, 60)
    assert result.ok, result.error
    assert result.metadata["worker"] == "fast"
    assert slow_server.stats.chat_requests == stops  # one per hand-back, none twice
    assert mock_server.stats.chat_requests == 1
    assert await queue_depth(use_cluster, use_cluster.dead_letter_queue) == 0
    assert await queue_depth(use_cluster, use_cluster.queue("writer")) == 0


async def test_a_task_delivered_twice_at_once_runs_once(
    cluster: Cluster, tmp_path: Path, mock_server: MockServer
) -> None:
    """Two copies of one task reach two workers at once: the second taker finds the first's
    lease live and waits; the task outlasts a lease's lifetime (10 s), so the waiting copy is
    handed back (published again, not counted) rather than kept, and once the result is
    stored it is acknowledged unrun."""
    agents_file = write_agents(tmp_path / "agents.yaml", _openai_agent(mock_server))
    message = TaskMessage(
        run_id="twice",
        agent="writer",
        mode="llm",
        task=AgentTask(id="one", prompt="[[latency=10]] p"),
    )
    with workers(
        [WorkerProcess(agents_file, cluster, name, concurrency=1) for name in ("a", "b")]
    ) as ws:
        for w in ws:
            await w.registered()
        connection = await aio_pika.connect(cluster.broker_url)
        try:
            channel = await connection.channel()
            for _ in range(2):
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        message.encode(),
                        headers={TASK_HEADER: TASK_VERSION},
                        content_type="application/json",
                    ),
                    routing_key=cluster.queue("writer"),
                )
        finally:
            await connection.close()
        async with store_of(cluster) as store:
            await eventually(lambda: mock_server.stats.chat_requests >= 1, timeout_s=30)
            for _ in range(600):
                if await store.get_many("twice", ["one"]) and not await queue_depth(
                    cluster, cluster.queue("writer")
                ):
                    break
                await asyncio.sleep(0.05)
            stored = await store.get_many("twice", ["one"])
            # Both copies settled: none waits in the queue or unacknowledged at a worker.
            for _ in range(600):
                if all(w.in_flight == 0 for w in await store.workers()):
                    break
                await asyncio.sleep(0.05)
            counted = await store.counters("twice")
            in_flight = [w.in_flight for w in await store.workers()]
    assert stored["one"].ok
    assert mock_server.stats.chat_requests == 1
    assert counted == {"executions": 1, "duplicates": 0}
    assert in_flight == [0, 0]
    assert await queue_depth(cluster, cluster.queue("writer")) == 0


@pytest.mark.parametrize("outage", ["down", "frozen"])
async def test_a_redis_outage_mid_run_hangs_nothing_and_runs_each_task_once(
    use_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outage: str
) -> None:
    """Redis goes away for a few seconds under 80 tasks on two workers (down: every connection
    dropped, new ones refused; frozen: connections open, nothing answered), the orchestrator's
    and the workers' alike: the workers stop
    taking tasks and hand back what they cannot take (not counted as failed deliveries), keep
    the results of what they ran until Redis takes them, and resume; every task ends with
    exactly one result, each ran once, and no worker ran more than its concurrency."""
    with mock_server_in_thread() as first, mock_server_in_thread() as second:
        servers = (first, second)
        files = [
            write_agents(tmp_path / f"w{i}.yaml", _openai_agent(server))
            for i, server in enumerate(servers)
        ]
        tasks = [AgentTask(id=f"o{i}", prompt=f"[[latency=0.2]] p{i}") for i in range(80)]
        async with CuttableProxy("127.0.0.1", 6379) as proxy:
            via_proxy = Cluster(
                use_cluster.broker_url,
                proxy.url(use_cluster.results_url),
                namespace=use_cluster.namespace,
            )
            monkeypatch.setenv("TASKEXEC_RESULTS_URL", via_proxy.results_url)
            with workers(
                [WorkerProcess(files[i], via_proxy, f"w{i}", concurrency=4) for i in (0, 1)]
            ) as ws:
                for w in ws:
                    await w.registered()
                orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(files[0])))
                run = asyncio.create_task(orchestrator.execute_tasks(tasks))
                await eventually(
                    lambda: sum(s.stats.chat_requests for s in servers) >= 20, timeout_s=30
                )
                stop, restore = (
                    (proxy.down, proxy.up) if outage == "down" else (proxy.freeze, proxy.thaw)
                )
                stop()
                await asyncio.sleep(3)  # the length of the outage (the input of this test)
                restore()
                results = await asyncio.wait_for(run, 120)
                logs = [w.log.read_text() for w in ws]
    assert [r.task_id for r in results] == [t.id for t in tasks]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert sum(s.stats.chat_requests for s in servers) == len(tasks)
    assert all(s.stats.max_in_flight <= 4 for s in servers)
    if outage == "down":  # a frozen Redis answers late (within the command timeout)
        assert any("Redis cannot be reached" in log for log in logs)
    async with store_of(use_cluster) as store:
        stored = await store.get_many(results[0].metadata["run_id"], [t.id for t in tasks])
        counted = await store.counters(results[0].metadata["run_id"])
    assert {t: r.output for t, r in stored.items()} == {r.task_id: r.output for r in results}
    assert counted == {"executions": len(tasks), "duplicates": 0}
    assert await queue_depth(use_cluster, use_cluster.dead_letter_queue) == 0


async def test_a_crashed_orchestrator_resumes_without_sending_again(
    use_cluster: Cluster, tmp_path: Path
) -> None:
    """`taskexec run` killed (SIGKILL) while its tasks run and wait in the queue, then run
    again with the same --run-id: it waits on the tasks the first one sent (under a lease or
    queued) instead of sending them again; the server sees each task once."""
    count = 16
    with mock_server_in_thread() as server:
        plan_file = write_agents(
            tmp_path / "plan.yaml",
            _openai_agent(server),
            [{"id": f"s{i}", "prompt": f"[[latency=2]] p{i}"} for i in range(count)],
        )
        out = tmp_path / "out.jsonl"
        command = [
            *(sys.executable, "-m", "taskexec", "run", str(plan_file)),
            *("--run-id", "resume", "--output", str(out), "--concurrency", str(count)),
        ]
        env = cluster_env(use_cluster)
        # Every finished event of the run, as a dashboard would see them: a copy sent again
        # would be acknowledged unrun with a "duplicate" event.
        connection = await aio_pika.connect(use_cluster.broker_url)
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                use_cluster.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            events = await channel.declare_queue(exclusive=True)
            await events.bind(exchange, routing_key="run.resume.#")
            dashboard = WorkerProcess(plan_file, use_cluster, "w", concurrency=6, events=True)
            with workers([dashboard]) as (w,):
                await w.registered()
                first = await asyncio.create_subprocess_exec(
                    *command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                try:
                    await eventually(lambda: server.stats.chat_requests >= 6, timeout_s=30)
                finally:
                    first.kill()
                    await first.wait()
                again = await asyncio.to_thread(
                    subprocess.run, command, env=env, capture_output=True, text=True, timeout=120
                )
                assert again.returncode == 0, again.stderr
            seen: list[dict[str, Any]] = []
            while (message := await events.get(fail=False)) is not None:
                seen.append(json.loads(message.body))
                await message.ack()
        finally:
            await connection.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["task_id"] for r in lines if r["status"] == "success") == sorted(
        f"s{i}" for i in range(count)
    )
    assert server.stats.chat_requests == count
    assert [e for e in seen if e.get("duplicate")] == []
    assert len(seen) == count


async def test_a_task_nobody_holds_is_sent_again(tmp_path: Path) -> None:
    """A task an orchestrator waits on whose message is gone (never published by an
    orchestrator that crashed, or dead-lettered by RabbitMQ's own limit): no live lease and
    nothing queued for its agent for orphan_after_s, so it is sent again and runs once."""
    require_services()
    cluster = new_cluster(orphan_after_s=1.5)
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    try:
        with workers([WorkerProcess(agents_file, cluster, "w")]) as (worker,):
            await worker.registered()
            async with Dispatcher(cluster) as dispatcher:
                await dispatcher.attach("lost")
                task = AgentTask(id="gone", prompt="p")
                # Waits on a task it believes sent: the message never reached the broker.
                result = await asyncio.wait_for(
                    dispatcher.run("lost", task, "writer", "llm", send=False), 60
                )
                resent = dispatcher.resent
            async with store_of(cluster) as store:
                counted = await store.counters("lost")
    finally:
        await drop_cluster(cluster, AGENTS)
    assert result.ok
    assert result.metadata["worker"] == "w"
    assert resent == 1
    assert counted == {"executions": 1, "duplicates": 0}


async def test_a_forged_live_worker_cannot_keep_no_worker_from_firing(cluster: Cluster) -> None:
    """A registration written to live for a year (no worker renews that far ahead) is not a
    live worker: the task fails no_worker after the wait instead of waiting for it."""
    from taskexec.distributed._store import worker_info

    quick = Cluster(
        cluster.broker_url,
        cluster.results_url,
        namespace=cluster.namespace,
        no_worker_wait_s=0.3,
        poll_s=0.05,
    )
    forged = worker_info("ghost", "nowhere", 1, ["writer"], 10, 0, 0, 0.0)
    async with store_of(quick) as store:
        year_ms = 365 * 24 * 3600 * 1000
        await store._register(
            keys=store._registry(), args=[forged.name, forged.model_dump_json(), year_ms]
        )
        honest = worker_info("real", "here", 2, ["reviewer"], 10, 0, 0, 0.0)
        await store.register(honest)
        live = [w.name for w in await store.workers()]
    async with Dispatcher(quick) as dispatcher:
        await dispatcher.attach("forged")
        result = await asyncio.wait_for(
            dispatcher.run("forged", AgentTask(id="a", prompt="p"), "writer", "llm"), 30
        )
    assert live == ["real"]
    assert result.error is not None
    assert result.error.kind == "no_worker"


async def test_calls_on_workers_because_of_the_environment_are_said_once(
    use_cluster: Cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Calls that go to workers only because TASKEXEC_BROKER_URL is set say so once per
    process, naming the variables (the URL without its password), not once per call."""
    import taskexec.distributed._engine as engine_module

    monkeypatch.setattr(engine_module, "_told_environment", False)
    agents_file = write_agents(tmp_path / "agents.yaml", OFFLINE)
    with workers([WorkerProcess(agents_file, use_cluster, "w")]) as (worker,):
        await worker.registered()
        for round_ in range(2):
            async with TaskExecutor(taskexec.load_agents(agents_file)) as executor:
                for i in range(2):
                    result = await asyncio.wait_for(
                        executor.execute(AgentTask(id=f"e{round_}{i}", prompt="p", agent="writer")),
                        30,
                    )
                    assert result.metadata["worker"] == "w"
        # Named in code, the cluster is no surprise: nothing more is said.
        async with TaskExecutor(
            taskexec.load_agents(agents_file),
            broker_url=use_cluster.broker_url + "?heartbeat=10",
            results_url=use_cluster.results_url,
        ) as named:
            assert (await named.execute(AgentTask(id="n", prompt="p", agent="writer"))).ok
    said = [r.getMessage() for r in caplog.records if "unset them" in r.getMessage()]
    assert len(said) == 1
    assert "TASKEXEC_BROKER_URL" in said[0]
    assert "guest:***@" in said[0]


async def test_a_broker_that_stops_answering_is_noticed_and_said(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A RabbitMQ that accepts but no longer answers (frozen behind the proxy): the AMQP
    heartbeat notices, the orchestrator says on stderr that it lost the broker and waits, and
    says so again when it is back."""
    async with CuttableProxy("127.0.0.1", 5672) as proxy:
        via_proxy = Cluster(
            proxy.url(cluster.broker_url) + "?heartbeat=1",
            cluster.results_url,
            namespace=cluster.namespace,
        )
        async with Dispatcher(via_proxy):
            proxy.freeze()
            try:
                await eventually(lambda: "lost its connection to RabbitMQ" in caplog.text, 30)
            finally:
                proxy.thaw()
            await eventually(lambda: "connected to RabbitMQ at" in caplog.text, 60)
    lost = next(r.getMessage() for r in caplog.records if "lost its connection" in r.getMessage())
    assert "guest:***@" in lost


async def test_a_reader_cancelled_while_the_loop_runs_is_a_lost_connection(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """aiormq cancels its reader when the broker stops answering (its heartbeat): that close
    comes with a CancelledError, as a loop's end does, and is still said while the loop runs."""
    async with Dispatcher(cluster) as dispatcher:
        assert dispatcher._connection is not None
        dispatcher._connection.transport.connection._reader_task.cancel()
        await eventually(lambda: "lost its connection to RabbitMQ" in caplog.text, 30)
        await eventually(lambda: "connected to RabbitMQ at" in caplog.text, 30)


async def test_a_worker_runs_no_more_than_its_concurrency_across_reconnects(
    use_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's broker connection drops while it runs its 4 tasks: RabbitMQ requeues them
    and hands them to it again on the new connection while the first runs go on. The second
    deliveries wait on the worker's own leases and are acknowledged unrun once the first runs
    store their results: 4 requests, never more than 4 at once (there were 8)."""
    with mock_server_in_thread() as server:
        agents_file = write_agents(tmp_path / "agents.yaml", _openai_agent(server))
        tasks = [AgentTask(id=f"r{i}", prompt=f"[[latency=8]] p{i}") for i in range(4)]
        async with CuttableProxy("127.0.0.1", 5672) as proxy:
            via_proxy = Cluster(
                proxy.url(use_cluster.broker_url),
                use_cluster.results_url,
                namespace=use_cluster.namespace,
            )
            with workers([WorkerProcess(agents_file, via_proxy, "w", concurrency=4)]) as (w,):
                await w.registered()
                orchestrator = ProjectOrchestrator(TaskExecutor(taskexec.load_agents(agents_file)))
                run = asyncio.create_task(orchestrator.execute_tasks(tasks))
                await eventually(lambda: server.stats.chat_requests == 4, timeout_s=30)
                proxy.cut()  # only the worker's connection goes through the proxy
                await eventually(lambda: proxy.connections >= 1, timeout_s=30)
                results = await asyncio.wait_for(run, 60)
        stats = server.stats
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert stats.chat_requests == 4
    assert stats.max_in_flight <= 4
    async with store_of(use_cluster) as store:
        counted = await store.counters(results[0].metadata["run_id"])
    assert counted == {"executions": 4, "duplicates": 0}


async def test_closing_a_connection_on_purpose_says_nothing(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a connection lost by accident is reported on stderr, not one closed by its owner."""
    for _ in range(3):
        async with Dispatcher(cluster):
            pass
    assert not [r for r in caplog.records if "lost its connection" in r.getMessage()]


def test_a_connection_left_open_closes_quietly_when_its_loop_ends(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """An executor its program never closes (``asyncio.run(main())`` without ``aclose``): its
    connection to the cluster closes as its loop ends, with no warning of a lost connection
    and no socket left to the garbage collector on a dead loop."""
    import gc

    import redis as sync_redis

    engine = WorkersEngine(cluster)
    opened: list[tuple[Dispatcher, int]] = []

    async def use() -> None:
        dispatcher = await engine.dispatcher()
        opened.append((dispatcher, await dispatcher.store.client.client_id()))

    for _ in range(3):
        with asyncio.Runner() as runner:
            runner.run(use())
    gc.collect()  # a socket left open warns here, and warnings fail this suite
    assert engine.connections_opened == 3
    assert all(
        dispatcher._connection and dispatcher._connection.is_closed for dispatcher, _ in opened
    )
    ids = [client_id for _, client_id in opened]
    with sync_redis.Redis.from_url(cluster.results_url) as client:
        wait_until(lambda: not client.client_list(client_id=ids), "Redis saw the clients close")
    assert not [r for r in caplog.records if "lost its connection" in r.getMessage()]


@pytest.mark.parametrize("redelivered", [True, False])
async def test_a_task_whose_holder_is_gone_is_taken_over_at_once(
    mock_server: MockServer, caplog: pytest.LogCaptureFixture, redelivered: bool
) -> None:
    """A task's lease is held by a worker process with no connection to Redis left (killed:
    its OS closed them), and RabbitMQ delivers the task again, or a copy of it (a redelivered
    batch's task sent again alone): a worker takes the lease over and runs it, instead of
    waiting for it to lapse (60 s here, past the test's bound)."""
    from .conftest import openai_agent

    require_services()
    cluster = new_cluster(lease_s=60)
    message = TaskMessage(
        run_id="ghost", agent="writer", mode="llm", task=AgentTask(id="t", prompt="p")
    )
    async with store_of(cluster) as store:
        assert await store.take("ghost", "t", "dead/0001/0001") is None  # its take, then death
        connection = await aio_pika.connect(cluster.broker_url)
        try:
            channel = await connection.channel()
            queue = await _declare(channel, cluster, "writer")
            await channel.default_exchange.publish(
                aio_pika.Message(
                    message.encode(),
                    headers={TASK_HEADER: TASK_VERSION},
                    content_type="application/json",
                ),
                routing_key=cluster.queue("writer"),
            )
            if redelivered:
                # Delivered to the dead holder and never acknowledged: its channel closes, and
                # RabbitMQ delivers the task again, marked redelivered.
                assert await queue.get(no_ack=False, timeout=10) is not None
            await channel.close()
        finally:
            await connection.close()
        worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=2)
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.serve(stop))
        try:
            with caplog.at_level("INFO", logger="taskexec"):
                await eventually(lambda: worker.done == 1, timeout_s=20)
            stored = await store.get_many("ghost", ["t"])
            counted = await store.counters("ghost")
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
            await drop_cluster(cluster, ["writer"])
    assert stored["t"].ok
    assert mock_server.stats.chat_requests == 1
    assert counted["executions"] == 2  # the dead holder's take and this one
    assert any("its holder dead/0001 is gone; taken over" in r.message for r in caplog.records)


async def test_a_lease_is_taken_over_only_while_its_holder_has_no_connection(
    cluster: Cluster,
) -> None:
    """Whether a holder is gone is read from Redis's client list: a lease whose holder has a
    connection named after it stays its own; once that connection closes, it is the one to
    take over; a worker never takes over its own leases; a take naming another token as dead
    does not take a live lease."""
    import redis.asyncio as aioredis

    from taskexec.distributed._store import LEASED

    worker = Worker([taskexec.Agent(name="writer", provider="offline")], cluster)
    async with store_of(cluster) as store:
        worker._store = store
        assert await store.take("r", "t", "other/0002/aa") is None
        assert await store.take("r", "mine", f"{worker._instance}/bb") is None
        holder = aioredis.from_url(cluster.results_url, client_name="taskexec-worker/other/0002")
        try:
            await holder.ping()
            assert await worker._gone("r", "t") is None
        finally:
            await holder.aclose()
        assert await worker._gone("r", "t") == "other/0002/aa"
        assert await worker._gone("r", "mine") is None
        assert await worker._gone("r", "nobody") is None
        assert await store.take("r", "t", "w/cc", dead="other/0009/zz") == LEASED
        assert await store.take("r", "t", "w/cc", dead="other/0002/aa") is None


async def test_a_worker_cancelled_again_while_it_winds_down_still_closes_redis(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving worker cancelled, then cancelled again while it winds down (a supervisor's
    second Ctrl-C, a loop that ends): winding down stops there, but its connections to Redis
    and RabbitMQ are still closed, not left open to the garbage collector."""
    from taskexec.distributed._acks import Acknowledgements
    from taskexec.distributed._worker import _client_name

    winding_down = asyncio.Event()

    async def stuck(acks: Acknowledgements) -> None:
        winding_down.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(Acknowledgements, "drain", stuck)
    worker = Worker([taskexec.Agent(name="writer", provider="offline")], cluster)
    serving = asyncio.create_task(worker.serve(asyncio.Event()))
    await asyncio.wait_for(worker.ready.wait(), 30)
    name = _client_name(worker._instance)
    async with store_of(cluster) as store:

        async def connected() -> bool:
            return any(c.get("name") == name for c in await store.client.client_list())

        assert await connected()
        serving.cancel()
        await asyncio.wait_for(winding_down.wait(), 30)  # in the midst of winding down
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        gone = False
        for _ in range(200):  # Redis sees a close within a few of its event-loop turns
            gone = not await connected()
            if gone:
                break
            await asyncio.sleep(0.05)
        assert gone, "the worker's Redis connection is still open"
    assert worker._consumers
    assert all(queue.channel.is_closed for queue, _ in worker._consumers)


async def test_closing_an_engine_while_it_opens_can_itself_be_cancelled(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aclose()`` under a timeout while the engine's connection is still opening: the
    timeout's cancellation reaches the caller (it is not taken for the opening's own), and the
    opening is cancelled with it, closing what it had opened."""
    entered = asyncio.Event()

    async def slow_open(dispatcher: Dispatcher) -> None:
        entered.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(Dispatcher, "open", slow_open)
    engine = WorkersEngine(cluster)
    opening = asyncio.create_task(engine.dispatcher())
    await asyncio.wait_for(entered.wait(), 30)
    closing = asyncio.create_task(engine.aclose())
    await asyncio.sleep(0)  # one step: the close now waits on the opening
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    with pytest.raises(asyncio.CancelledError):
        await opening


async def test_a_stream_through_a_worker_ends_though_redis_swallows_a_cancellation(
    cluster: Cluster, mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's watch for a departed caller reads Redis while the stream runs. redis-py can
    turn a cancellation that lands in a read into an error (its command timeout): here every
    read hangs until cancelled, then fails so. The stream's task still ends and its result is
    stored: the watch is told to stop between reads and is settled within a bound, never
    awaited after a cancellation it may lose."""
    from taskexec.distributed import _worker as worker_module
    from taskexec.distributed._store import ResultStore

    async def swallowing(store: ResultStore, run_id: str, task_id: str) -> bool:
        try:
            await asyncio.Event().wait()  # a read that does not come back by itself
        except asyncio.CancelledError:
            raise TimeoutError("the read was cancelled (as redis-py reports it)") from None
        return False

    monkeypatch.setattr(ResultStore, "is_cancelled", swallowing)
    monkeypatch.setattr(worker_module, "STOP_TIMEOUT_S", 0.5)
    monkeypatch.setenv("TASKEXEC_NAMESPACE", cluster.namespace)
    agent = openai_agent(mock_server, "writer", max_retries=0)
    worker = Worker([agent], cluster, concurrency=2)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), 30)
        async with TaskExecutor(
            [agent], broker_url=cluster.broker_url, results_url=cluster.results_url
        ) as executor:

            async def streamed() -> tuple[list[str], taskexec.ExecutionResult]:
                prompt = "one two three four [[chunk_delay=0.05]]"
                async with executor.stream(AgentTask(id="s", prompt=prompt)) as stream:
                    return [delta async for delta in stream], stream.result

            # The bound only keeps a broken worker from hanging the test.
            deltas, result = await asyncio.wait_for(streamed(), 60)
    finally:
        stop.set()
        # Not awaited past the bound: a worker that lost a cancellation would not end.
        ended, _ = await asyncio.wait({serving}, timeout=30)
        if not ended:
            serving.cancel()
    assert ended, "the worker did not stop"
    assert result.status is ExecutionStatus.SUCCESS, result.error
    assert "".join(deltas) == result.output
    assert worker.done == 1
