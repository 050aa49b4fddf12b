"""An in-process message bus for agent coordination, and the orchestrator's lifecycle events.

Messages are pydantic models, published to a topic. Each subscription has its own bounded queue,
so a slow subscriber can never make the bus grow without bound or block a publisher for ever.
When a subscription's queue is full, its ``overflow`` policy decides:

- ``"drop_oldest"`` (default): the oldest queued message is dropped to make room;
- ``"drop_newest"``: the new message is dropped;
- ``"block"``: the publisher waits for room, at most ``block_timeout_s``, then drops it.

Every drop is counted in ``Subscription.dropped``. Messages reach each subscriber in the order
they were published on a topic.

Code running inside an orchestrated task (a custom provider, a callback agent) finds the bus of
its run with :func:`current_bus`. The orchestrator talks to the bus only through the
:class:`Bus` protocol, so a networked backend replaces :class:`MessageBus` without changing it:
``taskexec.distributed.NetworkBus`` (the ``workers`` extra) carries the same bus over RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict

from ._errors import (
    BusTimeoutError,
    InvalidValueError,
    NoSubscriberError,
    NotAModelError,
    NotARequestError,
)
from ._models import ExecutionResult

__all__ = (
    "Bus",
    "Envelope",
    "MessageBus",
    "Overflow",
    "Subscription",
    "TaskEvent",
    "current_bus",
)

Overflow = Literal["drop_oldest", "drop_newest", "block"]
_current_bus: contextvars.ContextVar[Bus | None] = contextvars.ContextVar(
    "taskexec_current_bus", default=None
)


def current_bus() -> Bus | None:
    """Return the bus of the orchestrated run this code is part of, or None outside one."""
    return _current_bus.get()


class TaskEvent(BaseModel):
    """A task's lifecycle event: ``task.queued``, ``task.started`` or ``task.finished``."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    result: ExecutionResult | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """A delivered message: its topic, the message, and where to reply for a request."""

    topic: str
    message: BaseModel
    reply_to: str | None = None


class Bus(Protocol):
    """What the orchestrator and agents need from a bus; :class:`MessageBus` is in-process."""

    def has_subscribers(self, topic: str) -> bool:
        """Return True if publishing to ``topic`` would reach anyone."""
        ...

    async def publish(self, topic: str, message: BaseModel, *, reply_to: str | None = None) -> int:
        """Deliver ``message`` to every subscription matching ``topic``; return how many got it."""
        ...

    def subscribe(
        self, topic: str, *, maxsize: int = ..., overflow: Overflow = ...
    ) -> Subscription:
        """Return a subscription to ``topic`` (``"a.b"``, or ``"a.*"`` for a prefix, or ``"*"``)."""
        ...

    async def request(self, topic: str, message: BaseModel, *, timeout_s: float) -> BaseModel:
        """Publish ``message`` and wait for the first reply."""
        ...

    async def reply(self, envelope: Envelope, message: BaseModel) -> None:
        """Answer a request received as ``envelope``."""
        ...


def _matches(pattern: str, topic: str) -> bool:
    if pattern == "*" or pattern == topic:
        return True
    return pattern.endswith(".*") and topic.startswith(pattern[:-1])


class Subscription:
    """A bounded queue of envelopes for one subscriber; iterate it with ``async for``.

    Close it with :meth:`close` (or use ``with``) to stop receiving.
    """

    def __init__(
        self,
        bus: MessageBus,
        pattern: str,
        *,
        maxsize: int,
        overflow: Overflow,
        block_timeout_s: float,
    ) -> None:
        if maxsize < 1:
            raise InvalidValueError(f"maxsize must be at least 1, not {maxsize}")
        self.pattern = pattern
        self.maxsize = maxsize
        self.overflow: Overflow = overflow
        self.dropped = 0
        self._bus = bus
        self._items: deque[Envelope] = deque()
        self._block_timeout_s = block_timeout_s
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    async def _offer(self, envelope: Envelope) -> bool:
        if len(self._items) >= self.maxsize:
            if self.overflow == "drop_newest":
                self.dropped += 1
                return False
            if self.overflow == "drop_oldest":
                self._items.popleft()
                self.dropped += 1
            elif not await self._wait_for_room():
                return False
        self._items.append(envelope)
        self._readable.set()
        return True

    async def _wait_for_room(self) -> bool:
        """Wait until the queue has room (True), or the timeout passes or it closes (False).

        Every blocked publisher is woken when one item is taken, so each one checks the room
        again before it appends: the queue never holds more than ``maxsize``.
        """
        deadline = asyncio.get_running_loop().time() + self._block_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                while len(self._items) >= self.maxsize and not self.closed:
                    self._writable.clear()
                    await self._writable.wait()
        except TimeoutError:
            self.dropped += 1
            return False
        return not self.closed

    async def get(self) -> Envelope:
        """Return the next envelope, waiting for one.

        Raises:
            StopAsyncIteration: The subscription was closed and is empty.
        """
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        envelope = self._items.popleft()
        self._writable.set()
        return envelope

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self

    async def __anext__(self) -> Envelope:
        return await self.get()

    def close(self) -> None:
        """Stop receiving; messages already queued can still be read."""
        if not self.closed:
            self.closed = True
            self._bus._remove(self)
            self._readable.set()
            self._writable.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MessageBus:
    """The in-process, asyncio implementation of :class:`Bus`.

    Args:
        maxsize: Default queue size of each subscription.
        overflow: Default policy when a subscription's queue is full.
        block_timeout_s: Longest a publisher waits under the ``"block"`` policy.
    """

    def __init__(
        self,
        *,
        maxsize: int = 1000,
        overflow: Overflow = "drop_oldest",
        block_timeout_s: float = 1.0,
    ) -> None:
        self.maxsize = maxsize
        self.overflow: Overflow = overflow
        self.block_timeout_s = block_timeout_s
        self._subscriptions: list[Subscription] = []
        self._callbacks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)

    def has_subscribers(self, topic: str) -> bool:
        # Asked several times per task by the orchestrator: the common no-subscriber case is
        # answered without building a generator.
        return bool(self._subscriptions) and any(
            _matches(s.pattern, topic) for s in self._subscriptions
        )

    async def publish(self, topic: str, message: BaseModel, *, reply_to: str | None = None) -> int:
        if not isinstance(message, BaseModel):
            raise NotAModelError(f"bus messages are pydantic models, not {type(message).__name__}")
        envelope = Envelope(topic, message, reply_to)
        delivered = 0
        for subscription in [s for s in self._subscriptions if _matches(s.pattern, topic)]:
            delivered += await subscription._offer(envelope)
        return delivered

    def subscribe(
        self,
        topic: str,
        *,
        maxsize: int | None = None,
        overflow: Overflow | None = None,
    ) -> Subscription:
        subscription = Subscription(
            self,
            topic,
            maxsize=maxsize or self.maxsize,
            overflow=overflow or self.overflow,
            block_timeout_s=self.block_timeout_s,
        )
        self._subscriptions.append(subscription)
        return subscription

    def on(
        self,
        topic: str,
        callback: Callable[[Envelope], Awaitable[None]],
        *,
        maxsize: int | None = None,
        overflow: Overflow | None = None,
    ) -> Subscription:
        """Call ``await callback(envelope)`` for each message on ``topic``, one at a time.

        The callback runs in a task of its own; close the returned subscription (or the bus) to
        stop it. An exception in the callback is not swallowed: it ends that subscription's task.
        """
        subscription = self.subscribe(topic, maxsize=maxsize, overflow=overflow)

        async def pump() -> None:
            async for envelope in subscription:
                await callback(envelope)

        self._callbacks.append(asyncio.create_task(pump(), name=f"bus-callback:{topic}"))
        return subscription

    async def request(self, topic: str, message: BaseModel, *, timeout_s: float) -> BaseModel:
        """Publish ``message`` on ``topic`` and return the first reply.

        Raises:
            BusTimeoutError: No reply came within ``timeout_s`` (a ``TimeoutError``).
            NoSubscriberError: Nobody subscribes to ``topic`` (a ``LookupError``).
        """
        reply_topic = self._reply_topic()
        with self.subscribe(reply_topic, maxsize=1, overflow="drop_newest") as inbox:
            if not await self.publish(topic, message, reply_to=reply_topic):
                raise NoSubscriberError(f"no subscriber for request topic {topic!r}")
            try:
                async with asyncio.timeout(timeout_s):
                    return (await inbox.get()).message
            except TimeoutError:
                raise BusTimeoutError(
                    f"no reply to the request on {topic!r} within {timeout_s:g} s"
                ) from None

    def _reply_topic(self) -> str:
        """A topic for the replies of one request, unique on this bus."""
        return f"_reply.{next(self._ids)}"

    async def reply(self, envelope: Envelope, message: BaseModel) -> None:
        if envelope.reply_to is None:
            raise NotARequestError(f"the message on {envelope.topic!r} is not a request")
        await self.publish(envelope.reply_to, message)

    def _remove(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    async def aclose(self) -> None:
        """Close every subscription and stop every callback task."""
        for subscription in list(self._subscriptions):
            subscription.close()
        callbacks, self._callbacks = self._callbacks, []
        for task in callbacks:
            task.cancel()
        await asyncio.gather(*callbacks, return_exceptions=True)
