"""An orchestrator's side of distributed runs: sends ready tasks to workers, collects results.

One :class:`Dispatcher` is one connection to the cluster (AMQP connection, channel, event queue,
Redis pool and one subscription), opened once by the workers engine of an executor and shared by
every run and every ``execute()`` call made through it. Results are always read from Redis; two
things say when. The script that stores a result publishes the task's id on its run's Redis
channel, to which the dispatcher subscribes (the fast path; the reads of notifications that
arrive together are one MGET). Every ``poll_s``, the dispatcher also reads Redis for the tasks
it still waits on, which covers notifications lost while a connection was down, and checks
that each waiting task's agent still has a live
worker, and that someone holds each waiting task: a task with no live lease, no message
queued for its agent and no worker holding tasks of its agent that wait for a slot, for
``orphan_after_s``, is sent again (its message was lost); a copy sent in vain is acknowledged
unrun by the worker that gets it.

Tasks that become ready together for one agent while more of its tasks wait than its live
workers have slots go in one message (a batch, see :func:`batch_size`): those tasks would wait
in the queue anyway, and RabbitMQ's work, the publisher confirm, the delivery and the
acknowledgement are then paid once per batch instead of once per task. A worker runs and
settles each task of a batch on its own. Streamed tasks go alone, and so do the tasks of an
agent that a worker of an earlier version (which refuses batches) serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from .._engines.base import new_run_id
from .._errors import ClusterUnavailableError
from .._models import AgentTask, ExecutionResult, Mode
from .._tracing import inject_trace_context
from ._amqp import connect_broker, declare_agent_queue, declare_events, queue_depth
from ._config import Cluster
from ._loops import repeat, settle
from ._store import REDIS_COMMAND_TIMEOUT_S, ResultStore, connect_redis
from ._wire import (
    BATCH_VERSION,
    CONTENT_TYPE,
    TASK_HEADER,
    TASK_VERSION,
    DeltaEvent,
    FinishedEvent,
    TaskMessage,
    failure,
    message_digest,
)

# new_run_id: from the engine seam, where run ids are
__all__ = ("Dispatcher", "batch_size", "new_run_id")

log = logging.getLogger("taskexec")
#: How long a publish is retried while the broker connection is being restored.
PUBLISH_RETRY_S = 60.0
#: The most task messages out at once and not yet confirmed by RabbitMQ.
PUBLISH_WINDOW = 256
#: The most bytes of task messages in one message.
BATCH_BYTES = 1024 * 1024
_SEEN_EVENTS = 10_000
CLOSE_TIMEOUT_S = 5.0
#: How long a step of a run that needs Redis waits for it to come back before it gives up.
REDIS_WAIT_S = 60.0
#: How often the notification listener wakes when nothing arrives (to see that it is closing).
LISTEN_WAKE_S = 1.0
_T = TypeVar("_T")


#: A task of a run: (run id, task id).
TaskKey = tuple[str, str]


def batch_size(waiting: int, slots: int, most: int) -> int:
    """How many tasks of an agent one message may carry, with ``waiting`` of its tasks not
    back yet and ``slots`` tasks of it running at once on its live workers.

    One: while every waiting task can run at once, each goes on its own, to whichever worker
    is free. Beyond that, each slot has ``waiting // slots`` tasks to run one after another,
    and a message of that many moves tasks from the queue to a worker that would have run
    them in turn anyway (at most ``most``, ``Cluster.batch``; one with no worker known).
    """
    if slots <= 0:
        return 1
    return max(1, min(most, waiting // slots))


@dataclass(slots=True)
class _Outgoing:
    """A task message to publish with the others that are ready in the same loop iteration."""

    message: TaskMessage
    body: bytes
    sent: asyncio.Future[bool]


@dataclass(slots=True)
class _Waiting:
    """A task sent (or re-attached to) and not yet back."""

    future: asyncio.Future[ExecutionResult]
    agent: str
    mode: Mode
    message: TaskMessage
    #: The message as published.
    body: bytes
    #: When it was sent (loop time): its result is looked for in Redis from a poll later.
    sent_at: float
    #: When it was last seen held (a live lease) or sent: how long nobody has held it.
    held_at: float


class Dispatcher:
    """Sends tasks of any number of runs to the cluster's workers and hands back their results.

    Use as ``async with Dispatcher(cluster) as dispatcher``; call :meth:`attach` once per run
    before its first :meth:`run`.

    Args:
        cluster: The broker and results store.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        #: Tasks sent and not yet back.
        self._pending: dict[TaskKey, _Waiting] = {}
        #: How many tasks this dispatcher sent again because nobody held them.
        self.resent = 0
        #: How many task messages RabbitMQ took from this dispatcher (a batch is one).
        self.published = 0
        self._attached: dict[str, asyncio.Future[Any]] = {}
        self._users: dict[str, int] = {}
        #: Where the pieces of streamed tasks go, by task.
        self._deltas: dict[TaskKey, asyncio.Queue[DeltaEvent]] = {}
        self._queue: AbstractQueue | None = None
        #: Tasks whose event arrived and whose result is to be read from Redis.
        self._wanted: set[TaskKey] = set()
        self._reading: asyncio.Task[None] | None = None
        self._events: aio_pika.abc.AbstractExchange | None = None
        self._served: set[str] = set()
        #: How many tasks of each agent its live workers run at once, together.
        self._slots: dict[str, int] = {}
        #: Agents with a live worker that holds tasks of theirs waiting for its slots (a
        #: batch's, unleased): their tasks are not orphans for that.
        self._holding: set[str] = set()
        #: Agents whose live workers all read batches.
        self._batched: set[str] = set()
        #: How many tasks of each agent were handed to :meth:`run` and are not back.
        self._waiting: dict[str, int] = {}
        #: Task messages to publish at the end of this loop iteration, by agent.
        self._outbox: dict[str, list[_Outgoing]] = {}
        self._served_at = 0.0
        self._unserved_since: dict[str, float] = {}
        self._declared: dict[str, asyncio.Future[AbstractQueue]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._redis: Redis | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._poller: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._window = asyncio.Semaphore(PUBLISH_WINDOW)
        self._background: set[asyncio.Future[object]] = set()
        self._pubsub: PubSub | None = None
        self._closing = asyncio.Event()
        self.store: ResultStore

    async def __aenter__(self) -> Dispatcher:
        await self.open()
        return self

    async def open(self) -> None:
        """Connect to the broker and the results store, and start listening for results."""
        self._redis = await connect_redis(self.cluster)
        self.store = ResultStore(self._redis, self.cluster)
        try:
            name = f"taskexec orchestrator {os.getpid()}"
            self._connection = await connect_broker(self.cluster, name)
            self._channel = channel = await self._connection.channel()
            self._events = await declare_events(channel, self.cluster)
            # Named here (not by the server), so that the robust connection can declare it again
            # (with its bindings) after a reconnect; exclusive and auto-deleted, so it goes
            # when this connection does.
            self._queue = queue = await channel.declare_queue(
                f"{self.cluster.namespace}.orchestrator.{uuid.uuid4().hex[:12]}",
                exclusive=True,
                auto_delete=True,
            )
            await queue.consume(self._on_event, no_ack=True)
            await self._read_registry()
            await self._subscribe()
        except BaseException:
            await self.aclose()
            raise
        self._poller = asyncio.create_task(self._poll())
        self._listener = asyncio.create_task(self._listen())

    async def _subscribe(self) -> None:
        """Subscribe to every run's notification channel, and wait until Redis confirms it:
        a result stored after this is announced here (one subscription, whatever the runs)."""
        assert self._redis is not None
        self._pubsub = pubsub = self._redis.pubsub()
        await pubsub.psubscribe(self.store.done_pattern)
        while True:
            message = await pubsub.get_message(timeout=REDIS_COMMAND_TIMEOUT_S)
            if message is None:
                raise ClusterUnavailableError("Redis did not confirm a subscription")
            if message["type"] == "psubscribe":
                return

    async def _listen(self) -> None:
        """Read the notifications of stored results: each wakes the task that waits on it,
        which reads the result from the store (a notification is not a result). A gap while
        the subscription's connection is down is made up by the poller."""
        assert self._pubsub is not None
        prefix = self.store.done_channel("")
        failing = False
        while not self._closing.is_set():
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=LISTEN_WAKE_S
                )
            except (RedisError, OSError) as exc:
                if not failing:
                    failing = True
                    log.warning(
                        "lost the subscription to results in Redis (%s); reading them every "
                        "%g s until it is back",
                        self.cluster.redactor()(str(exc) or type(exc).__name__),
                        self.cluster.poll_s,
                    )
                await asyncio.sleep(min(self.cluster.poll_s, 0.5))
                continue
            failing = False
            if message is None:
                continue
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode(errors="replace")
            try:
                task_ids = json.loads(message["data"])
            except ValueError:
                continue  # not a worker's: a notification reads the store, nothing more
            if isinstance(task_ids, dict) and isinstance(task_ids.get("rejected"), list):
                run_id = channel.removeprefix(prefix)
                rejected = [(run_id, t) for t in task_ids["rejected"] if isinstance(t, str)]
                self._spawn(self._fail_rejected(rejected))
            elif isinstance(task_ids, list):
                run_id = channel.removeprefix(prefix)
                for task_id in task_ids:
                    if isinstance(task_id, str):
                        self._want((run_id, task_id))

    async def attach(self, run_id: str) -> None:
        """Listen for the results of ``run_id``, until as many :meth:`detach` calls.

        The first attachment binds the run's events to this connection's queue (one broker
        round trip, shared by the calls that attach at once); the last detachment unbinds them,
        so that a long-lived connection does not collect a binding per run it ever served.
        """
        self._users[run_id] = self._users.get(run_id, 0) + 1
        attached = self._attached.get(run_id)
        if attached is None or (attached.done() and attached.exception() is not None):
            assert self._queue is not None
            assert self._events is not None
            attached = self._attached[run_id] = asyncio.ensure_future(
                self._queue.bind(self._events, routing_key=f"run.{run_id}.#")
            )
        try:
            await asyncio.shield(attached)
        except BaseException:
            await self.detach(run_id)
            raise

    @property
    def attached_runs(self) -> int:
        """How many runs this connection listens for now (each is a binding at the broker)."""
        return len(self._attached)

    async def detach(self, run_id: str) -> None:
        """Stop listening for ``run_id`` once nobody attached to it any more."""
        users = self._users.get(run_id, 0) - 1
        if users > 0:
            self._users[run_id] = users
            return
        self._users.pop(run_id, None)
        attached = self._attached.pop(run_id, None)
        if attached is None or self._closing.is_set():
            return
        if not attached.done() or attached.exception() is not None:
            attached.cancel()
            return
        assert self._queue is not None
        assert self._events is not None
        try:
            await self._queue.unbind(self._events, routing_key=f"run.{run_id}.#")
        except Exception as exc:  # the binding goes with the queue when the connection does
            log.info("could not stop listening for run %s: %s", run_id, exc)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening and close the connections (once; again is a no-op)."""
        if self._closing.is_set():
            return
        self._closing.set()
        try:
            await self._stop()
        finally:
            # Whatever stopping raised (a close cancelled as its loop ends), the connections
            # are closed: a later aclose() is a no-op.
            try:
                if self._connection is not None:
                    # Bounded: closing must not keep a finished run waiting on a broker that
                    # went away.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT_S)
            finally:
                if self._redis is not None:
                    await self._redis.aclose()

    async def _stop(self) -> None:
        # The listener only reads (a wait of up to LISTEN_WAKE_S): cancelled, not waited for.
        if self._listener is not None:
            self._listener.cancel()
        await settle([self._poller, self._listener, self._reading], CLOSE_TIMEOUT_S)
        for task in list(self._background):
            task.cancel()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pubsub.aclose(), CLOSE_TIMEOUT_S)  # type: ignore[no-untyped-call,unused-ignore]

    async def with_redis(self, step: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run a step that needs Redis, waiting up to ``REDIS_WAIT_S`` for a Redis that cannot
        be reached to come back (said once on stderr); then its error is raised."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REDIS_WAIT_S
        said = False
        while True:
            try:
                return await step()
            except (RedisError, OSError) as exc:
                if loop.time() >= give_up:
                    raise
                if not said:
                    said = True
                    log.warning(
                        "%s: Redis cannot be reached (%s); waiting up to %g s for it",
                        what,
                        self.cluster.redactor()(str(exc) or type(exc).__name__),
                        REDIS_WAIT_S,
                    )
                await asyncio.sleep(min(self.cluster.poll_s, 0.5))

    async def stored(self, run_id: str, task_ids: Sequence[str]) -> dict[str, ExecutionResult]:
        """Return the results a run already has (a re-run with the same run id)."""
        return await self.store.get_many(run_id, task_ids)

    async def run(
        self,
        run_id: str,
        task: AgentTask,
        agent: str,
        mode: Mode,
        outputs: dict[str, str | None] | None = None,
        inputs: str | None = None,
        deltas: asyncio.Queue[DeltaEvent] | None = None,
        *,
        send: bool = True,
    ) -> ExecutionResult:
        """Send a task of an attached run to a worker that serves ``agent``; return the run's
        result for it.

        With ``send=False`` the task is not sent: an earlier orchestrator of the run sent it
        (it crashed), and this one waits for its result; should nobody hold it (no live lease,
        nothing queued) for ``orphan_after_s``, it is sent after all.
        """
        loop = asyncio.get_running_loop()
        key = (run_id, task.id)
        if not await self._wait_for_worker(agent):
            return await self._fail(key, agent, mode, "no_worker", self._no_worker(agent))
        future: asyncio.Future[ExecutionResult] = loop.create_future()
        # Built from parts validated already (the run id, the roster's agent and mode, the
        # task): not validated again (the task's validators measured 2% of a large run's CPU).
        message = TaskMessage.model_construct(
            run_id=run_id,
            agent=agent,
            mode=mode,
            task=task,
            outputs=outputs,
            inputs=inputs,
            trace=inject_trace_context() or None,  # the task span this run_one runs in
            stream=deltas is not None,
        )
        now = loop.time()
        body = message.encode()
        self._pending[key] = _Waiting(future, agent, mode, message, body, now, now)
        self._waiting[agent] = self._waiting.get(agent, 0) + 1
        if deltas is not None:
            self._deltas[key] = deltas  # the worker streams the reply here, piece by piece
        try:
            if send:
                if inputs is not None:
                    # Before the publish: a re-run of the id after a crash here waits on the
                    # task instead of sending it again (and sends it if nobody holds it).
                    # Best effort: without the mark, such a re-run sends a copy, which the
                    # lease and the store dedupe.
                    with contextlib.suppress(RedisError, OSError):
                        await self.store.mark_sent(run_id, task.id, inputs)
                if not await self._publish(message, body):
                    reason = "the broker did not take the task (its connection is down)"
                    return await self._fail(key, agent, mode, "connection", reason)
            else:
                # Its result may have been stored before this run attached to its events (if
                # Redis is away now, the poller reads it later).
                with contextlib.suppress(RedisError, OSError):
                    await self._fetch([key])
            return await future
        finally:
            self._pending.pop(key, None)
            self._deltas.pop(key, None)
            self._waiting[agent] -= 1

    def _no_worker(self, agent: str) -> str:
        return (
            f"no live worker serves agent {agent!r} (waited {self.cluster.no_worker_wait_s:g} s); "
            f"start one with: taskexec worker AGENTS_FILE (a file that defines {agent!r})"
        )

    async def _wait_for_worker(self, agent: str) -> bool:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.cluster.no_worker_wait_s
        while agent not in self._served:
            left = give_up - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(self.cluster.poll_s, left))
            # However many tasks wait, the registry is read once per poll interval.
            if loop.time() - self._served_at >= self.cluster.poll_s:
                self._served_at = loop.time()
                with contextlib.suppress(RedisError, OSError):  # Redis away: the wait goes on
                    await self._read_registry()
        return True

    async def _read_registry(self) -> None:
        """Read which agents live workers serve, and with how many slots in all."""
        slots: dict[str, int] = {}
        lone: set[str] = set()
        holding: set[str] = set()
        for worker in await self.store.workers():
            for agent in worker.agents:
                slots[agent] = slots.get(agent, 0) + worker.concurrency
            if BATCH_VERSION not in worker.protocols:
                lone.update(worker.agents)  # an earlier worker: it would refuse a batch
            holding.update(worker.holding)
        self._slots = slots
        self._served = set(slots)
        self._batched = self._served - lone
        self._holding = holding

    async def _publish(self, message: TaskMessage, encoded: bytes) -> bool:
        """Publish a task message, in one message with the other tasks of its agent that are
        ready in this loop iteration, as many as :func:`batch_size` allows; return whether
        RabbitMQ took it."""
        if message.stream:
            # A stream's first piece is not kept waiting behind a batch's other tasks.
            return await self._publish_now(message.agent, [encoded], message)
        loop = asyncio.get_running_loop()
        outbox = self._outbox.setdefault(message.agent, [])
        if not outbox:
            # After the callbacks of this iteration, which may add to it.
            loop.call_soon(self._flush, message.agent)
        sent: asyncio.Future[bool] = loop.create_future()
        outbox.append(_Outgoing(message, encoded, sent))
        return await sent

    def _flush(self, agent: str) -> None:
        # A task whose run was cancelled meanwhile is not sent.
        outgoing = [o for o in self._outbox.pop(agent, []) if not o.sent.done()]
        most = batch_size(
            self._waiting.get(agent, 0),
            self._slots.get(agent, 0),
            self.cluster.batch if agent in self._batched else 1,
        )
        batch: list[_Outgoing] = []
        size = 0
        for item in outgoing:
            if batch and (len(batch) >= most or size + len(item.body) > BATCH_BYTES):
                self._spawn(self._send(agent, batch))
                batch, size = [], 0
            batch.append(item)
            size += len(item.body) + 1
        if batch:
            self._spawn(self._send(agent, batch))

    async def _send(self, agent: str, batch: list[_Outgoing]) -> None:
        try:
            sent = await self._publish_now(agent, [item.body for item in batch], batch[0].message)
        except BaseException:
            for item in batch:
                if not item.sent.done():
                    item.sent.set_result(False)
            raise
        for item in batch:
            if not item.sent.done():
                item.sent.set_result(sent)

    async def _publish_now(self, agent: str, bodies: list[bytes], first: TaskMessage) -> bool:
        """Publish one message of one task (or several, as a batch), confirmed; retried while
        the broker connection is being restored."""
        assert self._channel is not None
        lone = len(bodies) == 1
        body = aio_pika.Message(
            bodies[0] if lone else b"\n".join(bodies),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={TASK_HEADER: TASK_VERSION if lone else BATCH_VERSION},
            message_id=f"{first.run_id}:{first.task.id}" + ("" if lone else f"+{len(bodies) - 1}"),
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + PUBLISH_RETRY_S
        while True:
            try:
                await self._declare(agent)
                # With publisher confirms (aio-pika's default), this returns once RabbitMQ
                # has the message, persisted in the quorum queue. At most PUBLISH_WINDOW
                # unconfirmed at once: aiormq looks through every unconfirmed publish for each
                # confirmation frame (a run that sent 5,000 tasks at once spent a tenth of its
                # CPU there), and a window of a few hundred keeps the broker just as busy.
                async with self._window:
                    await self._channel.default_exchange.publish(
                        body, routing_key=self.cluster.queue(agent)
                    )
                self.published += 1
                return True
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                if loop.time() >= give_up:
                    log.error(
                        "run %s: cannot publish task %s%s: %s",
                        first.run_id,
                        first.task.id,
                        "" if lone else f" and {len(bodies) - 1} more",
                        self.cluster.redactor()(str(exc) or type(exc).__name__),
                    )
                    return False
                # The robust connection is reconnecting; try again in a moment.
                await asyncio.sleep(0.5)

    async def _declare(self, agent: str) -> None:
        """Declare an agent's queue once, however many tasks are sent to it at once."""
        declared = self._declared.get(agent)
        if declared is None or (declared.done() and declared.exception() is not None):
            assert self._channel is not None
            declared = asyncio.ensure_future(
                declare_agent_queue(self._channel, self.cluster, agent)
            )
            self._declared[agent] = declared
        await asyncio.shield(declared)

    async def _fail(
        self, key: TaskKey, agent: str, mode: Mode, kind: str, message: str
    ) -> ExecutionResult:
        """Record a failure the orchestrator itself saw; a worker's result, if first, wins."""
        run_id, task_id = key
        result = failure(task_id, agent, mode, kind, message, run_id=run_id)
        try:
            return await self.with_redis(
                lambda: self.store.put_first(run_id, result), f"run {run_id}: task {task_id}"
            )
        except (RedisError, OSError):
            return result  # not stored: the run still ends, with this result

    def _resolve(self, key: TaskKey, result: ExecutionResult) -> None:
        entry = self._pending.get(key)
        if entry is not None and not entry.future.done():
            entry.future.set_result(result)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        if (message.routing_key or "").endswith(".delta"):
            self._on_delta(message.body)
            return
        try:
            event = FinishedEvent.model_validate_json(message.body)
        except ValidationError:
            log.warning("ignored an event that is not a taskexec event")
            return
        if event.id in self._seen:
            return
        self._seen[event.id] = None
        if len(self._seen) > _SEEN_EVENTS:
            self._seen.popitem(last=False)
        # An event is a notification, never the result: anyone who can publish on the events
        # exchange could forge one.
        self._want((event.run_id, event.task_id))

    def _want(self, key: TaskKey) -> None:
        """Read a task's result from Redis, where the first one that a worker stored is the one
        that counts; the reads of notifications that arrive together are one MGET."""
        if key not in self._pending:
            return
        self._wanted.add(key)
        if self._reading is None:
            self._reading = asyncio.create_task(self._read_wanted())

    def _spawn(self, work: Awaitable[object]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fail_rejected(self, keys: Sequence[TaskKey]) -> set[TaskKey]:
        """Fail the waiting tasks whose very message a worker could not read (its record's
        digest is the one this dispatcher published); return them. Anything else recorded
        for a task (a forged or stale message naming it) is ignored."""
        by_run: dict[str, list[str]] = {}
        for run_id, task_id in keys:
            if (run_id, task_id) in self._pending:
                by_run.setdefault(run_id, []).append(task_id)
        failed: set[TaskKey] = set()
        for run_id, task_ids in by_run.items():
            try:
                found = await self.store.rejections(run_id, task_ids)
            except (RedisError, OSError):
                continue  # the orphan check looks again
            for task_id, (digest, reason) in found.items():
                entry = self._pending.get((run_id, task_id))
                # A worker's record fails the task only if it is of this very message.
                if (
                    entry is None
                    or entry.future.done()
                    or message_digest(entry.body, TASK_VERSION) != digest
                ):
                    continue
                result = await self._fail(
                    (run_id, task_id), entry.agent, entry.mode, "configuration", reason
                )
                self._resolve((run_id, task_id), result)
                failed.add((run_id, task_id))
        return failed

    def _on_delta(self, body: bytes) -> None:
        try:
            delta = DeltaEvent.model_validate_json(body)
        except ValidationError:
            log.warning("ignored a delta event that is not a taskexec event")
            return
        queue = self._deltas.get((delta.run_id, delta.task_id))
        if queue is not None:
            queue.put_nowait(delta)

    async def _read_wanted(self) -> None:
        keys: list[TaskKey] = []
        try:
            while self._wanted:
                await asyncio.sleep(0)  # the events already received join this read
                keys, self._wanted = list(self._wanted), set()
                await self._fetch(keys)
        except Exception as exc:
            # Redis is away: the poller reads these tasks again every poll_s.
            log.warning(
                "reading %d result(s) from Redis failed: %s",
                len(keys),
                self.cluster.redactor()(str(exc) or type(exc).__name__),
            )
        finally:
            self._reading = None

    async def _fetch(self, keys: Sequence[TaskKey]) -> None:
        by_run: dict[str, list[str]] = {}
        for run_id, task_id in keys:
            by_run.setdefault(run_id, []).append(task_id)
        for run_id, task_ids in by_run.items():
            for task_id, result in (await self.stored(run_id, task_ids)).items():
                self._resolve((run_id, task_id), result)

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()

        async def step() -> None:
            await self._poll_once(loop.time())

        await repeat(
            self.cluster.poll_s,
            self._closing,
            step,
            "polling Redis for results",
            self.cluster.redactor(),
        )

    async def _poll_once(self, now: float) -> None:
        # Results whose event was missed (sent while this connection was down).
        waiting = [
            t for t, entry in self._pending.items() if now - entry.sent_at >= self.cluster.poll_s
        ]
        if waiting:
            await self._fetch(waiting)
            await self._resend_orphans([t for t in waiting if t in self._pending], now)
        # Tasks whose agent lost its last worker: fail them after the allowed wait.
        await self._read_registry()
        served = self._served
        agents = {entry.agent for entry in self._pending.values()}
        for agent in agents:
            if agent in served:
                self._unserved_since.pop(agent, None)
                continue
            since = self._unserved_since.setdefault(agent, now)
            if now - since < self.cluster.no_worker_wait_s:
                continue
            for key, entry in list(self._pending.items()):
                if entry.agent == agent and not entry.future.done():
                    failed = await self._fail(
                        key, agent, entry.mode, "no_worker", self._no_worker(agent)
                    )
                    self._resolve(key, failed)

    async def _resend_orphans(self, keys: Sequence[TaskKey], now: float) -> None:
        """Send again the tasks nobody has held for ``orphan_after_s``: no live lease, and no
        message queued for their agent (its message was lost: dead-lettered by RabbitMQ's own
        delivery limit, say, or never published by an orchestrator that crashed)."""
        # Only the tasks not seen held for that long are looked up (one MGET per run), not
        # every waiting task at every poll.
        due = [
            key
            for key in keys
            if (entry := self._pending.get(key)) is not None
            and now - entry.held_at >= self.cluster.orphan_after_s
        ]
        by_run: dict[str, list[str]] = {}
        for run_id, task_id in due:
            by_run.setdefault(run_id, []).append(task_id)
        for run_id, task_ids in by_run.items():
            for task_id in await self.store.leased(run_id, task_ids):
                entry = self._pending.get((run_id, task_id))
                if entry is not None:
                    entry.held_at = now
        orphans = [
            (key, entry)
            for key in due
            if (entry := self._pending.get(key)) is not None and entry.held_at != now
        ]
        # A task nobody holds because a worker could not read its message (a lost notice).
        refused = await self._fail_rejected([key for key, _ in orphans])
        orphans = [(key, entry) for key, entry in orphans if key not in refused]
        queued: dict[str, int | None] = {}
        for (run_id, task_id), entry in orphans:
            if entry.agent not in queued:
                assert self._channel is not None
                # A worker that holds tasks of the agent waiting for its slots (a batch's,
                # unleased) may hold this one: as good as queued.
                queued[entry.agent] = entry.agent in self._holding or await queue_depth(
                    self._channel, self.cluster.queue(entry.agent)
                )
            if queued[entry.agent]:
                continue  # it may be among them: look again once the queue has drained
            entry.held_at = now
            log.warning(
                "run %s: no worker has held task %s for %g s and none has it queued; sending "
                "it again",
                run_id,
                task_id,
                self.cluster.orphan_after_s,
            )
            self.resent += 1
            # On its own: a worker of an earlier version, which refuses batches, runs it.
            await self._publish_now(entry.agent, [entry.body], entry.message)
