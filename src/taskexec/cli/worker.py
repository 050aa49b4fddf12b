"""``taskexec worker`` and ``taskexec workers``: the commands of the ``workers`` extra.

Both load :mod:`taskexec.distributed` through :func:`taskexec._plugins.load_plugin`, so that
without the extra they exit 2 naming it, and so that no other command loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .._engines.selection import BROKER_ENV_VAR, RESULTS_ENV_VAR
from .._errors import MissingExtraError
from .._plan import load_agents
from .._plugins import load_plugin
from ._args import positive_int, seconds
from ._output import UsageError, printable
from ._signals import Interrupts
from ._status import EXIT_OK

__all__ = ("register", "worker", "workers")


def _distributed(command: str) -> ModuleType:
    return load_plugin("workers", f"taskexec {command}")


def _distributed_for_argument() -> ModuleType:
    try:
        return _distributed("worker")
    except MissingExtraError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _worker_concurrency(value: str) -> int:
    limit: int = _distributed_for_argument().MAX_CONCURRENCY
    number = positive_int(value)
    if number > limit:
        raise argparse.ArgumentTypeError(
            f"must be at most {limit} (RabbitMQ's prefetch count), not {number}"
        )
    return number


def _worker_name(value: str) -> str:
    if not _distributed_for_argument().WORKER_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{printable(value)!r} is not a worker name: use 1-128 letters, digits, '_', '.', "
            "':', '@' or '-'"
        )
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``worker`` and ``workers`` commands."""
    worker_parser = commands.add_parser(
        "worker",
        help="serve agents to distributed runs until Ctrl-C or SIGTERM",
        description="Take tasks of the agents AGENTS_FILE defines from RabbitMQ, run them, and "
        "store their results in Redis. Keys come from this process's environment. Needs the "
        "workers extra: pip install 'taskexec[workers]'.",
    )
    worker_parser.add_argument(
        "agents_file", metavar="AGENTS_FILE", help="a plan file, or a file with only 'agents:'"
    )
    worker_parser.add_argument("--broker", metavar="URL", help=f"default: ${BROKER_ENV_VAR}")
    worker_parser.add_argument("--results", metavar="URL", help=f"default: ${RESULTS_ENV_VAR}")
    worker_parser.add_argument(
        "--concurrency",
        type=_worker_concurrency,
        default=100,
        help="most tasks running at once (default 100, at most 65535)",
    )
    worker_parser.add_argument(
        "--name", type=_worker_name, help="name in the registry (default: HOST-PID)"
    )
    worker_parser.add_argument(
        "--grace",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="on stop, time for tasks in flight to finish before they are handed back (default 10)",
    )
    worker_parser.add_argument(
        "--events",
        action="store_true",
        help="also publish each task's end on the events exchange (for a dashboard); "
        "orchestrators do not need it",
    )
    worker_parser.set_defaults(handler=worker)

    workers_parser = commands.add_parser("workers", help="list the live workers of a cluster")
    workers_parser.add_argument("--broker", metavar="URL", help=f"default: ${BROKER_ENV_VAR}")
    workers_parser.add_argument("--results", metavar="URL", help=f"default: ${RESULTS_ENV_VAR}")
    workers_parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    workers_parser.set_defaults(handler=workers)


def _cluster(distributed: ModuleType, args: argparse.Namespace) -> Any:
    cluster = distributed.Cluster.from_env(args.broker, args.results)
    if cluster is None:
        raise UsageError(
            f"no cluster: pass --broker URL --results URL (or set {BROKER_ENV_VAR} and "
            f"{RESULTS_ENV_VAR})"
        )
    return cluster


def worker(args: argparse.Namespace) -> int:
    """Serve the agents of ``args.agents_file`` until stopped; return the exit code."""
    distributed = _distributed("worker")
    agents = load_agents(args.agents_file)
    cluster = _cluster(distributed, args)
    if args.events:
        cluster = dataclasses.replace(cluster, events=True)
    worker = distributed.Worker(
        agents, cluster, concurrency=args.concurrency, name=args.name, grace_s=args.grace
    )

    async def serve() -> None:
        stop, hurry = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                print(
                    f"taskexec: worker {worker.name}: handing back {worker.in_flight} task(s) now",
                    file=sys.stderr,
                )
                hurry.set()
                return
            print(
                f"taskexec: worker {worker.name} stopping: waiting up to {args.grace:g} s for "
                f"{worker.in_flight} task(s) in flight (again to hand them back now)",
                file=sys.stderr,
            )
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in Interrupts.signals():
            loop.add_signal_handler(signum, on_signal)
        print(
            f"taskexec: worker {worker.name} serving {', '.join(sorted(worker.executor.agents))}"
            f" ({args.concurrency} at once); Ctrl-C or SIGTERM to stop",
            file=sys.stderr,
        )
        await worker.serve(stop, hurry)

    # The worker's own entry point: it owns the process's event loop.
    asyncio.run(serve())
    print(f"taskexec: worker {worker.name} stopped after {worker.done} task(s)", file=sys.stderr)
    return EXIT_OK


def workers(args: argparse.Namespace) -> int:
    """List the live workers of a cluster; return the exit code."""
    distributed = _distributed("workers")
    cluster = _cluster(distributed, args)
    workers, depths = asyncio.run(distributed.cluster_status(cluster))
    if args.json:
        data = {"workers": [w.model_dump() for w in workers], "queued": depths}
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    table = Table(title=f"{len(workers)} live worker(s)")
    for column in ("worker", "host", "pid", "agents", "in flight", "done", "seen"):
        table.add_column(column)
    now = time.time()
    for w in workers:
        table.add_row(
            escape(printable(w.name)),
            escape(printable(w.host)),
            str(w.pid),
            escape(printable(", ".join(w.agents))),
            f"{w.in_flight}/{w.concurrency}",
            str(w.done),
            f"{max(0.0, now - w.seen_at):.1f}s ago",
        )
    console = Console()
    console.print(table)
    for agent, depth in sorted(depths.items()):
        console.print(f"queue of {escape(printable(agent))}: {depth} task(s) waiting")
    return EXIT_OK
