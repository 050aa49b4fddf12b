"""``taskexec run PLAN``: run a plan's tasks, in-process or on workers, and report them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from .. import flags
from .._async_engine import run_batch
from .._calls import budget_settings
from .._engines.base import Batch, Engine, Job, check_run_id, new_run_id
from .._engines.registry import select_engine
from .._executor import TaskExecutor
from .._models import AgentTask, ExecutionError, ExecutionResult, ExecutionStatus
from .._plan import load_plan
from .._results import Progress
from .._stream import DeltaPrinter, stream_engine_name, stream_task
from ..bus import MessageBus
from ._args import engine_name, positive_float, positive_int
from ._output import UsageError
from ._report import FULL_TABLE_MAX, Reporter, open_for_append, print_summary, read_previous
from ._signals import Interrupts
from ._status import EXIT_FAILED, EXIT_OK, EXIT_USAGE

__all__ = ("CONCURRENCY_ENV_VAR", "register", "run")

CONCURRENCY_ENV_VAR = "TASKEXEC_MAX_CONCURRENCY"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` command."""
    run_parser = commands.add_parser("run", help="run a plan's tasks")
    run_parser.add_argument("plan", help="plan file (YAML or JSON)")
    run_parser.add_argument("--concurrency", type=positive_int, help="most tasks running at once")
    run_parser.add_argument(
        "--engine", type=engine_name, metavar="{async,legacy}", help="async (default) or legacy"
    )
    run_parser.add_argument(
        "--output", metavar="FILE.jsonl", help="append one JSON result per task"
    )
    run_parser.add_argument(
        "--resume", action="store_true", help="skip tasks already successful in --output"
    )
    run_parser.add_argument(
        "--fail-fast", action="store_true", help="cancel the rest at the first failure"
    )
    run_parser.add_argument(
        "--json", action="store_true", help="print the results as JSON, not a table"
    )
    run_parser.add_argument(
        "--full-table",
        action="store_true",
        help=f"list every task in the summary (by default only up to {FULL_TABLE_MAX} tasks; "
        "larger runs show the slowest and the failed ones)",
    )
    run_parser.add_argument(
        "--fsync",
        action="store_true",
        help="fsync --output after every line (survives a machine crash; slower)",
    )
    run_parser.add_argument(
        "--stream",
        action="store_true",
        help="print each task's text on stdout as it arrives (each line prefixed with its task "
        "id when several tasks run at once)",
    )
    run_parser.add_argument(
        "--max-cost",
        type=positive_float,
        metavar="USD",
        help="stop starting tasks whose worst-case cost no longer fits under this many USD "
        "(default: the plan's settings.max_cost_usd)",
    )
    run_parser.add_argument(
        "--allow-unpriced",
        action="store_true",
        help="with a cost ceiling, run agents whose price is unknown outside it (default: refuse)",
    )
    run_parser.add_argument(
        "--broker",
        metavar="URL",
        help="RabbitMQ URL: run tasks on workers (default: $TASKEXEC_BROKER_URL)",
    )
    run_parser.add_argument(
        "--results",
        metavar="URL",
        help="Redis URL of a distributed run (default: $TASKEXEC_RESULTS_URL)",
    )
    run_parser.add_argument(
        "--run-id",
        metavar="ID",
        help="a distributed run's id; a re-run with the same id keeps the results stored under it",
    )
    run_parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the plan; return the exit code."""
    if args.stream and args.json:
        raise UsageError(
            "--stream prints the tasks' text on stdout, where --json prints the results: use "
            "one, or --stream with --output FILE.jsonl"
        )
    plan = load_plan(args.plan)
    if args.run_id is not None:
        check_run_id(args.run_id)
    # Flags win over the plan, the plan over the environment (which the engine seam reads); a
    # setting that is overridden is not read at all, so a bad environment value cannot stop a
    # run whose flag replaces it.
    override = args.engine or plan.settings.engine
    concurrency = (
        args.concurrency or plan.settings.max_concurrency or _environment_concurrency() or 64
    )
    fail_fast = args.fail_fast or plan.settings.fail_fast
    executor = TaskExecutor(
        plan.agents,
        default_agent=plan.settings.default_agent,
        broker_url=args.broker,
        results_url=args.results,
    )
    previous: dict[str, ExecutionResult] = {}
    output_path = Path(args.output) if args.output else None
    if args.resume:
        if output_path is None:
            raise UsageError("--resume needs --output FILE.jsonl, the file of the earlier run")
        previous = {k: r for k, r in read_previous(output_path).items() if r.ok}
    kept = [previous[t.id] for t in plan.tasks if t.id in previous]
    outputs = {task_id: result.output for task_id, result in previous.items()}
    todo = [t.without_done(outputs) for t in plan.tasks if t.id not in previous]
    if kept:
        print(f"taskexec: resuming, {len(kept)} task(s) already succeeded", file=sys.stderr)
    max_cost = args.max_cost if args.max_cost is not None else plan.settings.max_cost_usd
    # A run's own call settings: held to the ceiling, counting what the kept results cost
    # (UnpricedAgentError, exit 2, names the agents whose price is unknown).
    settings = budget_settings(
        executor.parts.settings,
        executor.parts.roster,
        todo,
        max_cost,
        allow_unpriced=args.allow_unpriced,
        spent_usd=sum(r.usage.cost_usd or 0.0 for r in kept),
    )
    with flags.use_engine(override) if override else contextlib.nullcontext():
        # The one place an engine is chosen; the command's own --engine is no news to announce.
        engine = select_engine(executor.parts.engines, announce=False)
        run_id = _run_id(args, engine, executor)
        output = open_for_append(output_path) if output_path else None
        started = time.monotonic()
        interrupts = Interrupts()
        report = Reporter(
            todo,
            output,
            sys.stderr,
            fsync=args.fsync,
            # Results that cannot be recorded are not worth the calls: stop, as Ctrl-C would.
            on_write_error=lambda exc: interrupts.stop("its --output file could not be written"),
        )
        counts: dict[str, int] = {}
        try:
            with report:
                bus = MessageBus(maxsize=max(1000, 2 * len(todo)))
                batch = executor.parts.batch(
                    todo,
                    fail_fast=fail_fast,
                    limit=concurrency,
                    bus=bus,
                    on_result=report.finished,
                    run_id=run_id,
                    settings=settings,
                )
                printer: DeltaPrinter | None = None
                if args.stream:
                    stream_engine_name(engine)  # a usage error if this engine cannot stream
                    several = concurrency > 1 and len(todo) > 1
                    printer = DeltaPrinter(sys.stdout.write, prefix=several)
                if engine.runs_in_caller_thread and printer is None:
                    completed = _run_in_thread(engine, batch, interrupts)
                else:
                    # The command line's own entry point: it owns the process's event loop.
                    completed = asyncio.run(
                        _run_on_loop(engine, batch, executor, report, interrupts, counts, printer)
                    )
                if printer is not None:
                    printer.close()
                for task in todo:
                    if task.id not in report.results:
                        cancelled = _cancelled(executor, task, engine, interrupts.name)
                        report.finished(cancelled, ran=False)
        finally:
            if output is not None:
                try:
                    output.close()
                except OSError as exc:
                    report.write_error = report.write_error or exc
    by_id = {**previous, **report.results}
    results = [by_id[t.id] for t in plan.tasks]
    print_summary(results, time.monotonic() - started, args.json, args.full_table)
    if counts:
        print(
            f"taskexec: run {run_id}: {counts.get('reused', 0)} result(s) reused from an earlier "
            f"run of this id, {counts.get('executions', 0)} task execution(s) on workers, "
            f"{counts.get('duplicates', 0)} duplicate result(s) dropped",
            file=sys.stderr,
        )
    if report.write_error is not None:
        print(
            f"taskexec: cannot write to {output_path}: "
            f"{report.write_error.strerror or report.write_error}; the run was stopped, and the "
            "summary above is the only record of the results from then on",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not completed:
        return interrupts.exit_code
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _run_id(args: argparse.Namespace, engine: Engine, executor: TaskExecutor) -> str | None:
    """Return the run's id on an engine that keeps runs (printed, to re-run it), else None."""
    if not engine.keeps_runs:
        cluster = executor.parts.engines.cluster()
        if cluster is not None:
            if cluster.broker is None or cluster.results is None:
                raise UsageError(
                    "a distributed run needs both a broker and a results store (--broker and "
                    "--results, or TASKEXEC_BROKER_URL and TASKEXEC_RESULTS_URL)"
                )
            print(
                "taskexec: the legacy engine runs in-process; the broker is not used",
                file=sys.stderr,
            )
        elif args.run_id:
            raise UsageError("--run-id needs a distributed run: --broker URL --results URL")
        return None
    run_id: str = args.run_id or new_run_id()
    print(
        f"taskexec: run id {run_id} (re-run with --run-id {run_id} to keep its stored results)",
        file=sys.stderr,
    )
    return run_id


def _cancelled(
    executor: TaskExecutor, task: AgentTask, engine: Engine, why: str
) -> ExecutionResult:
    error = ExecutionError(kind="cancelled", message=f"cancelled: the run was interrupted ({why})")
    return executor.parts.roster.not_run_result(
        task, ExecutionStatus.CANCELLED, error, engine.result_engine
    )


async def _run_on_loop(
    engine: Engine,
    batch: Batch,
    executor: TaskExecutor,
    report: Reporter,
    interrupts: Interrupts,
    counts: dict[str, int],
    printer: DeltaPrinter | None = None,
) -> bool:
    """Run the batch on this (the command's) event loop; return False if interrupted.

    With a ``printer`` (``--stream``), each task's reply is streamed to it as it arrives.
    """
    loop = asyncio.get_running_loop()
    bus = batch.bus
    assert isinstance(bus, MessageBus)  # the command's own bus, made in run()

    async def watch_starts() -> None:
        async for _ in bus.subscribe("task.started"):
            report.started()

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.5)
            report.tick()

    # Results go to the report the moment each task ends (the batch's on_result), also the
    # "cancelled while running" results of tasks cut off by an interruption.
    runner = asyncio.create_task(
        engine.execute_tasks(batch) if printer is None else _streamed(engine, batch, printer)
    )
    watcher = asyncio.create_task(watch_starts())
    ticker = asyncio.create_task(tick())
    interrupts.on_first = runner.cancel
    handled = Interrupts.signals()
    for signum in handled:
        loop.add_signal_handler(signum, interrupts, signum)
    try:
        await runner
        if batch.run_id is not None:
            counts.update(await engine.run_counts(batch.run_id))
        return True
    except asyncio.CancelledError:
        return False
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        watcher.cancel()
        ticker.cancel()
        await bus.aclose()
        await executor.aclose()


async def _streamed(engine: Engine, batch: Batch, printer: DeltaPrinter) -> list[ExecutionResult]:
    """Run the batch with the engine's scheduler, each task streamed to ``printer``: the same
    dependencies, placeholders, bound and results as ``engine.execute_tasks``."""
    batch.check()

    def run_one(
        task: AgentTask, outputs: Mapping[str, str | None] | None, progress: Progress
    ) -> Coroutine[Any, Any, ExecutionResult]:
        job = Job(batch.roster, batch.settings, task)
        return stream_task(job, engine, printer.feed, outputs, progress)

    return await run_batch(batch, run_one)


def _run_in_thread(engine: Engine, batch: Batch, interrupts: Interrupts) -> bool:
    """Run the batch in this (the main) thread; return False if interrupted."""

    def interrupt() -> None:
        raise KeyboardInterrupt  # stops the blocking call in flight, in this (the main) thread

    def on_signal(signum: int, frame: object) -> None:
        interrupts(signum)

    interrupts.on_first = interrupt
    previous = {signum: signal.signal(signum, on_signal) for signum in Interrupts.signals()}
    try:
        engine.execute_tasks_blocking(batch)
    except KeyboardInterrupt:
        # The engine stopped the script or request in flight, and reported the task it cut
        # off, before this got here.
        return False
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return True


def _environment_concurrency() -> int | None:
    """Return ``TASKEXEC_MAX_CONCURRENCY``, or None when unset or blank."""
    raw = os.environ.get(CONCURRENCY_ENV_VAR, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(
            f"invalid environment: {CONCURRENCY_ENV_VAR}={raw!r} is not an integer >= 1"
        )
    return value
