"""The bridge under ``taskexec.sync``: run the async core from blocking code, safely.

It follows asgiref's ``async_to_sync`` semantics, and avoids its traps:

- **Which loop.** In a worker thread of asgiref's ``sync_to_async`` under a running application
  loop, the call is asgiref's own ``async_to_sync``. Anywhere else it runs on one event loop
  shared by the process, never a new loop per call (which would mean new connections per call).
- **Who runs that loop.** The calling threads: a caller that finds the loop idle runs it for the
  length of its call (a re-entry, a few microseconds); one that finds another thread running it
  hands its call over, and takes over the running if that thread finishes first. One loop, one
  pool, one ``close()``, for every thread (the measured alternatives: ``benchmarks/RESULTS.md``).
- **The rollback engine** runs in the calling thread with no loop at all: an entry's coroutine
  is first run by hand here (:mod:`taskexec._engines.entry`); it finishes at once on an engine
  that runs in the caller's thread, or asks for a loop before it touches one.
- **Contextvars** are copied in and back; **a running loop in this thread** is an error
  (:class:`SyncInAsyncContextError`), never a hang or a nested loop.
- **Ctrl-C** cancels the task and waits for its cleanup (request closed, subprocess killed)
  before it propagates; a second Ctrl-C stops waiting.
- **Exit and fork.** At exit the shared loop's pools are closed, then the loop; a forked child
  makes a loop of its own and never touches the parent's sockets.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import os
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast

from ._callsite import caller_site, enter_sync_call
from ._engines.entry import BLOCKING_CALLER, NEED_LOOP
from ._errors import SyncInAsyncContextError
from ._http import ClientPool

__all__ = ("SyncIteration", "call", "call_entry", "unwrap")

T = TypeVar("T")
P = ParamSpec("P")
#: After the shared loop has been idle this long, a call first lets it read its sockets once,
#: so that a keep-alive connection the server closed meanwhile is not picked from the pool.
#: Shorter than common servers' keep-alive timeouts (uvicorn 5 s, nginx 75 s).
IDLE_READ_AFTER_S = 1.0


class _SharedLoop:
    """One event loop per process for every sync call, driven by the calling threads themselves
    (see the module's docstring): one pool for every thread, one place for exit to reach."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        self._driving = False
        self._driver_meeting: _Meeting | None = None
        self._idle_since = 0.0
        self._parents_loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._cond:
            if self._loop is None or self._pid != os.getpid():
                # The bridge's own loop, made once per process and run only by calling threads
                # inside a sync call: never on the async path, never while another loop runs
                # in the calling thread (call() refuses that first).
                self._loop = asyncio.new_event_loop()  # the sync bridge's one loop
                self._pid = os.getpid()
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], context: contextvars.Context) -> T:
        try:
            loop = self.loop()
        except BaseException:
            coro.close()
            raise
        meeting = _Meeting(self, loop, coro, context)
        with self._cond:
            drive = not self._driving
            if drive:
                self._driving = True
        if not drive:
            loop.call_soon_threadsafe(meeting.start)  # the driver's loop will pick it up
        try:
            if drive:
                self._drive(meeting, start=True)  # the loop is ours and idle: no hand-off
            elif self._wait(meeting):
                self._drive(meeting)
        except BaseException:
            # KeyboardInterrupt, or an exception raised into this thread (a signal handler's
            # timeout): cancel the task and wait for its cleanup (request closed, subprocess
            # killed) before letting it propagate. A second Ctrl-C stops the wait.
            loop.call_soon_threadsafe(meeting.cancel)
            with contextlib.suppress(KeyboardInterrupt):
                if self._wait(meeting):
                    self._drive(meeting)
            raise
        return cast(T, meeting.outcome())

    def _wait(self, meeting: _Meeting) -> bool:
        """Wait for the call to finish; return True if this thread must drive the loop instead."""
        with self._cond:
            while not meeting.done:
                if not self._driving:
                    self._driving = True
                    return True
                self._cond.wait()
        return False

    def _drive(self, meeting: _Meeting, *, start: bool = False) -> None:
        """Run the loop in this thread until ``meeting`` is done (starting it first if
        ``start``), then give the loop up, whatever was raised."""
        loop = meeting.loop
        try:
            self._driver_meeting = meeting
            if start:
                self._start_driven(meeting)
            while not meeting.done:
                loop.run_forever()  # stopped when the meeting ends (or by a stray stop: again)
        finally:
            with self._cond:
                self._driver_meeting = None
                self._driving = False
                self._idle_since = time.monotonic()
                self._cond.notify_all()

    def _start_driven(self, meeting: _Meeting) -> None:
        """Start the call of the thread that drives the loop, after a while idle one pass late.

        Nobody runs the loop between calls, so a server closing an idle keep-alive connection
        goes unnoticed until the loop runs again. After a while idle, the call's task is
        started from the loop's second pass: the first polls the sockets and runs their
        callbacks (a closed connection is seen), so that the call does not pick that dead
        connection from the pool. (Not run_until_complete: a loop stopped early would raise
        there, and the loop is run in one place only, below.)
        """
        if self._idle_since and time.monotonic() - self._idle_since > IDLE_READ_AFTER_S:
            meeting.loop.call_soon(meeting.loop.call_soon, meeting.start)
        else:
            meeting.start()

    def finished(self, meeting: _Meeting) -> None:
        """Called on the loop when a call's task ends: wake its caller."""
        if self._driver_meeting is meeting and meeting.loop.is_running():
            meeting.loop.stop()  # never when not running: that would cut the next run short
        with self._cond:
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        """Forget the parent's loop and its connections; the child makes its own on first use."""
        old = self._loop
        self._cond = threading.Condition()
        self._loop, self._pid, self._driving, self._driver_meeting = None, 0, False, None
        # Keep the parent's loop referenced for the child's life: collected here, it would warn
        # (unclosed loop, sockets) about objects that are the parent's to close, not ours.
        self._parents_loop = old
        if old is not None:
            for pool in list(ClientPool.instances):
                pool.forget(old)

    def shutdown(self) -> None:
        """Close every pool that used the bridge's loop, then the loop (at interpreter exit)."""
        loop = self._loop
        if loop is None or self._pid != os.getpid() or self._driving or loop.is_closed():
            return

        async def close_all() -> None:
            for pool in list(ClientPool.instances):
                await pool.aclose_loop(loop)

        # Exit must not hang or fail because a close did. Then the loop's async generators:
        # what closes with the loop (a cluster connection, a shared limiter) closes now.
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.wait_for(close_all(), 5))  # at exit, in this thread
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 5))  # at exit
        loop.close()
        self._loop = None


@dataclass(slots=True, eq=False)
class _Meeting:
    """One blocking call on the shared loop: its task, its outcome, its cancellation."""

    owner: _SharedLoop
    loop: asyncio.AbstractEventLoop
    coro: Coroutine[Any, Any, Any]
    context: contextvars.Context
    task: asyncio.Task[None] | None = None
    done: bool = False
    value: Any = None
    error: BaseException | None = None
    was_cancelled: bool = False

    def start(self) -> None:
        # Runs on the loop's driving thread. The task runs in `context`, a copy of the caller's,
        # so the caller's contextvars are visible inside and changes can be copied back.
        if self.done:
            return  # cancelled before it started (cancel() ended it)
        run = self._run()
        try:
            self.task = self.loop.create_task(run, context=self.context)
        except BaseException as exc:  # a task factory's error: the caller gets it
            run.close()
            self.coro.close()
            self.error = exc
            self._end()
            return
        # The call ends when its task does, however it does: cancelled before its first step
        # (Ctrl-C while its start was queued), its coroutine never runs a line of _run().
        self.task.add_done_callback(self._task_done)

    async def _run(self) -> None:
        try:
            self.value = await self.coro
        except asyncio.CancelledError:
            raise  # the task ends cancelled: _task_done says so
        except BaseException as exc:
            self.error = exc

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.coro.close()  # a no-op if it ran; not left un-awaited if it never did
        self._end(cancelled=task.cancelled())

    def _end(self, *, cancelled: bool = False) -> None:
        if self.done:
            return
        self.was_cancelled = self.was_cancelled or cancelled
        self.done = True
        self.owner.finished(self)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
        elif not self.done:
            # Not started (its start is still queued, or starting it failed): it ends here.
            self.coro.close()
            self._end(cancelled=True)

    def outcome(self) -> Any:
        if self.was_cancelled:
            raise asyncio.CancelledError
        if self.error is not None:
            raise self.error
        return self.value


_shared = _SharedLoop()
atexit.register(_shared.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_shared.after_fork_in_child)


def unwrap(value: Any) -> Any:
    """Return the async object behind a sync shim (shims take each other where async classes do)."""
    return getattr(value, "_async", value)


def _inside_asgiref() -> bool:
    """True in a worker thread of asgiref's ``sync_to_async`` under a running application loop.

    The same test asgiref's ``async_to_sync`` makes (its thread-local, same process); only the
    test: the call itself is then left to asgiref, which also serves thread-sensitive
    ``sync_to_async`` calls made inside it from this blocked thread. asgiref has no public
    API for it: ``SyncToAsync.threadlocal`` is read here only, and
    tests/test_library_internals.py fails loudly if asgiref changes it.
    """
    asgiref_sync = sys.modules.get("asgiref.sync")
    if asgiref_sync is None:
        return False
    local = asgiref_sync.SyncToAsync.threadlocal
    if getattr(local, "main_event_loop_pid", None) != os.getpid():
        return False  # none recorded, or recorded before a fork: the parent's loop
    loop: asyncio.AbstractEventLoop | None = getattr(local, "main_event_loop", None)
    return loop is not None and loop.is_running()


def _restore_context(context: contextvars.Context) -> None:
    """Copy into the caller's context every variable the coroutine changed (as asgiref does)."""
    for var, value in context.items():
        try:
            if var.get() is value:
                continue
        except LookupError:
            pass
        var.set(value)


def call(method: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``await method(*args, **kwargs)`` (a bound async method) and return its result, blocking.

    Raises:
        SyncInAsyncContextError: This thread is running an event loop.
    """
    return _blocking(method, args, kwargs, entry=False)


def call_entry(
    method: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """Like :func:`call`, for a method that hands its work to the engine seam.

    Its coroutine is first run in this thread: on an engine that runs in the caller's thread
    (the rollback engine) the work runs right here, with no event loop of the bridge involved.

    Raises:
        SyncInAsyncContextError: This thread is running an event loop.
    """
    return _blocking(method, args, kwargs, entry=True)


def _blocking(
    method: Callable[..., Coroutine[Any, Any, T]], args: Any, kwargs: Any, *, entry: bool
) -> T:
    name = method.__name__
    cls = type(getattr(method, "__self__", None)).__name__
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise SyncInAsyncContextError(
            f"taskexec.sync.{cls}.{name}() blocks, and this thread is running an event loop; "
            f"use `await taskexec.{cls}.{name}(...)` here instead"
        )
    # The caller's line (_blocking() <- call() <- the shim method <- the caller), for warnings
    # raised while the call runs on a loop, perhaps in another thread, where that line is not
    # on the stack.
    token = enter_sync_call(cls, name, sys._getframe(3))
    try:
        return _call(method(*args, **kwargs), entry)
    finally:
        caller_site.reset(token)


def _probe(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an entry's coroutine up to where it needs a loop, as a blocking caller (see
    :mod:`taskexec._engines.entry`); StopIteration carries its value if it never needed one."""
    token = BLOCKING_CALLER.set(True)
    try:
        return coro.send(None)
    finally:
        BLOCKING_CALLER.reset(token)


@types.coroutine
def _go_on(coro: Coroutine[Any, Any, T]) -> Generator[Any, Any, T]:
    """Go on running a coroutine that was started by hand, on the running loop.

    The same delegation ``await`` does; the coroutine's first step (up to its request for a
    loop) already ran in the calling thread.
    """
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            yielded = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            return cast(T, stop.value)
        value, error = None, None
        try:
            value = yield yielded
        except BaseException as exc:  # cancellation (Ctrl-C, a timeout) goes on inside
            error = exc


async def _resumed(coro: Coroutine[Any, Any, T]) -> T:
    return await _go_on(coro)


def _first_step(coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T] | _Done[T]:
    """Run an entry's first step here: its value if it needed no loop, else what goes on."""
    try:
        yielded = _probe(coro)
    except StopIteration as done:
        # The engine ran the work in this thread (the rollback engine): no loop.
        return _Done(cast(T, done.value))
    if yielded is not NEED_LOOP:  # pragma: no cover (an entry asks before it awaits)
        coro.close()
        raise RuntimeError(f"an entry's coroutine awaited {yielded!r} before a loop")
    return _resumed(coro)


@dataclass(slots=True)
class _Done(Generic[T]):
    value: T


def _call(coro: Coroutine[Any, Any, T], entry: bool) -> T:
    if _inside_asgiref():
        # A Django-style view under sync_to_async: run on the application's loop the way
        # asgiref does, CurrentThreadExecutor included, so that a thread-sensitive
        # sync_to_async awaited inside the call can run in this (blocked) thread. asgiref
        # copies contextvars in and back itself; an entry's first step runs in this thread's
        # own context, so that what it sets is there too.
        if entry:
            step = _first_step(coro)
            if isinstance(step, _Done):
                return step.value
            coro = step
        from asgiref.sync import async_to_sync

        async def awaited() -> T:
            return await coro

        return async_to_sync(awaited)()
    context = contextvars.copy_context()
    try:
        if entry:
            step = context.run(_first_step, coro)
            if isinstance(step, _Done):
                return step.value
            coro = step
        return _shared.run(coro, context)
    finally:
        _restore_context(context)


# -- streams (issue 20) ----------------------------------------------------------------------------
#
# A sync stream runs its whole iteration in ONE task on the shared loop (the pump), never one
# task per item: a stream's request, its deadline and its cleanup belong to one task, as they do
# for an async caller. The caller's thread takes deltas from the pump's buffer, and runs the
# shared loop (through _SharedLoop.run, like any sync call) only while it waits for the next
# one; nobody runs the loop for an abandoned stream, and the pump stops reading after a bounded
# buffer anyway, so a stream left after `break` is not read to its end. Leaving (close(), the
# `with` block, Ctrl-C, the stream being dropped) closes the request before it returns.

#: Deltas a pump reads ahead of its caller before it waits for the caller to take some.
_READ_AHEAD = 64


class _AsyncStream(Protocol):
    """What a sync stream needs of an async one (:class:`taskexec._stream.TaskStream`)."""

    def __aiter__(self) -> AsyncIterator[str]: ...
    async def aclose(self) -> None: ...
    def _blocking_iterator(self) -> Iterator[str] | None: ...


class _Pump:
    """The one task that iterates an async stream for a sync caller, and its buffer."""

    __slots__ = ("ended", "error", "items", "space", "stream", "task", "waiter")

    def __init__(self, stream: _AsyncStream) -> None:
        self.stream = stream
        self.items: deque[str] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.space: asyncio.Future[None] | None = None

    async def run(self) -> None:
        stream = self.stream
        try:
            async for delta in stream:
                self.items.append(delta)
                self._wake()
                if len(self.items) >= _READ_AHEAD:
                    self.space = asyncio.get_running_loop().create_future()
                    await self.space
        except asyncio.CancelledError:
            pass  # closed by the caller (close(), Ctrl-C, a dropped stream): ends below
        except Exception as exc:  # a bug, not a task failure (those are results): re-raise there
            self.error = exc
        finally:
            try:
                await stream.aclose()  # closes the request if the loop was left mid-way
            finally:
                self.ended = True
                self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> str | None:
        """Return the next delta (None: the stream ended), starting the pump on first use."""
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.task = loop.create_task(self.run())
        # The caller may have emptied the buffer from its own thread (the fast path in
        # SyncIteration.next), which cannot wake the pump: let it read on now.
        space = self.space
        if space is not None and not space.done():
            space.set_result(None)
        while not self.items:
            if self.ended:
                if self.error is not None:
                    raise self.error
                return None
            self.waiter = loop.create_future()
            await self.waiter
        return self.items.popleft()

    async def aclose(self) -> None:
        """Stop the pump and wait until the stream is closed."""
        task = self.task
        if task is None:
            self.ended = True
            await self.stream.aclose()
            return
        if not task.done():
            task.cancel()
        await asyncio.wait([task])


def _on_shared_loop(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise SyncInAsyncContextError(
            "a taskexec.sync stream blocks, and this thread is running an event loop; use "
            "`async for` over taskexec.TaskExecutor.stream(...) here instead"
        )
    return _shared.run(coro, contextvars.copy_context())


def _abandon(pump: _Pump) -> None:
    """Close the stream of a sync stream dropped without ``close()`` (its finalizer)."""
    task = pump.task
    if task is None or task.done():
        return
    loop = task.get_loop()
    running = asyncio._get_running_loop()
    if running is loop:
        task.cancel()  # dropped on the shared loop's own thread: the loop is running here
        return

    def close() -> None:
        with contextlib.suppress(BaseException):
            _shared.run(pump.aclose(), contextvars.copy_context())

    if running is None and not _shared._driving:
        close()  # the usual case: dropped in the caller's thread, the loop idle: close it here
    else:
        # Dropped in a thread that runs another loop (the shared loop cannot be driven here),
        # or while a thread, perhaps this one between two steps, holds the shared loop: a
        # short-lived thread waits for the loop and closes the stream on it.
        threading.Thread(target=close, name="taskexec-stream-close", daemon=True).start()


class SyncIteration:
    """A generated sync stream's engine room: ``next()`` and ``close()`` for blocking callers.

    On the legacy engine the stream is the engine's own blocking iterator, in the caller's
    thread; otherwise it is pumped on the shared loop (see above).
    """

    __slots__ = ("__weakref__", "_blocking", "_finalizer", "_pump", "_stream")

    def __init__(self, stream: _AsyncStream) -> None:
        self._stream = stream
        self._blocking: Iterator[str] | None = None
        self._pump: _Pump | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def _start(self) -> None:
        blocking = self._stream._blocking_iterator()
        if blocking is not None:
            self._blocking = blocking
            return
        pump = self._pump = _Pump(self._stream)
        # Not a method of self: the finalizer must not keep this object alive.
        self._finalizer = weakref.finalize(self, _abandon, pump)
        self._finalizer.atexit = False

    def next(self) -> str:
        """Return the next delta, blocking until it arrives.

        Raises:
            StopIteration: The stream ended.
        """
        if self._blocking is None and self._pump is None:
            self._start()
        if self._blocking is not None:
            return next(self._blocking)
        pump = self._pump
        assert pump is not None
        if pump.items:
            return pump.items.popleft()  # read ahead already: no loop needed
        try:
            item = _on_shared_loop(pump.get())
        except BaseException:
            # Ctrl-C while waiting: close the request first, then let the interrupt reach the
            # caller. A second Ctrl-C stops waiting for the close.
            with contextlib.suppress(KeyboardInterrupt):
                _on_shared_loop(pump.aclose())
            raise
        if item is None:
            raise StopIteration
        return item

    def close(self) -> None:
        """Close the stream; its request is closed before this returns."""
        if self._blocking is None and self._pump is None:
            self._start()
        if self._blocking is not None:
            close = getattr(self._blocking, "close", None)
            if close is not None:
                close()
            return
        pump = self._pump
        assert pump is not None
        if self._finalizer is not None:
            self._finalizer.detach()
        if pump.ended and pump.task is not None and pump.task.done():
            return
        _on_shared_loop(pump.aclose())
