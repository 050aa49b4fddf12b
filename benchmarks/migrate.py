"""Section 11: ``taskexec migrate`` on a synthetic codebase, in files per second.

The codebase has the shapes the codemod follows: services that store their executor, chains of
calls through other modules, a thread target, a lambda, and an entry point. Each measurement
reads, analyses and rewrites every file in memory (``--diff`` does the same work and prints).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MODULE = '''\
"""Service {i}: a class that stores its executor, and a chain into module {prev}."""

import threading

from taskexec import AgentTask
from taskexec.sync import TaskExecutor

import {prev_name}


class Service{i}:
    def __init__(self, executor: TaskExecutor) -> None:
        # The executor is shared by every method.
        self.executor = executor

    def ask(self, prompt: str) -> str:
        return self.executor.execute(AgentTask(id="s{i}", prompt=prompt)).output or ""

    def many(self, prompts: list[str]) -> list[str]:
        return [self.ask(p) for p in prompts]

    def summary(self, prompts: list[str]) -> str:
        size = sum(len(self.ask(p)) for p in prompts)
        return f"{{size}} chars, last: {{self.ask(prompts[-1]) if prompts else ''}}"


def chain(executor: TaskExecutor, prompt: str) -> str:
    return {prev_name}.chain(executor, prompt) + Service{i}(executor).ask(prompt)


def in_background(agents) -> None:
    own = TaskExecutor(agents)
    threading.Thread(target=lambda: own.execute(AgentTask(id="b", prompt="bg"))).start()
'''

ROOT_MODULE = """\
from taskexec import AgentTask


def chain(executor, prompt):
    return executor.execute(AgentTask(id="root", prompt=prompt)).output or ""
"""

MAIN = """\
from taskexec import Agent
from taskexec.sync import TaskExecutor

import mod_{last}


def main() -> None:
    executor = TaskExecutor([Agent(name="a", provider="offline")])
    print(mod_{last}.chain(executor, "go"))
    executor.close()


if __name__ == "__main__":
    main()
"""


def write_codebase(folder: Path, files: int) -> None:
    """``files`` Python files: a root module, a chain of service modules, and ``main.py``."""
    (folder / "mod_0.py").write_text(ROOT_MODULE)
    for i in range(1, files - 1):
        (folder / f"mod_{i}.py").write_text(
            MODULE.format(i=i, prev=i - 1, prev_name=f"mod_{i - 1}")
        )
    (folder / "main.py").write_text(MAIN.format(last=files - 2))


def measure(folder: Path) -> tuple[float, int, int]:
    """One migration in memory: seconds, files, files that would change."""
    from taskexec._migrate.migration import plan_migration

    start = time.perf_counter()
    migration = plan_migration([str(folder)])
    elapsed = time.perf_counter() - start
    return elapsed, len(migration.files), len(migration.changed)


def run_all(quick: bool, repeats: int) -> dict[str, Any]:
    """Files per second on a synthetic codebase of 200 files (50 with ``--quick``)."""
    files = 50 if quick else 200
    with tempfile.TemporaryDirectory(prefix="taskexec-migrate-") as name:
        folder = Path(name)
        write_codebase(folder, files)
        measure(folder)  # warm-up: imports libcst and its native parser
        samples = [measure(folder) for _ in range(max(repeats, 3))]
    seconds = [s[0] for s in samples]
    return {
        "files": files,
        "changed": samples[0][2],
        "seconds": seconds,
        "files/s": [files / s for s in seconds],
        "median files/s": files / statistics.median(seconds),
    }


def render(d: dict[str, Any]) -> list[str]:
    """Section 11 of RESULTS.md."""
    rates = d["files/s"]
    return [
        f"## 11. taskexec migrate: a synthetic codebase of {d['files']} files",
        "",
        "Read, analyse (values followed across every file, the call graph, what stays sync) and "
        f"rewrite in memory; {d['changed']} files change. Median of {len(rates)} runs after a "
        "warm-up.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| files per second | {d['median files/s']:.0f} ({min(rates):.0f}-{max(rates):.0f}) |",
        f"| seconds per run | {statistics.median(d['seconds']):.2f} s |",
        "",
        f"Target: >= 50 files/s (**{d['median files/s']:.0f}**).",
        "",
    ]
