"""RabbitMQ: the connection, and the queues and exchange a cluster declares.

Each agent has a durable quorum queue. A worker acknowledges a task only after its result is
stored, so when a worker dies (its connection drops) RabbitMQ hands its unacknowledged tasks to
another worker at once. The queue's delivery limit and dead-letter queue stop a task that kills
every worker that takes it.

Both sides declare the same queues with the same arguments (RabbitMQ refuses a declaration that
differs), and declare them through a robust connection, which re-declares them and restores the
consumers after a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)

from .._errors import ClusterUnavailableError
from ._config import Cluster, redact_url

__all__ = ("connect_broker", "declare_agent_queue", "declare_events", "queue_depth")

#: Seconds between reconnection attempts after the broker went away (aio-pika's default is 5).
RECONNECT_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 10.0
#: How long a loop must outlive a connection whose reader was cancelled for the loss to be said.
LOST_CHECK_S = 0.5
#: AMQP heartbeat proposed to the broker (RabbitMQ's default is 60 s): a broker that accepts
#: but stops answering (a frozen host, a partition that drops packets) is noticed within a few
#: periods, the connection is dropped and re-opened, and the process says so on stderr. A
#: ``heartbeat`` in the broker URL's query wins.
HEARTBEAT_S = 10

log = logging.getLogger("taskexec")


async def connect_broker(cluster: Cluster, name: str) -> AbstractRobustConnection:
    """Return a robust (reconnecting) connection to the cluster's RabbitMQ.

    Raises:
        ClusterUnavailableError: The broker cannot be reached or refuses the login; the message
            names the URL (password redacted) and the cause.
    """
    options: dict[str, Any] = {}
    if "heartbeat" not in dict(parse_qsl(urlsplit(cluster.broker_url).query)):
        options["heartbeat"] = HEARTBEAT_S
    try:
        connection: AbstractRobustConnection = await aio_pika.connect_robust(
            cluster.broker_url,
            timeout=CONNECT_TIMEOUT_S,
            reconnect_interval=RECONNECT_INTERVAL_S,
            client_properties={"connection_name": name},
            **options,
        )
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError, ValueError) as exc:
        cause = cluster.redactor()(str(exc) or type(exc).__name__)
        if "Connection.Close" in cause and "OpenOk" in cause:
            # RabbitMQ answers the open of a virtual host that does not exist, or that the user
            # may not use, by closing; aiormq reports only the unexpected frame.
            cause = (
                "RabbitMQ refused the virtual host (the URL's path): it does not exist, or "
                "the user has no permission on it"
            )
        raise ClusterUnavailableError(
            f"cannot reach RabbitMQ at {redact_url(cluster.broker_url)}: {cause}"
        ) from None
    where = redact_url(cluster.broker_url)
    redact = cluster.redactor()

    def say_lost(exc: BaseException) -> None:
        if connection.close_called:
            return
        log.warning(
            "%s: lost its connection to RabbitMQ at %s (%s); waiting for it, reconnecting "
            "every %g s",
            name,
            where,
            redact(str(exc) or type(exc).__name__),
            RECONNECT_INTERVAL_S,
        )

    def lost(_: object, exc: BaseException | None = None) -> None:
        # Closed on purpose: aio-pika's close() passes a CancelledError as the reason.
        if exc is None or connection.close_called:
            return
        if isinstance(exc, asyncio.CancelledError):
            # A reader cancelled: by aiormq's heartbeat (a broker that stopped answering), or
            # by the loop ending with the connection still open. Said only if the loop is still
            # running a moment later: an ending loop closes first, and takes the timer with it.
            asyncio.get_running_loop().call_later(LOST_CHECK_S, say_lost, exc)
            return
        say_lost(exc)

    def back(*_: object) -> None:
        log.warning("%s: connected to RabbitMQ at %s again", name, where)

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(back)
    return connection


async def declare_dead_letter_queue(channel: AbstractChannel, cluster: Cluster) -> AbstractQueue:
    """Declare the queue that rejected and dead-lettered task messages go to."""
    return await channel.declare_queue(
        cluster.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )


async def declare_agent_queue(
    channel: AbstractChannel, cluster: Cluster, agent: str
) -> AbstractQueue:
    """Declare the task queue of ``agent`` (and the dead-letter queue it sends to)."""
    await declare_dead_letter_queue(channel, cluster)
    return await channel.declare_queue(
        cluster.queue(agent),
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            # One more delivery than the runs a task may take: the worker that receives it
            # records the task as dead-lettered and rejects it to the dead-letter queue, so the
            # run learns why. RabbitMQ's own limit is the backstop should that worker die too.
            "x-delivery-limit": cluster.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": cluster.dead_letter_queue,
        },
    )


async def declare_events(channel: AbstractChannel, cluster: Cluster) -> AbstractExchange:
    """Declare the topic exchange of task events."""
    return await channel.declare_exchange(
        cluster.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )


async def queue_depth(channel: AbstractChannel, name: str) -> int | None:
    """Return how many messages wait in a queue, or None if it does not exist."""
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return None
    result = queue.declaration_result
    return int(result.message_count or 0)
