"""Streaming one task: :class:`TaskStream`, and how each engine opens one.

``TaskExecutor.stream(task)`` returns a :class:`TaskStream` at once; nothing is sent until it is
iterated. The engine that runs it is the one the engine seam chose when ``stream()`` was called
(:func:`taskexec._engines.registry.select_engine`), by the way it streams
(``Engine.stream_path``):

- ``"loop"``, the async engine (:func:`open_stream_async`): the mode's async generator of
  deltas (:mod:`taskexec._modes.streaming`) on the caller's loop;
- ``"blocking"``, the legacy engine (:func:`open_stream_blocking`): a blocking iterator over
  the legacy engine's blocking client (:mod:`taskexec._legacy_stream`), iterated in a worker
  thread for async callers and in the caller's own thread for sync callers.

Whatever ends a stream ends it once and gives it one result: the end of the reply (``success``
or the mode's failure), the deadline (``timeout``), the caller leaving early (``aclose()``, a
``break`` out of ``async with``, an exception, the caller's cancellation, or the stream being
dropped) (``cancelled``). The text received so far is the result's ``output``; on success the
joined deltas are the output exactly.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Self

from ._engines.base import Job
from ._errors import ConfigurationError, StreamNotFinishedError
from ._models import (
    EngineName,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
)
from ._modes.streaming import STREAM_MODES
from ._results import Progress
from ._stream_run import StreamJob, StreamRun

if TYPE_CHECKING:
    from ._engines.base import Engine
    from ._legacy_stream import LegacyStream

__all__ = (
    "DeltaPrinter",
    "StreamJob",
    "StreamRun",
    "TaskStream",
    "create_stream",
    "open_stream_async",
    "open_stream_blocking",
    "render_deltas",
    "stream_engine_name",
    "stream_task",
)


def _cancelled(message: str) -> ExecutionError:
    return ExecutionError(kind="cancelled", message=message)


def open_stream_async(
    job: StreamJob, outputs: Mapping[str, str | None] | None = None
) -> tuple[StreamRun, AsyncGenerator[str, None]]:
    """The async engine's stream: the task's run record and its deltas, on the running loop.

    Nothing is sent before the generator is first iterated. Closing the generator closes the
    request (or kills the script); its deadline is kept by :class:`TaskStream`. ``outputs``
    fill the prompt's ``{{dep}}`` placeholders (an orchestrated task's dependencies).
    """
    run = StreamRun(job, "async", asyncio.get_running_loop().time(), outputs)
    return run, STREAM_MODES[run.mode](run.call, run.state)


def open_stream_blocking(
    job: StreamJob, outputs: Mapping[str, str | None] | None = None
) -> LegacyStream:
    """The legacy engine's stream: a blocking iterator of deltas over its blocking client."""
    from ._legacy_stream import LegacyStream  # loaded only when the rollback flag is set

    return LegacyStream(job, StreamRun(job, "legacy", time.monotonic(), outputs))


class _ThreadedDeltas:
    """A blocking stream iterated from a coroutine: each step in a worker thread, so the
    loop never blocks; a cancelled step aborts the blocking read before it goes on."""

    __slots__ = ("_stream",)

    def __init__(self, stream: LegacyStream) -> None:
        self._stream = stream

    async def __anext__(self) -> str:
        step = asyncio.ensure_future(asyncio.to_thread(self._stream.next_or_none))
        try:
            delta = await asyncio.shield(step)
        except BaseException:
            # The thread cannot be interrupted, its read can: close the response (kill the
            # script), wait for the thread to notice, then let the cancellation go on.
            self._stream.abort()
            await asyncio.wait([step])
            raise
        if delta is None:
            raise StopAsyncIteration
        return delta

    async def aclose(self) -> None:
        await asyncio.to_thread(self._stream.close)


class TaskStream:
    """A task's reply as it arrives: ``async for delta in stream`` gives ``str`` deltas.

    Made by :meth:`TaskExecutor.stream`; nothing is sent until the stream is iterated. Use it
    as ``async with executor.stream(task) as stream:`` so that leaving the block, however,
    closes the request at once; ``aclose()`` does the same by hand, and a stream dropped
    half-read is closed by the event loop that ran it.

    After the iteration ended or the block exited, :attr:`result` is the task's
    :class:`ExecutionResult`: on success its ``output`` is the joined deltas; a stream left
    early is ``cancelled`` and a stream that failed after some text arrived is ``failed``,
    both with the text received so far as ``output``. Retries happen only before the first
    delta, within the task's deadline, which covers the whole stream.
    """

    __slots__ = (
        "__weakref__",
        "_deltas",
        "_engine",
        "_job",
        "_legacy",
        "_outputs",
        "_progress",
        "_result",
        "_run",
        "_source",
    )

    def __init__(
        self,
        job: StreamJob,
        engine: EngineName,
        outputs: Mapping[str, str | None] | None = None,
        progress: Progress | None = None,
        source: Callable[[StreamRun], AsyncGenerator[str, None]] | None = None,
    ) -> None:
        self._job = job
        #: The engine's own stream (the workers engine's), instead of the mode's here.
        self._source = source
        self._outputs = outputs
        self._progress = progress
        self._engine: EngineName = engine
        self._run: StreamRun | None = None
        self._deltas: AsyncGenerator[str, None] | _ThreadedDeltas | None = None
        self._legacy: LegacyStream | None = None
        self._result: ExecutionResult | None = None

    def __repr__(self) -> str:
        state = "open" if self._deltas is not None else "done" if self.finished else "new"
        return f"<TaskStream task={self._job.task.id!r} engine={self._engine} {state}>"

    @property
    def finished(self) -> bool:
        """True once the stream has ended and :attr:`result` can be read."""
        if self._result is None and self._legacy is not None:
            self._result = self._legacy.result
        return self._result is not None

    @property
    def result(self) -> ExecutionResult:
        """The task's result, once the iteration has ended or the block has exited.

        Raises:
            StreamNotFinishedError: The stream has not ended yet.
        """
        if not self.finished:
            raise StreamNotFinishedError(
                f"the stream of task {self._job.task.id!r} has not ended: read its result "
                "after the loop over its deltas ends or its block exits (or close it first)"
            )
        assert self._result is not None
        return self._result

    def _open(self) -> AsyncGenerator[str, None] | _ThreadedDeltas:
        if self._source is not None:
            loop_time = asyncio.get_running_loop().time()
            self._run = StreamRun(self._job, self._engine, loop_time, self._outputs)
            self._deltas = self._source(self._run)
        elif self._engine == "legacy":
            self._legacy = open_stream_blocking(self._job, self._outputs)
            self._run = self._legacy.run
            self._deltas = _ThreadedDeltas(self._legacy)
        else:
            self._run, self._deltas = open_stream_async(self._job, self._outputs)
        run = self._run
        if self._progress is not None:
            self._progress.begin(run.call, run.mode, run.started_at, run.start)
        return self._deltas

    def _blocking_iterator(self) -> LegacyStream | None:
        """The stream as a blocking iterator for a caller's own thread, when its engine runs
        in the caller's thread (the legacy engine); None otherwise (iterate on a loop)."""
        if self._engine != "legacy" or self._source is not None:
            return None
        if self._legacy is None and self._result is None:
            self._legacy = open_stream_blocking(self._job, self._outputs)
            self._run = self._legacy.run
        return self._legacy

    def _end(self, error: ExecutionError | None) -> None:
        run = self._run
        assert run is not None
        self._deltas = None
        legacy = self._legacy
        if legacy is not None and (error is None or legacy.result is None):
            # The legacy stream ended itself (or is told how it ended): one result for both.
            if legacy.result is None:
                legacy.result = run.result(error)
            self._result = legacy.result
            return
        self._result = run.result(error)
        if legacy is not None:
            legacy.result = self._result

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        deltas = self._deltas
        if deltas is None:
            if self.finished:
                raise StopAsyncIteration
            deltas = self._open()
        run = self._run
        assert run is not None
        deadline = asyncio.timeout_at(run.deadline)
        try:
            async with deadline:
                delta = await deltas.__anext__()
        except StopAsyncIteration:
            self._end(None)
            raise
        except TimeoutError:
            if not deadline.expired():
                raise
            # The cancellation went through the mode's generator: the request is closed.
            self._end(run.timeout_error())
            raise StopAsyncIteration from None
        except BaseException:
            # The caller's cancellation (or an interrupt) went through the mode's generator,
            # which closed the request on its way out: record the end, then let it go on.
            self._end(_cancelled("cancelled while streaming"))
            raise
        if self._legacy is None:  # a legacy stream keeps its own record of the text
            run.parts.append(delta)
        return delta

    async def aclose(self) -> None:
        """Close the stream: the request is closed (the script killed) before this returns.

        The result is then ``cancelled`` with the text received so far, unless the stream had
        already ended.
        """
        if self.finished:
            return
        deltas = self._deltas
        if deltas is None:
            self._end_unopened()
            return
        try:
            await deltas.aclose()
        finally:
            if self._result is None:
                self._end(_cancelled("the stream was closed before its end"))

    def _end_unopened(self) -> None:
        """Give a stream closed before it was ever iterated its ``cancelled`` result."""
        if self._legacy is not None:
            self._legacy.close()
            return
        job = self._job
        error = _cancelled("the stream was closed before it was read")
        result = job.roster.not_run_result(job.task, ExecutionStatus.CANCELLED, error, self._engine)
        self._result = result.model_copy(update={"output": ""})

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def stream_engine_name(engine: Engine) -> EngineName:
    """The way ``engine`` streams, as :class:`TaskStream` runs it ("async": on the loop,
    "legacy": the blocking client).

    Raises:
        ConfigurationError: The engine cannot stream.
    """
    if engine.stream_path is None:
        raise ConfigurationError(
            f"streaming is not available on the {engine.name} engine yet: use execute() "
            "there, or stream in-process (unset TASKEXEC_BROKER_URL/TASKEXEC_RESULTS_URL, "
            "or give the executor no broker_url)"
        )
    return "legacy" if engine.stream_path == "blocking" else engine.result_engine


def create_stream(
    job: StreamJob,
    engine: Engine,
    outputs: Mapping[str, str | None] | None = None,
    progress: Progress | None = None,
) -> TaskStream:
    """Return the stream of a job on ``engine`` (the one the engine seam chose for the call).

    Raises:
        UnknownAgentError: The agent named is not registered.
        UnsupportedModeError: The agent cannot serve the mode.
        ConfigurationError: No agent is named anywhere and there is no default, or the engine
            cannot stream.
    """
    job.roster.resolve(job.task, job.agent, job.mode)
    name = stream_engine_name(engine)
    if engine.stream_path != "engine":
        return TaskStream(job, name, outputs, progress)
    engine_job = Job(job.roster, job.settings, job.task, job.agent, job.mode, outputs)

    def source(run: StreamRun) -> AsyncGenerator[str, None]:
        return engine.stream_deltas(engine_job, run)

    return TaskStream(job, name, outputs, progress, source)


#: Terminal escape sequences (CSI ``ESC [ ... final``, OSC ``ESC ] ... BEL|ESC \\``, and
#: two-character ones), then every other control character but tab and newline.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")


async def stream_task(
    job: StreamJob,
    engine: Engine,
    on_delta: Callable[[str, str], object],
    outputs: Mapping[str, str | None] | None = None,
    progress: Progress | None = None,
) -> ExecutionResult:
    """Stream one task to ``on_delta(task_id, delta)`` and return its result.

    Shaped for the orchestrator's ``RunOne`` hook (``taskexec run --stream``): ``outputs`` fill
    the prompt's placeholders and ``progress`` learns when the task started, so a run cancelled
    mid-stream still reports it. Runs on ``engine`` (the one the engine seam chose).
    """
    job.roster.resolve(job.task, job.agent, job.mode)
    async with create_stream(job, engine, outputs, progress) as stream:
        async for delta in stream:
            on_delta(job.task.id, delta)
    return stream.result


_CONTROL = dict.fromkeys([*(i for i in range(32) if i not in (9, 10)), 127, *range(0x80, 0xA0)])


def _terminal_safe(text: str) -> str:
    return _ESCAPES.sub("", text).translate(_CONTROL)


class DeltaPrinter:
    """Writes deltas for a terminal as they arrive, as ``taskexec run --stream`` shows them.

    With one task the text is written as it comes; when several tasks stream at once, each
    line is prefixed with its task id (``[id] ``), and a task's text starts a new line when
    another task's text came in between. Terminal escape sequences and control characters
    (but tab and newline) are removed, so a reply cannot move the cursor, clear, recolour or
    retitle the terminal.

    Args:
        write: Where the text goes (``sys.stdout.write``).
        prefix: Prefix lines with task ids (None: from the moment a second task speaks; a
            command running several tasks at once passes True).
    """

    __slots__ = ("_at_line_start", "_current", "_prefix", "_seen", "_write")

    def __init__(self, write: Callable[[str], object], *, prefix: bool | None = None) -> None:
        self._write = write
        self._prefix = prefix
        self._current: str | None = None
        self._at_line_start = True
        self._seen: set[str] = set()

    def feed(self, task_id: str, delta: str) -> None:
        """Write one delta of task ``task_id``."""
        self._seen.add(task_id)
        text = _terminal_safe(delta)
        if not text:
            return
        write = self._write
        several = len(self._seen) > 1 if self._prefix is None else self._prefix
        if several and self._current not in (None, task_id) and not self._at_line_start:
            write("\n")
            self._at_line_start = True
        self._current = task_id
        for index, line in enumerate(text.split("\n")):
            if index:
                write("\n")
                self._at_line_start = True
            if line:
                if several and self._at_line_start:
                    write(f"[{_terminal_safe(task_id)}] ")
                write(line)
                self._at_line_start = False

    def close(self) -> None:
        """End the last line."""
        if not self._at_line_start:
            self._write("\n")
            self._at_line_start = True


def render_deltas(
    deltas: Iterator[tuple[str, str]],
    write: Callable[[str], object],
    *,
    prefix: bool | None = None,
) -> None:
    """Write ``(task_id, delta)`` pairs for a terminal with a :class:`DeltaPrinter`."""
    printer = DeltaPrinter(write, prefix=prefix)
    for task_id, delta in deltas:
        printer.feed(task_id, delta)
    printer.close()
