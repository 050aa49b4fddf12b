"""The bridge under ``taskexec.sync``: run the async core from blocking code, safely.

It follows asgiref's ``async_to_sync`` semantics, and avoids its traps:

- **Which loop.** Called from a worker thread of asgiref's ``sync_to_async`` under a running
  application loop, the coroutine runs on that application loop (as ``async_to_sync`` does).
  Otherwise it runs on one long-lived loop in a daemon thread of this process (the *portal*),
  never on a new loop per call: pooled connections live on a loop, so a loop per call would mean
  a new client and new connections per call ("Event loop is closed", httpx issue 2473).
- **Contextvars** are copied in, and changes made by the coroutine are copied back.
- **A running loop in this thread** is an error (:class:`SyncInAsyncContextError`), never a hang
  and never a nested loop.
- **Ctrl-C or any exception raised into the waiting thread** cancels the task and waits for its
  cleanup (request closed, subprocess killed) before it propagates; a second Ctrl-C stops
  waiting.
- **Exit and fork.** At interpreter exit the portal closes every pool it served and stops; a
  forked child starts a portal of its own and never touches the parent's loop or sockets.

Why one portal thread rather than a loop per calling thread: a portal costs a thread hand-off per
call (tens of microseconds) but gives every thread one shared pool and a ``close()`` that reaches
it; a loop per thread would be cheaper per call but need a pool per thread and a close that must
visit each thread's loop while that thread may be using it. See ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import os
import sys
import threading
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

from ._errors import SyncInAsyncContextError
from ._http import ClientPool
from .flags import get_engine

__all__ = ("call", "unwrap")

T = TypeVar("T")
P = ParamSpec("P")
WARN_SYNC_ENV = "TASKEXEC_WARN_SYNC"


class _Portal:
    """One event loop in a daemon thread, started on first use, per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                # The portal's own loop: created once per process and run for ever in its
                # thread. This is the bridge's loop, not the async path: async callers never
                # come here.
                loop = asyncio.new_event_loop()  # the portal's own loop, once per process
                thread = threading.Thread(
                    target=loop.run_forever, name="taskexec-sync-portal", daemon=True
                )
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def after_fork_in_child(self) -> None:
        """Forget the parent's loop and its connections; the child makes its own on first use."""
        old = self._loop
        self._lock = threading.Lock()
        self._loop, self._thread, self._pid = None, None, 0
        if old is not None:
            for pool in list(ClientPool.instances):
                pool.forget(old)

    def shutdown(self) -> None:
        """Close every pool served by the portal, then stop its loop (at interpreter exit)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or self._pid != os.getpid() or not loop.is_running():
            return

        async def close_all() -> None:
            for pool in list(ClientPool.instances):
                await pool.aclose_loop(asyncio.get_running_loop())

        # Exit must not hang or fail because a close did.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not loop.is_running():
            loop.close()
        self._loop = None


_portal = _Portal()
atexit.register(_portal.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_portal.after_fork_in_child)


def unwrap(value: Any) -> Any:
    """Return the async object behind a sync shim (shims take each other where async classes do)."""
    return getattr(value, "_async", value)


def _target_loop() -> tuple[asyncio.AbstractEventLoop, list[asyncio.Task[Any]] | None]:
    """The loop to run on, and asgiref's task list to join for cancellation.

    Inside asgiref's ``sync_to_async`` (a worker thread under a running application loop) that
    is the application loop, and our task joins asgiref's ``task_context`` so that cancelling
    the awaiting coroutine cancels it, exactly as with ``async_to_sync``. Otherwise it is the
    portal's loop.
    """
    asgiref_sync = sys.modules.get("asgiref.sync")
    if asgiref_sync is not None:
        local = asgiref_sync.SyncToAsync.threadlocal
        # Same check as asgiref: a loop recorded before a fork belongs to the parent.
        if getattr(local, "main_event_loop_pid", None) == os.getpid():
            loop: asyncio.AbstractEventLoop | None = getattr(local, "main_event_loop", None)
            if loop is not None and loop.is_running():
                return loop, getattr(local, "task_context", None)
    return _portal.loop(), None


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

    Under the legacy engine, the object's ``_legacy_<name>`` runs instead, in this thread, with
    no event loop of the bridge involved: the rollback path does not depend on the bridge.

    Raises:
        SyncInAsyncContextError: This thread is running an event loop.
    """
    target = getattr(method, "__self__", None)
    name = method.__name__
    cls = type(target).__name__
    if os.environ.get(WARN_SYNC_ENV, "") not in ("", "0"):
        _warn_sync_call(cls, name)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise SyncInAsyncContextError(
            f"taskexec.sync.{cls}.{name}() blocks, and this thread is running an event loop; "
            f"use `await taskexec.{cls}.{name}(...)` here instead"
        )
    if get_engine() == "legacy":
        legacy: Callable[P, T] | None = getattr(target, f"_legacy_{name}", None)
        if legacy is not None:
            return legacy(*args, **kwargs)
    loop, task_context = _target_loop()
    return _run(loop, method(*args, **kwargs), task_context)


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
