"""What ``taskexec workers`` shows: the live workers, and the tasks waiting for each agent."""

from __future__ import annotations

import contextlib

from ._amqp import connect_broker, queue_depth
from ._config import Cluster
from ._store import ResultStore, WorkerInfo, connect_redis

__all__ = ("cluster_status",)


async def cluster_status(cluster: Cluster) -> tuple[list[WorkerInfo], dict[str, int]]:
    """Return the live workers and, for each agent they serve, how many tasks wait in its queue.

    Raises:
        ClusterUnavailableError: RabbitMQ or Redis cannot be reached.
    """
    redis = await connect_redis(cluster)
    try:
        workers = await ResultStore(redis, cluster).workers()
    finally:
        await redis.aclose()
    connection = await connect_broker(cluster, "taskexec workers")
    depths: dict[str, int] = {}
    try:
        for agent in sorted({a for w in workers for a in w.agents}):
            # A passive declaration that fails closes its channel: one channel per queue.
            channel = await connection.channel()
            depth = await queue_depth(channel, cluster.queue(agent))
            if depth is not None:
                depths[agent] = depth
            with contextlib.suppress(Exception):
                await channel.close()
    finally:
        await connection.close()
    return workers, depths
