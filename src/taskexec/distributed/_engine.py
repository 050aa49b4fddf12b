"""The workers engine: a batch's scheduling stays in the orchestrator, its tasks run on workers.

Dependencies, the concurrency bound, fail-fast, placeholders and the bus's events are the async
engine's own scheduler (:func:`~taskexec._async_engine.run_batch`); only the step that runs one
ready task differs: the task goes to a worker through RabbitMQ and its result comes back through
Redis. So a plan gets the same results on workers as in-process.

The engine belongs to one executor. It opens one connection to the cluster (a
:class:`~taskexec.distributed._dispatch.Dispatcher`: AMQP connection, channel, event queue,
Redis pool) per event loop on first use, shares it between every call made through that
executor, and closes it with the executor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import ClassVar, Literal

from .._async_engine import run_batch
from .._engines.base import (
    Batch,
    Engine,
    Job,
    StreamRunLike,
    check_run_id,
    new_run_id,
)
from .._engines.registry import EngineSpec, register_engine
from .._engines.selection import BROKER_ENV_VAR, RESULTS_ENV_VAR, Selection, env_value
from .._loops import close_with_loop
from .._models import AgentTask, EngineName, ExecutionError, ExecutionResult, ExecutionStatus
from .._plugins import wants_workers
from .._results import Progress
from ._config import Cluster, redact_url
from ._dispatch import Dispatcher
from ._wire import DeltaEvent, inputs_digest

__all__ = ("WorkersEngine", "register")

log = logging.getLogger("taskexec")


class _CallRuns:
    """The runs of ``execute()`` calls on one connection.

    Each call must behave as a run of its own (a task id called again runs again), but a new
    run per call would cost broker round trips each (listening for its results, then not). So
    calls share one run while their task ids differ; a task id seen again in it, or a run grown
    to :attr:`SIZE` tasks, starts the next run. The current run stays attached between calls;
    a run that is no longer current is detached once its last call ends.
    """

    SIZE = 10_000

    def __init__(self) -> None:
        self.run_id = ""
        self.task_ids: set[str] = set()

    def run_for(self, task_id: str) -> tuple[str, str | None]:
        """Return the run of a call of ``task_id``, and the run it replaced (if it did)."""
        retired = None
        if not self.run_id or task_id in self.task_ids or len(self.task_ids) >= self.SIZE:
            retired = self.run_id or None
            self.run_id, self.task_ids = new_run_id(), set()
        self.task_ids.add(task_id)
        return self.run_id, retired


class _OnLoop:
    """A workers engine's connection on one event loop, and the runs of its execute() calls."""

    def __init__(self, engine: WorkersEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.opening: asyncio.Future[Dispatcher] | None = None
        self.closer: AsyncGenerator[None, None] | None = None
        self.call_runs = _CallRuns()

    async def connected(self) -> Dispatcher:
        opening = self.opening
        if opening is None or (opening.done() and opening.exception() is not None):
            opening = self.opening = asyncio.ensure_future(self._open())
        return await asyncio.shield(opening)

    async def _open(self) -> Dispatcher:
        dispatcher = Dispatcher(self.engine.cluster)
        await dispatcher.open()
        self.engine.connections_opened += 1
        # An executor that is never closed still releases its connection when its loop ends.
        self.closer = close_with_loop(self._loop_ends)
        return dispatcher

    async def _loop_ends(self) -> None:
        if self.engine._loops.get(self.loop) is self:
            del self.engine._loops[self.loop]
        await self._close_dispatcher()

    async def aclose(self) -> None:
        closer, self.closer = self.closer, None
        if closer is not None:
            await closer.aclose()  # runs _loop_ends once
        else:
            await self._close_dispatcher()

    async def _close_dispatcher(self) -> None:
        opening, self.opening = self.opening, None
        if opening is None:
            return
        try:
            dispatcher = await asyncio.shield(opening)
        except Exception:
            return  # an opening that failed holds nothing to close
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                opening.cancel()  # this close was cancelled: the opening closes what it opened
                raise
            return  # the opening was cancelled (its loop ending): it closed what it had opened
        await dispatcher.aclose()


class WorkersEngine(Engine):
    """Runs tasks on the workers of a cluster.

    Args:
        cluster: The broker and results store.
    """

    name: ClassVar[str] = "workers"
    keeps_runs: ClassVar[bool] = True
    #: Streams come from the worker running the task, piece by piece (:meth:`stream_deltas`).
    stream_path: ClassVar[Literal["loop", "blocking", "engine"] | None] = "engine"
    #: Workers run tasks on the async engine, so results say ``engine="async"``.
    result_engine: ClassVar[EngineName] = "async"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # One connection per event loop (the sync bridge's, a test's, the command line's),
        # opened on first use: a connection belongs to the loop it was opened on. A plain dict
        # (the values hold their loop): entries go when their loop shuts down or is found
        # closed, and with aclose().
        self._loops: dict[asyncio.AbstractEventLoop, _OnLoop] = {}
        self._counts: dict[str, dict[str, int]] = {}
        #: How many connections this engine has opened (one per loop it ran on).
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"<WorkersEngine cluster={self.cluster!r}>"

    async def dispatcher(self) -> Dispatcher:
        """Return this loop's connection to the cluster, opening it on first use.

        Calls that start at once share one opening; a failed opening is tried again by the
        next call.

        Raises:
            ClusterUnavailableError: The broker or Redis cannot be reached.
        """
        return await self._on_loop().connected()

    def _on_loop(self) -> _OnLoop:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            for gone in [other for other in self._loops if other.is_closed()]:
                del self._loops[gone]  # closed without shutting down its async generators
            state = self._loops[loop] = _OnLoop(self, loop)
        return state

    async def aclose(self) -> None:
        """Close every connection this engine opened: on this loop directly, on other running
        loops through them (a connection can only be closed on its own loop)."""
        current = asyncio.get_running_loop()
        states, self._loops = dict(self._loops), {}
        for owner, state in states.items():
            if owner is current:
                await state.aclose()
            elif owner.is_running():
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(state.aclose(), owner))
            # A loop that is closed, or stopped for good, took its sockets with it.

    async def execute(self, job: Job) -> ExecutionResult:
        agent, mode = job.roster.resolve(job.task, job.agent, job.mode)
        state = self._on_loop()
        dispatcher = await state.connected()
        run_id = await self._call_run(state, dispatcher, job.task.id)
        try:
            outputs = dict(job.outputs) if job.outputs is not None else None
            return await dispatcher.run(run_id, job.task, agent.name, mode, outputs)
        finally:
            await dispatcher.detach(run_id)

    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        batch.check()
        run_id = check_run_id(batch.run_id) if batch.run_id is not None else new_run_id()
        dispatcher = await self.dispatcher()
        await dispatcher.attach(run_id)
        try:
            return await self._run_batch(dispatcher, run_id, batch)
        finally:
            await dispatcher.detach(run_id)

    async def _run_batch(
        self, dispatcher: Dispatcher, run_id: str, batch: Batch
    ) -> list[ExecutionResult]:
        store = dispatcher.store
        what = f"run {run_id}"
        task_ids = [t.id for t in batch.tasks]
        stored = await dispatcher.with_redis(lambda: dispatcher.stored(run_id, task_ids), what)
        before = await dispatcher.with_redis(lambda: store.counters(run_id), what)
        reused = 0
        # Tasks an earlier orchestrator of this id sent and that have no result yet: under a
        # live lease, queued, or lost. A re-run after a crash waits on them instead of sending
        # them again (and sends those nobody holds). Not after a cancellation: workers dropped
        # that run's queued tasks.
        unstored = [t for t in task_ids if t not in stored]
        sent = await dispatcher.with_redis(lambda: store.sent_many(run_id, unstored), what)
        # A re-run of a run id clears its cancellation, so that its tasks run again.
        if await dispatcher.with_redis(lambda: store.set_cancelled(run_id, False), what):
            sent = {}

        async def run_one(
            task: AgentTask, outputs: Mapping[str, str | None] | None, _: Progress
        ) -> ExecutionResult:
            nonlocal reused
            agent, mode = batch.roster.resolve(task)
            inputs = inputs_digest(task, agent.name, mode, agent.model, outputs)
            earlier = stored.get(task.id)
            if earlier is not None:
                if earlier.metadata.get("inputs") == inputs:
                    reused += 1
                    return earlier
                # Stored under this run id for other inputs (an edited plan, another plan
                # under a reused id, last week's "nightly"): it does not count; run again.
                await dispatcher.with_redis(lambda: store.forget(run_id, task.id), what)
            return await dispatcher.run(
                run_id,
                task,
                agent.name,
                mode,
                dict(outputs) if outputs else None,
                inputs,
                send=sent.get(task.id) != inputs,
            )

        try:
            results = await run_batch(batch, run_one)
        except asyncio.CancelledError:
            # Workers drop the run's queued tasks instead of running them for nobody.
            await asyncio.shield(store.set_cancelled(run_id, True))
            raise
        if any(r.status is ExecutionStatus.CANCELLED for r in results):
            await store.set_cancelled(run_id, True)
        after = await dispatcher.with_redis(lambda: store.counters(run_id), what)
        self._counts[run_id] = {
            "reused": reused,
            **{name: after[name] - before.get(name, 0) for name in after},
        }
        return results

    async def _call_run(self, state: _OnLoop, dispatcher: Dispatcher, task_id: str) -> str:
        """The run of one call (attached: the caller detaches it when done)."""
        runs = state.call_runs
        run_id, retired = runs.run_for(task_id)  # a task id called again runs again
        if retired is not None or len(runs.task_ids) == 1:
            await dispatcher.attach(run_id)  # held while it is the current run
            if retired is not None:
                await dispatcher.detach(retired)  # unbound when its last call ends
        await dispatcher.attach(run_id)
        return run_id

    async def stream_deltas(self, job: Job, run: StreamRunLike) -> AsyncGenerator[str, None]:
        """Stream a task from the worker that runs it.

        A stream is an ``execute()`` call's run (shared with other calls, see
        :class:`_CallRuns`); leaving it early (the caller's ``break``, ``aclose()``,
        cancellation) marks just its task cancelled: the worker sees the mark within
        :data:`~taskexec.distributed._worker.STREAM_CANCEL_POLL_S` and closes the request.
        The text comes as the worker publishes it; the result, as for every task, from Redis.
        If a second worker's pieces arrive (the first was lost mid-stream), the stream ends
        ``failed`` with the text already received, which is never sent twice.
        """
        agent, mode = job.roster.resolve(job.task, job.agent, job.mode)
        state = self._on_loop()
        dispatcher = await state.connected()
        run_id = await self._call_run(state, dispatcher, job.task.id)
        pieces: asyncio.Queue[DeltaEvent] = asyncio.Queue()
        outputs = dict(job.outputs) if job.outputs is not None else None
        runner = asyncio.ensure_future(
            dispatcher.run(run_id, job.task, agent.name, mode, outputs, deltas=pieces)
        )
        received: list[str] = []
        attempt: str | None = None
        expected = 0
        try:
            while not runner.done() or not pieces.empty():
                if pieces.empty():
                    waiting = asyncio.ensure_future(pieces.get())
                    try:
                        await asyncio.wait({waiting, runner}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not waiting.done():
                            waiting.cancel()
                    if not waiting.done() or waiting.cancelled():
                        continue
                    piece = waiting.result()
                else:
                    piece = pieces.get_nowait()
                attempt = attempt or piece.attempt
                if piece.attempt != attempt:
                    run.state.error = ExecutionError(
                        kind="connection",
                        message="the worker streaming the task was lost mid-stream, and the "
                        "task started again elsewhere; the text received before is kept",
                    )
                    return
                if piece.seq < expected:
                    continue  # a piece delivered twice
                expected = piece.seq + 1  # a gap is filled from the stored output below
                received.append(piece.text)
                yield piece.text
            result = runner.result()
            text = "".join(received)
            output = result.output or ""
            if result.ok and output != text:
                if output.startswith(text):
                    yield output[len(text) :]  # pieces lost on the way: the rest, once
                else:
                    run.state.error = ExecutionError(
                        kind="bad_response",
                        message="the streamed text does not match the task's stored result",
                    )
                    return
            run.call.attempts = result.attempts
            run.state.usage = result.usage
            run.state.error = result.error
            run.state.metadata.update(result.metadata)
        finally:
            if not runner.done():
                # The caller left: the worker stops within its poll, the request is closed.
                runner.cancel()
                await asyncio.shield(dispatcher.store.cancel_task(run_id, job.task.id))
            await dispatcher.detach(run_id)

    async def run_counts(self, run_id: str) -> dict[str, int]:
        """What a run of this engine did this time: results ``reused`` from an earlier run of
        the id (same inputs), task ``executions`` the workers counted, and ``duplicates``
        (results that lost the first-writer race: tasks that ran twice after a crash)."""
        return self._counts.pop(run_id, {})


#: Whether this process has said that its calls run on workers because of the environment.
_told_environment = False


def _cluster_of(selection: Selection) -> Cluster:
    global _told_environment
    assert selection.cluster is not None
    cluster = Cluster.from_env(selection.cluster.broker, selection.cluster.results)
    assert cluster is not None
    if not _told_environment and selection.cluster.broker == env_value(BROKER_ENV_VAR):
        # Once per process, not per call: someone who exported the variables for a worker
        # (docs/DISTRIBUTED.md) and then ran an in-process example should see why it waits.
        _told_environment = True
        log.warning(
            "taskexec: calls run on the workers of the cluster that %s and %s name (%s); "
            "unset them to run in this process",
            BROKER_ENV_VAR,
            RESULTS_ENV_VAR,
            redact_url(cluster.broker_url),
        )
    return cluster


def register() -> None:
    """Register the workers engine: the async engine's calls go to workers when a cluster is
    configured (the executor's ``broker_url``/``results_url``, or the environment)."""
    register_engine(
        EngineSpec(
            "workers",
            wants_workers,
            lambda selection: WorkersEngine(_cluster_of(selection)),
            rank=100,
            # The whole cluster, namespace and waits included, as read now: a setting that
            # changes between calls gets an engine (a connection) of its own.
            key=_cluster_of,
        )
    )
