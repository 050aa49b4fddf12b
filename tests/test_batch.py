"""Calls made together go out together (taskexec.distributed._batch), without Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from taskexec.distributed._batch import MOST, Batched


class Recorder:
    """A ``send`` that records each batch and answers each item doubled."""

    def __init__(self, fail: Exception | None = None, short: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.fail = fail
        self.short = short
        self.release = asyncio.Event()
        self.release.set()
        self.called = asyncio.Event()

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.called.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        answers = [2 * i for i in items]
        return answers[:-1] if self.short else answers


async def test_calls_of_one_iteration_are_one_batch_in_order() -> None:
    send = Recorder()
    batched = Batched(send)
    first = await asyncio.gather(*(batched(i) for i in range(5)))
    second = await batched(7)
    assert first == [0, 2, 4, 6, 8]
    assert second == 14
    assert send.batches == [[0, 1, 2, 3, 4], [7]]


async def test_a_large_batch_goes_in_chunks() -> None:
    send = Recorder()
    batched = Batched(send)
    answers = await asyncio.gather(*(batched(i) for i in range(MOST + 3)))
    assert answers == [2 * i for i in range(MOST + 3)]
    assert [len(b) for b in send.batches] == [MOST, 3]


async def test_a_failed_batch_fails_every_call_in_it() -> None:
    batched = Batched(Recorder(fail=ConnectionError("redis away")))
    outcomes = await asyncio.gather(batched(1), batched(2), return_exceptions=True)
    assert [type(o) for o in outcomes] == [ConnectionError, ConnectionError]


async def test_answers_that_do_not_match_the_calls_are_an_error() -> None:
    batched = Batched(Recorder(short=True))
    with pytest.raises(RuntimeError, match="1 answers to 2 calls"):
        await asyncio.gather(batched(1), batched(2))


async def test_a_cancelled_caller_leaves_its_batch_to_finish() -> None:
    send = Recorder()
    send.release.clear()
    batched = Batched(send)
    leaving = asyncio.create_task(batched(1))
    staying = asyncio.create_task(batched(2))
    await send.called.wait()
    leaving.cancel()
    send.release.set()
    assert await staying == 4
    assert leaving.cancelled()
    assert send.batches == [[1, 2]]


class FakeChannel:
    def __init__(self) -> None:
        self.is_closed = False
        self.sent: list[tuple[str, int, bool]] = []


class FakeDelivery:
    """What the acknowledgements use of an aio-pika delivery: its channel, tag, ack, reject."""

    def __init__(self, channel: FakeChannel, tag: int) -> None:
        self.channel = channel
        self.delivery_tag = tag

    async def ack(self, multiple: bool = False) -> None:
        if self.channel.is_closed:
            raise RuntimeError("channel closed")
        self.channel.sent.append(("ack", self.delivery_tag, multiple))

    async def reject(self, requeue: bool = False) -> None:
        self.channel.sent.append(("reject", self.delivery_tag, requeue))


async def test_finished_deliveries_are_acknowledged_together() -> None:
    """The finished deliveries no unfinished one precedes: one frame; one that a running task
    precedes: its own frame, at once (it must not hold a prefetch slot)."""
    from taskexec.distributed._acks import Acknowledgements

    channel = FakeChannel()
    acks = Acknowledgements()
    deliveries = [FakeDelivery(channel, tag) for tag in range(1, 7)]
    for delivery in deliveries:
        acks.delivered(delivery)  # type: ignore[arg-type]
    for tag in (1, 2, 3, 5):
        acks.ack(deliveries[tag - 1])  # type: ignore[arg-type]
    await acks.settle(deliveries[5], deliveries[5].reject())  # type: ignore[arg-type]
    await acks.drain()
    assert channel.sent == [("reject", 6, False), ("ack", 3, True), ("ack", 5, False)]
    acks.ack(deliveries[3])  # type: ignore[arg-type]
    await acks.drain()
    assert channel.sent[3:] == [("ack", 4, True)]  # nothing unsettled before it any more


async def test_acknowledgements_of_a_closed_channel_are_dropped() -> None:
    """A channel that closed (a reconnect) took its deliveries back to the queue."""
    from taskexec.distributed._acks import Acknowledgements

    old, new = FakeChannel(), FakeChannel()
    acks = Acknowledgements()
    stale, fresh = FakeDelivery(old, 1), FakeDelivery(new, 1)
    for delivery in (stale, fresh):
        acks.delivered(delivery)  # type: ignore[arg-type]
        acks.ack(delivery)  # type: ignore[arg-type]
    old.is_closed = True
    await acks.drain()
    assert (old.sent, new.sent) == ([], [("ack", 1, True)])


async def test_acknowledgements_go_out_in_the_order_they_were_decided() -> None:
    """An individual acknowledgement still being written when a later ``multiple`` one covers
    its tag would reach RabbitMQ second: an unknown delivery tag, which closes the channel."""
    from taskexec.distributed._acks import Acknowledgements

    class SlowDelivery(FakeDelivery):
        async def ack(self, multiple: bool = False) -> None:
            for _ in range(3):  # a write that takes a few turns of the loop
                await asyncio.sleep(0)
            await super().ack(multiple)

    channel = FakeChannel()
    acks = Acknowledgements()
    deliveries = [SlowDelivery(channel, tag) for tag in range(1, 5)]
    for delivery in deliveries:
        acks.delivered(delivery)  # type: ignore[arg-type]
    acks.ack(deliveries[1])  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the first flush: 2 on its own (1 still runs)
    acks.ack(deliveries[0])  # type: ignore[arg-type]
    acks.ack(deliveries[2])  # type: ignore[arg-type]
    await acks.settle(deliveries[3], deliveries[3].reject())  # type: ignore[arg-type]
    await acks.drain()
    # The rejection was decided before the end of the iteration that decided the second flush.
    assert channel.sent == [("ack", 2, False), ("reject", 4, False), ("ack", 3, True)]
