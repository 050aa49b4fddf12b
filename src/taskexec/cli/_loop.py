"""The event loop a command runs on: uvloop where it is installed, asyncio's own otherwise.

The ``workers`` extra installs uvloop on Linux and macOS: a worker and the orchestrator of a
distributed run spend much of their time in the loop's socket and callback machinery, which
uvloop does in C (benchmarks/RESULTS.md, section 12). ``TASKEXEC_LOOP`` chooses: ``auto`` (the
default), ``uvloop`` (an error if it is not installed) or ``asyncio``. Only the command line's
own entry points use it; a program that imports taskexec keeps the loop it chose.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._output import UsageError

__all__ = ("LOOP_ENV_VAR", "loop_factory", "run_main")

T = TypeVar("T")
LOOP_ENV_VAR = "TASKEXEC_LOOP"
_CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return the factory of the loop ``TASKEXEC_LOOP`` chooses (None: asyncio's own).

    Raises:
        UsageError: An unknown choice, or ``uvloop`` chosen but not installed.
    """
    choice = os.environ.get(LOOP_ENV_VAR, "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise UsageError(f"{LOOP_ENV_VAR}={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError(
                f"{LOOP_ENV_VAR}=uvloop, but uvloop is not installed: "
                "pip install 'taskexec[workers]' (Linux and macOS)"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_main(main: Coroutine[Any, Any, T]) -> T:
    """Run a command's main coroutine on a loop of its own, as ``asyncio.run()`` does.

    The command's entry point owns the process's event loop: this is the top of the program,
    never a call from async code.
    """
    try:
        factory = loop_factory()
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
