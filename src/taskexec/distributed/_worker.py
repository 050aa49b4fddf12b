"""A worker: takes tasks of the agents it defines from RabbitMQ, runs them, stores the results.

The order of one task's steps is what makes a crash lose nothing and a hand-back cost nothing:

1. A message that is not a taskexec task of this version, or names an agent this worker does
   not define, is rejected to the dead-letter queue and never run; if it names a run and a
   task, the reason is then recorded next to that task with a digest of the message (best
   effort: the rejection needs no Redis), and the orchestrator that sent that very message
   fails the task with it, so that its run does not wait.
2. The task is taken under a lease in Redis (one script: not if its run was cancelled or it
   has a result, which acknowledges it unrun; not while another taker's lease is live, which
   waits for that result or that lease's expiry; not once ``delivery_limit`` earlier takers
   died with it, which records it ``failed``, kind ``dead_lettered``, and rejects it to the
   dead-letter queue). The lease is renewed every third of ``Cluster.lease_s`` and expires
   on Redis's clock.
3. The task runs on this process's async engine (at most ``concurrency`` at once, across
   reconnects), its result is stored (the first result per task wins, and the lease is
   released in the same round trip), an event is published, and only then is the message
   acknowledged. A worker that dies before the acknowledgement leaves the message to RabbitMQ,
   which hands it to another worker the moment the connection drops; that one waits for the
   dead worker's lease to expire, and the take counts as one poison attempt.
4. A task handed back (the worker stops, or Redis cannot be reached) is published again,
   confirmed, and only then acknowledged, and its take is released: RabbitMQ's delivery count
   does not grow and no poison attempt is counted. A worker that cannot reach Redis stops
   taking tasks until Redis answers again.
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
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from redis.exceptions import RedisError, ResponseError

from .._calls import Roster
from .._engines import entry
from .._engines.base import Job
from .._engines.registry import select_engine
from .._errors import ClusterUnavailableError, ConfigurationError
from .._executor import TaskExecutor
from .._models import Agent, ExecutionResult
from .._stream import create_stream
from .._tracing import trace_context_from
from ._acks import Acknowledgements, Delivery, Part, channel_closed
from ._amqp import connect_broker, declare_agent_queue, declare_events
from ._config import Cluster
from ._loops import repeat, settle
from ._store import (
    LEASED,
    POISON,
    STORED,
    ResultStore,
    WorkerInfo,
    connect_redis,
    worker_info,
)
from ._wire import (
    BATCH_VERSION,
    CONTENT_TYPE,
    TASK_HEADER,
    TASK_VERSION,
    BadMessage,
    DeltaEvent,
    FinishedEvent,
    TaskMessage,
    addressee,
    decode_task,
    failure,
    message_digest,
    routing_key,
    split_batch,
)

__all__ = ("Worker",)

log = logging.getLogger("taskexec.worker")
#: How long stopping waits for a background step (a heartbeat's Redis write) to end.
STOP_TIMEOUT_S = 5.0
#: How often a worker tries to set up its queues before it gives up.
SUBSCRIBE_ATTEMPTS = 5
#: How often a worker that cannot reach Redis tries it again (and retries storing a result).
RETRY_PAUSE_S = 1.0
#: How often a worker streaming a task checks that its caller is still there.
STREAM_CANCEL_POLL_S = 0.05
#: The longest a task of a batch waits here for a slot before it goes back to the queue alone
#: (to a worker with a free slot, or one that joined since). It bounds how long a batch stays
#: unacknowledged: this, plus the longest task, stays well below RabbitMQ's consumer timeout.
PART_WAIT_S = 120.0
#: How often publishing a copy of a task of a batch (alone, or to the dead-letter queue) is
#: tried before the worker gives up on it.
COPY_ATTEMPTS = 3
#: Headers RabbitMQ sets on a delivery, dropped when a task is published again.
_BROKER_HEADERS = (
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
)
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
        concurrency: The most tasks running at once, and the broker's prefetch in messages: a
            lone task's message is never held without running; an orchestrator sends batches
            (up to ``Cluster.batch`` tasks) only while every slot has that many waiting.
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
        #: This process among the workers of that name: its lease tokens start with it, and
        #: its connections to Redis carry it, so that a worker that finds a lease of a process
        #: whose connections are all gone (it died) takes the task over at once.
        self._instance = f"{self.name}/{uuid.uuid4().hex[:8]}"
        #: False once Redis refused CLIENT LIST (then a dead worker's leases lapse instead).
        self._may_list_clients = True
        self.done = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        #: Finished deliveries are acknowledged together, at the end of a loop iteration.
        self._acks = Acknowledgements()
        #: Running tasks hold a slot: never more than ``concurrency`` at once, also when a
        #: reconnect hands this worker new deliveries while the old ones still run.
        self._slots = asyncio.Semaphore(concurrency)
        #: The leases this worker holds (renewed every third of Cluster.lease_s):
        #: (run, task) -> token.
        self._leases: dict[tuple[str, str], str] = {}
        #: How many tasks delivered here wait for a slot, by agent (the registry says which
        #: agents have any: their tasks are held here unleased, not lost).
        self._awaiting_slot: dict[str, int] = {}
        #: The jobs that run a task here, so that a second delivery of it waits for this one.
        self._holders: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._channel: AbstractChannel | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._paused: asyncio.Task[None] | None = None
        #: Hand-backs whose release Redis did not take: (run, task, token, ran), released when
        #: Redis answers again (else the lease expires and the take counts as an attempt).
        self._unreleased: list[tuple[str, str, str, bool]] = []
        self._stopping = False
        self._store: ResultStore | None = None
        self._events: AbstractExchange | None = None
        self._started_at = time.time()
        #: Set once the worker consumes from every queue (tests and tools wait on it).
        self.ready = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """How many tasks this worker holds now: running, or waiting for a slot or for
        another taker's lease (each is handed back if the worker stops)."""
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
        redis = await connect_redis(self.cluster, _client_name(self._instance))
        # The store first: a task can arrive the moment the first consumer is attached.
        self._store = store = ResultStore(redis, self.cluster)
        try:
            connection, self._consumers = await self._subscribe()
        except BaseException:
            await redis.aclose()
            raise
        beating = asyncio.Event()  # set: the heartbeat stops after its current beat

        async def beat() -> None:
            try:
                await self._release_late()
            finally:
                await store.register(self._info())

        async def renew() -> None:
            # Leases on a faster loop than the registry: a crashed worker's tasks run elsewhere
            # once its leases lapse (Cluster.lease_s), not after three registry heartbeats.
            if self._leases:
                await store.renew(dict(self._leases))

        heartbeat = asyncio.create_task(
            repeat(
                self.cluster.heartbeat_s,
                beating,
                beat,
                f"worker {self.name}: heartbeat",
                self.cluster.redactor(),
            )
        )
        renewing = asyncio.create_task(
            repeat(
                self.cluster.lease_s / 3,
                beating,
                renew,
                f"worker {self.name}: renewing leases",
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
            self._stopping = True
            await settle([self._paused], 0)
            await self._cancel_consumers()
            await self._drain(hurry)
        finally:
            try:
                await self._wind_down(heartbeat, renewing, beating)
            finally:
                # Even if winding down was cut short (the serving task cancelled again, its
                # loop ending), the connections and the executor's pools are closed.
                try:
                    # Closing the connection hands every unacknowledged task back to RabbitMQ
                    # (bounded: a broker that stopped answering does not hold the exit).
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), STOP_TIMEOUT_S)
                    with contextlib.suppress(Exception):
                        await store.unregister(self.name)
                finally:
                    await redis.aclose()
                    await self.executor.aclose()

    async def _wind_down(
        self, heartbeat: asyncio.Task[None], renewing: asyncio.Task[None], beating: asyncio.Event
    ) -> None:
        """Stop the heartbeat and hand back what is in flight."""
        self._stopping = True
        beating.set()
        await settle([heartbeat, renewing, self._paused], STOP_TIMEOUT_S)
        # Each job hands its task back (published again, then acknowledged) as it ends.
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        await settle(self._background, STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._acks.drain(), STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._release_late(), STOP_TIMEOUT_S)

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
                # The prefetch is the concurrency: RabbitMQ never hands this worker a lone task
                # it would have to hold without running (which another worker could run
                # meanwhile); a batch comes only while every slot has that many tasks waiting.
                await channel.set_qos(prefetch_count=self.concurrency)
                # Publisher confirms (aio-pika's default): a task handed back is acknowledged
                # only once RabbitMQ has its copy.
                self._channel = channel
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
            protocols=(TASK_VERSION, BATCH_VERSION),
            holding=[agent for agent, waiting in self._awaiting_slot.items() if waiting],
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            bodies = split_batch(message.body, message.headers, message.content_type)
        except BadMessage as exc:
            await self._refuse(message, exc)
            return
        if bodies is None:
            await self._take(message)
            return
        # A batch: each task is a part, settled on its own; the message is acknowledged once
        # every part is. A part's headers are those of a lone message of its task.
        headers = {k: v for k, v in message.headers.items() if k not in _BROKER_HEADERS}
        headers[TASK_HEADER] = TASK_VERSION
        if message.redelivered:
            # Its worker died (or lost its channel) with it. Run together again, its tasks
            # would share every taker's fate: one that kills its worker would have the others
            # counted as dying with it each time. One message each, they go their own ways.
            self._acks.delivered(message)
            self._spawn(self._unbatch(message, bodies, headers), self._background)
            return
        self._acks.delivered(message, parts=len(bodies))
        for body in bodies:
            await self._take(Part(message, body, headers, None, self._to_dead_letters))

    async def _unbatch(
        self, message: AbstractIncomingMessage, bodies: list[bytes], headers: dict[str, Any]
    ) -> None:
        """Publish each task of a redelivered batch alone (confirmed), to its agent's queue,
        then acknowledge the batch. A publish that fails is tried again a few times; then the
        batch is returned to its queue (a delivery RabbitMQ counts), not kept unacknowledged
        for as long as the channel lives. Copies already published find the task stored or
        leased, and are acknowledged unrun or wait on the lease."""
        assert self._channel is not None
        try:
            for body in bodies:
                found = addressee(body, headers)
                agent = found[2] if found is not None else ""
                # Its agent's queue (a task of an agent this worker does not serve, or one
                # that names none, goes back where the batch came from, to be refused alone).
                queue = (
                    self.cluster.queue(agent)
                    if agent in self._roster.agents
                    else (message.routing_key or self.cluster.dead_letter_queue)
                )
                message_id = f"{found[0]}:{found[1]}" if found is not None else None
                await self._publish_again(_copy(body, headers, message_id), queue)
        except Exception as exc:
            log.warning(
                "worker %s: could not send a redelivered batch's %d tasks again one by one (%s); "
                "returned it to its queue",
                self.name,
                len(bodies),
                self._roster_redact(str(exc) or type(exc).__name__),
            )
            await self._acks.settle(message, message.nack(requeue=True))
            return
        log.info(
            "worker %s: a redelivered batch's %d tasks sent again one per message",
            self.name,
            len(bodies),
        )
        self._acks.ack(message)

    async def _publish_again(self, copy: aio_pika.Message, queue: str) -> None:
        """Publish a copy of a task (confirmed), tried up to COPY_ATTEMPTS times."""
        assert self._channel is not None
        for attempt in range(1, COPY_ATTEMPTS + 1):
            try:
                await self._channel.default_exchange.publish(
                    copy, routing_key=queue, timeout=STOP_TIMEOUT_S
                )
                return
            except Exception:
                if attempt == COPY_ATTEMPTS:
                    raise
                await asyncio.sleep(RETRY_PAUSE_S)

    async def _take(self, message: Delivery) -> None:
        """Start the task a delivery carries, or refuse it."""
        try:
            task = decode_task(message.body, message.headers, message.content_type)
            if task.agent not in self._roster.agents:
                raise BadMessage(f"agent {task.agent!r} is not defined by this worker")
        except BadMessage as exc:
            await self._refuse(message, exc)
            return
        if isinstance(message, Part):
            message.message_id = f"{task.run_id}:{task.task.id}"
        else:
            self._acks.delivered(message)
        self._spawn(self._handle(message, task), self._in_flight)

    async def _refuse(self, message: Delivery, problem: BadMessage) -> None:
        log.warning(
            "worker %s: rejected a message to the dead-letter queue: %s", self.name, problem
        )
        # Rejected first: the dead-letter path needs no Redis; telling the run is best
        # effort (a run that is not told sees a task nobody holds, and sends it again).
        await self._acks.settle(message, message.reject(requeue=False))
        self._spawn(self._unreadable(message, problem), self._background)

    async def _to_dead_letters(self, part: Part) -> None:
        """Move one task of a batch to the dead-letter queue (confirmed): what rejecting a
        lone task's message makes RabbitMQ do.

        Tried a few times; then the copy is dropped, with an error on the log, as RabbitMQ
        drops a rejected message whose dead-letter queue cannot take it (its default,
        at-most-once dead-lettering). The task's run loses nothing: its failure or the reason
        it was refused is already recorded. Keeping the batch unacknowledged instead would
        hold a prefetch slot for as long as the channel lives.
        """
        try:
            copy = _copy(part.body, part.headers, part.message_id)
            await self._publish_again(copy, self.cluster.dead_letter_queue)
        except Exception as exc:
            log.error(
                "worker %s: could not move task message %s of a batch to the dead-letter queue "
                "%r (%s); dropped it",
                self.name,
                part.message_id or "(unreadable)",
                self.cluster.dead_letter_queue,
                self._roster_redact(str(exc) or type(exc).__name__),
            )

    @staticmethod
    def _spawn(work: Any, into: set[asyncio.Task[None]]) -> None:
        job: asyncio.Task[None] = asyncio.create_task(work)
        into.add(job)
        job.add_done_callback(into.discard)

    async def _unreadable(self, message: Delivery, problem: BadMessage) -> None:
        """Tell the run of a taskexec message that this worker cannot run (another version's,
        or for an agent this worker does not define) why, so that it does not wait for ever.

        Recorded next to the task with a digest of the message, not as its result: the
        orchestrator that sent this very message fails the task with it; a message that names a
        task someone else sent (a forgery, a stale copy) changes nothing, however the task's
        real execution goes.
        """
        found = addressee(message.body, message.headers)
        if found is None or self._store is None:
            return
        run_id, task_id, _ = found
        version = message.headers.get(TASK_HEADER) if isinstance(message.headers, dict) else None
        reason = (
            f"worker {self.name} did not run the task: {problem} (are the workers and the "
            "orchestrator on the same version of taskexec, with the same agents?)"
        )
        try:
            await self._store.record_rejection(
                run_id, task_id, message_digest(message.body, version), reason
            )
        except Exception as exc:  # Redis away: the message is dead-lettered all the same
            log.error(
                "worker %s: could not record task %s of run %s as unreadable: %s",
                self.name,
                task_id,
                run_id,
                self._roster_redact(str(exc) or type(exc).__name__),
            )

    async def _handle(self, message: Delivery, msg: TaskMessage) -> None:
        assert self._store is not None
        store, run_id, task = self._store, msg.run_id, msg.task
        key = (run_id, task.id)
        token = f"{self._instance}/{uuid.uuid4().hex[:16]}"
        taken = False
        dead: str | None = None  # the token of a lease whose holder is gone
        loop = asyncio.get_running_loop()
        # The longest a delivery waits on another taker's lease before it is handed back (so
        # that it does not keep a prefetch slot for the length of someone else's task): one
        # lease lifetime, by which a dead taker's lease has expired.
        give_up = loop.time() + store.lease_ttl_ms / 1000 + self.cluster.heartbeat_s
        arrived = loop.time()
        #: A hand-back of this delivery began: a cancellation does not start another.
        handing_back = False
        looked = False  # whether the lease's holder was looked up (see LEASED below)
        try:
            while True:
                local = self._holders.get(key)
                if local is not None:
                    # Delivered again while this worker runs it (its channel reconnected):
                    # this delivery settles once that run stored its result.
                    await asyncio.wait({local})
                # A batch's task waits PART_WAIT_S at most, then goes back to the queue alone.
                deadline = arrived + PART_WAIT_S if isinstance(message, Part) else None
                if not await self._wait_for_slot(msg.agent, deadline):
                    log.info(
                        "worker %s: task %s of run %s waited %.0f s for a slot; handed back",
                        self.name,
                        task.id,
                        run_id,
                        loop.time() - arrived,
                    )
                    handing_back = True
                    await self._hand_back(message, msg, None, ran=False)
                    return
                try:
                    if channel_closed(message):
                        # Its channel closed while it waited (a reconnect): RabbitMQ requeued
                        # it, and whoever it goes to runs it.
                        return
                    if self._stopping:
                        # Stopping: a task that waited for a slot (a batch's) is handed back
                        # unrun rather than started in the grace meant for running ones.
                        handing_back = True
                        await self._hand_back(message, msg, None, ran=False)
                        return
                    reason = await store.take(run_id, task.id, token, dead)
                    if reason is None:
                        taken = True
                        self._leases[key] = token
                        self._holders[key] = holder = loop.create_future()
                        try:
                            await self._run(message, msg, token)
                        finally:
                            self._leases.pop(key, None)
                            self._holders.pop(key, None)
                            holder.set_result(None)
                        return
                finally:
                    self._slots.release()
                if reason == LEASED:
                    # Delivered again (the holder's channel closed), or a copy (a redelivered
                    # batch's, sent again alone; a hand-back's). If the holder's connections
                    # to Redis are gone too, its process is (killed, say): run the task now,
                    # rather than after its lease lapses.
                    # Looked up once per delivery (a copy may wait out a live holder's whole
                    # task), and at each turn for a redelivery, as before copies existed.
                    redelivered = not isinstance(message, Part) and bool(message.redelivered)
                    gone = None
                    if redelivered or not looked:
                        looked = True
                        gone = await self._gone(run_id, task.id)
                    if gone is not None and gone != dead:
                        dead = gone
                        continue
                    if loop.time() >= give_up:
                        log.info(
                            "worker %s: task %s of run %s is held by another worker; handed back",
                            self.name,
                            task.id,
                            run_id,
                        )
                        handing_back = True
                        await self._hand_back(message, msg, None, ran=False)
                        return
                    await asyncio.sleep(self.cluster.lease_s / 3)  # a lapse is seen at once
                    continue
                if reason == POISON:
                    await self._dead_letter(message, msg)
                    return
                await self._skip(message, msg, reason)
                return
        except asyncio.CancelledError:
            # Stopping: hand the task back without it counting as a failed delivery.
            if not handing_back:
                await self._hand_back(message, msg, token, ran=taken)
            raise
        except Exception as exc:
            # Redis went away, say: hand the task back (it does not count as an attempt) and
            # stop taking tasks until Redis answers.
            log.error(
                "worker %s: task %s of run %s: %s: %s",
                self.name,
                task.id,
                run_id,
                type(exc).__name__,
                self._roster_redact(str(exc)),
            )
            self._redis_trouble()
            # Released even when the take seemed to fail: its answer may be what was lost.
            if not handing_back:
                await self._hand_back(message, msg, token, ran=taken)

    async def _wait_for_slot(self, agent: str, deadline: float | None = None) -> bool:
        """Take one of this worker's slots, counting the wait for the registry; False if
        none came by ``deadline`` (loop time)."""
        self._awaiting_slot[agent] = self._awaiting_slot.get(agent, 0) + 1
        try:
            if deadline is None or not self._slots.locked():
                await self._slots.acquire()
                return True
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                # On Python 3.11, wait_for returns the acquisition if it completed as the
                # timeout struck, and Semaphore.acquire passes a wake-up it cannot use on.
                await asyncio.wait_for(self._slots.acquire(), left)
            except TimeoutError:
                return False
            return True
        finally:
            self._awaiting_slot[agent] -= 1

    async def _gone(self, run_id: str, task_id: str) -> str | None:
        """The token of the task's lease if the worker process holding it has no connection to
        Redis left (it died: its OS closed them), else None."""
        if not self._may_list_clients or self._store is None:
            return None
        holder = await self._store.holder(run_id, task_id)
        instance = holder.rpartition("/")[0] if holder else ""
        if not instance or instance == self._instance:
            return None
        try:
            connected = await self._store.connected(_client_name(instance))
        except ResponseError as exc:
            self._may_list_clients = False
            log.warning(
                "worker %s: Redis refused CLIENT LIST (%s): the tasks of a worker that dies "
                "run elsewhere once its leases lapse (Cluster.lease_s), not at once",
                self.name,
                self._roster_redact(str(exc)),
            )
            return None
        if connected:
            return None
        log.info(
            "worker %s: task %s of run %s: its holder %s is gone; taken over",
            self.name,
            task_id,
            run_id,
            instance,
        )
        return holder

    async def _run(self, message: Delivery, msg: TaskMessage, token: str) -> None:
        """Run a task taken under ``token``'s lease, store its result, and acknowledge it."""
        assert self._store is not None
        run_id, task = msg.run_id, msg.task
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
        while True:
            # The task ran (and was paid for): keep its result until Redis takes it, rather
            # than hand the task back to run again. Stopping hands it back all the same.
            try:
                counted = await self._store.put_first(run_id, result, token)
                break
            except Exception as exc:
                log.error(
                    "worker %s: storing the result of task %s of run %s failed (%s); again",
                    self.name,
                    task.id,
                    run_id,
                    self._roster_redact(str(exc) or type(exc).__name__),
                )
                self._redis_trouble()
                await asyncio.sleep(RETRY_PAUSE_S)
        await self._finished(run_id, task.id, result if counted is result else None)
        self.done += 1
        self._acks.ack(message)

    async def _hand_back(
        self, message: Delivery, msg: TaskMessage, token: str | None, *, ran: bool
    ) -> None:
        """Give a task back to the queue without RabbitMQ counting a failed delivery.

        The take is released first (a crash after that leaves the message unacknowledged:
        RabbitMQ requeues it). Then a copy is published, confirmed, and only then is this
        delivery acknowledged: a crash between the two leaves two copies, and the second one
        finds the result stored (or the task leased) and is acknowledged unrun. Where this
        delivery's channel is already gone, RabbitMQ has requeued it: nothing to publish.
        """
        if token is not None and self._store is not None:
            try:
                await asyncio.wait_for(
                    self._store.release(msg.run_id, msg.task.id, token, ran), STOP_TIMEOUT_S
                )
            except Exception as exc:
                log.warning(
                    "worker %s: could not release task %s of run %s yet: %s",
                    self.name,
                    msg.task.id,
                    msg.run_id,
                    self._roster_redact(str(exc) or type(exc).__name__),
                )
                self._unreleased.append((msg.run_id, msg.task.id, token, ran))
        if self._channel is None or channel_closed(message):
            return
        headers = {k: v for k, v in message.headers.items() if k not in _BROKER_HEADERS}
        copy = _copy(message.body, headers, message.message_id, message.content_type)
        try:
            await self._channel.default_exchange.publish(
                copy, routing_key=self.cluster.queue(msg.agent), timeout=STOP_TIMEOUT_S
            )
        except Exception as exc:
            # Not published: leave this delivery unacknowledged; RabbitMQ requeues it when
            # the connection closes (and counts that delivery).
            log.warning(
                "worker %s: could not hand back task %s of run %s by publishing it again (%s); "
                "RabbitMQ requeues it when the connection closes",
                self.name,
                msg.task.id,
                msg.run_id,
                self.cluster.redactor()(str(exc) or type(exc).__name__),
            )
            return
        await self._acks.settle(message, message.ack())

    def _redis_trouble(self) -> None:
        """Redis failed a command: stop taking tasks until it answers again."""
        if self._paused is None and not self._stopping:
            self._paused = asyncio.create_task(self._pause_until_redis())

    async def _pause_until_redis(self) -> None:
        assert self._store is not None
        log.warning(
            "worker %s: Redis cannot be reached; not taking tasks until it answers", self.name
        )
        try:
            await self._cancel_consumers()
            while not self._stopping:
                await asyncio.sleep(RETRY_PAUSE_S)
                try:
                    await self._store.client.ping()
                    break
                except Exception:
                    continue
            if self._stopping:
                return
            with contextlib.suppress(Exception):
                await self._release_late()
            queues = [queue for queue, _ in self._consumers]
            self._consumers = [(q, await q.consume(self._on_message)) for q in queues]
            log.warning("worker %s: Redis answers again; taking tasks", self.name)
        finally:
            self._paused = None

    async def _release_late(self) -> None:
        """Release the hand-backs Redis could not take when they happened."""
        assert self._store is not None
        while self._unreleased:
            run_id, task_id, token, ran = self._unreleased[0]
            await self._store.release(run_id, task_id, token, ran)
            self._unreleased.pop(0)

    async def _cancel_consumers(self) -> None:
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)

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

        relayed = asyncio.Event()

        async def left() -> None:
            # Polled: the mark is set in Redis by another process. A failed read is not a
            # departure: the stream goes on, and the next read tells. Told to stop with an
            # event, between two reads, never cancelled in one (see _loops: a Redis command
            # cancelled midway can swallow the cancellation, and this loop went on for ever).
            while True:
                # The first look after one interval: the stream's start is not kept waiting.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(relayed.wait(), STREAM_CANCEL_POLL_S)
                if relayed.is_set():
                    return
                with contextlib.suppress(Exception):
                    if await store.is_cancelled(msg.run_id, msg.task.id):
                        return

        relaying, watching = asyncio.create_task(relay()), asyncio.create_task(left())
        try:
            await asyncio.wait({relaying, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            relayed.set()
            relaying.cancel()  # the caller left (or this task was cancelled): close the request
            await asyncio.gather(relaying, return_exceptions=True)
            await settle([watching], STOP_TIMEOUT_S)
        failed = None if relaying.cancelled() else relaying.exception()
        if failed is not None:
            raise failed  # Redis or the broker went away: handled as for any task
        return stream.result

    async def _publish_delta(self, delta: DeltaEvent) -> None:
        assert self._events is not None
        body = aio_pika.Message(delta.model_dump_json().encode(), content_type=CONTENT_TYPE)
        await self._events.publish(body, routing_key(delta.run_id, delta.task_id, "delta"))

    async def _skip(self, message: Delivery, msg: TaskMessage, reason: str) -> None:
        log.info(
            "worker %s: task %s of run %s not run: %s", self.name, msg.task.id, msg.run_id, reason
        )
        if reason == STORED:  # whoever waits on it learns at once, not at its next poll
            assert self._store is not None
            with contextlib.suppress(RedisError, OSError):  # else it reads it at its next poll
                await self._store.notify(msg.run_id, msg.task.id)
            await self._finished(msg.run_id, msg.task.id, None)
        self._acks.ack(message)

    async def _dead_letter(self, message: Delivery, msg: TaskMessage) -> None:
        """Record a task every earlier taker died with, and move its message aside."""
        assert self._store is not None
        result = self._dead_lettered(msg, self.cluster.delivery_limit)
        counted = await self._store.put_first(msg.run_id, result)
        await self._finished(msg.run_id, msg.task.id, result if counted is result else None)
        await self._acks.settle(message, message.reject(requeue=False))

    async def _finished(self, run_id: str, task_id: str, first: ExecutionResult | None) -> None:
        """Announce a task's end on the events exchange, if the cluster asks for events
        (``Cluster.events``, for dashboards): with its result if that was the run's first, else
        as a duplicate. Orchestrators do not need it: the script that stored the result
        published the task's id on the run's Redis channel."""
        if not self.cluster.events:
            return
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
            f"task {msg.task.id!r} was taken by a worker {deliveries} times and no worker "
            "finished it (each one died, or lost Redis for longer than its lease, while running "
            "it; a worker that was stopped or handed it back is not counted); its message "
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


def _copy(
    body: bytes,
    headers: dict[str, Any],
    message_id: str | None,
    content_type: str | None = CONTENT_TYPE,
) -> aio_pika.Message:
    """A copy of a task's message, to publish again (persistent, as the original was)."""
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
    )


def _client_name(instance: str) -> str:
    """The name of a worker process's connections to Redis."""
    return f"taskexec-worker/{instance}"
