"""Batches: the tasks of one agent that are ready together, while more of them wait than its
workers have slots, travel in one message; a worker settles each on its own. On the real
RabbitMQ and Redis, requests counted at the server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

import taskexec
from taskexec import AgentTask, ExecutionResult, ExecutionStatus
from taskexec.distributed import Cluster, Worker
from taskexec.distributed._amqp import declare_agent_queue
from taskexec.distributed._dispatch import Dispatcher, batch_size
from taskexec.distributed._wire import (
    BATCH_VERSION,
    TASK_HEADER,
    TASK_VERSION,
    BadMessage,
    TaskMessage,
    message_digest,
    split_batch,
)
from taskexec.testing import MockServer

from .cluster import drop_cluster, new_cluster, queue_depth, require_services, store_of
from .conftest import eventually, openai_agent


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    require_services()
    made = new_cluster()
    yield made
    await drop_cluster(made, ["writer", "other"])


@pytest.mark.parametrize(
    ("waiting", "slots", "most", "expected"),
    [
        (1, 0, 8, 1),  # no worker known: one task per message
        (500, 0, 8, 1),
        (3, 10, 8, 1),  # every task can start at once: each goes to whichever worker is free
        (10, 10, 8, 1),
        (19, 10, 8, 1),
        (20, 10, 8, 2),  # two rounds per slot: two tasks per message
        (5000, 200, 8, 8),
        (5000, 200, 50, 25),
        (5000, 200, 1, 1),
    ],
)
def test_a_batch_is_one_slots_share_of_what_waits(
    waiting: int, slots: int, most: int, expected: int
) -> None:
    assert batch_size(waiting, slots, most) == expected


def test_a_batch_splits_into_its_tasks_as_sent() -> None:
    one = TaskMessage(run_id="r", agent="a", mode="llm", task=AgentTask(id="x", prompt="a\nb"))
    two = TaskMessage(run_id="r", agent="a", mode="llm", task=AgentTask(id="y", prompt="\n"))
    body = b"\n".join([one.encode(), two.encode()])
    headers = {TASK_HEADER: BATCH_VERSION}
    assert split_batch(body, headers, "application/json") == [one.encode(), two.encode()]
    assert split_batch(one.encode(), {TASK_HEADER: TASK_VERSION}, "application/json") is None
    assert split_batch(body, None, None) is None
    for bad, content_type, problem in [
        (body + b"\n", "application/json", "empty line"),
        (b"\n\n", "application/json", "empty line"),
        (body, "text/plain", "content type"),
    ]:
        with pytest.raises(BadMessage, match=problem):
            split_batch(bad, headers, content_type)


async def _serving(worker: Worker) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    await asyncio.wait_for(worker.ready.wait(), 30)
    return stop, serving


async def _dispatch(
    cluster: Cluster, worker: Worker, run_id: str, count: int, sending: Cluster | None = None
) -> tuple[list[ExecutionResult], Dispatcher]:
    """Send ``count`` tasks of a run at once through a dispatcher (on ``sending``, else the
    cluster), served by ``worker``; return their results and the dispatcher, closed."""
    stop, serving = await _serving(worker)
    try:
        async with Dispatcher(sending or cluster) as dispatcher:
            await dispatcher.attach(run_id)
            tasks = [AgentTask(id=f"t{i}", prompt=f"task {i}") for i in range(count)]
            results = await asyncio.wait_for(
                asyncio.gather(*(dispatcher.run(run_id, t, "writer", "llm") for t in tasks)), 60
            )
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    return results, dispatcher


@pytest.mark.parametrize(("most", "messages"), [(None, 8), (1, 60), (20, 4)])
async def test_more_tasks_than_slots_go_in_batches_and_each_runs_once(
    cluster: Cluster, mock_server: MockServer, most: int | None, messages: int
) -> None:
    """60 tasks at once for 4 slots: a quarter of what waits per message (15), or the most a
    message may carry (8 by default, 1: each alone); every task runs once (counted at the
    server) and gets its own result."""
    worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=4)
    sending = None if most is None else dataclasses.replace(cluster, batch=most)
    results, dispatcher = await _dispatch(cluster, worker, "many", 60, sending)
    async with store_of(cluster) as store:
        counted = await store.counters("many")
    assert [(r.task_id, r.status) for r in results] == [
        (f"t{i}", ExecutionStatus.SUCCESS) for i in range(60)
    ]
    assert dispatcher.published == messages
    assert mock_server.stats.chat_requests == 60
    assert counted == {"executions": 60, "duplicates": 0}
    assert worker.done == 60
    # Every message was acknowledged: nothing went back to the queue when the worker left.
    assert await queue_depth(cluster, cluster.queue("writer")) == 0


async def test_tasks_that_can_all_start_at_once_go_one_per_message(
    cluster: Cluster, mock_server: MockServer
) -> None:
    worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=8)
    results, dispatcher = await _dispatch(cluster, worker, "few", 8)
    assert all(r.ok for r in results)
    assert dispatcher.published == 8
    assert mock_server.stats.chat_requests == 8


async def test_a_task_cancelled_before_its_batch_goes_is_not_sent(cluster: Cluster) -> None:
    async with store_of(cluster) as store:
        await store.register(_registration("w", ["writer"], concurrency=1))
    async with Dispatcher(cluster) as dispatcher:
        await dispatcher.attach("gone")
        kept = asyncio.create_task(
            dispatcher.run("gone", AgentTask(id="kept", prompt="p"), "writer", "llm")
        )
        left = asyncio.create_task(
            dispatcher.run("gone", AgentTask(id="left", prompt="p"), "writer", "llm")
        )
        await asyncio.sleep(0)  # both wait in the outbox, whose flush comes after this step
        left.cancel()
        await eventually(lambda: dispatcher.published == 1, timeout_s=30)
        kept.cancel()
        await asyncio.gather(kept, left, return_exceptions=True)
    connection = await aio_pika.connect(cluster.broker_url)
    try:
        channel = await connection.channel()
        queue = await declare_agent_queue(channel, cluster, "writer")
        message = await queue.get(timeout=10)
        assert message is not None
        await message.ack()
        assert message.headers[TASK_HEADER] == TASK_VERSION  # one task: a lone message
        assert TaskMessage.model_validate_json(message.body).task.id == "kept"
        assert await queue.get(fail=False) is None
    finally:
        await connection.close()


def _registration(
    name: str, agents: list[str], concurrency: int, protocols: tuple[str, ...] = ("task/1",)
) -> Any:
    from taskexec.distributed._store import worker_info

    return worker_info(name, "host", 1, agents, concurrency, 0, 0, 0.0, protocols=protocols)


@pytest.mark.parametrize(
    ("protocols", "stream", "messages"),
    [
        ((TASK_VERSION, BATCH_VERSION), False, 1),
        # A worker of an earlier version registers no protocols: it would refuse a batch.
        ((TASK_VERSION,), False, 5),
        # A stream's first piece does not wait behind a batch's other tasks.
        ((TASK_VERSION, BATCH_VERSION), True, 5),
    ],
)
async def test_batches_go_only_to_workers_that_read_them_and_never_carry_streams(
    cluster: Cluster, protocols: tuple[str, ...], stream: bool, messages: int
) -> None:
    async with store_of(cluster) as store:
        await store.register(_registration("w", ["writer"], 1, protocols))
    async with Dispatcher(cluster) as dispatcher:
        await dispatcher.attach("mixed")
        runs = [
            asyncio.create_task(
                dispatcher.run(
                    "mixed",
                    AgentTask(id=f"t{i}", prompt="p"),
                    "writer",
                    "llm",
                    deltas=asyncio.Queue() if stream else None,
                )
            )
            for i in range(5)
        ]
        await eventually(lambda: dispatcher.published == messages, timeout_s=30)
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
    assert await queue_depth(cluster, cluster.queue("writer")) == messages


def _three_tasks(run_id: str) -> list[bytes]:
    """The messages of tasks t0, t1 and t2 of a run, for the writer agent."""
    return [
        TaskMessage(
            run_id=run_id, agent="writer", mode="llm", task=AgentTask(id=f"t{i}", prompt="p")
        ).encode()
        for i in range(3)
    ]


async def _take_all(cluster: Cluster, queue_name: str) -> list[tuple[object, bytes]]:
    """Take every message waiting in a queue: (its protocol header, its body) each."""
    connection = await aio_pika.connect(cluster.broker_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        taken: list[tuple[object, bytes]] = []
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            taken.append((message.headers.get(TASK_HEADER), message.body))
        return taken
    finally:
        await connection.close()


async def _publish_batch(cluster: Cluster, parts: list[bytes]) -> None:
    connection = await aio_pika.connect(cluster.broker_url)
    try:
        channel = await connection.channel()
        queue = await declare_agent_queue(channel, cluster, "writer")
        await channel.default_exchange.publish(
            aio_pika.Message(
                b"\n".join(parts),
                headers={TASK_HEADER: BATCH_VERSION},
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue.name,
        )
    finally:
        await connection.close()


async def test_a_batchs_unreadable_tasks_go_to_the_dead_letter_queue_alone(
    cluster: Cluster, mock_server: MockServer
) -> None:
    """A batch with a task for an agent this worker does not define and a line that is no
    task: each goes to the dead-letter queue as a lone message (the first tells its run why,
    with the digest of its own message), the others run, and the batch is acknowledged."""
    good = [
        TaskMessage(run_id="mixed", agent="writer", mode="llm", task=AgentTask(id=i, prompt="p"))
        for i in ("a", "b")
    ]
    foreign = TaskMessage(
        run_id="mixed", agent="other", mode="llm", task=AgentTask(id="c", prompt="p")
    )
    parts = [good[0].encode(), foreign.encode(), b"{not json", good[1].encode()]
    worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=4)
    stop, serving = await _serving(worker)
    try:
        await _publish_batch(cluster, parts)
        await eventually(lambda: worker.done == 2, timeout_s=30)
        async with store_of(cluster) as store:
            stored = await store.get_many("mixed", ["a", "b", "c"])
            for _ in range(200):
                if await store.rejections("mixed", ["c"]):
                    break
                await asyncio.sleep(0.02)
            rejected = await store.rejections("mixed", ["c"])
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    assert sorted(stored) == ["a", "b"]
    assert all(r.ok for r in stored.values())
    assert mock_server.stats.chat_requests == 2
    assert rejected["c"][0] == message_digest(foreign.encode(), TASK_VERSION)
    assert "agent 'other' is not defined by this worker" in rejected["c"][1]
    dead = await _take_all(cluster, cluster.dead_letter_queue)
    assert sorted(dead) == sorted((TASK_VERSION, p) for p in [foreign.encode(), b"{not json"])
    assert await queue_depth(cluster, cluster.queue("writer")) == 0


async def test_a_batch_that_cannot_be_one_goes_to_the_dead_letter_queue_whole(
    cluster: Cluster,
) -> None:
    task = TaskMessage(run_id="r", agent="writer", mode="llm", task=AgentTask(id="a", prompt="p"))
    worker = Worker([taskexec.Agent(name="writer", provider="offline")], cluster)
    stop, serving = await _serving(worker)
    try:
        await _publish_batch(cluster, [task.encode(), b""])  # an empty line: not a batch
        for _ in range(200):
            if await queue_depth(cluster, cluster.dead_letter_queue) == 1:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    assert await queue_depth(cluster, cluster.dead_letter_queue) == 1
    assert worker.done == 0
    assert await queue_depth(cluster, cluster.queue("writer")) == 0


async def test_a_stopped_worker_hands_back_each_task_of_a_batch_alone(
    cluster: Cluster, mock_server: MockServer
) -> None:
    """Stopped while a batch runs (one slot: one task running, two waiting for it), the worker
    hands back each task as a lone message, and the batch itself is acknowledged: three
    messages wait, not the batch as well."""
    mock_server.latency_s = 30.0
    parts = _three_tasks("back")
    worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=1, grace_s=0)
    stop, serving = await _serving(worker)
    try:
        await _publish_batch(cluster, parts)
        await eventually(lambda: mock_server.stats.chat_requests == 1, timeout_s=30)
        assert worker.in_flight == 3
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    handed_back = await _take_all(cluster, cluster.queue("writer"))
    assert sorted(handed_back) == sorted((TASK_VERSION, p) for p in parts)
    async with store_of(cluster) as store:
        # Handed back, not failed: no result, and no take counted against the tasks.
        assert await store.get_many("back", ["t0", "t1", "t2"]) == {}


async def test_a_batch_redelivered_after_its_worker_died_runs_only_what_has_no_result(
    cluster: Cluster, mock_server: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that dies with a batch (delivered, never acknowledged) leaves all of it to
    RabbitMQ. The next worker runs the tasks without a result, acknowledges unrun the one the
    dead worker had stored, and acknowledges the batch."""
    from taskexec.distributed._wire import failure

    parts = _three_tasks("died")
    stored_first = failure("t0", "writer", "llm", "bad_response", "the dead worker's result")
    async with store_of(cluster) as store:
        await store.put_first("died", stored_first)
        await _publish_batch(cluster, parts)
        connection = await aio_pika.connect(cluster.broker_url)
        try:
            channel = await connection.channel()
            queue = await declare_agent_queue(channel, cluster, "writer")
            assert await queue.get(no_ack=False, timeout=10) is not None
            await channel.close()  # the holder's channel goes: RabbitMQ requeues the batch
        finally:
            await connection.close()
        worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=4)
        stop, serving = await _serving(worker)
        try:
            with caplog.at_level("INFO", logger="taskexec.worker"):
                await eventually(lambda: worker.done == 2, timeout_s=30)
            results = await store.get_many("died", ["t0", "t1", "t2"])
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
    # Sent again one per message (its tasks do not share a taker's fate again), then run.
    assert any("redelivered batch's 3 tasks sent again" in r.message for r in caplog.records)
    assert results["t0"] == stored_first
    assert results["t1"].ok
    assert results["t2"].ok
    assert mock_server.stats.chat_requests == 2
    assert await queue_depth(cluster, cluster.queue("writer")) == 0


async def test_tasks_of_a_batch_waiting_for_a_slot_are_not_sent_again(
    mock_server: MockServer,
) -> None:
    """Three tasks for one slot: one message, two of its tasks wait in the worker for the slot,
    unleased, for longer than ``orphan_after_s``. The worker reports holding more than it runs,
    so the orchestrator does not take them for lost and send them again."""
    require_services()
    cluster = new_cluster(orphan_after_s=1.0, poll_s=0.1, heartbeat_s=0.1)
    mock_server.latency_s = 1.5
    worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=1)
    try:
        results, dispatcher = await _dispatch(cluster, worker, "slow", 3)
    finally:
        await drop_cluster(cluster, ["writer"])
    assert all(r.ok for r in results)
    assert (dispatcher.published, dispatcher.resent) == (1, 0)
    assert mock_server.stats.chat_requests == 3


async def test_a_worker_stopping_runs_out_its_running_task_and_hands_back_the_waiting_ones(
    cluster: Cluster, mock_server: MockServer
) -> None:
    """Stopped with a grace long enough for its running task, a worker lets that task finish
    but does not start the tasks of the batch still waiting for its slot: they go back to the
    queue alone, unrun."""
    mock_server.latency_s = 1.0
    parts = _three_tasks("grace")
    worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=1, grace_s=60)
    stop, serving = await _serving(worker)
    try:
        await _publish_batch(cluster, parts)
        await eventually(lambda: mock_server.stats.chat_requests == 1, timeout_s=30)
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    async with store_of(cluster) as store:
        stored = await store.get_many("grace", ["t0", "t1", "t2"])
    assert list(stored) == ["t0"]
    assert stored["t0"].ok
    assert (worker.done, mock_server.stats.chat_requests) == (1, 1)
    assert await queue_depth(cluster, cluster.queue("writer")) == 2


async def test_a_batchs_task_that_waits_long_for_a_slot_goes_back_to_the_queue_alone(
    cluster: Cluster,
    mock_server: MockServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch stays unacknowledged while any of its tasks waits: a task that waited longer
    than PART_WAIT_S for a slot goes back to the queue alone (and runs from there, here on
    the same worker), so that a batch never outlives RabbitMQ's consumer timeout."""
    import taskexec.distributed._worker as worker_module

    monkeypatch.setattr(worker_module, "PART_WAIT_S", 0.3)
    mock_server.latency_s = 1.0
    parts = _three_tasks("long")
    worker = Worker([openai_agent(mock_server, "writer")], cluster, concurrency=1)
    stop, serving = await _serving(worker)
    try:
        with caplog.at_level("INFO", logger="taskexec.worker"):
            await _publish_batch(cluster, parts)
            await eventually(lambda: worker.done == 3, timeout_s=30)
        async with store_of(cluster) as store:
            stored = await store.get_many("long", ["t0", "t1", "t2"])
            counted = await store.counters("long")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    handed_back = sorted(
        r.getMessage().split()[3] for r in caplog.records if "for a slot; handed back" in r.message
    )
    assert handed_back == ["t1", "t2"]
    assert all(r.ok for r in stored.values())
    assert sorted(stored) == ["t0", "t1", "t2"]
    assert counted == {"executions": 3, "duplicates": 0}
    assert mock_server.stats.chat_requests == 3
    assert await queue_depth(cluster, cluster.queue("writer")) == 0


class _RefusingExchange:
    """An exchange whose broker refuses every publish (a queue with no quorum leader)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        self.attempts.append(routing_key)
        raise ConnectionError("the queue has no leader")


class _RefusingChannel:
    is_closed = False

    def __init__(self) -> None:
        self.default_exchange = _RefusingExchange()


async def test_a_task_the_dead_letter_queue_cannot_take_is_dropped_after_a_few_tries(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ drops a rejected message whose dead-letter queue cannot take it; a batch's
    task is moved there by the worker, which tries a few times, says so, and settles it, so
    that the batch is not kept unacknowledged for as long as the channel lives."""
    import taskexec.distributed._worker as worker_module
    from taskexec.distributed._acks import Part

    monkeypatch.setattr(worker_module, "RETRY_PAUSE_S", 0.0)
    channel = _RefusingChannel()
    attempts = channel.default_exchange.attempts
    worker = Worker([taskexec.Agent(name="writer", provider="offline")], cluster)
    worker._channel = channel  # type: ignore[assignment]
    part = Part(None, b"{not json", {TASK_HEADER: TASK_VERSION}, None, worker._to_dead_letters)  # type: ignore[arg-type]
    with caplog.at_level("ERROR", logger="taskexec.worker"):
        await part.reject()
    assert attempts == [cluster.dead_letter_queue] * worker_module.COPY_ATTEMPTS
    assert any("dropped it" in r.message for r in caplog.records)


async def test_a_redelivered_batch_that_cannot_be_sent_again_alone_goes_back_to_its_queue(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending a redelivered batch's tasks again one by one fails (the broker refuses, a few
    times): the batch is returned to its queue, not kept unacknowledged for as long as the
    channel lives."""
    import taskexec.distributed._worker as worker_module

    monkeypatch.setattr(worker_module, "RETRY_PAUSE_S", 0.0)
    channel = _RefusingChannel()
    attempts = channel.default_exchange.attempts
    settled: list[str] = []

    class Delivered:
        channel = _RefusingChannel()
        delivery_tag = 7
        routing_key = cluster.queue("writer")

        async def nack(self, requeue: bool = True) -> None:
            settled.append(f"nack requeue={requeue}")

        async def ack(self, multiple: bool = False) -> None:
            settled.append("ack")

    worker = Worker([taskexec.Agent(name="writer", provider="offline")], cluster)
    worker._channel = channel  # type: ignore[assignment]
    batch = Delivered()
    worker._acks.delivered(batch)  # type: ignore[arg-type]
    await worker._unbatch(batch, _three_tasks("back"), {TASK_HEADER: TASK_VERSION})  # type: ignore[arg-type]
    await worker._acks.drain()
    assert attempts == [cluster.queue("writer")] * worker_module.COPY_ATTEMPTS
    assert settled == ["nack requeue=True"]
