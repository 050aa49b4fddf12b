"""The ``taskexec`` command: run a plan (in-process or on workers), validate it, serve workers,
list them, serve the mock LLM server, or migrate sync call sites to ``await``.

One module per job: :mod:`.run`, :mod:`.worker` (``worker`` and ``workers``, the ``workers``
extra's commands), :mod:`.validate`, :mod:`.mock_server`, and ``migrate`` (the codemod's
command lives with it, in :mod:`taskexec._migrate.command`); the report and the results file in
:mod:`._report`, terminal-safe output in :mod:`._output`, signals in :mod:`._signals`.

Exit codes: 0 every task succeeded, 1 some task did not, 2 usage or plan error (also a command
that needs a missing extra, which the message names), 129 SIGHUP (the terminal closed), 130
Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Sequence

from .._errors import PlanError, TaskexecError
from .._migrate import command as migrate
from .._version import __version__
from . import mock_server, run, validate, worker
from ._output import BestEffortStream, UsageError, lines
from ._status import EXIT_INTERRUPTED, EXIT_USAGE

__all__ = ("build_parser", "main")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every command."""
    parser = argparse.ArgumentParser(
        prog="taskexec", description="Run LLM agent tasks concurrently from a plan file."
    )
    parser.add_argument("--version", action="version", version=f"taskexec {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=mock_server.LazyEpilogParser
    )
    for command in (run, worker, validate, mock_server, migrate):
        command.register(commands)
    return parser


def _reserve_standard_descriptors() -> None:
    """Put /dev/null on descriptors 0-2 that the command was started without (``>&- 2>&-``).

    Otherwise the next file the process opens takes their number: an event loop's epoll or
    wake-up descriptor became "stdout", and a write meant for the terminal went into it (uvloop
    aborted the process). Python has already set ``sys.stdout`` (or ``sys.stderr``) to None for
    a closed one; that stays so.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free number, which is this one: those below are open by now.
            # Inheritable, as the descriptor it stands for would have been.
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    # Started in the background by a non-interactive shell, a process inherits SIGINT ignored;
    # Ctrl-C handling below needs the default handler back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _reserve_standard_descriptors()
    args = build_parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = BestEffortStream(sys.stdout), BestEffortStream(sys.stderr)
    # A run makes many short-lived objects per task, and each of the collector's full passes
    # would also walk everything imported so far (1,000 tasks on workers: 30-45 ms of the
    # run's start, before the first task went out). What exists now is left out of those
    # passes for the command's length, then handed back, so that a program that calls main()
    # in its own process keeps its objects collectable. Not if something froze objects
    # already (the program itself, a main() still running): unfreezing would undo that too.
    freezing = gc.get_freeze_count() == 0
    if freezing:
        gc.freeze()
    try:
        code: int = args.handler(args)
    except PlanError as exc:
        print(f"taskexec: invalid plan {lines(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, TaskexecError) as exc:
        print(f"taskexec: {lines(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if freezing:
            gc.unfreeze()
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
    return code
