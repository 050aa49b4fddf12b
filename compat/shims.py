"""Which async classes get blocking shims in ``taskexec.sync``, and what differs.

Every public member of a declared class is mirrored: coroutine methods become blocking methods
with the same name, parameters, defaults, annotations and docstring; plain methods and properties
delegate. A public async member the generator cannot mirror must be listed in ``exclude`` with the
reason, or generation fails: adding an async method without deciding its sync story breaks CI.

Docstrings are copied as written, never rewritten. Where an async docstring is not true of the
blocking shim (it says ``await``, ``async with``, ``gather``, or names an excluded member), the
shim's own docstring goes in ``docs`` (``""`` for the class); the generator fails on any shim
docstring that still mentions one of those.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shim:
    """One async class to mirror."""

    module: str
    name: str
    exclude: dict[str, str] = field(default_factory=dict)
    #: Instances come from another class's method (``TaskExecutor.stream``), not from users:
    #: the shim wraps the async object that method returned.
    wraps: bool = False
    #: Sync docstrings for members ("" is the class) whose async docstring does not hold. One
    #: without an ``Args:`` section gets the async docstring's sections (Args, Raises, ...).
    docs: dict[str, str] = field(default_factory=dict)
    #: Methods that hand their work to the engine seam (``taskexec._engines.entry``): their
    #: shims run on the rollback engine in the caller's thread, with no event loop at all.
    #: A method missing here still works on every engine, through the bridge's loop.
    entries: frozenset[str] = frozenset()


#: Async name -> sync name.
RENAMES = {"aclose": "close"}

_EXECUTOR_DOC = """Runs agent tasks, blocking: ``executor.execute(task)`` returns one result.

Calls run on one event loop shared by the process, driven by the calling threads, so sequential
calls and calls from many threads share one pool of HTTP connections. Close the executor with
``executor.close()`` or use it as ``with TaskExecutor(...) as executor``. From code that runs
on an event loop, use :class:`taskexec.TaskExecutor` instead: this shim refuses to block a
running loop.
"""

_ORCHESTRATOR_DOC = """Runs many tasks concurrently, blocking until all are done.

Dependencies run first, at most ``max_concurrency`` tasks at once. Every task handed in gets
exactly one result. A task whose dependency did not succeed is ``skipped``; with ``fail_fast``
the first failure cancels the rest. The message bus of lifecycle events is not mirrored here
(read it through :class:`taskexec.ProjectOrchestrator`); a bus passed here still receives them.

Args:
    executor: Runs each task (a ``taskexec.sync.TaskExecutor``); without one, the orchestrator
        makes (and owns) its own.
    max_concurrency: Most tasks running at once.
    bus: Where lifecycle events go (default: a new ``MessageBus``).

Raises:
    InvalidValueError: ``max_concurrency`` is below 1 (a ``ValueError``).
"""

_STREAM_DOC = """A task's reply as it arrives, blocking: ``for delta in stream`` gives deltas.

Made by :meth:`TaskExecutor.stream`; nothing is sent until the stream is iterated. Use it
as ``with executor.stream(task) as stream:`` so that leaving the block, however (``break``,
an exception, Ctrl-C), closes the request at once; ``close()`` does the same by hand, and a
stream dropped half-read is closed when it is collected. The whole stream runs in one task
on the process's shared loop (or, on the legacy engine, in the calling thread).

After the iteration ended or the block exited, :attr:`result` is the task's
:class:`ExecutionResult`: on success its ``output`` is the joined deltas; a stream left
early is ``cancelled`` and a stream that failed after some text arrived is ``failed``, both
with the text received so far as ``output``. Retries happen only before the first delta,
within the task's deadline, which covers the whole stream.
"""

_STREAM_CLOSE_DOC = """Close the stream: its request is closed (its script killed) first.

The result is then ``cancelled`` with the text received so far, unless the stream had
already ended.
"""

SHIMS = (
    Shim(
        "taskexec._executor",
        "TaskExecutor",
        docs={"": _EXECUTOR_DOC},
        entries=frozenset({"execute"}),
    ),
    Shim(
        "taskexec._stream",
        "TaskStream",
        wraps=True,
        docs={"": _STREAM_DOC, "aclose": _STREAM_CLOSE_DOC},
    ),
    Shim(
        "taskexec._orchestrator",
        "ProjectOrchestrator",
        exclude={
            "stream": "an async iterator; sync callers use execute_tasks()",
            "executor": "returns the async executor; keep the sync one you passed in",
            "bus": "the message bus is async-only for now (see the contract)",
        },
        docs={"": _ORCHESTRATOR_DOC},
        entries=frozenset({"execute_task", "execute_tasks", "run"}),
    ),
)
