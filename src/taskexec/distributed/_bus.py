"""A message bus between processes: :class:`~taskexec.MessageBus` with RabbitMQ behind it.

Each :class:`NetworkBus` delivers to its own subscribers exactly as the in-process bus does,
and also publishes every message on the cluster's topic exchange ``<ns>.bus`` (the routing key
is the topic). It receives, on a queue of its own, the messages of other processes whose topics
match its subscriptions, and delivers them to those subscriptions. Requests and replies work
across processes: the reply topic names the requesting bus.

Messages are pydantic models. A receiver rebuilds a message as the model class it was published
as when that class is among its ``models``; any other arrives as a :class:`RemoteMessage` with
the class's name and the data, never as an instance of a class chosen by the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any, Self

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import BaseModel, ConfigDict, ValidationError

from ..bus import MessageBus, Overflow, Subscription
from ._amqp import connect_broker
from ._config import Cluster
from ._loops import settle

__all__ = ("NetworkBus", "RemoteMessage")

log = logging.getLogger("taskexec")
_CONTENT_TYPE = "application/json"


class RemoteMessage(BaseModel):
    """A message from another process whose model class this bus was not given."""

    model_config = ConfigDict(frozen=True)

    #: The sender's ``module.QualName`` of the model.
    model: str
    data: dict[str, Any]


def _name(model: type[BaseModel]) -> str:
    return f"{model.__module__}.{model.__qualname__}"


def _binding(pattern: str) -> str:
    """The AMQP topic pattern of a bus pattern (``*`` everything, ``a.*`` a prefix)."""
    if pattern == "*":
        return "#"
    if pattern.endswith(".*"):
        return pattern[:-1] + "#"
    return pattern


class NetworkBus(MessageBus):
    """A :class:`~taskexec.MessageBus` shared with every process of a cluster.

    Use as ``async with NetworkBus(cluster, models=[MyMessage]) as bus``, and hand it to
    ``ProjectOrchestrator(bus=bus)`` to share a run's lifecycle events and its agents' messages.

    Args:
        cluster: The broker (only RabbitMQ is used).
        models: The message classes to rebuild on receipt; others arrive as
            :class:`RemoteMessage`.
        maxsize, overflow, block_timeout_s: As for :class:`~taskexec.MessageBus`.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        models: Iterable[type[BaseModel]] = (),
        maxsize: int = 1000,
        overflow: Overflow = "drop_oldest",
        block_timeout_s: float = 1.0,
    ) -> None:
        super().__init__(maxsize=maxsize, overflow=overflow, block_timeout_s=block_timeout_s)
        self.cluster = cluster
        self.id = uuid.uuid4().hex
        self._models = {_name(m): m for m in models}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._bound: dict[str, int] = {}
        self._binding: set[asyncio.Task[None]] = set()
        self._reply_ids = itertools.count(1)
        self._closing = False

    async def __aenter__(self) -> Self:
        self._connection = await connect_broker(self.cluster, f"taskexec bus {self.id}")
        try:
            # on_return_raises: a message no queue is bound for (mandatory) raises, so that a
            # request to a topic nobody subscribes to fails at once, as in-process.
            self._channel = channel = await self._connection.channel(on_return_raises=True)
            self._exchange = await channel.declare_exchange(
                f"{self.cluster.namespace}.bus", aio_pika.ExchangeType.TOPIC, durable=True
            )
            self._queue = await channel.declare_queue(
                f"{self.cluster.namespace}.bus.{self.id}", exclusive=True, auto_delete=True
            )
            await self._queue.consume(self._on_message, no_ack=True)
        except BaseException:
            await self._connection.close()
            raise
        for pattern in list(self._bound):  # subscriptions made before the bus connected
            self._schedule_bind(pattern)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closing = True  # the queue goes with the connection: no unbinding one by one
        await super().aclose()
        await settle(self._binding, 5.0)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    def has_subscribers(self, topic: str) -> bool:
        # Another process may subscribe to any topic: a networked bus always publishes.
        return True

    def subscribe(
        self,
        topic: str,
        *,
        maxsize: int | None = None,
        overflow: Overflow | None = None,
    ) -> Subscription:
        subscription = super().subscribe(topic, maxsize=maxsize, overflow=overflow)
        self._bound[topic] = self._bound.get(topic, 0) + 1
        if self._bound[topic] == 1 and self._queue is not None:
            self._schedule_bind(topic)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        super()._remove(subscription)
        left = self._bound.get(subscription.pattern, 0) - 1
        if left > 0:
            self._bound[subscription.pattern] = left
            return
        self._bound.pop(subscription.pattern, None)
        if self._queue is not None and self._exchange is not None and not self._closing:
            with contextlib.suppress(RuntimeError):  # no running loop: the queue goes anyway
                asyncio.get_running_loop()
                self._track(self._queue.unbind(self._exchange, _binding(subscription.pattern)))

    async def bound(self) -> None:
        """Wait until every subscription made so far receives other buses' messages.

        ``subscribe`` returns at once and binds the bus's queue to the pattern in the
        background; a message another process publishes before the binding is in place does
        not reach it. (This bus's own messages reach its subscribers at once.)
        """
        await asyncio.gather(*self._binding)

    def _schedule_bind(self, pattern: str) -> None:
        assert self._queue is not None
        assert self._exchange is not None
        self._track(self._queue.bind(self._exchange, _binding(pattern)))

    def _track(self, step: Any) -> None:
        async def run() -> None:
            try:
                await step
            except Exception as exc:  # a binding that failed: logged, the bus goes on
                log.warning("bus %s: binding failed: %s", self.id, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._binding.add(task)
        task.add_done_callback(self._binding.discard)

    async def publish(self, topic: str, message: BaseModel, *, reply_to: str | None = None) -> int:
        """Deliver to this process's subscribers and publish to the others.

        Returns the local deliveries, plus one if the broker routed the message to another
        bus (it cannot say to how many).
        """
        delivered = await super().publish(topic, message, reply_to=reply_to)
        if self._exchange is None:
            return delivered
        # Subscriptions made just before (a request's reply topic) are bound before sending.
        await self.bound()
        headers: dict[str, Any] = {"model": _name(type(message)), "origin": self.id}
        if reply_to is not None:
            headers["reply_to"] = reply_to
        body = aio_pika.Message(
            message.model_dump_json().encode(),
            content_type=_CONTENT_TYPE,
            headers=headers,
            message_id=uuid.uuid4().hex,
        )
        try:
            await self._exchange.publish(body, topic, mandatory=True)
        except aio_pika.exceptions.DeliveryError:
            return delivered  # no bus subscribes to this topic
        # Routed. This bus's queue is bound only to its own subscribers' patterns, so when none
        # of them took it, another bus did; when some did, the count is "at least".
        return delivered or 1

    def _reply_topic(self) -> str:
        return f"_reply.{self.id}.{next(self._reply_ids)}"

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        headers = incoming.headers or {}
        if headers.get("origin") == self.id:
            return  # published here: already delivered to this process's subscribers
        name = str(headers.get("model", ""))
        reply_to = headers.get("reply_to")
        try:
            model = self._models.get(name)
            message: BaseModel = (
                model.model_validate_json(incoming.body)
                if model is not None
                else RemoteMessage.model_validate({"model": name, "data": _json(incoming.body)})
            )
        except ValidationError as exc:
            # Counted, not quoted: pydantic's text repeats the message's content.
            log.warning(
                "bus %s: dropped a message on %s: not a valid %s (%d problem(s))",
                self.id,
                incoming.routing_key,
                name,
                exc.error_count(),
            )
            return
        except ValueError:
            log.warning(
                "bus %s: dropped a message on %s: its body is not a JSON object",
                self.id,
                incoming.routing_key,
            )
            return
        topic = incoming.routing_key or ""
        await MessageBus.publish(self, topic, message, reply_to=str(reply_to) if reply_to else None)


def _json(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data
