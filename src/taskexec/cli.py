"""The ``taskexec`` command: run a plan, validate it, or serve the mock LLM server.

Exit codes: 0 every task succeeded, 1 some task did not, 2 usage or plan error, 129 SIGHUP
(the terminal closed), 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, ClassVar

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import flags
from ._engines import CLUSTER_ENV_VARS, ENGINES, Batch, Engine
from ._errors import PlanError, TaskexecError
from ._executor import TaskExecutor
from ._limits import waiting_now
from ._models import AgentTask, ExecutionError, ExecutionResult, ExecutionStatus
from ._modes.script import kill_live_groups
from ._plan import load_agents, load_plan
from ._version import __version__
from .bus import MessageBus

if TYPE_CHECKING:
    from .distributed import Cluster, WorkersEngine

__all__ = ("main",)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONCURRENCY_ENV_VAR = "TASKEXEC_MAX_CONCURRENCY"


class UsageError(Exception):
    """A mistake on the command line or in the environment: message, exit 2, no traceback."""


# -- output -------------------------------------------------------------------------------------

#: Characters that would act on a terminal instead of showing: C0 and C1 controls (ESC starts
#: escape sequences; NUL, BEL, CR rewrite or ring), and the bidirectional overrides and isolates
#: that reorder what is shown. Line breaks and tabs become spaces; the rest is shown escaped.
_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in "\n\t":
        return " "
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class _BestEffortStream(io.TextIOBase):
    """Standard output or error whose reader may go away: a pipe closed by ``| head``, a
    terminal that hung up, or a descriptor closed before the start (``2>&-``; Python then has
    no stream at all). Writes that fail are dropped, so the run goes on and every result still
    reaches ``--output``; a closed stderr must not cost the tasks still running.
    """

    def __init__(self, stream: IO[str] | None) -> None:
        super().__init__()
        self.stream = stream
        self.lost = stream is None

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.stream is not None and not self.lost:
            try:
                self.stream.write(text)
            except OSError:
                self._lose(self.stream)
        return len(text)

    def flush(self) -> None:
        if self.stream is not None and not self.lost:
            try:
                self.stream.flush()
            except OSError:
                self._lose(self.stream)

    def isatty(self) -> bool:
        try:
            return self.stream is not None and not self.lost and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.stream is None:
            raise io.UnsupportedOperation("the stream was closed before the command started")
        return self.stream.fileno()

    def _lose(self, stream: IO[str]) -> None:
        self.lost = True
        # What the stream still buffers would fail again when Python flushes it at exit (and
        # turn the exit code into 120): point its descriptor at /dev/null, as Python's notes on
        # SIGPIPE advise.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, stream.fileno())
            finally:
                os.close(devnull)


def _lines(text: str) -> str:
    return "\n".join(printable(line) for line in text.splitlines())


def printable(text: str) -> str:
    """Return ``text`` safe to print on a terminal: control characters shown, not obeyed.

    Only what is printed is escaped; the JSONL results keep the exact text.
    """
    return _TERMINAL_UNSAFE.sub(_escape_char, text.replace("\r\n", "\n"))


class Reporter:
    """Progress on stderr, the JSONL file, and the final summary."""

    def __init__(
        self,
        tasks: Sequence[AgentTask],
        output: IO[str] | None,
        stderr: IO[str],
        *,
        fsync: bool = False,
        on_write_error: Callable[[OSError], object] = lambda exc: None,
    ) -> None:
        self.total = len(tasks)
        self.output = output
        self.fsync = fsync
        #: The first failed write to the results file (a full disk, say): no line after it is
        #: written, and ``on_write_error`` is told once, to stop the run.
        self.write_error: OSError | None = None
        self._on_write_error = on_write_error
        self.results: dict[str, ExecutionResult] = {}
        self.running = 0
        self.failed = 0
        self._console = Console(file=stderr, stderr=True)
        self._plain = not self._console.is_terminal
        self._stderr = stderr
        self._progress: Progress | None = None
        self._bar: TaskID | None = None

    def __enter__(self) -> Reporter:
        if not self._plain:
            self._progress = Progress(
                TextColumn("[bold]tasks"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._progress.start()
            self._bar = self._progress.add_task(
                "tasks", total=self.total, running=0, failed=0, rate=""
            )
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def started(self) -> None:
        self.running += 1
        self._refresh()

    def finished(self, result: ExecutionResult, *, ran: bool = True) -> None:
        if result.task_id in self.results:
            return
        self.results[result.task_id] = result
        if ran and result.status is not ExecutionStatus.SKIPPED:
            self.running = max(0, self.running - 1)
        if not result.ok:
            self.failed += 1
        if self.output is not None and self.write_error is None:
            # One line per finished task, handed to the OS before we go on: a crash of this
            # process loses nothing. --fsync also waits for the disk, for a crash of the machine.
            try:
                self.output.write(result.model_dump_json() + "\n")
                self.output.flush()
                if self.fsync:
                    os.fsync(self.output.fileno())
            except OSError as exc:
                self.write_error = exc
                self._on_write_error(exc)
        if self._plain:
            done = len(self.results)
            detail = printable(result.error.message) if result.error else ""
            print(
                f"[{done:>{len(str(self.total))}}/{self.total}] {result.status.value:<9} "
                f"{result.task_id} ({result.duration_s:.2f}s){'  ' + detail if detail else ''}",
                file=self._stderr,
                flush=True,
            )
        self._refresh()

    def _refresh(self) -> None:
        if self._progress is None or self._bar is None:
            return
        elapsed = max(time.monotonic() - self._started, 1e-9)
        waiting = waiting_now()
        limited = f"  rate-limited: {waiting} waiting" if waiting else ""
        self._progress.update(
            self._bar,
            completed=len(self.results),
            running=self.running,
            failed=self.failed,
            rate=f"{len(self.results) / elapsed:.1f}/s{limited}",
        )

    def tick(self) -> None:
        """Refresh the progress line between task events (a rate limit's waiting count)."""
        self._refresh()


#: Up to this many tasks, the summary table lists every task; beyond it (unless --full-table),
#: it lists the slowest and the ones that did not succeed, so that a 20,000-task run does not
#: spend longer drawing its table than running.
FULL_TABLE_MAX = 50
SLOWEST_SHOWN = 10
FAILED_SHOWN = 40


def _print_summary(
    results: Sequence[ExecutionResult], elapsed: float, as_json: bool, full_table: bool = False
) -> None:
    if as_json:
        # Each result serialised by pydantic directly: no round trip through json.loads.
        out = sys.stdout
        out.write("[\n" if results else "[")
        out.write(",\n".join(r.model_dump_json(indent=2) for r in results))
        out.write("\n]\n" if results else "]\n")
        return
    console = Console(file=sys.stdout, width=max(100, Console().width))
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    if full_table or len(results) <= FULL_TABLE_MAX:
        console.print(_table("taskexec run", results))
    else:
        slowest = sorted(results, key=lambda r: r.duration_s, reverse=True)[:SLOWEST_SHOWN]
        console.print(_table(f"the {len(slowest)} slowest tasks", slowest))
        failed = [r for r in results if not r.ok]
        if failed:
            title = f"tasks that did not succeed ({len(failed)})"
            console.print(_table(title, failed[:FAILED_SHOWN]))
            if len(failed) > FAILED_SHOWN:
                console.print(
                    f"... and {len(failed) - FAILED_SHOWN} more (--full-table, --json or "
                    "--output FILE.jsonl list them all)"
                )
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    console.print(f"{len(results)} tasks: {parts} in {elapsed:.2f} s")


def _table(title: str, results: Sequence[ExecutionResult]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("task", "status", "agent", "mode", "attempts", "time", "output / error"):
        table.add_column(column, overflow="fold" if column == "output / error" else "ellipsis")
    for r in results:
        text = r.output if r.ok else (r.error.message if r.error else "")
        text = printable(text or "")
        style = "green" if r.ok else ("yellow" if r.status is ExecutionStatus.SKIPPED else "red")
        table.add_row(
            escape(r.task_id),
            f"[{style}]{r.status.value}[/]",
            escape(r.agent),
            r.mode,
            str(r.attempts),
            f"{r.duration_s:.2f}s",
            escape(text[:80] + ("..." if len(text) > 80 else "")),
        )
    return table


# -- run ----------------------------------------------------------------------------------------


def _read_previous(path: Path) -> dict[str, ExecutionResult]:
    """Return the latest result per task id in a JSONL file (later lines win).

    A line that is not a result (cut short by a crash mid-write, not UTF-8, edited by hand) is
    skipped with a warning: that task simply runs again.
    """
    latest: dict[str, ExecutionResult] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return latest
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the results file: {exc.strerror or exc}") from None
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = f"byte offset {start + exc.start}"
            _warn(f"{path}:{number}: skipping a line that is not UTF-8 ({where})")
            continue
        try:
            result = ExecutionResult.model_validate_json(line)
        except ValidationError:
            cut = " (cut short)" if offset > len(data) else ""
            _warn(f"{path}:{number}: skipping a line that is not a result{cut}")
            continue
        latest[result.task_id] = result
    return latest


def _open_for_append(path: Path) -> IO[str]:
    """Open a results file for appending, on a line of its own.

    After a crash mid-write the file can end in a partial line; a new line starts first, so the
    next result is not glued onto it and stays readable.
    """
    try:
        output = path.open("a+b")
    except OSError as exc:
        raise UsageError(f"{path}: cannot open the results file: {exc.strerror or exc}") from None
    if output.seek(0, os.SEEK_END) > 0:
        output.seek(-1, os.SEEK_END)
        if output.read(1) != b"\n":
            output.write(b"\n")
    return io.TextIOWrapper(output, encoding="utf-8", newline="\n", write_through=True)


def _warn(message: str) -> None:
    print(f"taskexec: {printable(message)}", file=sys.stderr)


class _Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) during a run.

    The first one cancels cleanly: requests closed, scripts' process groups stopped, a
    ``cancelled`` result for every unfinished task, then exit 128 plus the signal's number (130
    for SIGINT, 143 for SIGTERM, 129 for SIGHUP). A second one exits at once, after it has
    SIGKILLed every script process group still running: no child outlives the command either
    way.
    """

    NAMES: ClassVar[dict[int, str]] = {
        signal.SIGINT: "Ctrl-C",
        signal.SIGTERM: "SIGTERM",
        # Scripts run in sessions of their own, so a terminal that closes reaches only this
        # process: left to its default, SIGHUP would end it and orphan them.
        signal.SIGHUP: "SIGHUP",
    }
    _WHAT: ClassVar[dict[int, str]] = {
        signal.SIGINT: "interrupted",
        signal.SIGTERM: "terminated",
        signal.SIGHUP: "hung up",
    }

    @classmethod
    def signals(cls) -> list[int]:
        """The signals to handle: SIGHUP only where it is not ignored (under ``nohup`` the user
        asked the command to outlive the terminal)."""
        return [s for s in cls.NAMES if s != signal.SIGHUP or signal.getsignal(s) != signal.SIG_IGN]

    def __init__(self) -> None:
        self.signum: int | None = None
        #: Why the run stopped when no signal stopped it.
        self.why: str | None = None
        self.on_first: Callable[[], object] = lambda: None

    @property
    def exit_code(self) -> int:
        """128 plus the number of the first signal, as shells report it."""
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        """The first signal, as the user knows it (or why the run stopped without one)."""
        if self.signum is None and self.why is not None:
            return self.why
        return self.NAMES.get(self.signum or signal.SIGINT, "a signal")

    def stop(self, why: str) -> None:
        """Cancel the run as a first signal does, for a reason of the command's own."""
        if self.signum is None and self.why is None:
            self.why = why
            self.on_first()

    def __call__(self, signum: int) -> None:
        if self.signum is not None:
            kill_live_groups()
            os._exit(self.exit_code)  # the second signal: leave at once, children ended
        self.signum = signum
        print(
            f"\ntaskexec: {self._WHAT[signum]}, cancelling "
            f"({self.NAMES[signum]} again to quit at once)",
            file=sys.stderr,
        )
        self.on_first()


def _cancelled(
    executor: TaskExecutor, task: AgentTask, engine: flags.Engine, why: str
) -> ExecutionResult:
    error = ExecutionError(kind="cancelled", message=f"cancelled: the run was interrupted ({why})")
    return executor._roster.not_run_result(task, ExecutionStatus.CANCELLED, error, engine)


async def _run_on_loop(
    engine: Engine, batch: Batch, bus: MessageBus, report: Reporter, interrupts: _Interrupts
) -> bool:
    """Run the batch on this (the command's) event loop; return False if interrupted."""
    loop = asyncio.get_running_loop()

    async def watch_starts() -> None:
        async for _ in bus.subscribe("task.started"):
            report.started()

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.5)
            report.tick()

    # Results go to the report the moment each task ends (the batch's on_result), also the
    # "cancelled while running" results of tasks cut off by an interruption.
    runner = asyncio.create_task(engine.execute_tasks(batch))
    watcher = asyncio.create_task(watch_starts())
    ticker = asyncio.create_task(tick())
    interrupts.on_first = runner.cancel
    handled = _Interrupts.signals()
    for signum in handled:
        loop.add_signal_handler(signum, interrupts, signum)
    try:
        await runner
        return True
    except asyncio.CancelledError:
        return False
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        watcher.cancel()
        ticker.cancel()
        await bus.aclose()
        await batch.settings.pool.aclose()


def _run_in_thread(engine: Engine, batch: Batch, interrupts: _Interrupts) -> bool:
    """Run the batch in this (the main) thread; return False if interrupted."""

    def interrupt() -> None:
        raise KeyboardInterrupt  # stops the blocking call in flight, in this (the main) thread

    def on_signal(signum: int, frame: object) -> None:
        interrupts(signum)

    interrupts.on_first = interrupt
    previous = {signum: signal.signal(signum, on_signal) for signum in _Interrupts.signals()}
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


def _cmd_run(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    # Flags win over the plan, the plan over the environment; a setting that is overridden is
    # not read at all, so a bad environment value cannot stop a run whose flag replaces it.
    engine: flags.Engine = (
        args.engine or plan.settings.engine or flags.environment_engine() or "async"
    )
    concurrency = (
        args.concurrency or plan.settings.max_concurrency or _environment_concurrency() or 64
    )
    fail_fast = args.fail_fast or plan.settings.fail_fast
    executor = TaskExecutor(plan.agents, default_agent=plan.settings.default_agent)
    previous: dict[str, ExecutionResult] = {}
    output_path = Path(args.output) if args.output else None
    if args.resume:
        if output_path is None:
            raise UsageError("--resume needs --output FILE.jsonl, the file of the earlier run")
        previous = {k: r for k, r in _read_previous(output_path).items() if r.ok}
    kept = [previous[t.id] for t in plan.tasks if t.id in previous]
    outputs = {task_id: result.output for task_id, result in previous.items()}
    todo = [t.without_done(outputs) for t in plan.tasks if t.id not in previous]
    if kept:
        print(f"taskexec: resuming, {len(kept)} task(s) already succeeded", file=sys.stderr)
    workers = _workers_engine(args, engine)
    output = _open_for_append(output_path) if output_path else None
    started = time.monotonic()
    interrupts = _Interrupts()
    report = Reporter(
        todo,
        output,
        sys.stderr,
        fsync=args.fsync,
        # Results that cannot be recorded are not worth the calls: stop, as Ctrl-C would.
        on_write_error=lambda exc: interrupts.stop("its --output file could not be written"),
    )
    try:
        with flags.use_engine(engine), report:
            runner: Engine = workers or ENGINES[engine]
            bus = MessageBus(maxsize=max(1000, 2 * len(todo)))
            batch = Batch(
                executor._roster,
                executor._settings,
                todo,
                fail_fast,
                concurrency,
                bus,
                on_result=report.finished,
            )
            if runner.runs_in_caller_thread:
                completed = _run_in_thread(runner, batch, interrupts)
            else:
                # The command line's own entry point: it owns the process's event loop.
                completed = asyncio.run(_run_on_loop(runner, batch, bus, report, interrupts))
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
    _print_summary(results, time.monotonic() - started, args.json, args.full_table)
    if workers is not None and workers.counters:
        counted = workers.counters
        print(
            f"taskexec: run {workers.run_id}: {counted['executions']} task execution(s) on "
            f"workers, {counted['duplicates']} duplicate result(s) dropped",
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


def _workers_engine(args: argparse.Namespace, engine: flags.Engine) -> WorkersEngine | None:
    """Return the engine of a distributed run, or None to run in-process.

    Flags win over ``TASKEXEC_BROKER_URL`` / ``TASKEXEC_RESULTS_URL``. The rollback engine
    (``legacy``) always runs in-process.
    """
    configured = any(os.environ.get(v, "").strip() for v in CLUSTER_ENV_VARS)
    if not (args.broker or args.results or configured):  # blank values count as unset
        if args.run_id:
            raise UsageError("--run-id needs a distributed run: --broker URL --results URL")
        return None
    from .distributed import Cluster, WorkersEngine

    cluster = Cluster.from_env(args.broker, args.results)
    assert cluster is not None
    if engine == "legacy":
        print(
            "taskexec: the legacy engine runs in-process; the broker is not used", file=sys.stderr
        )
        return None
    from .distributed._dispatch import new_run_id

    workers = WorkersEngine(cluster, args.run_id or new_run_id())
    print(
        f"taskexec: run id {workers.run_id} (re-run with --run-id {workers.run_id} to "
        "keep its stored results)",
        file=sys.stderr,
    )
    return workers


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


def _cmd_validate(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    print(f"{args.plan}: ok ({len(plan.tasks)} tasks, {len(plan.agents)} agents)")
    return EXIT_OK


def _cmd_mock_server(args: argparse.Namespace) -> int:
    from .testing import MockServer

    async def serve() -> None:
        server = MockServer(
            args.host,
            args.port,
            latency_s=args.latency,
            faults=args.faults,
            rate_limit=args.rate_limit,
            token_limit=args.token_limit,
        )
        await server.start()
        print(f"taskexec mock server listening on {server.url}", flush=True)
        print(f"  OpenAI-compatible base_url: {server.openai_base_url}", flush=True)
        print(f"  Anthropic / Gemini base_url: {server.url}", flush=True)
        print(f"  api-mode agent url: {server.agent_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in _Interrupts.signals():
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await server.stop()

    try:
        # The command line's own entry point: it owns the process's event loop.
        asyncio.run(serve())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        where = f"{args.host}:{args.port}"
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"cannot listen on {where}: the port is taken; use --port") from None
        raise UsageError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return EXIT_OK


def _cluster(args: argparse.Namespace) -> Cluster:
    from .distributed import Cluster

    cluster = Cluster.from_env(args.broker, args.results)
    if cluster is None:
        raise UsageError(
            f"no cluster: pass --broker URL --results URL (or set {CLUSTER_ENV_VARS[0]} and "
            f"{CLUSTER_ENV_VARS[1]})"
        )
    return cluster


def _cmd_worker(args: argparse.Namespace) -> int:
    from .distributed import Worker

    agents = load_agents(args.agents_file)
    cluster = _cluster(args)
    worker = Worker(
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
        for signum in _Interrupts.signals():
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


def _cmd_workers(args: argparse.Namespace) -> int:
    from .distributed._status import cluster_status

    cluster = _cluster(args)
    workers, depths = asyncio.run(cluster_status(cluster))
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


def _faults(value: str) -> list[str]:
    return [f.strip() for f in value.split(",") if f.strip()]


def _engine(value: str) -> flags.Engine | None:
    try:
        return flags.parse_engine(value, "--engine")
    except TaskexecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _worker_concurrency(value: str) -> int:
    from .distributed._worker import MAX_CONCURRENCY

    number = _positive_int(value)
    if number > MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_CONCURRENCY} (RabbitMQ's prefetch count), not {number}"
        )
    return number


def _worker_name(value: str) -> str:
    from .distributed._worker import WORKER_NAME

    if not WORKER_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{printable(value)!r} is not a worker name: use 1-128 letters, digits, '_', '.', "
            "':', '@' or '-'"
        )
    return value


def _seconds(value: str) -> float:
    number = float(value)
    if not number >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskexec", description="Run LLM agent tasks concurrently from a plan file."
    )
    parser.add_argument("--version", action="version", version=f"taskexec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a plan's tasks")
    run.add_argument("plan", help="plan file (YAML or JSON)")
    run.add_argument("--concurrency", type=_positive_int, help="most tasks running at once")
    run.add_argument(
        "--engine", type=_engine, metavar="{async,legacy}", help="async (default) or legacy"
    )
    run.add_argument("--output", metavar="FILE.jsonl", help="append one JSON result per task")
    run.add_argument(
        "--resume", action="store_true", help="skip tasks already successful in --output"
    )
    run.add_argument(
        "--fail-fast", action="store_true", help="cancel the rest at the first failure"
    )
    run.add_argument("--json", action="store_true", help="print the results as JSON, not a table")
    run.add_argument(
        "--full-table",
        action="store_true",
        help=f"list every task in the summary (by default only up to {FULL_TABLE_MAX} tasks; "
        "larger runs show the slowest and the failed ones)",
    )
    run.add_argument(
        "--fsync",
        action="store_true",
        help="fsync --output after every line (survives a machine crash; slower)",
    )
    run.add_argument(
        "--broker",
        metavar="URL",
        help=f"RabbitMQ URL: run tasks on workers (default: ${CLUSTER_ENV_VARS[0]})",
    )
    run.add_argument(
        "--results",
        metavar="URL",
        help=f"Redis URL of a distributed run (default: ${CLUSTER_ENV_VARS[1]})",
    )
    run.add_argument(
        "--run-id",
        metavar="ID",
        help="a distributed run's id; a re-run with the same id keeps the results stored under it",
    )
    run.set_defaults(handler=_cmd_run)

    worker = commands.add_parser(
        "worker",
        help="serve agents to distributed runs until Ctrl-C or SIGTERM",
        description="Take tasks of the agents AGENTS_FILE defines from RabbitMQ, run them, and "
        "store their results in Redis. Keys come from this process's environment.",
    )
    worker.add_argument(
        "agents_file", metavar="AGENTS_FILE", help="a plan file, or a file with only 'agents:'"
    )
    worker.add_argument("--broker", metavar="URL", help=f"default: ${CLUSTER_ENV_VARS[0]}")
    worker.add_argument("--results", metavar="URL", help=f"default: ${CLUSTER_ENV_VARS[1]}")
    worker.add_argument(
        "--concurrency",
        type=_worker_concurrency,
        default=100,
        help="most tasks running at once (default 100, at most 65535)",
    )
    worker.add_argument(
        "--name", type=_worker_name, help="name in the registry (default: HOST-PID)"
    )
    worker.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="on stop, time for tasks in flight to finish before they are handed back (default 10)",
    )
    worker.set_defaults(handler=_cmd_worker)

    workers = commands.add_parser("workers", help="list the live workers of a cluster")
    workers.add_argument("--broker", metavar="URL", help=f"default: ${CLUSTER_ENV_VARS[0]}")
    workers.add_argument("--results", metavar="URL", help=f"default: ${CLUSTER_ENV_VARS[1]}")
    workers.add_argument("--json", action="store_true", help="print JSON, not a table")
    workers.set_defaults(handler=_cmd_workers)

    validate = commands.add_parser("validate", help="check a plan and list every problem")
    validate.add_argument("plan")
    validate.set_defaults(handler=_cmd_validate)

    from .testing import USAGE

    mock = commands.add_parser(
        "mock-server",
        help="serve the mock LLM server until Ctrl-C",
        description="Serve a mock of the OpenAI, Anthropic and Gemini APIs and of an api-mode "
        "agent on loopback, for trying taskexec with no keys and for tests.",
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8765)
    mock.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    mock.add_argument("--faults", type=_faults, default=[], help="e.g. 429,500,reset")
    mock.add_argument(
        "--rate-limit",
        type=_positive_int,
        metavar="N",
        help="at most N chat requests in any second (429 beyond)",
    )
    mock.add_argument(
        "--token-limit",
        type=_positive_int,
        metavar="N",
        help="at most N tokens in any second (429 beyond)",
    )
    mock.set_defaults(handler=_cmd_mock_server)
    from ._migrate.command import register as register_migrate

    register_migrate(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    # Started in the background by a non-interactive shell, a process inherits SIGINT ignored;
    # Ctrl-C handling below needs the default handler back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _BestEffortStream(sys.stdout), _BestEffortStream(sys.stderr)
    try:
        code: int = args.handler(args)
    except PlanError as exc:
        print(f"taskexec: invalid plan {_lines(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, TaskexecError) as exc:
        print(f"taskexec: {_lines(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
    return code
