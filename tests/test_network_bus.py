"""The networked bus on the real RabbitMQ: two buses on two connections (as two processes would
have), typed messages, request and reply across them, and lifecycle events of a run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from pydantic import BaseModel

from taskexec import Agent, AgentTask, NoSubscriberError, ProjectOrchestrator, TaskExecutor
from taskexec.bus import TaskEvent
from taskexec.distributed import Cluster, NetworkBus, RemoteMessage

from .cluster import drop_cluster, new_cluster, require_services


class Note(BaseModel):
    text: str


class Answer(BaseModel):
    value: int


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    require_services()
    made = new_cluster()
    yield made
    await drop_cluster(made, [])


async def test_a_message_reaches_a_subscriber_on_another_bus_as_its_model(
    cluster: Cluster,
) -> None:
    async with (
        NetworkBus(cluster, models=[Note]) as a,
        NetworkBus(cluster, models=[Note]) as b,
    ):
        with b.subscribe("notes.*") as inbox, a.subscribe("notes.*") as own:
            await a.bound()
            await b.bound()
            assert await a.publish("notes.new", Note(text="hello")) >= 1
            envelope = await asyncio.wait_for(inbox.get(), 10)
            assert (envelope.topic, envelope.message) == ("notes.new", Note(text="hello"))
            # The publisher's own subscriber gets it once, not again through the broker.
            assert (await own.get()).message == Note(text="hello")
            await a.publish("notes.second", Note(text="again"))
            assert (await asyncio.wait_for(own.get(), 10)).message == Note(text="again")
            assert len(own) == 0


async def test_an_unknown_model_arrives_as_data_not_as_the_senders_class(
    cluster: Cluster,
) -> None:
    async with NetworkBus(cluster, models=[Note]) as a, NetworkBus(cluster) as b:
        with b.subscribe("*") as inbox:
            await b.bound()
            await a.publish("x", Note(text="t"))
            envelope = await asyncio.wait_for(inbox.get(), 10)
    assert envelope.message == RemoteMessage(model=f"{Note.__module__}.Note", data={"text": "t"})


async def test_request_and_reply_across_buses(cluster: Cluster) -> None:
    async with (
        NetworkBus(cluster, models=[Note]) as asker,
        NetworkBus(cluster, models=[Answer]) as answerer,
    ):

        async def answer(envelope: object) -> None:
            await answerer.reply(envelope, Answer(value=42))  # type: ignore[arg-type]

        answerer.on("questions", answer)
        await answerer.bound()
        reply = await asker.request("questions", Note(text="six times seven?"), timeout_s=10)
        assert reply == RemoteMessage(model=f"{Answer.__module__}.Answer", data={"value": 42})
        with pytest.raises(NoSubscriberError):
            await asker.request("nobody.listens", Note(text="?"), timeout_s=1)


async def test_a_runs_lifecycle_events_reach_another_bus(cluster: Cluster) -> None:
    async with NetworkBus(cluster) as run_bus, NetworkBus(cluster, models=[TaskEvent]) as watcher:
        with watcher.subscribe("task.finished") as finished:
            await watcher.bound()
            async with TaskExecutor([Agent(name="w")]) as executor:
                orchestrator = ProjectOrchestrator(executor, bus=run_bus)
                tasks = [AgentTask(id=f"t{i}", prompt="p") for i in range(3)]
                await orchestrator.execute_tasks(tasks)
            seen = [await asyncio.wait_for(finished.get(), 10) for _ in tasks]
    assert sorted(e.message.task_id for e in seen) == ["t0", "t1", "t2"]  # type: ignore[attr-defined]
    assert all(isinstance(e.message, TaskEvent) and e.message.result for e in seen)


async def test_a_message_that_is_not_its_model_is_dropped_without_quoting_it(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """What another process sends that is not the model it names is logged by count, never
    by content (pydantic's error text repeats the input), and the bus goes on."""
    secret = "sk-bus-SECRET-5d1f0a"
    model = f"{Note.__module__}.{Note.__qualname__}"
    async with NetworkBus(cluster, models=[Note]) as bus:
        with bus.subscribe("notes.*") as inbox:
            await bus.bound()
            connection = await aio_pika.connect(cluster.broker_url)
            try:
                channel = await connection.channel()
                exchange = await channel.get_exchange(f"{cluster.namespace}.bus")
                # Not a Note; and, for a model this bus does not know, not JSON at all.
                for name, body in ((model, f'{{"txt": "{secret}"}}'), ("other.Model", secret)):
                    await exchange.publish(
                        aio_pika.Message(
                            body.encode(), headers={"model": name, "origin": "elsewhere"}
                        ),
                        "notes.bad",
                    )
                await exchange.publish(
                    aio_pika.Message(
                        Note(text="fine").model_dump_json().encode(),
                        headers={"model": model, "origin": "elsewhere"},
                    ),
                    "notes.good",
                )
            finally:
                await connection.close()
            envelope = await asyncio.wait_for(inbox.get(), 10)  # the two bad ones never arrive
    assert (envelope.topic, envelope.message) == ("notes.good", Note(text="fine"))
    dropped = [r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()]
    assert dropped == [
        f"bus {bus.id}: dropped a message on notes.bad: not a valid {model} (1 problem(s))",
        f"bus {bus.id}: dropped a message on notes.bad: its body is not a JSON object",
    ]
    assert secret not in caplog.text
