"""The run's report: progress on stderr, the JSONL results file, and the final summary."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

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

from .._limits import waiting_now
from .._models import AgentTask, ExecutionResult, ExecutionStatus
from .._spend import spend_table, summarize_spend
from ._output import UsageError, printable, warn

__all__ = (
    "FULL_TABLE_MAX",
    "Reporter",
    "open_for_append",
    "print_summary",
    "read_previous",
)

#: How often plain progress lines (stderr not a terminal) are written: a few times a second.
LINES_EVERY_S = 0.2


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
        #: Plain progress lines not yet written: they go out together, a few times a second
        #: (one write per task cost a large run a tenth of its time).
        self._lines: list[str] = []
        self._written_at = 0.0
        self._flush_later: asyncio.TimerHandle | None = None

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
        self._write_lines()
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
            self._lines.append(
                f"[{done:>{len(str(self.total))}}/{self.total}] {result.status.value:<9} "
                f"{result.task_id} ({result.duration_s:.2f}s){'  ' + detail if detail else ''}\n"
            )
            self._coalesce()
        self._refresh()

    def _coalesce(self) -> None:
        """Write the pending lines now if none went out for a while, else soon."""
        if time.monotonic() - self._written_at >= LINES_EVERY_S:
            self._write_lines()
            return
        if self._flush_later is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write_lines()  # no loop to come back on
                return
            self._flush_later = loop.call_later(LINES_EVERY_S, self._write_lines)

    def _write_lines(self) -> None:
        if self._flush_later is not None:
            self._flush_later.cancel()
            self._flush_later = None
        self._written_at = time.monotonic()
        if self._lines:
            text, self._lines = "".join(self._lines), []
            self._stderr.write(text)
            self._stderr.flush()

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


def print_summary(
    results: Sequence[ExecutionResult], elapsed: float, as_json: bool, full_table: bool = False
) -> None:
    spend = summarize_spend(results)
    if as_json:
        # {"results": [...], "usage": {...}}; each result serialised by pydantic directly, with
        # no round trip through json.loads.
        out = sys.stdout
        out.write('{"results": [\n' if results else '{"results": [')
        out.write(",\n".join(r.model_dump_json(indent=2) for r in results))
        out.write("\n],\n" if results else "],\n")
        out.write(f'"usage": {json.dumps(spend.to_dict(), indent=2)}}}\n')
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
    if spend.total.tasks and (spend.total.input_tokens or spend.total.output_tokens):
        console.print(spend_table(spend))
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    console.print(f"{len(results)} tasks: {parts} in {elapsed:.2f} s")
    if spend.total.unpriced:
        console.print(
            f"{spend.total.unpriced} result(s) have no known price: their cost is not in the "
            "totals (set the agent's price, see docs/COST.md)"
        )


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


def read_previous(path: Path) -> dict[str, ExecutionResult]:
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
            warn(f"{path}:{number}: skipping a line that is not UTF-8 ({where})")
            continue
        try:
            result = ExecutionResult.model_validate_json(line)
        except ValidationError:
            cut = " (cut short)" if offset > len(data) else ""
            warn(f"{path}:{number}: skipping a line that is not a result{cut}")
            continue
        latest[result.task_id] = result
    return latest


def open_for_append(path: Path) -> IO[str]:
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
