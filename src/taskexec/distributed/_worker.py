"""A worker: takes tasks of the agents it defines from RabbitMQ, runs them, stores the results.

The order of one task's steps is what makes a crash lose nothing:

1. A message that is not a taskexec task of this version, or names an agent this worker does
   not define, is rejected to the dead-letter queue and never run; if it names a run and a
   task, that task is recorded as ``failed`` with the reason, so that its run does not wait.
2. A task whose result is already stored (it ran before a crash) or whose run was cancelled is
   acknowledged without running.
3. A task delivered more often than the cluster's delivery limit (every worker that took it
   died) is recorded as ``failed`` (kind ``dead_lettered``) and rejected to the dead-letter queue.
4. Otherwise it runs on this process's async engine, its result is stored (the first result per
   task wins), an event is published, and only then is the message acknowledged. A worker that
   dies before the acknowledgement leaves the message to RabbitMQ, which hands it to another
   worker the moment the connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from .._calls import Roster
from .._engines import entry
from .._engines.base import Job
from .._engines.registry import select_engine
from .._errors import ClusterUnavailableError, ConfigurationError
from .._executor import TaskExecutor
from .._models import Agent, ExecutionResult
from .._stream import create_stream
from .._tracing import trace_context_from
from ._amqp import connect_broker, declare_agent_queue, declare_events
from ._config import Cluster
from ._loops import repeat, settle
from ._store import STORED, ResultStore, WorkerInfo, connect_redis, worker_info
from ._wire import (
    CONTENT_TYPE,
    BadMessage,
    DeltaEvent,
    FinishedEvent,
    TaskMessage,
    addressee,
    decode_task,
    failure,
    routing_key,
)

__all__ = ("Worker",)

log = logging.getLogger("taskexec.worker")
#: How long stopping waits for a background step (a heartbeat's Redis write) to end.
STOP_TIMEOUT_S = 5.0
#: How often a worker tries to set up its queues before it gives up.
SUBSCRIBE_ATTEMPTS = 5
#: How long a task that failed for want of Redis waits before it goes back to the queue.
RETRY_PAUSE_S = 1.0
#: How often a worker streaming a task checks that its caller is still there.
STREAM_CANCEL_POLL_S = 0.05
#: The concurrency is the channel's prefetch count, a 16-bit field in AMQP.
MAX_CONCURRENCY = 65535
#: A worker's name goes into the registry, log lines and ``taskexec workers``: no spaces or
#: control characters (a newline would forge a log line), as a host name would have.
WORKER_NAME = re.compile(r"[A-Za-z0-9_.:@\-]{1,128}")


class Worker:
    """Serves the agents it is given to every run of a cluster, many tasks at once.

    Args:
        agents: The agents this worker runs; a task message can name only these. Keys come
            from this process's environment (or the agents' own ``api_key``).
        cluster: The broker and results store.
        concurrency: The most tasks running at once (also the broker's prefetch, so that it
            never hands this worker more than it runs).
        name: The worker's name in the registry (default: ``<host>-<pid>``).
        grace_s: On stop, how long tasks in flight may take to finish before they are handed
            back (unacknowledged, so another worker runs them).
    """

    def __init__(
        self,
        agents: Iterable[Agent],
        cluster: Cluster,
        *,
        concurrency: int = 100,
        name: str | None = None,
        grace_s: float = 10.0,
    ) -> None:
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ValueError(
                f"concurrency must be from 1 to {MAX_CONCURRENCY} (RabbitMQ's prefetch count), "
                f"not {concurrency}"
            )
        if not grace_s >= 0:  # also NaN
            raise ValueError(f"grace_s must be >= 0, not {grace_s}")
        self.executor = TaskExecutor(agents)
        if not self.executor.agents:
            raise ValueError("a worker needs at least one agent to serve")
        # Tasks taken from the queue run here, whatever cluster the environment names.
        self._parts = self.executor.parts.in_process()
        # As an orchestrator does: the pool admits as many connections as tasks run at once.
        self._parts.settings.pool.reserve(concurrency)
        self.cluster = cluster
        self.concurrency = concurrency
        # The default from the host name, made a valid name whatever the host is called.
        host = re.sub(r"[^A-Za-z0-9_.:@\-]", "-", socket.gethostname())[:100] or "host"
        self.name = name or f"{host}-{os.getpid()}"
        if not WORKER_NAME.fullmatch(self.name):
            raise ValueError(
                f"worker name {self.name!r} is not valid: use 1-128 letters, digits, '_', '.', "
                "':', '@' or '-'"
            )
        self.grace_s = grace_s
        self.done = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._store: ResultStore | None = None
        self._events: AbstractExchange | None = None
        self._started_at = time.time()
        #: Set once the worker consumes from every queue (tests and tools wait on it).
        self.ready = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """How many tasks are running now."""
        return len(self._in_flight)

    @property
    def _roster(self) -> Roster:
        return self._parts.roster

    async def serve(self, stop: asyncio.Event, hurry: asyncio.Event | None = None) -> None:
        """Take and run tasks until ``stop`` is set; then stop taking tasks, give the ones in
        flight ``grace_s`` to finish (or until ``hurry`` is set), hand back the rest, and
        return.

        Raises:
            ClusterUnavailableError: RabbitMQ or Redis cannot be reached at the start.
        """
        redis = await connect_redis(self.cluster)
        # The store first: a task can arrive the moment the first consumer is attached.
        self._store = store = ResultStore(redis, self.cluster)
        try:
            connection, consumers = await self._subscribe()
        except BaseException:
            await redis.aclose()
            raise
        beating = asyncio.Event()  # set: the heartbeat stops after its current beat

        async def beat() -> None:
            await store.register(self._info())

        heartbeat = asyncio.create_task(
            repeat(
                self.cluster.heartbeat_s,
                beating,
                beat,
                f"worker {self.name}: heartbeat",
                self.cluster.redactor(),
            )
        )
        try:
            await self._warn_if_named_twice(store)
            await store.register(self._info())
            self.ready.set()
            log.info("worker %s serving %s", self.name, ", ".join(sorted(self._roster.agents)))
            await stop.wait()
            # Stop taking tasks first, then let the ones in flight finish (or hand them back).
            for queue, tag in consumers:
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
            await self._drain(hurry)
        finally:
            beating.set()
            await settle([heartbeat], STOP_TIMEOUT_S)
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            # Closing the connection hands every unacknowledged task back to RabbitMQ.
            with contextlib.suppress(Exception):
                await connection.close()
            with contextlib.suppress(Exception):
                await store.unregister(self.name)
            await redis.aclose()
            await self.executor.aclose()

    async def _subscribe(
        self,
    ) -> tuple[AbstractRobustConnection, list[tuple[AbstractQueue, str]]]:
        """Connect, declare the queues and consume from them; retried a few times.

        RabbitMQ 3.10 can close a connection with INTERNAL_ERROR when a consumer attaches to a
        quorum queue that another client declared a moment before (its Raft member not yet
        running; seen here with two workers starting at once). Starting again a moment later
        succeeds.
        """
        for attempt in range(1, SUBSCRIBE_ATTEMPTS + 1):
            connection = await connect_broker(self.cluster, f"taskexec worker {self.name}")
            try:
                channel = await connection.channel()
                # The prefetch is the concurrency: RabbitMQ never hands this worker a task it
                # would have to hold without running (which another worker could run meanwhile).
                await channel.set_qos(prefetch_count=self.concurrency)
                # Events are advisory (the result is in Redis, and the orchestrator reads it
                # there if an event is lost): no publisher confirms, no round trip per event.
                events_channel = await connection.channel(publisher_confirms=False)
                self._events = await declare_events(events_channel, self.cluster)
                consumers: list[tuple[AbstractQueue, str]] = []
                for agent in sorted(self._roster.agents):
                    queue = await declare_agent_queue(channel, self.cluster, agent)
                    consumers.append((queue, await queue.consume(self._on_message)))
            except (aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                with contextlib.suppress(Exception):
                    await connection.close()
                cause = self.cluster.redactor()(str(exc) or type(exc).__name__)
                if attempt == SUBSCRIBE_ATTEMPTS:
                    raise ClusterUnavailableError(
                        f"worker {self.name}: RabbitMQ refused its queues {attempt} times: {cause}"
                    ) from None
                log.warning("worker %s: setting up its queues failed (%s); again", self.name, cause)
                await asyncio.sleep(0.2 * attempt)
                continue
            return connection, consumers
        raise AssertionError("unreachable")  # pragma: no cover

    async def _drain(self, hurry: asyncio.Event | None) -> None:
        if not self._in_flight:
            return
        log.info(
            "worker %s: %d task(s) in flight, waiting up to %ss",
            self.name,
            len(self._in_flight),
            self.grace_s,
        )

        async def all_finished() -> None:
            await asyncio.wait(set(self._in_flight))

        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(all_finished())]
        if hurry is not None:
            waiters.append(asyncio.create_task(hurry.wait()))
        try:
            await asyncio.wait(waiters, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _warn_if_named_twice(self, store: ResultStore) -> None:
        """Two live workers of one name share one registry entry, and hide each other there
        (``taskexec workers``, the live-worker checks): say so. Not refused, since a worker
        restarted at once after a crash finds its own earlier entry until it expires."""
        here = (socket.gethostname(), os.getpid())
        for other in await store.workers():
            if other.name == self.name and (other.host, other.pid) != here:
                log.warning(
                    "worker %s: a live worker is already registered under this name (host %s, "
                    "pid %d); give each worker its own --name, or they hide each other in the "
                    "registry",
                    self.name,
                    other.host,
                    other.pid,
                )

    def _info(self) -> WorkerInfo:
        return worker_info(
            self.name,
            socket.gethostname(),
            os.getpid(),
            self._roster.agents,
            self.concurrency,
            len(self._in_flight),
            self.done,
            self._started_at,
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            task = decode_task(message.body, message.headers, message.content_type)
            if task.agent not in self._roster.agents:
                raise BadMessage(f"agent {task.agent!r} is not defined by this worker")
        except BadMessage as exc:
            log.warning(
                "worker %s: rejected a message to the dead-letter queue: %s", self.name, exc
            )
            await self._unreadable(message, exc)
            await _settle(message.reject(requeue=False))
            return
        # Quorum queues count earlier deliveries of this message (0 or absent on the first).
        count = message.headers.get("x-delivery-count")
        deliveries = count if isinstance(count, int) else 0
        job = asyncio.create_task(self._handle(message, task, deliveries))
        self._in_flight.add(job)
        job.add_done_callback(self._in_flight.discard)

    async def _unreadable(self, message: AbstractIncomingMessage, problem: BadMessage) -> None:
        """Tell the run of a taskexec message that this worker cannot run (another version's,
        or for an agent this worker does not define) why, so that it does not wait for ever."""
        found = addressee(message.body, message.headers)
        if found is None or self._store is None:
            return
        run_id, task_id, agent = found
        result = failure(
            task_id,
            agent,
            "",
            "configuration",
            f"worker {self.name} did not run the task: {problem} (are the workers and the "
            "orchestrator on the same version of taskexec, with the same agents?)",
            worker=self.name,
            run_id=run_id,
        )
        try:
            counted = await self._store.put_first(run_id, result)
            await self._finished(run_id, task_id, result if counted is result else None)
        except Exception as exc:  # Redis away: the message is dead-lettered all the same
            log.error(
                "worker %s: could not record task %s of run %s as unreadable: %s",
                self.name,
                task_id,
                run_id,
                self._roster_redact(str(exc) or type(exc).__name__),
            )

    async def _handle(
        self, message: AbstractIncomingMessage, msg: TaskMessage, deliveries: int
    ) -> None:
        assert self._store is not None
        store, run_id, task = self._store, msg.run_id, msg.task
        try:
            if deliveries >= self.cluster.delivery_limit:
                await self._dead_letter(message, msg, deliveries)
                return
            reason = await store.claim(run_id, task.id)  # counts the execution if it runs
            if reason is not None:
                await self._skip(message, msg, reason)
                return
            try:
                job = self._parts.job(task, msg.agent, msg.mode, msg.outputs)
                # The worker's spans join the orchestrator's trace (a no-op without otel).
                with trace_context_from(msg.trace):
                    if msg.stream:
                        result = await self._stream(msg, job)
                    else:
                        result = await entry.execute(self._parts.engines, job)
            except ConfigurationError as exc:
                # This worker's own definition of the agent cannot serve the task (another mode
                # than the orchestrator's plan, say): a failed result, not a retry elsewhere.
                result = failure(
                    task.id, msg.agent, msg.mode, "configuration", f"worker {self.name}: {exc}"
                )
            recorded = {**result.metadata, "worker": self.name, "run_id": run_id}
            if msg.inputs is not None:
                recorded["inputs"] = msg.inputs
            result = result.model_copy(update={"metadata": recorded})
            counted = await store.put_first(run_id, result)
            await self._finished(msg.run_id, msg.task.id, result if counted is result else None)
            self.done += 1
            await _settle(message.ack())
        except asyncio.CancelledError:
            raise  # stopping: the message stays unacknowledged and goes back to the queue
        except Exception as exc:
            # Redis went away mid-task, say: give the task back to run again later.
            log.error(
                "worker %s: task %s of run %s: %s: %s",
                self.name,
                task.id,
                run_id,
                type(exc).__name__,
                self._roster_redact(str(exc)),
            )
            # Not at once: a Redis that is down would otherwise spin the task through the queue.
            await asyncio.sleep(RETRY_PAUSE_S)
            await _settle(message.nack(requeue=True))

    async def _stream(self, msg: TaskMessage, job: Job) -> ExecutionResult:
        """Run a task as a stream, publishing its text to the orchestrator as it arrives.

        The pieces go on the events exchange (the channel the orchestrator already listens to
        for the run, in order, no confirm per piece). The orchestrator marks the run cancelled
        when its caller leaves the stream: checked every :data:`STREAM_CANCEL_POLL_S`, and the
        request is closed then, so nothing more is read or paid for.
        """
        assert self._store is not None
        store = self._store
        stream = create_stream(job, select_engine(self._parts.engines), job.outputs)
        attempt = uuid.uuid4().hex[:12]

        async def relay() -> None:
            async with stream:
                seq = 0
                async for text in stream:
                    delta = DeltaEvent(
                        run_id=msg.run_id, task_id=msg.task.id, attempt=attempt, seq=seq, text=text
                    )
                    seq += 1
                    await self._publish_delta(delta)

        async def left() -> None:
            # Polled: the mark is set in Redis by another process. A failed read is not a
            # departure: the stream goes on, and the next read tells.
            while True:
                with contextlib.suppress(Exception):
                    if await store.is_cancelled(msg.run_id, msg.task.id):
                        return
                await asyncio.sleep(STREAM_CANCEL_POLL_S)

        relaying, watching = asyncio.create_task(relay()), asyncio.create_task(left())
        try:
            await asyncio.wait({relaying, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relaying, watching):
                task.cancel()
            await asyncio.gather(relaying, watching, return_exceptions=True)
        failed = None if relaying.cancelled() else relaying.exception()
        if failed is not None:
            raise failed  # Redis or the broker went away: handled as for any task
        return stream.result

    async def _publish_delta(self, delta: DeltaEvent) -> None:
        assert self._events is not None
        body = aio_pika.Message(delta.model_dump_json().encode(), content_type=CONTENT_TYPE)
        await self._events.publish(body, routing_key(delta.run_id, delta.task_id, "delta"))

    async def _skip(self, message: AbstractIncomingMessage, msg: TaskMessage, reason: str) -> None:
        log.info(
            "worker %s: task %s of run %s not run: %s", self.name, msg.task.id, msg.run_id, reason
        )
        if reason == STORED:  # whoever waits on it learns at once, not at its next poll
            await self._finished(msg.run_id, msg.task.id, None)
        await _settle(message.ack())

    async def _dead_letter(
        self, message: AbstractIncomingMessage, msg: TaskMessage, deliveries: int
    ) -> None:
        """Record a task every earlier taker died with, and move its message aside."""
        assert self._store is not None
        reason = await self._store.skip_reason(msg.run_id, msg.task.id)
        if reason is not None:
            await self._skip(message, msg, reason)
            return
        result = self._dead_lettered(msg, deliveries)
        counted = await self._store.put_first(msg.run_id, result)
        await self._finished(msg.run_id, msg.task.id, result if counted is result else None)
        await _settle(message.reject(requeue=False))

    async def _finished(self, run_id: str, task_id: str, first: ExecutionResult | None) -> None:
        """Announce a task's end: with its result if that was the run's first, else as a
        duplicate (whoever waits reads the result that counts from Redis)."""
        event = FinishedEvent(
            run_id=run_id,
            task_id=task_id,
            state="finished",
            worker=self.name,
            result=first,
            duplicate=first is None,
        )
        await self._publish(event)

    def _roster_redact(self, text: str) -> str:
        from ..providers import secret_redactor

        return secret_redactor(self._roster.agents.values())(self.cluster.redactor()(text))

    def _dead_lettered(self, msg: TaskMessage, deliveries: int) -> ExecutionResult:
        message = (
            f"task {msg.task.id!r} was handed to a worker {deliveries} times and no worker "
            "finished it (each one died or lost its connection while running it); its message "
            f"is in the dead-letter queue {self.cluster.dead_letter_queue!r}"
        )
        return failure(
            msg.task.id,
            msg.agent,
            msg.mode,
            "dead_lettered",
            message,
            worker=self.name,
            run_id=msg.run_id,
            deliveries=deliveries,
        )

    async def _publish(self, event: FinishedEvent) -> None:
        """Publish an event; events are advisory (results are in Redis), so a failure is logged."""
        assert self._events is not None
        body = aio_pika.Message(
            event.model_dump_json(exclude_defaults=True).encode(),
            content_type="application/json",
            message_id=event.id,
        )
        try:
            await self._events.publish(body, routing_key(event.run_id, event.task_id, event.state))
        except Exception as exc:
            log.warning(
                "worker %s: could not publish a %s event: %s",
                self.name,
                event.state,
                self._roster_redact(str(exc) or type(exc).__name__),
            )


async def _settle(acknowledgement: object) -> None:
    """Acknowledge or reject a message, tolerating a channel that reconnected meanwhile.

    After a reconnect the delivery tag belongs to a channel that is gone, and RabbitMQ has
    already requeued the message (its result, if any, is stored, so the next delivery is
    acknowledged without running). aio-pika raises here; a worker that let this escape would stop
    taking tasks (taskiq-aio-pika issue #46).
    """
    try:
        await acknowledgement  # type: ignore[misc]
    except Exception as exc:
        log.info("could not settle a delivery (the channel reconnected?): %s", exc)
