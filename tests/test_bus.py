"""MessageBus: per-topic ordering, bounded queues and their policies, request/reply."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from taskexec import (
    BusTimeoutError,
    InvalidValueError,
    MessageBus,
    NoSubscriberError,
    NotAModelError,
    NotARequestError,
)
from taskexec.bus import Envelope


class Note(BaseModel):
    n: int


async def test_order_is_kept_per_topic_and_patterns_match() -> None:
    bus = MessageBus()
    exact = bus.subscribe("a.x")
    prefix = bus.subscribe("a.*")
    every = bus.subscribe("*")
    for i in range(5):
        await bus.publish("a.x", Note(n=i))
        await bus.publish("b", Note(n=100 + i))
    assert [(await exact.get()).message for _ in range(5)] == [Note(n=i) for i in range(5)]
    assert len(exact) == 0
    assert len(prefix) == 5
    assert len(every) == 10
    assert bus.has_subscribers("a.y")
    await bus.aclose()
    assert not bus.has_subscribers("a.y")


async def test_drop_oldest_keeps_the_newest_and_counts() -> None:
    bus = MessageBus(maxsize=3)
    sub = bus.subscribe("t")
    for i in range(10):
        assert await bus.publish("t", Note(n=i)) == 1
    assert len(sub) == 3
    assert sub.dropped == 7
    sub.close()
    assert [e.message.n async for e in sub] == [7, 8, 9]  # type: ignore[attr-defined]


async def test_drop_newest_keeps_the_oldest() -> None:
    bus = MessageBus()
    sub = bus.subscribe("t", maxsize=2, overflow="drop_newest")
    delivered = [await bus.publish("t", Note(n=i)) for i in range(4)]
    assert delivered == [1, 1, 0, 0]
    assert [(await sub.get()).message for _ in range(2)] == [Note(n=0), Note(n=1)]


async def test_block_waits_for_room_then_gives_up() -> None:
    bus = MessageBus(block_timeout_s=0.05)
    sub = bus.subscribe("t", maxsize=1, overflow="block")
    await bus.publish("t", Note(n=1))
    # Full, nobody reading: the publisher waits at most block_timeout_s, then the message drops.
    assert await bus.publish("t", Note(n=2)) == 0
    assert sub.dropped == 1
    # Full, but a reader makes room: the publisher gets through.
    publisher = asyncio.create_task(bus.publish("t", Note(n=3)))
    assert (await sub.get()).message == Note(n=1)
    assert await publisher == 1
    assert (await sub.get()).message == Note(n=3)


async def test_request_reply_and_timeout() -> None:
    bus = MessageBus()

    async def doubler(envelope: Envelope) -> None:
        assert isinstance(envelope.message, Note)
        await bus.reply(envelope, Note(n=envelope.message.n * 2))

    bus.on("double", doubler)
    assert await bus.request("double", Note(n=21), timeout_s=5) == Note(n=42)
    bus.subscribe("silent")
    # Each misuse has a taskexec error of its own that is also the built-in error it used to be.
    with pytest.raises(BusTimeoutError, match="no reply to the request on 'silent'") as late:
        await bus.request("silent", Note(n=1), timeout_s=0.05)
    assert isinstance(late.value, TimeoutError)
    with pytest.raises(NoSubscriberError, match="no subscriber") as nobody:
        await bus.request("nobody", Note(n=1), timeout_s=1)
    assert isinstance(nobody.value, LookupError)
    with pytest.raises(NotARequestError, match="not a request") as not_request:
        await bus.reply(Envelope("x", Note(n=1)), Note(n=2))
    assert isinstance(not_request.value, ValueError)
    await bus.aclose()


async def test_messages_must_be_models() -> None:
    bus = MessageBus()
    with pytest.raises(NotAModelError, match="pydantic models") as not_model:
        await bus.publish("t", {"n": 1})  # type: ignore[arg-type]
    assert isinstance(not_model.value, TypeError)
    with pytest.raises(InvalidValueError, match="maxsize must be at least 1, not -1") as bad:
        bus.subscribe("t", maxsize=-1)
    assert isinstance(bad.value, ValueError)


async def test_closed_subscription_ends_iteration_and_stops_delivery() -> None:
    bus = MessageBus()
    with bus.subscribe("t") as sub:
        await bus.publish("t", Note(n=1))
    assert await bus.publish("t", Note(n=2)) == 0
    assert [e.message async for e in sub] == [Note(n=1)]
    waiting = bus.subscribe("u")
    reader = asyncio.create_task(waiting.get())
    await asyncio.sleep(0)
    waiting.close()
    with pytest.raises(StopAsyncIteration):
        await reader


async def test_block_never_overfills_with_several_blocked_publishers() -> None:
    bus = MessageBus(block_timeout_s=60)
    sub = bus.subscribe("t", maxsize=1, overflow="block")
    await bus.publish("t", Note(n=0))
    publishers = [asyncio.create_task(bus.publish("t", Note(n=n))) for n in (1, 2, 3)]
    await asyncio.sleep(0)  # every publisher is now blocked on the full queue
    assert (await sub.get()).message == Note(n=0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(sub) == 1  # one of the three got the room; two wait again
    received = [(await sub.get()).message.n for _ in range(3)]  # type: ignore[attr-defined]
    assert sorted(received) == [1, 2, 3]
    assert await asyncio.gather(*publishers) == [1, 1, 1]
    assert sub.dropped == 0


@settings(max_examples=150, deadline=None)
@given(
    maxsize=st.integers(1, 4),
    publishers=st.integers(1, 6),
    steps=st.lists(st.sampled_from(["get", "yield", "yield", "close"]), max_size=60),
)
def test_block_bound_holds_under_any_interleaving(
    maxsize: int, publishers: int, steps: list[str]
) -> None:
    async def scenario() -> None:
        bus = MessageBus(block_timeout_s=60)
        sub = bus.subscribe("t", maxsize=maxsize, overflow="block")
        sent = [asyncio.create_task(bus.publish("t", Note(n=n))) for n in range(publishers)]
        received = 0
        for step in steps:
            if step == "get" and len(sub):
                await sub.get()
                received += 1
            elif step == "close":
                sub.close()
            else:
                await asyncio.sleep(0)
            assert len(sub) <= maxsize
        sub.close()
        delivered = await asyncio.gather(*sent)
        assert len(sub) <= maxsize
        # Every message was delivered (and is read or still queued) or not, never lost twice.
        assert sum(delivered) == received + len(sub)

    asyncio.run(scenario())
