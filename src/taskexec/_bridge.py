"""The bridge under ``taskexec.sync``: run the async core from blocking code, safely.

It follows asgiref's ``async_to_sync`` semantics, and avoids its traps:

- **Which loop.** Called from a worker thread of asgiref's ``sync_to_async`` under a running
  application loop, the coroutine runs on that application loop (as ``async_to_sync`` does).
  Otherwise it runs on one event loop shared by the whole process, never on a new loop per
  call: pooled connections live on a loop, so a loop per call would mean a new client and new
  connections per call ("Event loop is closed", httpx issue 2473).
- **Who runs that loop.** The calling threads themselves: a caller that finds the loop idle runs
  it in its own thread for the length of its call (a loop re-entry, a few microseconds); a caller
  that finds another thread running it hands its call over and waits, and takes over the running
  if that thread finishes first. So a single-threaded program pays no thread hand-off, and many
  threads still share one loop, one pool and one ``close()``.
- **Contextvars** are copied in, and changes made by the coroutine are copied back.
- **A running loop in this thread** is an error (:class:`SyncInAsyncContextError`), never a hang
  and never a nested loop.
- **Ctrl-C or any exception raised into the waiting thread** cancels the task and waits for its
  cleanup (request closed, subprocess killed) before it propagates; a second Ctrl-C stops
  waiting.
- **Exit and fork.** At interpreter exit the shared loop's pools are closed, then the loop; a
  forked child makes a loop of its own and never touches the parent's loop or sockets.

The two designs measured before choosing (``benchmarks/RESULTS.md``): a loop in a thread of its
own (a *portal*) costs a thread hand-off per call, 45-110 us on these 2-core machines, more than
the 100 us budget once the call itself runs on the other core; a loop per calling thread costs a
re-entry, but a pool per thread. The shared, caller-driven loop keeps the portal's one pool and
the re-entry's price.
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
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

from ._callsite import caller_site, site_of
from ._engines import current_engine, work_of
from ._errors import SyncInAsyncContextError
from ._http import ClientPool

__all__ = ("call", "unwrap")

T = TypeVar("T")
P = ParamSpec("P")
WARN_SYNC_ENV = "TASKEXEC_WARN_SYNC"


class _SharedLoop:
    """One event loop per process for every sync call, driven by the calling threads themselves.

    No thread of its own: a caller that finds the loop idle runs it in its own thread until its
    call is done (the *driver*), which costs a loop re-entry rather than a hand-off to another
    thread. A caller that finds another thread driving hands its call to that loop and waits; if
    the driver finishes first, a waiting caller takes over the driving. One loop means one pool
    of connections shared by every thread, and one place for ``close()`` and exit to reach.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        self._driving = False
        self._driver_meeting: _Meeting | None = None
        self._idle_since = 0.0

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
        loop = self.loop()
        meeting = _Meeting(self, loop, coro, context)
        with self._cond:
            drive = not self._driving
            if drive:
                self._driving = True
        if drive:
            self._read_if_idle(loop)
            meeting.start()  # the loop is ours and idle: no hand-off needed
        else:
            loop.call_soon_threadsafe(meeting.start)  # the driver's loop will pick it up
        try:
            if not drive:
                drive = self._wait(meeting)
            if drive:
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

    def _drive(self, meeting: _Meeting) -> None:
        """Run the loop in this thread until ``meeting`` is done, then give the loop up."""
        loop = meeting.loop
        try:
            self._driver_meeting = meeting
            if not meeting.done:
                loop.run_forever()  # stopped by the meeting's task when it finishes
        finally:
            with self._cond:
                self._driver_meeting = None
                self._driving = False
                self._idle_since = time.monotonic()
                self._cond.notify_all()

    def _read_if_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """After a while idle, let the loop read what arrived meanwhile, before a call starts.

        Nobody runs the loop between calls, so a server closing an idle keep-alive connection
        goes unnoticed until the loop runs again; one pass of the loop notices it, so that the
        next call does not pick that dead connection from the pool.
        """
        if self._idle_since and time.monotonic() - self._idle_since > 1.0:
            loop.run_until_complete(_one_pass())  # this thread is the driver: the loop is ours

    def finished(self, meeting: _Meeting) -> None:
        """Called on the loop when a call's task ends: wake its caller."""
        if self._driver_meeting is meeting:
            meeting.loop.stop()
        with self._cond:
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        """Forget the parent's loop and its connections; the child makes its own on first use."""
        old = self._loop
        self._cond = threading.Condition()
        self._loop, self._pid, self._driving, self._driver_meeting = None, 0, False, None
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

        # Exit must not hang or fail because a close did.
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.wait_for(close_all(), 5))  # at exit, in this thread
        loop.close()
        self._loop = None


async def _one_pass() -> None:
    """Return at once: running it makes the loop poll its sockets once."""


class _Meeting:
    """One blocking call on the shared loop: its task, its outcome, its cancellation."""

    __slots__ = (
        "cancel_requested",
        "context",
        "coro",
        "done",
        "error",
        "loop",
        "owner",
        "task",
        "value",
        "was_cancelled",
    )

    def __init__(
        self,
        owner: _SharedLoop,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context,
    ) -> None:
        self.owner, self.loop, self.coro, self.context = owner, loop, coro, context
        self.task: asyncio.Task[None] | None = None
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.was_cancelled = False
        self.cancel_requested = False

    def start(self) -> None:
        # Runs on the loop's driving thread. The task runs in `context`, a copy of the caller's,
        # so the caller's contextvars are visible inside and changes can be copied back.
        if self.cancel_requested:
            self.coro.close()
            self._end(cancelled=True)
            return
        self.task = self.loop.create_task(self._run(), context=self.context)

    async def _run(self) -> None:
        try:
            self.value = await self.coro
        except asyncio.CancelledError:
            self.was_cancelled = True
            raise
        except BaseException as exc:
            self.error = exc
        finally:
            self._end()

    def _end(self, *, cancelled: bool = False) -> None:
        self.was_cancelled = self.was_cancelled or cancelled
        self.done = True
        self.owner.finished(self)

    def cancel(self) -> None:
        self.cancel_requested = True
        if self.task is not None:
            self.task.cancel()

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


def _app_loop() -> tuple[asyncio.AbstractEventLoop | None, list[asyncio.Task[Any]] | None]:
    """The loop to run on, and asgiref's task list to join for cancellation.

    Inside asgiref's ``sync_to_async`` (a worker thread under a running application loop) that
    is the application loop, and our task joins asgiref's ``task_context`` so that cancelling
    the awaiting coroutine cancels it, exactly as with ``async_to_sync``. Otherwise there is
    none, and the bridge's shared loop is used.
    """
    asgiref_sync = sys.modules.get("asgiref.sync")
    if asgiref_sync is not None:
        local = asgiref_sync.SyncToAsync.threadlocal
        # Same check as asgiref: a loop recorded before a fork belongs to the parent.
        if getattr(local, "main_event_loop_pid", None) == os.getpid():
            loop: asyncio.AbstractEventLoop | None = getattr(local, "main_event_loop", None)
            if loop is not None and loop.is_running():
                return loop, getattr(local, "task_context", None)
    return None, None


def _restore_context(context: contextvars.Context) -> None:
    """Copy into the caller's context every variable the coroutine changed (as asgiref does)."""
    for var, value in context.items():
        try:
            if var.get() is value:
                continue
        except LookupError:
            pass
        var.set(value)


_warned_sites: set[tuple[str, int]] = set()
_warned_lock = threading.Lock()


def _warn_sync_call(cls: str, name: str) -> None:
    """With TASKEXEC_WARN_SYNC=1, warn once per call site so teams can list what to migrate."""
    frame = sys._getframe(3)  # call() <- the shim method <- the caller
    site = (frame.f_code.co_filename, frame.f_lineno)
    with _warned_lock:
        if site in _warned_sites:
            return
        _warned_sites.add(site)
    sync_name = "close" if name == "aclose" else name
    warnings.warn(
        f"taskexec.sync.{cls}.{sync_name}() is a blocking shim; migrate this call to "
        f"`await taskexec.{cls}.{name}()` (see docs/MIGRATION.md)",
        DeprecationWarning,
        stacklevel=4,
    )


def call(method: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``await method(*args, **kwargs)`` (a bound async method) and return its result, blocking.

    When the current engine runs in the caller's thread (the legacy engine), the work the
    method stands for goes to it directly, with no event loop of the bridge involved.

    Raises:
        SyncInAsyncContextError: This thread is running an event loop.
    """
    target = getattr(method, "__self__", None)
    name = method.__name__
    cls = type(target).__name__
    if os.environ.get(WARN_SYNC_ENV, "") not in ("", "0"):
        _warn_sync_call(cls, name)
    # The caller's line, for warnings raised while the call runs on a loop (perhaps in another
    # thread) where that line is not on the stack: call() <- the shim method <- the caller.
    site = caller_site.set(caller_site.get() or site_of(sys._getframe(2)))
    try:
        return _call(target, method, name, cls, *args, **kwargs)
    finally:
        caller_site.reset(site)


def _call(
    target: Any,
    method: Callable[P, Coroutine[Any, Any, T]],
    name: str,
    cls: str,
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise SyncInAsyncContextError(
            f"taskexec.sync.{cls}.{name}() blocks, and this thread is running an event loop; "
            f"use `await taskexec.{cls}.{name}(...)` here instead"
        )
    engine = current_engine()
    if engine.runs_in_caller_thread:
        # The legacy engine runs in this thread, with no loop of the bridge involved: the
        # rollback path must not depend on the bridge.
        work = work_of(method, args, kwargs)
        if work is not None:
            return cast(T, engine.run_blocking(work))
    app_loop, task_context = _app_loop()
    if app_loop is not None:
        return _run(app_loop, method(*args, **kwargs), task_context)
    context = contextvars.copy_context()
    try:
        return _shared.run(method(*args, **kwargs), context)
    finally:
        _restore_context(context)


class _Rendezvous:
    """One blocking call's meeting point: a lock the caller waits on, released by the loop.

    A bare lock is the cheapest cross-thread wake-up there is (a concurrent.futures.Future adds a
    Condition and callbacks), and waiting on it stays interruptible by Ctrl-C in the main thread.
    """

    __slots__ = ("cancel_requested", "cancelled", "error", "latch", "task", "value")

    def __init__(self) -> None:
        self.latch = threading.Lock()
        self.latch.acquire()
        self.task: asyncio.Task[Any] | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.cancel_requested = False


def _run(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T],
    task_context: list[asyncio.Task[Any]] | None = None,
) -> T:
    context = contextvars.copy_context()
    meeting = _Rendezvous()

    async def run_and_report() -> None:
        # Reports from inside the task rather than from a done-callback: one loop iteration
        # less per call, which is a measurable part of the hand-off (benchmarks/RESULTS.md).
        try:
            meeting.value = await coro
        except asyncio.CancelledError:
            meeting.cancelled = True
            raise
        except BaseException as exc:
            meeting.error = exc
        finally:
            if task_context is not None and meeting.task in task_context:
                task_context.remove(meeting.task)
            meeting.latch.release()

    def start() -> None:
        # Runs on the target loop. The task runs in `context`, a copy of the caller's, so the
        # caller's contextvars are visible inside and changes can be copied back afterwards.
        if meeting.cancel_requested:
            coro.close()
            meeting.cancelled = True
            meeting.latch.release()
            return
        task = meeting.task = loop.create_task(run_and_report(), context=context)
        if task_context is not None:
            task_context.append(task)

    def cancel() -> None:
        meeting.cancel_requested = True
        if meeting.task is not None:
            meeting.task.cancel()

    loop.call_soon_threadsafe(start)
    try:
        meeting.latch.acquire()
    except BaseException:
        # KeyboardInterrupt, or an exception raised into this thread (a signal handler's
        # timeout): cancel the task and wait for its cleanup (request closed, subprocess
        # killed) before letting it propagate. A second Ctrl-C stops the wait.
        loop.call_soon_threadsafe(cancel)
        with contextlib.suppress(KeyboardInterrupt):
            meeting.latch.acquire()
        raise
    finally:
        _restore_context(context)
    if meeting.cancelled:
        raise asyncio.CancelledError
    if meeting.error is not None:
        raise meeting.error
    return cast(T, meeting.value)
